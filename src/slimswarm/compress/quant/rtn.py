"""Round-to-nearest min-max quantization: Q(w) = round((w - min) / (max - min) * (2^b - 1)), per tensor, channel or group."""

from __future__ import annotations

import torch

from ...errors import SlimswarmError


def check_grouping(in_features: int, group_size: int, name: str = "layer") -> int:
    """The effective group size (per-channel: the whole row); error when it does not divide the width."""
    if group_size in (0, -1):
        return in_features
    if group_size < 1 or in_features % group_size:
        raise SlimswarmError(f"{name}: group_size {group_size} does not divide in_features {in_features}")
    return group_size


def minmax_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``w`` [rows, group] (each row one group)."""
    qmax = 2**bits - 1
    w = w.float()
    if symmetric:
        amax = w.abs().amax(-1).clamp_min(1e-8)
        half = 2 ** (bits - 1)
        # Codes in [0, 2^b-1] centred at z = 2^(b-1): w = (q - z) * s, +-amax map to z +- (2^(b-1) - 1).
        scale = amax / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = w.amin(-1).clamp(max=0.0)
        hi = w.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` [rows, group] given per-row scale and zero point."""
    return torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16, per_tensor: bool = False, search: bool = False,
                 importance: torch.Tensor | None = None):
    """Weight [out, in] → (codes uint8 [out, in], scales [out, G], zeros uint8 [out, G]).

    Scales are rounded to ``scale_dtype`` before the codes are computed, so the stored (fp16) scales
    are exactly the ones the codes were made for. ``per_tensor``: one scale and zero point for the whole
    weight (stored repeated per row, so every kernel runs it; the overhead is 3 bytes a row). ``search``: each group's
    range is searched for the least squared error, weighted per input column by ``importance`` [in] when given
    (``search.search_params``)."""
    out, inp = w.shape
    gs = inp if per_tensor else check_grouping(inp, group_size)
    wg = w.reshape(-1, gs)
    if per_tensor:
        scale, zero = minmax_params(w.reshape(1, -1), bits, symmetric)
        scale, zero = scale.expand(out), zero.expand(out)
    elif search:
        from .search import search_params

        imp = None
        if importance is not None:
            imp = importance.float().view(1, inp // gs, gs).expand(out, -1, -1).reshape(-1, gs)
        scale, zero = search_params(wg, bits, symmetric, imp, scale_dtype=scale_dtype)
    else:
        scale, zero = minmax_params(wg, bits, symmetric)
    scale = scale.to(scale_dtype).float()
    codes = quantize_codes(wg, scale, zero, bits)
    return (codes.to(torch.uint8).reshape(out, inp), scale.view(out, -1).to(scale_dtype),
            zero.to(torch.uint8).view(out, -1))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w = (q - z) * s, groups along the input dimension."""
    out, inp = codes.shape
    g = scales.shape[1]
    q = codes.float().view(out, g, inp // g)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(out, inp)
