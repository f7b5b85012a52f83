"""Magnitude pruning: drop the weights with the smallest |W|, per output row, per layer, or N:M."""

from __future__ import annotations

import torch

from .masks import keep_mask


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs()


def magnitude_prune(w: torch.Tensor, sparsity: float, pattern: str | tuple[int, int] | None = "unstructured", per_row: bool = True,
                    name: str = "weight") -> torch.Tensor:
    """A pruned copy of ``w`` [out, in]; kept weights are unchanged."""
    keep = keep_mask(magnitude_scores(w), sparsity, pattern, per_row, name)
    return w * keep.to(w.dtype)
