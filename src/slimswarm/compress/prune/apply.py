"""Prune a model in place, decoder layer by decoder layer: structured removal first, then unstructured / N:M masks
from calibration activations (each layer sees the pruned layers before it), then compact ``SparseLinear`` storage."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimswarmError
from ..layerwise import layer_linears, set_module, walk_layers
from .magnitude import magnitude_prune
from .masks import check_nm, check_sparsity, sparsity_of
from .sparse import SparseLinear
from .sparsegpt import sparsegpt_prune
from .structured import structured_prune
from .wanda import wanda_prune


def unstructured_sparsity(cfg) -> float:
    nm = cfg.nm
    return 1 - nm[0] / nm[1] if nm else cfg.sparsity


def check_plan(model, cfg) -> None:
    """Fail before any calibration: sparsity range, N:M widths, layer counts."""
    check_sparsity(cfg.sparsity, "prune.sparsity")
    nm = cfg.nm
    if nm:
        for li, layer in enumerate(model.model.layers):
            for name, lin in layer_linears(layer, li, cfg.targets).items():
                check_nm(lin.in_features, nm, name)
    st = cfg.structured
    if st is not None and st.layers >= model.config.num_hidden_layers:
        raise SlimswarmError(f"prune.structured.layers: {st.layers} must be below the model's "
                             f"{model.config.num_hidden_layers} layers")


def prune_weight(method: str, w: torch.Tensor, stats: dict | None, cfg, name: str) -> torch.Tensor:
    s = unstructured_sparsity(cfg)
    if method == "magnitude":
        return magnitude_prune(w, s, cfg.nm, cfg.per_row, name)
    if method == "wanda":
        return wanda_prune(w, torch.diag(stats["H"]), s, cfg.nm, cfg.per_row, name)
    return sparsegpt_prune(w, stats["H"], s, cfg.nm, cfg.block, cfg.damp, name)


@torch.no_grad()
def prune_model(model, cfg, calib: torch.Tensor | None = None) -> dict:
    """Apply a ``PruneConfig`` in place; returns metadata (structured sizes, per-linear sparsity and format)."""
    check_plan(model, cfg)
    needs_calib = cfg.structured is not None or cfg.method in ("wanda", "sparsegpt")
    if needs_calib and calib is None:
        raise SlimswarmError(f"prune method {cfg.method}{' / structured' if cfg.structured else ''} needs calibration text")
    meta: dict = {}
    model.clear_cache()
    nm = cfg.nm
    if cfg.structured is not None and (cfg.structured.heads or cfg.structured.channels or cfg.structured.layers):
        st = cfg.structured
        meta["structured"] = structured_prune(model, calib, st.heads, st.channels, st.layers, nm[1] if nm else 1,
                                               scope=st.scope)
    if not (unstructured_sparsity(cfg) > 0):
        return meta
    layers_meta: dict[str, dict] = {}
    calibrated = cfg.method in ("wanda", "sparsegpt")

    def visit(li, layer, names, stats):
        for name, lin in names.items():
            w = prune_weight(cfg.method, lin.weight.detach(), stats.get(name), cfg, name)
            lin.weight.data.copy_(w)
            layers_meta[name] = {"sparsity": round(sparsity_of(lin.weight), 6)}

    label = f"prune ({cfg.method}, {cfg.pattern if nm else f'{cfg.sparsity:.0%}'})"
    walk_layers(model, calib if calibrated else None, label, visit,
                select=lambda li, layer: layer_linears(layer, li, cfg.targets), dtype=model.dtype)
    if cfg.storage == "sparse":
        for name, info in layers_meta.items():
            lin = model.get_submodule(name)
            sp = SparseLinear.from_dense(lin.weight.detach(), lin.bias, nm)
            set_module(model, name, sp)
            info["format"] = sp.fmt
    meta["layers"] = layers_meta
    return meta


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters of the architecture, nonzero ones): a SparseLinear counts in·out weights, of which nnz are nonzero."""
    total = nonzero = 0
    seen: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            nonzero += int((p != 0).sum())
        if isinstance(m, SparseLinear):
            total += m.in_features * m.out_features
            nonzero += int((m.values != 0).sum())
    return total, nonzero
