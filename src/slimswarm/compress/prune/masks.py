"""Keep-masks from importance scores: per-row or per-layer top-k for unstructured sparsity, N:M along the input dim."""

from __future__ import annotations

import math
import re

import torch

from ...errors import SlimswarmError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" → None; "2:4" → (2, 4): keep N of every M consecutive input weights."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)) <= 16:
        raise SlimswarmError(f"pattern {pattern!r}: use 'unstructured' or N:M with 0 < N < M <= 16 (e.g. 2:4, 4:8)")
    return int(m.group(1)), int(m.group(2))


def nm_of(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """An already-parsed (N, M) or None as it is (what a validated ``PruneConfig.nm`` holds); a string is parsed."""
    if pattern is None or isinstance(pattern, tuple):
        return pattern
    return parse_pattern(pattern)


def check_sparsity(sparsity: float, where: str = "sparsity") -> float:
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1) or math.isnan(sparsity):
        raise SlimswarmError(f"{where}: {sparsity!r} is outside [0, 1)")
    return float(sparsity)


def check_nm(width: int, nm: tuple[int, int], name: str = "weight") -> None:
    if width % nm[1]:
        raise SlimswarmError(f"{name}: {nm[0]}:{nm[1]} sparsity needs the input width ({width}) to be a multiple of {nm[1]}")


def n_pruned(width: int, sparsity: float) -> int:
    """How many of ``width`` weights a sparsity removes (rounded, so fractions are exact where they can be)."""
    return int(round(sparsity * width))


def row_topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Bool keep-mask [out, in]: the lowest-scoring ``sparsity`` fraction is dropped in each row (or in the whole layer)."""
    check_sparsity(sparsity)
    flat = scores if per_row else scores.reshape(1, -1)
    k = n_pruned(flat.shape[1], sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        # Sorting, not a threshold: ties (e.g. many zero scores) still give exactly k pruned per row.
        idx = torch.argsort(flat, dim=1, stable=True)[:, :k]
        keep.scatter_(1, idx, False)
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Bool keep-mask [out, in] with exactly ``n`` kept in every group of ``m`` consecutive inputs."""
    out, width = scores.shape
    check_nm(width, (n, m), name)
    g = scores.reshape(out, width // m, m)
    idx = torch.topk(g, n, dim=-1, sorted=False).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view(out, width)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str | tuple[int, int] | None = "unstructured",
              per_row: bool = True, name: str = "weight") -> torch.Tensor:
    nm = nm_of(pattern)
    if nm is None:
        return row_topk_mask(scores, sparsity, per_row)
    return nm_mask(scores, *nm, name=name)


def sparsity_of(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / max(w.numel(), 1)
