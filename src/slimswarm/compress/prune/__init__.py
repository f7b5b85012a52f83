"""Pruning passes: unstructured and N:M masks (magnitude, Wanda, SparseGPT), structured removal, schedules, sparse storage."""

from .magnitude import magnitude_prune, magnitude_scores
from .masks import nm_mask, parse_pattern, row_topk_mask, sparsity_of
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune, wanda_scores

__all__ = ["magnitude_prune", "magnitude_scores", "nm_mask", "parse_pattern", "row_topk_mask", "sparsity_of",
           "sparsegpt_prune", "wanda_prune", "wanda_scores"]
