"""Activation-aware weight scaling (AWQ-style, Lin et al., 2023): scale input channels that carry large
activations up before rounding, and fold the inverse scale into the operation that produces those inputs."""

from __future__ import annotations

import torch

from .rtn import dequantize, rtn_quantize


def fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    return dequantize(*rtn_quantize(w, bits, group_size, symmetric))


def awq_search(weights: list[torch.Tensor], x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
               grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Per-input-channel scales s for linears sharing input ``x`` [tokens, in].

    Tries s = mean|x|^a for a in [0, 1) and keeps the one with the least output error of the quantized
    (W·s) applied to (x / s). Returns (s, error with s, error without scaling)."""
    x = x.float()
    xmean = x.abs().mean(0)
    refs = [x @ w.float().T for w in weights]
    best, best_err, base_err = torch.ones_like(xmean), float("inf"), None
    for k in range(grid):
        a = k / grid
        s = xmean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, refs):
            wq = fake_quant(w.float() * s, bits, group_size, symmetric) / s
            err += (x @ wq.T - r).pow(2).mean().item()
        if k == 0:
            base_err = err
        if err < best_err:
            best, best_err = s, err
    return best, best_err, base_err
