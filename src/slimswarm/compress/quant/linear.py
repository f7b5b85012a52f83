"""QuantLinear: packed integer weights + fp16 scales + uint8 zero points, with a per-call choice of CPU kernel.

Stored state (the persistent state dict, what safetensors saves): ``qweight`` uint8 [out, packed_len(in, bits)]
(row-major, codes packed along the input dimension, see ``packing``), ``scales`` fp16 [out, G], ``zeros`` uint8
[out, G], optional ``bias``. ``w = (q - z) * s`` for each group of ``group_size`` input columns (per-channel:
one group per row). Symmetric quantization is the special case ``z = 2^(b-1)``.

Why fp16 scales: half the bytes of fp32 (at group 32 that is 0.5 instead of 1 extra bit a weight), the usual
GPTQ/AWQ/GGUF storage, and the product ``(q - z) * s`` of a <= 9-bit integer and an 11-bit-mantissa scale is
exact in fp32, so ``dequantize()`` is exact and every fp32 kernel below starts from the exact weight.
Why uint8 integer zero points: they are what min-max and GPTQ produce, they are exact (a float zero point would
be rounded), and one byte per group is cheap.

Kernels (``forward`` picks with ``kernel_for``; every one is tested against ``F.linear(x, dequantize(), bias)``;
timings in benchmarks/results/quant_kernels.md):

* ``"tinygemm"`` bf16 input, 1..8 rows, 2/3/4 bits: ``torch._weight_int4pack_mm_for_cpu`` (AVX512 in torch 2.13)
                 on a cached copy in its tile layout. It computes w = (q - 8) * s + zf with zf = (8 - z) * s and
                 wants both in bf16, so scales and zf are rounded to bf16 (relative 2^-9, the size of rounding
                 the weight itself to bf16, which bf16 F.linear also does). The fastest path we measured: 12-18x
                 fp32 F.linear on the lm_head. Needs out % 16 == 0 and a group that 32/64/128/256 divides.
* ``"c"``        fp32 input (or bf16 where tinygemm does not apply), 1..8 rows, 4 and 8 bits (2 and 3 bits
                 through a 4-bit copy): our C kernel (``slimswarm.kernels``) reads the packed codes once,
                 de-quantizes in registers and accumulates in fp32 with x in fp32, so it is exact up to fp32
                 rounding. Faster than fp32 F.linear on the lm_head (about 2x at 4 bits, 4x at 8 bits) but
                 slower on the 576-wide layers: use bf16 activations for speed.
* ``"dequant"``  everything else (prefill, no kernel applies): de-quantize exactly, in row chunks of
                 <= ``DEQUANT_CHUNK`` elements written to a shared scratch buffer (the lm_head never has a full
                 float copy), and call ``F.linear`` in the input dtype. Exact; roughly the speed of the float
                 GEMM of that dtype plus the de-quantization (slower than bf16 F.linear, faster than fp32).
* ``"fbgemm"``   opt-in only (``act_quant=True``): fbgemm int8 dynamic quantization. It quantizes the
                 *activations* to uint8 per call, so it is a different model, not a free speedup; per-channel only.

2 and 3 bits: the fast kernels need 4-bit codes, so ``prepare`` keeps a non-persistent 4-bit copy of the codes
(0.5 byte a weight in RAM on top of the 0.25/0.375 stored). 5 and 6 bits (a mixed-precision plan's step between
4 and 8, as llama.cpp's Q5/Q6 k-quants): the C kernel and the native step read an 8-bit copy (1 byte a weight in
RAM on top of the 0.625/0.75 stored). Set ``low_memory=True`` to refuse either copy and
de-quantize per call instead (exact, much slower at decode). Caches are never saved and are rebuilt after
``load_state_dict`` / ``.to()``.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from .packing import pack, pack_int4, packed_len, unpack
from .rtn import check_grouping, dequantize

KERNELS = ("c", "tinygemm", "dequant", "fbgemm")
DEQUANT_CHUNK = 1 << 22  # elements of float weight the "dequant" path hands to one F.linear call
DEQUANT_PIECE = 1 << 18  # elements de-quantized per torch op (keeps the temporaries about 1 MB)
_TINY_GROUPS = (256, 128, 64, 32)  # group sizes torch._weight_int4pack_mm_for_cpu accepts


_WS = threading.local()


def _workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A scratch buffer shared by all QuantLinear layers of this thread (grows, never shrinks). The dequant path
    writes its temporary weight here: fresh multi-MB allocations each call cost page faults, which on our VM
    were sometimes slower than the matmul itself."""
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    if torch.is_grad_enabled():
        # autograd may keep this tensor for backward (QLoRA-style training on a quantized base): never reuse it
        return torch.empty(numel, dtype=dtype)
    t = bufs.get((name, dtype))
    if t is None or t.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            t = bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return t[:numel]


def _tiny_group(group_size: int) -> int | None:
    """A group size the int4pack kernel accepts that divides ours (scales are repeated to fill it)."""
    return next((g for g in _TINY_GROUPS if group_size % g == 0), None)


class QuantLinear(nn.Module):
    _restore = None  # (instances set their own in __init__; this covers modules unpickled from older versions)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device=None, *, act_quant: bool = False, low_memory: bool = False):
        super().__init__()
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_grouping(in_features, group_size)
        self._cache: dict = {}  # kernel-specific copies and dispatch choices, built lazily, never in the state dict
        self._restore = None  # set while the packed codes are released (``release_codes``): rebuilds them
        self._act_quant, self._low_memory = act_quant, low_memory
        g = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @property
    def act_quant(self) -> bool:
        """Opt-in: fbgemm dynamic int8 (quantizes activations; a different model). Per-channel weights only."""
        return self._act_quant

    @act_quant.setter
    def act_quant(self, v: bool) -> None:
        self._act_quant, self._cache = bool(v), {}

    @property
    def low_memory(self) -> bool:
        """2/3 (5/6) bits: never keep a 4-bit (8-bit) copy of the codes (de-quantize per call instead)."""
        return self._low_memory

    @low_memory.setter
    def low_memory(self, v: bool) -> None:
        self._low_memory, self._cache = bool(v), {}

    # ------------------------------------------------------------------ construction and stored form
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int | None = None, bias: torch.Tensor | None = None, **kw) -> "QuantLinear":
        """codes int [out, in] in [0, 2^bits - 1], scales [out, G], zeros [out, G] (integers in the code range).

        ``group_size`` None means ``in // G``. (A tensor in its place is taken as ``bias``, the older call form.)"""
        if isinstance(group_size, torch.Tensor):
            group_size, bias = None, group_size
        out, inp = codes.shape
        n_groups = scales.shape[1]
        gs = inp // n_groups if group_size in (None, 0, -1) else group_size
        if inp // gs != n_groups or scales.shape != zeros.shape or scales.shape[0] != out:
            raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} / zeros "
                             f"{tuple(zeros.shape)} do not match group_size {group_size}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
            raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
        zeros = torch.as_tensor(zeros)
        if zeros.numel() and (float(zeros.min()) < 0 or float(zeros.max()) > 255):
            raise ValueError("zero points must be integers in [0, 255] (stored as uint8)")
        m = cls(inp, out, bits, gs, bias is not None, **kw)
        m.qweight = pack(codes, bits)
        m.scales = scales.to(torch.float16).contiguous()
        m.zeros = zeros.round().to(torch.uint8).contiguous()
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def release_codes(self, restore) -> int:
        """Free the stored packed codes while another holder keeps the same codes in its own layout (the native
        decode step's repacked copy): ``restore()`` rebuilds ``qweight`` on the first use that needs it (the Python
        kernels, ``codes()``, saving, a device move). Returns the bytes freed. The state dict is unaffected: it
        always holds the codes."""
        q = self._q()
        self._restore = restore
        # a one-byte placeholder of the stored shape (stride 0): shapes and the size counts (evaluate/size.py, the
        # planner) still see the layer's stored codes; every reader of the values goes through _q()
        self.qweight = torch.zeros(1, dtype=torch.uint8, device=q.device).expand(q.shape)
        return q.numel()

    @property
    def codes_released(self) -> bool:
        return self._restore is not None

    def _q(self) -> torch.Tensor:
        """``qweight``, rebuilt first if it was released."""
        r = self._restore
        if r is not None:
            self.qweight = r()
            self._restore = None
        return self.qweight

    def packed_codes(self) -> torch.Tensor:
        """The stored packed codes [out, packed_len] (``qweight``; rebuilt if released)."""
        return self._q()

    def codes(self) -> torch.Tensor:
        return unpack(self._q(), self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact float weight [out, in] (exact in fp32; ``dtype`` rounds it once)."""
        return dequantize(self.codes(), self.scales, self.zeros).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized float copy (for code that reads ``.weight``); costs memory, not used by forward."""
        return self.dequantize()

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not re-round the stored fp16 scales; device moves still apply.
        self._q()
        keep = self.scales
        super()._apply(fn, recurse)
        self.scales = keep.to(self.scales.device)
        self._cache = {}
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._q()  # (the shape check reads the buffer)
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._restore is not None:  # released: the codes for this state dict only, not kept
            destination[prefix + "qweight"] = self._restore()

    def __getstate__(self):
        self._q()  # (a pickled module carries its codes, not the closure that rebuilds them)
        return self.__dict__.copy()

    # ------------------------------------------------------------------ kernel-specific copies
    def _fp32_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 scales, zero points and -z*s [out, G] (small: G floats a row)."""
        if "fp32" not in self._cache:
            s = self.scales.float().contiguous()
            z = self.zeros.float().contiguous()
            self._cache["fp32"] = (s, z, (-z * s).contiguous())
        return self._cache["fp32"]

    def _codes4(self) -> torch.Tensor:
        """Codes packed 4 bits each (the stored ones at 4 bits; a cached copy for 2/3 bits)."""
        if self.bits == 4:
            return self._q()
        if "codes4" not in self._cache:
            self._cache["codes4"] = pack_int4(self.codes())
        return self._cache["codes4"]

    def _codes8(self) -> torch.Tensor:
        """Codes one byte each (the stored ones at 8 bits; a cached copy for 5/6 bits)."""
        if self.bits == 8:
            return self._q()
        if "codes8" not in self._cache:
            self._cache["codes8"] = self.codes().contiguous()
        return self._cache["codes8"]

    def _kernel_codes(self) -> tuple[torch.Tensor, int]:
        """(codes, 4 or 8): what the C kernel reads, the stored codes or a 4/8-bit copy."""
        return (self._codes8(), 8) if self.bits >= 5 else (self._codes4(), 4)

    def _tiny(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if "tiny" not in self._cache:
            g = _tiny_group(self.group_size)
            codes = unpack(self._codes4(), 4, self.in_features).to(torch.int32)
            w = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            s, z, _ = self._fp32_params()
            zf = (8.0 - z) * s  # exact in fp32; rounded once to bf16 below
            rep = self.group_size // g
            sz = torch.stack((s, zf), -1).repeat_interleave(rep, dim=1)  # [out, in/g, 2]
            self._cache["tiny"] = (w, sz.transpose(0, 1).contiguous().to(torch.bfloat16), g)
        return self._cache["tiny"]

    def _fbgemm(self):
        if "fbgemm" not in self._cache:
            q = (self.codes().to(torch.int16) - 128).to(torch.int8)
            s = self.scales.double().view(-1)
            z = self.zeros.long().view(-1) - 128
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wq = torch._make_per_channel_quantized_tensor(q, s, z, 0)
            b = None if self.bias is None else self.bias.detach().float()
            self._cache["fbgemm"] = torch.ops.quantized.linear_prepack(wq, b)
        return self._cache["fbgemm"]

    def prepare(self) -> "QuantLinear":
        """Build the caches the decode kernels will use now, instead of on the first call."""
        for dtype in (torch.float32, torch.bfloat16):
            k = self.kernel_for(1, dtype)
            if k == "c":
                self._fp32_params()
                self._kernel_codes()
            elif k == "tinygemm":
                self._tiny()
            elif k == "fbgemm":
                self._fbgemm()
        return self

    def native_weight(self) -> dict | str:
        """What the native decode step (kernels/native.py) reads: 8-bit or 4-bit codes with fp32 scale/zero [out, G]
        (2/3 bits through the 4-bit copy), or the reason it cannot read this layer."""
        if self.act_quant:
            return "act_quant layer (fbgemm int8 activations)"
        if self.bits in (2, 3, 5, 6) and self.low_memory:
            return f"{self.bits}-bit low_memory layer (no {4 if self.bits < 4 else 8}-bit copy of the codes)"
        if self.qweight.device.type != "cpu":
            return f"weights on {self.qweight.device}"
        s, z, _ = self._fp32_params()
        codes, bits = self._kernel_codes()
        return {"fmt": f"q{bits}", "codes": codes,
                "scale": s, "zero": z, "group_size": self.group_size,
                "bias": None if self.bias is None else self.bias.detach().float().contiguous()}

    # ------------------------------------------------------------------ dispatch
    def supports(self, kernel: str, m: int, dtype: torch.dtype) -> bool:
        cpu = self.qweight.device.type == "cpu"
        if kernel == "dequant":
            return True
        if kernel == "c":
            return (cpu and 0 < m <= kernels.MAX_M and self.group_size % 16 == 0 and self.in_features % 2 == 0
                    and (self.bits in (4, 8) or not self.low_memory) and kernels.available())
        if kernel == "tinygemm":
            return (cpu and m > 0 and dtype == torch.bfloat16 and self.bits in (2, 3, 4)
                    and (self.bits == 4 or not self.low_memory) and _tiny_group(self.group_size) is not None
                    and self.out_features % 16 == 0)
        if kernel == "fbgemm":
            return (cpu and m > 0 and self.group_size == self.in_features
                    and "fbgemm" in torch.backends.quantized.supported_engines)
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")

    def kernel_for(self, m: int, dtype: torch.dtype) -> str:
        """The path ``forward`` takes for ``m`` rows of ``dtype`` (see the module docstring for why)."""
        if self.act_quant and self.supports("fbgemm", m, dtype):
            return "fbgemm"
        if 0 < m <= kernels.MAX_M:
            # measured (benchmarks/quant_kernels.md): torch's int4pack kernel beats our C kernel on bf16 input
            for k in (("tinygemm", "c") if dtype == torch.bfloat16 else ("c",)):
                if self.supports(k, m, dtype):
                    return k
        return "dequant"

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Exact float rows r0:r1 of the weight in ``dtype``, built in cache-sized pieces (fp32 math, one rounding)."""
        s, _, zs = self._fp32_params()
        k, g = self.in_features, s.shape[1]
        if out is None:
            out = torch.empty(r1 - r0, k, dtype=dtype, device=self.qweight.device)
        step = max(1, DEQUANT_PIECE // k)
        tmp = None if dtype == torch.float32 else _workspace("piece", min(step, r1 - r0) * k, torch.float32)
        for r in range(r0, r1, step):
            e = min(r + step, r1)
            q = unpack(self._q()[r:e], self.bits, k).view(e - r, g, -1)
            w = (out[r - r0:e - r0] if tmp is None else tmp[:(e - r) * k]).view(e - r, g, -1)
            w.copy_(q).mul_(s[r:e, :, None]).add_(zs[r:e, :, None])  # q*s, -z*s exact in fp32, so is the sum
            if dtype != torch.float32:
                out[r - r0:e - r0].copy_(w.view(e - r, k))
        return out

    def forward(self, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if kernel is None:
            key = (min(m, kernels.MAX_M + 1), x.dtype)  # the choice only depends on m through these buckets
            k = self._cache.get(key)
            if k is None:
                k = self._cache[key] = self.kernel_for(m, x.dtype)
        elif not self.supports(kernel, m, x.dtype):
            raise ValueError(f"kernel {kernel!r} does not support m={m}, {x.dtype}, bits={self.bits}, "
                             f"group_size={self.group_size} here")
        else:
            k = kernel
        x2 = x.reshape(m, self.in_features)
        if k == "c":
            s, z, _ = self._fp32_params()
            q, bits = self._kernel_codes()
            b = None if self.bias is None else self.bias.float().contiguous()
            y = kernels.linear_quant(x2.float().contiguous(), q, s, z, bits, self.group_size, b).to(x.dtype)
        elif k == "tinygemm":
            w, sz, g = self._tiny()
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), w, g, sz)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        elif k == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._fbgemm(), True).to(x.dtype)
        else:
            b = None if self.bias is None else self.bias.to(x.dtype)
            rows = min(self.out_features, max(16, DEQUANT_CHUNK // max(1, self.in_features)))
            ws = _workspace("weight", rows * self.in_features, x.dtype)
            parts = []
            for r in range(0, self.out_features, rows):
                e = min(r + rows, self.out_features)
                if r and torch.is_grad_enabled():  # autograd keeps each chunk's weight for backward: no reuse
                    ws = _workspace("weight", rows * self.in_features, x.dtype)
                w = self._dequant_rows(r, e, x.dtype, ws[:(e - r) * self.in_features].view(e - r, -1))
                parts.append(F.linear(x2, w, None if b is None else b[r:e]))
            y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
                + (", act_quant=True" if self.act_quant else "") + (", low_memory=True" if self.low_memory else ""))


class QuantEmbedding(nn.Module):
    """Embedding lookup over a QuantLinear's rows. Tied input/output embeddings (``shared``) store the table once:
    the LM head owns it and this module only refers to it."""

    def __init__(self, table: QuantLinear, shared: bool):
        super().__init__()
        self.shared = shared
        if shared:
            self._ref = [table]  # a list, so the head's buffers are not registered (or saved) twice
        else:
            self.table = table

    @property
    def rows(self) -> QuantLinear:
        return self._ref[0] if self.shared else self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.rows
        flat = ids.reshape(-1)
        q = unpack(h.packed_codes()[flat], h.bits, h.in_features).float()
        g = h.scales.shape[1]
        w = (q.view(len(flat), g, -1) - h.zeros[flat].float()[..., None]) * h.scales[flat].float()[..., None]
        return w.view(*ids.shape, h.in_features)
