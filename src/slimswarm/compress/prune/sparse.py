"""``SparseLinear``: a pruned linear stored compactly (N:M values + packed in-group indices, or bitmask/CSR + values),
saved and reloaded by the checkpoint registry.

Bytes per weight at 50% sparsity, fp32 values: dense 4; 2:4 → 2 (values) + 0.125 (2-bit index per kept value);
bitmask → 2 + 0.125; CSR (int16 columns) → 2 + 1. ``from_dense`` picks the smallest that holds the weight exactly.

Speed: on this CPU ``torch.sparse`` CSR matmul at batch-1 decode shapes is 5–10x slower than the dense matmul at 50%
sparsity (measured with 2 threads: [576x576] 14 us dense vs 116 us CSR, [1536x576] 34 vs 314 us, [576x1536] 33 vs
324 us; benchmarks/prune_distill_smollm2.py re-measures it), and there is no 2:4 kernel for CPUs, so ``forward``
decompresses once into a cached dense weight and runs the dense kernel. Disk bytes shrink; decode speed and runtime
RAM do not (the RAM holds the dense copy beside the compact one; ``release()`` drops it, and each forward then
decompresses again).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import SlimswarmError
from ...models.checkpoint import register_module
from ..quant.packing import pack, packed_len, unpack

FORMATS = ("nm", "bitmask", "csr")


def index_bits(m: int) -> int:
    """Bits of one in-group index: 2 for M=4, 3 for M=8, 4 up to M=16 (widths the packer stores exactly)."""
    b = max(2, math.ceil(math.log2(m)))
    if b > 4:
        raise SlimswarmError(f"N:M with M={m}: group indices above 4 bits are not supported (M <= 16)")
    return b


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] → uint8 [out, ceil(in/8)], element j at bit j % 8 of byte j // 8."""
    out, n = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8)).view(out, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8)
    return (m << shifts).sum(-1, dtype=torch.uint8) if m.numel() else torch.zeros(out, 0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def storage_bytes(out: int, inp: int, nnz: int, elem: int, fmt: str, nm: tuple[int, int] | None = None) -> int:
    """Bytes the compact form takes (values + indices); what ``from_dense`` minimises."""
    if fmt == "nm":
        n, m = nm
        kept = inp // m * n
        return out * kept * elem + out * packed_len(kept, index_bits(m))
    if fmt == "bitmask":
        return nnz * elem + out * ((inp + 7) // 8)
    col = 2 if inp <= 32767 else 4
    return nnz * elem + nnz * col + 4 * (out + 1)


def _fits_nm(w: torch.Tensor, n: int, m: int) -> bool:
    out, inp = w.shape
    return inp % m == 0 and bool(((w != 0).view(out, inp // m, m).sum(-1) <= n).all())


@register_module
class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W kept in a compact sparse form; see the module docstring for formats and speed."""

    def __init__(self, in_features: int, out_features: int, fmt: str, nnz: int, n: int = 0, m: int = 0,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if fmt not in FORMATS:
            raise SlimswarmError(f"SparseLinear: unknown format {fmt!r} ({', '.join(FORMATS)})")
        self.in_features, self.out_features, self.fmt, self.nnz, self.n, self.m = in_features, out_features, fmt, nnz, n, m
        self._cache: dict = {}
        if fmt == "nm":
            kept = in_features // m * n
            self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype))
            self.register_buffer("indices", torch.zeros(out_features, packed_len(kept, index_bits(m)), dtype=torch.uint8))
        elif fmt == "bitmask":
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
            self.register_buffer("mask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8))
        else:
            col = torch.int16 if in_features <= 32767 else torch.int32
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
            self.register_buffer("crow", torch.zeros(out_features + 1, dtype=torch.int32))
            self.register_buffer("col", torch.zeros(nnz, dtype=col))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    # ------------------------------------------------------------------ building and storing
    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, pattern: tuple[int, int] | None = None,
                   fmt: str = "auto") -> "SparseLinear":
        """Compress a pruned weight [out, in] exactly. ``pattern`` (N, M) allows the N:M form; "auto" picks the
        smallest form that holds this weight."""
        w = weight.detach()
        out, inp = w.shape
        nnz = int((w != 0).sum())
        elem = w.element_size()
        if fmt == "auto":
            options = ["bitmask", "csr"]
            if pattern is not None and _fits_nm(w, *pattern):
                options.insert(0, "nm")
            fmt = min(options, key=lambda f: storage_bytes(out, inp, nnz, elem, f, pattern))
        if fmt == "nm" and (pattern is None or not _fits_nm(w, *pattern)):
            raise SlimswarmError(f"SparseLinear: weight [{out}, {inp}] is not {pattern} sparse")
        n, m = pattern if fmt == "nm" else (0, 0)
        mod = cls(inp, out, fmt, nnz, n, m, bias is not None, w.dtype)
        if fmt == "nm":
            g = w.reshape(out, inp // m, m)
            # Kept slots: the n largest |w| of each group (zeros fill up groups with fewer than n nonzeros).
            idx = torch.topk(g.abs().float(), n, dim=-1, sorted=False).indices.sort(-1).values
            mod.values.copy_(torch.gather(g, -1, idx).reshape(out, -1))
            mod.indices.copy_(pack(idx.reshape(out, -1).to(torch.uint8), index_bits(m)))
        elif fmt == "bitmask":
            keep = w != 0
            mod.values.copy_(w[keep])
            mod.mask.copy_(pack_bits(keep))
        else:
            rc = (w != 0).nonzero()  # row-major order: rows ascending, columns ascending within a row
            mod.values.copy_(w[rc[:, 0], rc[:, 1]])
            mod.crow[1:] = torch.cumsum(torch.bincount(rc[:, 0], minlength=out), 0).to(torch.int32)
            mod.col.copy_(rc[:, 1].to(mod.col.dtype))
        if bias is not None:
            mod.bias.data = bias.detach().clone().to(w.dtype)
        return mod

    def checkpoint_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "fmt": self.fmt, "nnz": self.nnz,
                "n": self.n, "m": self.m, "bias": self.bias is not None, "dtype": str(self.values.dtype).split(".")[1]}

    @classmethod
    def from_spec(cls, spec: dict) -> "SparseLinear":
        spec = dict(spec)
        spec["dtype"] = getattr(torch, spec.get("dtype", "float32"))
        return cls(**spec)

    def check_loaded(self, source: str) -> None:
        """After loading from a file: the indices must stay inside the matrix (a corrupt CSR index would otherwise
        write outside the dense weight), and the value count must match the pattern."""
        if self.fmt == "csr":
            crow = self.crow.long()
            ok = (int(crow[0]) == 0 and int(crow[-1]) == self.nnz and bool((torch.diff(crow) >= 0).all())
                  and (self.nnz == 0 or 0 <= int(self.col.min()) and int(self.col.max()) < self.in_features))
            if not ok:
                raise SlimswarmError(f"{source}: CSR row pointers or column indices out of range")
        elif self.fmt == "bitmask":
            kept = int(unpack_bits(self.mask, self.in_features).sum())
            if kept != self.nnz:
                raise SlimswarmError(f"{source}: bitmask keeps {kept} values, the layer stores {self.nnz}")

    # ------------------------------------------------------------------ dense view and forward
    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The exact dense weight [out, in]."""
        out, inp, dev = self.out_features, self.in_features, self.values.device
        if self.fmt == "nm":
            kept = inp // self.m * self.n
            idx = unpack(self.indices, index_bits(self.m), kept).long().view(out, inp // self.m, self.n)
            w = torch.zeros(out, inp // self.m, self.m, dtype=self.values.dtype, device=dev)
            return w.scatter_(-1, idx, self.values.view(out, -1, self.n)).view(out, inp)
        if self.fmt == "bitmask":
            w = torch.zeros(out, inp, dtype=self.values.dtype, device=dev)
            w[unpack_bits(self.mask, inp)] = self.values
            return w
        rows = torch.repeat_interleave(torch.arange(out, device=dev), torch.diff(self.crow.long()))
        w = torch.zeros(out, inp, dtype=self.values.dtype, device=dev)
        w[rows, self.col.long()] = self.values
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.to_dense()

    def compact_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def release(self) -> None:
        """Drop the cached dense weight (saves its RAM; the next forward rebuilds it)."""
        self._cache = {}

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ...models.llama import Linear

        lin = self._cache.get("dense")
        if lin is None:
            lin = Linear(self.in_features, self.out_features, bias=False, device="meta")
            lin.weight = nn.Parameter(self.to_dense(), requires_grad=False)
            self._cache["dense"] = lin
        y = lin(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        pat = f", {self.n}:{self.m}" if self.fmt == "nm" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.fmt}{pat}, density={density:.3f}"
