"""Per-tensor sensitivity to quantization: the predicted KL increase when only that linear is quantized in a format.

Measure (and why): the KL from the float model to a perturbed one is, to second order, ½ Δzᵀ F Δz with F the Fisher
information of the model's own output distribution. Pushed back to one linear's outputs y = Wx, with F kept
diagonal per output channel and the weight error's output E[Δy_j²] = (ΔW E[xxᵀ] ΔWᵀ)_jj, the predicted increase is

    ΔKL(W → Ŵ) ≈ ½ Σ_j E[g_j²] · (ΔW E[xxᵀ] ΔWᵀ)_jj,   g = ∂ CE(z, ŷ)/∂y with ŷ sampled from the model itself.

One forward + backward over the calibration text gives E[g_j²] (gradients for labels drawn from the model, so the
squared gradient estimates the Fisher, not the data loss's gradient noise) and E[xxᵀ] for every linear at once;
each candidate format then costs one RTN quantization of the weight (see ``quantize_as``) and a matrix product. Measuring the KL directly (one model evaluation per tensor and format: 210 × 4 on SmolLM2) does
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
    """Per decoder linear and ``lm_head``: ``g2`` = E[g_j²] over tokens [out] and ``xx`` = E[xxᵀ] of its inputs
    [in, in]; and ``embed``: ``g2`` [vocab, dim], the squared gradients at the embedding rows looked up, summed per
    token id over the tokens (divided by their count), so a row's error costs ½ Σ_d g2[v, d]·ΔE[v, d]²."""
    lins = {**decoder_linears(model), "lm_head": model.lm_head}
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
    emb = model.model.embed_tokens.weight
    stats["embed"] = {"g2": torch.zeros(emb.shape, dtype=torch.float32)}

    def embed_hook(mod, inp, out):
        o = out.detach().requires_grad_(True)
        ids = inp[0].reshape(-1)
        def hook(g):  # returns None: the gradient is left as it is
            stats["embed"]["g2"].index_add_(0, ids, g.reshape(len(ids), -1).float().pow(2))

        o.register_hook(hook)
        return o

    hooks.append(model.model.embed_tokens.register_forward_hook(embed_hook))
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
        if "xx" in st:
            st["xx"] /= tokens
    return stats


def quantize_as(w: torch.Tensor, fmt: WeightFormat, cfg, xx: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """The de-quantized weight in ``fmt``: by default RTN min-max (one cheap pass); ``exact``: the recipe's own
    quantizer (GPTQ with H = 2·E[xxᵀ], range search). GPTQ and the search shrink every tensor's error by a similar
    factor, so the cheap errors rank the tensors alike at a fraction of the cost (GPTQ of 210 tensors x 4 formats
    takes minutes on a small CPU)."""
    if not exact:
        return dequantize(*rtn_quantize(w, fmt.bits, fmt.group_size, cfg.symmetric))
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


def _key(model, calib: torch.Tensor, cfg) -> str:
    """The cache key: weights, calibration tokens and quantizer settings; not the formats (one file holds every
    format measured so far, so a plan with one more format only measures that one)."""
    h = hashlib.sha256()
    for n, m in decoder_linears(model).items():
        h.update(n.encode())
        h.update(m.weight.detach().float().contiguous().numpy().tobytes())
    h.update(model.lm_head.weight.detach().float().contiguous().numpy().tobytes())
    h.update(calib.contiguous().numpy().astype("int64").tobytes())
    h.update(repr((cfg.symmetric, "rtn-minmax errors", 2)).encode())
    return h.hexdigest()[:24]


def head_sensitivity(model, stats, formats: list[WeightFormat], search: bool) -> dict[str, float]:
    """Predicted ΔKL of the embeddings / LM head in each format: the LM-head role (as a linear) plus the embedding
    role (per looked-up row); a tied table has both roles, an untied model two tables in the same format."""
    from .apply import head_codes

    head = model.lm_head.weight.detach().float()
    table = model.model.embed_tokens.weight.detach().float()
    tied = model.config.tie_word_embeddings
    out = {}
    for f in formats:
        if not f.fits(head.shape[1]):
            continue
        hq = dequantize(*head_codes(head, f.bits, f.group_size, search))
        eq = hq if tied else dequantize(*head_codes(table, f.bits, f.group_size, search))
        out[f.name] = (predicted_kl(head, hq, stats["lm_head"]["g2"], stats["lm_head"]["xx"])
                       + 0.5 * float((stats["embed"]["g2"] * (eq - table).pow(2)).sum()))
    return out


@torch.no_grad()
def sensitivities(model, calib: torch.Tensor, formats: list[WeightFormat], cfg, cache: bool = True,
                  head_formats: list[WeightFormat] | None = None) -> dict:
    """{linear name: {format name: predicted ΔKL in nats/token}} for every decoder linear and every format that fits
    its width (and "lm_head" for ``head_formats``). Cached under ``cache_dir()`` (``SLIMSWARM_CACHE`` moves it):
    formats already measured for these weights and calibration tokens are read back, only new ones are measured."""
    path = cache_dir() / f"{_key(model, calib, cfg)}.pt"
    known: dict[str, dict[str, float]] = {}
    if cache and path.is_file():
        known = torch.load(path, weights_only=True)  # a dict of floats: nothing to unpickle
    lins = decoder_linears(model)
    head_formats = head_formats or []
    want = {n: [f for f in formats if f.fits(m.in_features) and f.name not in known.get(n, {})]
            for n, m in lins.items()}
    want_head = [f for f in head_formats if f.name not in known.get("lm_head", {})]
    if any(want.values()) or want_head:
        stats = fisher_pass(model, calib)
        for n, m in progress(list(lins.items()), "sensitivity (formats)"):
            w = m.weight.detach().float()
            st = stats[n]
            known.setdefault(n, {}).update(
                {f.name: predicted_kl(w, quantize_as(w, f, cfg, st["xx"]), st["g2"], st["xx"]) for f in want[n]})
        if want_head:
            known.setdefault("lm_head", {}).update(head_sensitivity(model, stats, want_head, False))
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(known, tmp)
            os.replace(tmp, path)
    names = {f.name for f in formats}
    out = {n: {k: v for k, v in known[n].items() if k in names} for n in lins}
    if head_formats:
        out["lm_head"] = {k: v for k, v in known["lm_head"].items() if k in {f.name for f in head_formats}}
    return out
