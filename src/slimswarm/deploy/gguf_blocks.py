"""deploy/: our packed integer groups → GGML block bytes (Q4_0, Q4_1, Q8_0) with the same codes, or a re-quantization.

GGML blocks hold 32 weights of one row (ggml-common.h):

* Q4_0 (18 bytes): fp16 ``d``, then 16 bytes where byte ``j`` holds code ``j`` (low nibble) and code ``j + 16``
  (high nibble); ``w = (q - 8) * d``. Our symmetric int4 (zero point 8, fp16 scale) is this exactly.
* Q4_1 (20 bytes): fp16 ``d``, fp16 ``m``, the same nibbles; ``w = q * d + m``. Ours is ``w = (q - z) * s``, so
  ``d = s`` and ``m = -z * s`` rounded to fp16: the codes and ``d`` are exact, ``m`` carries one fp16 rounding.
* Q8_0 (34 bytes): fp16 ``d``, 32 int8 ``q``; ``w = q * d``. Our symmetric int8 (zero point 128) is this exactly.

Anything else goes through ``requantize`` (gguf-py's reference quantizers) from the exact de-quantized weight.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _blocks(codes: torch.Tensor) -> np.ndarray:
    """uint8 codes [rows, n] (n % 32 == 0) → [rows, n / 32, 32]."""
    rows, n = codes.shape
    if n % BLOCK:
        raise ValueError(f"row length {n} is not a multiple of {BLOCK}")
    return codes.to(torch.uint8).numpy().reshape(rows, n // BLOCK, BLOCK)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes 0..15 → [..., 16] bytes: code j low, code j+16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """fp16 values [rows, G] → their little-endian bytes [rows, G, 2]."""
    return x.to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def encode_q4_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Symmetric int4, group 32 (zero point 8) → Q4_0 bytes [rows, n / 32 * 18]."""
    q = _blocks(codes)
    out = np.concatenate([_half_bytes(scales), _nibbles(q)], axis=-1)
    return out.reshape(q.shape[0], -1)


def q4_1_offsets(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``m = -z * s`` in fp16 (the only rounding in an int4 → Q4_1 export); -z*s is computed exactly in fp32."""
    return (-(zeros.float() * scales.float())).to(torch.float16)


def encode_q4_1(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> np.ndarray:
    """Asymmetric int4, group 32 → Q4_1 bytes [rows, n / 32 * 20] (d = s, m = fp16(-z s), same codes)."""
    q = _blocks(codes)
    out = np.concatenate([_half_bytes(scales), _half_bytes(q4_1_offsets(scales, zeros)), _nibbles(q)], axis=-1)
    return out.reshape(q.shape[0], -1)


def encode_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Symmetric int8, group 32 (zero point 128) → Q8_0 bytes [rows, n / 32 * 34]."""
    q = (_blocks(codes).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    out = np.concatenate([_half_bytes(scales), q], axis=-1)
    return out.reshape(q.shape[0], -1)


def exact_type(bits: int, group_size: int, zeros: torch.Tensor) -> str | None:
    """The GGML type that holds these groups with the same codes, or None (then re-quantize)."""
    if group_size != BLOCK:
        return None
    if bits == 4:
        return "Q4_0" if bool((zeros == 8).all()) else "Q4_1"
    if bits == 8 and bool((zeros == 128).all()):
        return "Q8_0"
    return None


def encode_exact(kind: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> np.ndarray:
    if kind == "Q4_0":
        return encode_q4_0(codes, scales)
    if kind == "Q4_1":
        return encode_q4_1(codes, scales, zeros)
    if kind == "Q8_0":
        return encode_q8_0(codes, scales)
    raise ValueError(f"no exact encoder for {kind}")


FLOAT_TYPES = ("F32", "F16", "BF16")
REQUANT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def requantize(w: torch.Tensor, kind: str) -> np.ndarray:
    """A float weight [rows, n] → GGML bytes of ``kind`` (F32/F16 as numpy arrays, the rest via gguf-py)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = w.detach().float().contiguous().numpy()
    if kind == "F32":
        return a
    if kind == "F16":
        return a.astype(np.float16)
    return quantize(a, GGMLQuantizationType[kind])


def nearest_type(bits: int) -> str:
    """Where no GGML type has our codes: Q8_0 for 8 bits, Q5_1 / Q8_0 for 5 / 6 bits, else Q4_1 (at least our bits,
    asymmetric like min-max)."""
    return {8: "Q8_0", 6: "Q8_0", 5: "Q5_1"}.get(bits, "Q4_1")
