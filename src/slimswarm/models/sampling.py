"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators; validated parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SlimswarmError


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SlimswarmError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise SlimswarmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SlimswarmError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SlimswarmError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


# Below this temperature, logits / temperature overflows float32 (a logit gap of 10 / 1e-38 is inf, and softmax of
# inf - inf is NaN): such a temperature already means "the most likely token", so it is taken greedily.
GREEDY_BELOW = 1e-6


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from one row of logits [V]."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False  # also when top_p is below float32's smallest number (5e-324 compares as 0 here)
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=gen))
