"""Range search for a group's scale and zero point: try clipped ranges, keep the one with the least weighted error.

Min-max (``rtn.minmax_params``) spends the code range on the group's extremes; shrinking the range rounds the many
small weights more finely at the cost of clipping a few large ones. The error of each candidate is weighted per input
column by ``importance`` (llama.cpp's imatrix: E[x_j²] over calibration text, i.e. diag(XᵀX)/n), so a column that
carries large activations is rounded more carefully: the weighted squared error Σ_j E[x_j²]·(w_j − ŵ_j)² is the
output error E||(W − Ŵ)x||² up to the cross terms between columns. Pure functions on tensors; the stored format is
unchanged (fp16 scale, uint8 zero per group), so every kernel runs the result.
"""

from __future__ import annotations

import torch

from .rtn import minmax_params, quantize_codes


def _err(w, imp, s, z, bits):
    q = quantize_codes(w, s, z, bits)
    return (imp * (w - (q - z[:, None]) * s[:, None]).pow(2)).sum(-1)


def search_params(w: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                  steps: int = 8, lowest: float = 0.6, scale_dtype: torch.dtype = torch.float16):
    """Scale and integer zero point per row of ``w`` [rows, group] (each row one group), the candidate of least
    ``importance``-weighted squared error (``importance`` [group] or [rows, group]; None: plain MSE).

    Candidates: min-max itself, and the range shrunk by factors in [``lowest``, 1) — symmetric: the absolute maximum
    mapped to code ±(2^(b-1) − 1) or to −2^(b-1) (the extra negative level); asymmetric: both ends shrunk by the same
    factor, or one end alone (3·steps candidates, not steps², to keep the search cheap). Scales are rounded to ``scale_dtype`` before the error is measured, so the winner is exact as stored."""
    w = w.float()
    rows, g = w.shape
    imp = torch.ones(g) if importance is None else importance.float()
    imp = imp.expand(rows, g) if imp.dim() == 1 else imp
    qmax = 2**bits - 1
    half = 2 ** (bits - 1)

    best_s, best_z = minmax_params(w, bits, symmetric)
    best_s = best_s.to(scale_dtype).float()
    best_e = _err(w, imp, best_s, best_z, bits)

    def consider(s, z):
        nonlocal best_s, best_z, best_e
        s = s.clamp_min(1e-8).to(scale_dtype).float().clamp_min(1e-8)
        e = _err(w, imp, s, z, bits)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_e = torch.where(better, e, best_e)

    factors = [lowest + (1 - lowest) * k / steps for k in range(steps + 1)]
    if symmetric:
        zero = torch.full((rows,), float(half))
        amax = w.abs().amax(-1).clamp_min(1e-8)
        # the signed extreme: where it is negative it can take code 0 (value -half * s) without clipping
        neg = w.gather(1, w.abs().argmax(-1, keepdim=True))[:, 0] < 0
        for p in factors:
            if p < 1:
                consider(amax * p / (half - 1), zero)
            consider(torch.where(neg, amax * p / half, amax * p / (half - 1)), zero)
    else:
        lo0 = w.amin(-1).clamp(max=0.0)
        hi0 = w.amax(-1).clamp(min=0.0)
        pairs = [(p, p) for p in factors[:-1]] + [(p, 1.0) for p in factors[:-1]] + [(1.0, p) for p in factors[:-1]]
        for pl, ph in pairs:
            lo, hi = lo0 * pl, hi0 * ph
            s = ((hi - lo) / qmax).clamp_min(1e-8).to(scale_dtype).float().clamp_min(1e-8)
            z = torch.round(-lo / s).clamp(0, qmax)
            consider(s, z)
    return best_s, best_z
