"""QuantLinear: packed integer weights + fp16 scales + uint8 zero points, run by a dequantize-in-kernel path.

Stored state (the safetensors checkpoint): ``qweight`` uint8 [out, packed_len(in, bits)], ``scales`` fp16
[out, G], ``zeros`` uint8 [out, G], optional ``bias``. w = (q - z) * s for each group of ``group_size``
input columns. At run time, batches of up to 8 rows (decode) go to our C kernel, which reads the packed
codes once and never materialises a float weight (int4, int8). Other shapes (prefill, 2/3 bits, no
compiler) de-quantize to a temporary float weight and call ``F.linear``: correct, but not faster than
float, and the report says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from .packing import pack, packed_len, unpack
from .rtn import check_grouping, dequantize


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_grouping(in_features, group_size)
        g = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._kernel_args: tuple | None = None  # fp32 scales/zeros for the C kernel, built on first use

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None) -> "QuantLinear":
        out, inp = codes.shape
        m = cls(inp, out, bits, inp // scales.shape[1], bias is not None)
        m.qweight = pack(codes, bits)
        m.scales = scales.to(torch.float16).contiguous()
        m.zeros = zeros.to(torch.uint8).contiguous()
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized float copy (for code that reads ``.weight``); costs memory, not used by forward."""
        return self.dequantize()

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not re-round the stored fp16 scales; device moves still apply.
        keep = self.scales
        super()._apply(fn, recurse)
        self.scales = keep.to(self.scales.device)
        self._kernel_args = None
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_args = None
        super()._load_from_state_dict(*args, **kwargs)

    def _kernel_ok(self, x: torch.Tensor, m: int) -> bool:
        return (0 < m <= kernels.MAX_M and self.bits in (4, 8) and self.group_size % 16 == 0
                and x.device.type == "cpu" and kernels.available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // x.shape[-1] if x.numel() else 0
        if self._kernel_ok(x, m):
            if self._kernel_args is None:
                s = self.scales.float().contiguous()
                self._kernel_args = (s, self.zeros.float().contiguous(),
                                     None if self.bias is None else self.bias.float().contiguous())
            s, z, b = self._kernel_args
            y = kernels.linear_quant(x.reshape(m, -1).float().contiguous(), self.qweight, s, z, self.bits,
                                     self.group_size, b)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


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
        q = unpack(h.qweight[flat], h.bits, h.in_features).float()
        g = h.scales.shape[1]
        w = (q.view(len(flat), g, -1) - h.zeros[flat].float()[..., None]) * h.scales[flat].float()[..., None]
        return w.view(*ids.shape, h.in_features)
