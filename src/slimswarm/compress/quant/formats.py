"""Weight formats a mixed-precision plan chooses from ("w4g64": 4-bit codes, groups of 64 inputs; "w8": 8-bit per
output channel), and their exact bytes as stored: packed codes + fp16 scales + uint8 zero points (+ fp32 bias)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import SlimswarmError
from .packing import packed_len

_NAME = re.compile(r"w([234568])(?:g(\d+))?")


@dataclass(frozen=True, order=True)
class WeightFormat:
    bits: int
    group_size: int  # -1: one group per output row

    @classmethod
    def parse(cls, name: str) -> "WeightFormat":
        m = _NAME.fullmatch(name)
        if not m or (m.group(2) is not None and (int(m.group(2)) < 16 or int(m.group(2)) % 16)):
            raise SlimswarmError(f"format {name!r}: use wB or wBgG with B in 2, 3, 4, 5, 6, 8 and G a multiple of 16 "
                                 "(e.g. w4g64, w3g128, w8)")
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else -1)

    @property
    def name(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size > 0 else "")

    def fits(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0

    def nbytes(self, out_features: int, in_features: int, bias: bool = False) -> int:
        """Bytes of a QuantLinear [out, in] in this format, as in its state dict (and so on disk)."""
        groups = 1 if self.group_size == -1 else in_features // self.group_size
        return out_features * (packed_len(in_features, self.bits) + 3 * groups) + (4 * out_features if bias else 0)


def float_bytes(out_features: int, in_features: int, bias: bool = False, element: int = 4) -> int:
    """Bytes of the same linear left in float (fp32 by default)."""
    return element * out_features * (in_features + (1 if bias else 0))
