"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta, 2017): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³,
updated every Δt steps from t0 to t0 + nΔt, with the masks re-applied after every optimizer step in between."""

from __future__ import annotations

import fnmatch

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .magnitude import magnitude_scores
from .masks import row_topk_mask


class PolynomialSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    initial: float = Field(0.0, ge=0, lt=1)  # s_i
    final: float = Field(0.5, ge=0, lt=1)  # s_f
    start: int = Field(0, ge=0)  # t0
    steps: int = Field(10, ge=1)  # n: how many pruning updates
    interval: int = Field(100, ge=1)  # Δt: training steps between updates
    targets: list[str] = ["model.layers.*"]

    @model_validator(mode="after")
    def _monotone(self) -> "PolynomialSchedule":
        if self.final < self.initial:
            raise ValueError(f"final sparsity {self.final} is below initial {self.initial}")
        return self

    def sparsity_at(self, step: int) -> float:
        """s_t, held constant between updates (t is rounded down to the last update step)."""
        if step < self.start:
            return 0.0  # pruning has not begun: the dense model trains as it is
        span = self.steps * self.interval
        t = min(step - self.start, span) // self.interval * self.interval
        return self.final + (self.initial - self.final) * (1 - t / span) ** 3


def _targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatch(n, p) for p in patterns)}


class GradualPruner:
    """Call ``step(model, t)`` after each optimizer step: it recomputes the masks at update steps and zeroes the
    pruned weights every time (so the optimizer cannot bring them back)."""

    def __init__(self, schedule: PolynomialSchedule):
        self.schedule = schedule
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0

    @torch.no_grad()
    def step(self, model: nn.Module, t: int) -> float:
        s = self.schedule.sparsity_at(t)
        lins = _targets(model, self.schedule.targets)
        if s != self.sparsity or not self.masks:
            # Weights already pruned have |w| = 0, so magnitude ranking keeps them pruned as s grows.
            self.masks = {n: row_topk_mask(magnitude_scores(m.weight), s) for n, m in lins.items()}
            self.sparsity = s
        for n, m in lins.items():
            m.weight.mul_(self.masks[n].to(m.weight.dtype))
        return s


def apply_schedule(model: nn.Module, t: int, schedule: PolynomialSchedule, pruner: GradualPruner | None = None) -> float:
    """Prune ``model``'s targets to the schedule's sparsity at step ``t`` (stateless form of ``GradualPruner.step``)."""
    return (pruner or GradualPruner(schedule)).step(model, t)
