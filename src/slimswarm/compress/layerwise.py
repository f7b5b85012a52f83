"""The calibration-driven layer walk that every compress pass shares (quantize, prune, low-rank, sensitivity).

Calibration tokens are embedded once; then each decoder layer in turn: its linears' input statistics are
collected (Hessians ``XᵀX`` and a token sample), the pass edits the layer, and the layer is run again so the next
one sees the outputs of the already-compressed layers before it (as GPTQ, SparseGPT and SVD-LLM do). Only one
layer's activations are held at a time.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..progress import progress


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def layer_linears(layer: nn.Module, li: int, patterns: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` children of decoder layer ``li`` by full name, optionally only those matching ``patterns``."""
    pats = list(patterns) if patterns is not None else None
    out = {}
    for n, m in layer.named_modules():
        full = f"model.layers.{li}.{n}"
        if (isinstance(m, nn.Linear) and m.in_features and m.out_features
                and (pats is None or any(fnmatch.fnmatch(full, p) for p in pats))):
            out[full] = m
    return out


def calibration_inputs(model, calib: torch.Tensor, dtype: torch.dtype | None = None):
    """(hidden states [n, t, d] after the embeddings, rope cos, rope sin) for calibration ids [n, t]."""
    x = model.model.embed_tokens(calib)
    x = x.float() if dtype is None else x.to(dtype)
    cos, sin = model.rope(torch.arange(calib.shape[1]).expand(1, -1), x.dtype)
    return x, cos, sin


def run_layer(layer, x, cos, sin, chunk: int = 8) -> torch.Tensor:
    """One decoder layer over calibration sequences, as plain full-sequence forwards: a KV cache the model may hold
    (from generation or an engine) is set aside, never written."""
    attn = layer.self_attn
    cache, attn.cache = attn.cache, None
    try:
        outs = []
        for i in range(0, x.shape[0], chunk):
            xb = x[i : i + chunk]
            outs.append(layer(xb, cos, sin, 0, None, xb.shape[1]))
        return torch.cat(outs)
    finally:
        attn.cache = cache


def collect_stats(layer, x, cos, sin, names: dict[str, nn.Linear], keep_tokens: int = 4096) -> dict[str, dict]:
    """Per linear: ``H`` = 2/n·XᵀX of its inputs, ``n`` tokens seen and ``x`` a token sample, from one pass of the layer."""
    stats = {n: {"H": torch.zeros(m.in_features, m.in_features), "n": 0, "x": []} for n, m in names.items()}
    hooks = []
    for n, m in names.items():
        def hook(mod, inp, out, n=n):
            a = inp[0].reshape(-1, inp[0].shape[-1]).float()
            st = stats[n]
            st["H"] += a.T @ a
            st["n"] += a.shape[0]
            if sum(len(v) for v in st["x"]) < keep_tokens:
                st["x"].append(a[: keep_tokens // 4])
        hooks.append(m.register_forward_hook(hook))
    try:
        run_layer(layer, x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    for st in stats.values():
        st["H"] *= 2.0 / max(st["n"], 1)
        st["x"] = torch.cat(st["x"])[:keep_tokens] if st["x"] else torch.zeros(0)
    return stats


Visit = Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, dict]], None]


@torch.no_grad()
def walk_layers(model, calib: torch.Tensor | None, label: str, visit: Visit,
                select: Callable[[int, nn.Module], dict[str, nn.Linear]] | None = None,
                dtype: torch.dtype | None = None, keep_tokens: int = 4096) -> None:
    """For each decoder layer: ``names = select(li, layer)``; with ``calib``, their input statistics; then
    ``visit(li, layer, names, stats)`` edits the layer in place, and (with ``calib``) the edited layer is run so the
    next one sees its outputs. Without ``calib`` the stats are empty and nothing is run."""
    select = select or (lambda li, layer: layer_linears(layer, li))
    model.clear_cache()
    x = cos = sin = None
    if calib is not None:
        x, cos, sin = calibration_inputs(model, calib, dtype)
    for li, layer in progress(list(enumerate(model.model.layers)), label):
        names = select(li, layer)
        stats = collect_stats(layer, x, cos, sin, names, keep_tokens) if calib is not None and names else {}
        visit(li, layer, names, stats)
        if calib is not None:
            x = run_layer(layer, x, cos, sin)
