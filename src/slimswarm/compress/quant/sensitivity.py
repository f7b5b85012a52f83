"""Per-tensor sensitivity to quantization: the predicted KL increase when only that linear is quantized in a format.

Measure (and why): the KL from the float model to a perturbed one is, to second order, ½ Δzᵀ F Δz with F the Fisher
information of the model's own output distribution. Pushed back to one linear's outputs y = Wx, with F kept
diagonal per output channel and the weight error's output E[Δy_j²] = (ΔW E[xxᵀ] ΔWᵀ)_jj, the predicted increase is

    ΔKL(W → Ŵ) ≈ ½ Σ_j E[g_j²] · (ΔW E[xxᵀ] ΔWᵀ)_jj,   g = ∂ CE(z, ŷ)/∂y with ŷ sampled from the model itself.

One forward + backward over the calibration text gives E[g_j²] (gradients for labels drawn from the model, so the
squared gradient estimates the Fisher, not the data loss's gradient noise) and E[xxᵀ] for every linear at once;
each candidate format then costs one quantization of the weight (GPTQ or RTN, as the recipe will really run it) and
a matrix product. Measuring the KL directly (one model evaluation per tensor and format: 210 × 4 on SmolLM2) does
not fit a small CPU; this proxy costs one calibration pass. Results are cached on disk by weights, calibration
tokens and quantizer settings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ...progress import progress
from ..layerwise import layer_linears
from .formats import WeightFormat
from .gptq import gptq_quantize
from .rtn import dequantize, rtn_quantize


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMSWARM_CACHE", Path.home() / ".cache" / "slimswarm")) / "sensitivity"


def decoder_linears(model) -> dict:
    out = {}
    for li, layer in enumerate(model.model.layers):
        out.update(layer_linears(layer, li))
    return out


def fisher_pass(model, calib: torch.Tensor, chunk: int = 4, seed: int = 0) -> dict[str, dict]:
    """Per decoder linear: ``g2`` = E[g_j²] over tokens [out] and ``xx`` = E[xxᵀ] of its inputs [in, in]."""
    lins = decoder_linears(model)
    stats = {n: {"g2": torch.zeros(m.out_features), "xx": torch.zeros(m.in_features, m.in_features)}
             for n, m in lins.items()}
    hooks = []

    def grad_hook(n):
        def hook(g):  # returns None: the gradient itself is left as it is
            stats[n]["g2"].add_(g.reshape(-1, g.shape[-1]).float().pow(2).sum(0))
        return hook

    for n, m in lins.items():
        def fwd(mod, inp, out, n=n):
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            stats[n]["xx"] += a.T @ a
            if out.requires_grad:
                out.register_hook(grad_hook(n))
        hooks.append(m.register_forward_hook(fwd))
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda mod, i, o: o.detach().requires_grad_(True)))
    gen = torch.Generator().manual_seed(seed)
    model.clear_cache()
    tokens = 0
    try:
        with torch.enable_grad():
            for i in progress(range(0, calib.shape[0], chunk), "sensitivity (Fisher pass)",
                              total=(calib.shape[0] + chunk - 1) // chunk):
                ids = calib[i : i + chunk]
                logits = model(ids).float()
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.view(-1, logits.shape[-1]), -1), 1, generator=gen)[:, 0]
                F.cross_entropy(logits.view(-1, logits.shape[-1]), y, reduction="sum").backward()
                tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    for st in stats.values():
        st["g2"] /= tokens
        st["xx"] /= tokens
    return stats


def quantize_as(w: torch.Tensor, fmt: WeightFormat, cfg, xx: torch.Tensor) -> torch.Tensor:
    """The de-quantized weight the recipe's quantizer gives ``w`` in ``fmt`` (GPTQ with H = 2·E[xxᵀ], or RTN)."""
    search = cfg.range_search != "minmax"
    imatrix = cfg.range_search == "imatrix"
    if cfg.method == "gptq":
        q = gptq_quantize(w, 2 * xx, fmt.bits, fmt.group_size, cfg.symmetric, cfg.act_order, cfg.damp,
                          search=search, importance=imatrix)
    else:
        q = rtn_quantize(w, fmt.bits, fmt.group_size, cfg.symmetric, search=search,
                         importance=torch.diag(xx) if imatrix else None)
    return dequantize(*q)


def predicted_kl(w: torch.Tensor, wq: torch.Tensor, g2: torch.Tensor, xx: torch.Tensor) -> float:
    d = (wq - w.float())
    return 0.5 * float((g2 * ((d @ xx) * d).sum(1)).sum())


def _key(model, calib: torch.Tensor, formats: list[WeightFormat], cfg) -> str:
    h = hashlib.sha256()
    for n, m in decoder_linears(model).items():
        h.update(n.encode())
        h.update(m.weight.detach().float().contiguous().numpy().tobytes())
    h.update(calib.contiguous().numpy().astype("int64").tobytes())
    h.update(repr([f.name for f in formats]).encode())
    h.update(repr((cfg.method, cfg.symmetric, cfg.act_order, cfg.damp, cfg.range_search)).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def sensitivities(model, calib: torch.Tensor, formats: list[WeightFormat], cfg, cache: bool = True) -> dict:
    """{linear name: {format name: predicted ΔKL in nats/token}} for every decoder linear and every format that fits
    its width. Cached under ``cache_dir()`` (set ``SLIMSWARM_CACHE`` to move it)."""
    path = cache_dir() / f"{_key(model, calib, formats, cfg)}.pt"
    if cache and path.is_file():
        return torch.load(path)
    stats = fisher_pass(model, calib)
    out: dict[str, dict[str, float]] = {}
    lins = decoder_linears(model)
    for n, m in progress(list(lins.items()), "sensitivity (formats)"):
        w = m.weight.detach().float()
        st = stats[n]
        out[n] = {f.name: predicted_kl(w, quantize_as(w, f, cfg, st["xx"]), st["g2"], st["xx"])
                  for f in formats if f.fits(m.in_features)}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out
