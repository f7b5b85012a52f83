"""Bit packing of integer codes along the last dimension: 8 (as is), 4 (two a byte), 3 (eight in 3 bytes), 2 (four a byte)."""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take in a row."""
    if bits == 3:
        return (n + 7) // 8 * 3
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2**bits → uint8 [..., packed_len(n, bits)], low bits first."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    per = {2: 4, 4: 2, 3: 8}[bits]
    n = c.shape[-1]
    pad = (-n) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
    word = (c << shifts).sum(-1)  # per codes in one integer (8, 16 or 24 bits)
    nbytes = per * bits // 8
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], -1).to(torch.uint8)
    return out.reshape(*c.shape[:-2], -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., packed_len(n, bits)] → uint8 codes [..., n]."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if bits == 8:
        return packed[..., :n]
    per = {2: 4, 4: 2, 3: 8}[bits]
    nbytes = per * bits // 8
    p = packed.view(*packed.shape[:-1], -1, nbytes).to(torch.int32)
    word = sum(p[..., i] << (8 * i) for i in range(nbytes))
    shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
