"""Bit packing of integer codes along the last dimension: 8 (as is), 4 (two a byte), 3/5/6 (eight in 3/5/6 bytes),
2 (four a byte).

Layout (little-endian within each unit, the first code in the lowest bits):

* 4 bits: byte ``i`` holds codes ``2i`` (low nibble) and ``2i+1`` (high nibble).
* 2 bits: byte ``i`` holds codes ``4i .. 4i+3`` at bit offsets 0, 2, 4, 6.
* 3 bits: each group of 8 codes is one 24-bit little-endian word (3 bytes), code ``j`` at bit ``3j``.
  Rows are zero-padded up to a multiple of 8 codes; ``unpack`` takes ``n`` to drop the padding.
* 5 and 6 bits: the same, each group of 8 codes one 40/48-bit little-endian word (5/6 bytes), code ``j`` at bit
  ``bits*j``.
* 8 bits: the codes themselves (uint8).

A row of ``n`` codes takes ``packed_len(n, bits)`` bytes: n*bits/8, with 3/5/6 bits rounded up to whole groups of 8.
All functions are pure (no state, no in-place edits of their inputs) and work on any leading dimensions.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 5, 6, 8)
_WORD = (3, 5, 6)  # packed as words of 8 codes


def _check(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take in a row."""
    _check(bits)
    if bits in _WORD:
        return (n + 7) // 8 * bits
    return (n * bits + 7) // 8


def _pad_last(c: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-c.shape[-1]) % multiple
    return torch.nn.functional.pad(c, (0, pad)) if pad else c


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (values 0..15) → uint8 [..., ceil(n/2)], low nibble first (odd n is zero-padded)."""
    c = _pad_last(codes.to(torch.uint8), 2)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """uint8 [..., m] → uint8 codes [..., n] (default n = 2m)."""
    p = packed.to(torch.uint8)
    c = torch.stack((p & 0xF, p >> 4), -1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return c if n is None or n == c.shape[-1] else c[..., :n].contiguous()


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (values 0..3) → uint8 [..., ceil(n/4)], code 4i+j at bits 2j of byte i."""
    c = _pad_last(codes.to(torch.uint8), 4)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()


def unpack_int2(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """uint8 [..., m] → uint8 codes [..., n] (default n = 4m)."""
    p = packed.to(torch.uint8)
    c = torch.stack((p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6), -1).reshape(*p.shape[:-1], 4 * p.shape[-1])
    return c if n is None or n == c.shape[-1] else c[..., :n].contiguous()


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (values 0..7) → uint8 [..., ceil(n/8)*3]: 8 codes a 24-bit little-endian word."""
    c = _pad_last(codes.to(torch.uint8), 8)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 8, 8).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=c.device) * 3
    word = (c << shifts).sum(-1)  # 24 bits; the shifted codes do not overlap, so sum == bitwise or
    out = torch.stack((word & 0xFF, (word >> 8) & 0xFF, word >> 16), -1).to(torch.uint8)
    return out.reshape(*c.shape[:-2], 3 * c.shape[-2])


def unpack_int3(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """uint8 [..., 3k] → uint8 codes [..., n] (default n = 8k)."""
    if packed.shape[-1] % 3:
        raise ValueError(f"3-bit rows are a multiple of 3 bytes, got {packed.shape[-1]}")
    p = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3).to(torch.int32)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    shifts = torch.arange(8, dtype=torch.int32, device=p.device) * 3
    c = ((word[..., None] >> shifts) & 7).to(torch.uint8).reshape(*packed.shape[:-1], 8 * word.shape[-1])
    return c if n is None or n == c.shape[-1] else c[..., :n].contiguous()


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (values < 2^bits) → uint8 [..., ceil(n/8)*bits]: 8 codes a (8*bits)-bit little-endian word."""
    c = _pad_last(codes.to(torch.uint8), 8)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 8, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(-1)  # the shifted codes do not overlap, so sum == bitwise or (at most 48 bits)
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], -1).to(torch.uint8)
    return out.reshape(*c.shape[:-2], bits * c.shape[-2])


def unpack_words(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_words``: uint8 [..., bits*k] → uint8 codes [..., n] (default n = 8k)."""
    if packed.shape[-1] % bits:
        raise ValueError(f"{bits}-bit rows are a multiple of {bits} bytes, got {packed.shape[-1]}")
    p = packed.reshape(*packed.shape[:-1], packed.shape[-1] // bits, bits).to(torch.int64)
    word = sum(p[..., k] << (8 * k) for k in range(bits))
    shifts = torch.arange(8, dtype=torch.int64, device=p.device) * bits
    c = ((word[..., None] >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*packed.shape[:-1], 8 * word.shape[-1])
    return c if n is None or n == c.shape[-1] else c[..., :n].contiguous()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2**bits → uint8 [..., packed_len(n, bits)], low bits first."""
    _check(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits in (5, 6):
        return pack_words(codes, bits)
    return {2: pack_int2, 3: pack_int3, 4: pack_int4}[bits](codes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., packed_len(n, bits)] → uint8 codes [..., n]."""
    _check(bits)
    if bits == 8:
        return packed[..., :n]
    if bits in (5, 6):
        return unpack_words(packed, bits, n)
    return {2: unpack_int2, 3: unpack_int3, 4: unpack_int4}[bits](packed, n)
