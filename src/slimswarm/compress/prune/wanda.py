"""Wanda (Sun et al., 2023): score S_ij = |W_ij| · ||X_j||₂ from calibration inputs, compared within each output row."""

from __future__ import annotations

import torch

from .masks import keep_mask


def wanda_scores(w: torch.Tensor, act_sq: torch.Tensor) -> torch.Tensor:
    """``act_sq`` [in]: per-input sum (or mean) of x_j² over calibration tokens, e.g. diag(XᵀX)."""
    return w.detach().float().abs() * act_sq.float().clamp_min(0).sqrt()[None, :]


def wanda_prune(w: torch.Tensor, act_sq: torch.Tensor, sparsity: float, pattern: str | tuple[int, int] | None = "unstructured",
                per_row: bool = True, name: str = "weight") -> torch.Tensor:
    """A pruned copy of ``w``; no weight update (the paper's point: the score alone is enough)."""
    keep = keep_mask(wanda_scores(w, act_sq), sparsity, pattern, per_row, name)
    return w * keep.to(w.dtype)
