"""Quantize a model in place, decoder layer by decoder layer, so calibration holds one layer's activations at a time.

Each layer sees the outputs of the already-quantized layers before it (as GPTQ does), its linears are
replaced by ``QuantLinear`` modules, and the embeddings / LM head become int8 rows when asked.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import SlimswarmError
from ..layerwise import set_module, walk_layers
from .awq import awq_search
from .gptq import gptq_quantize
from .linear import QuantEmbedding, QuantLinear
from .rtn import rtn_quantize

if TYPE_CHECKING:  # the config type only: importing recipe here would close a circle (recipe imports this lazily)
    from ..recipe import QuantizeConfig


def effective_group(in_features: int, cfg_group: int, fallback: bool, name: str) -> int:
    if cfg_group in (0, -1):
        return -1
    if in_features % cfg_group == 0:
        return cfg_group
    if not fallback:
        raise SlimswarmError(f"{name}: group_size {cfg_group} does not divide in_features {in_features}")
    for g in range(cfg_group, 15, -1):
        if in_features % g == 0 and g % 16 == 0:
            return g
    return -1


def layer_plan(name: str, lin: nn.Linear, cfg: QuantizeConfig) -> tuple[int, int] | None:
    """(bits, group_size) for one linear after overrides; None to leave it in float."""
    bits, gs = cfg.bits, cfg.group_size
    for o in cfg.overrides:
        if fnmatch.fnmatch(name, o.pattern):
            if o.skip:
                return None
            bits = o.bits or bits
            gs = o.group_size if o.group_size is not None else gs
    return bits, effective_group(lin.in_features, gs, cfg.group_fallback, name)


def check_quantize_plan(model, cfg: QuantizeConfig) -> None:
    """Fail before any calibration: every decoder linear's grouping, or (mixed precision) the budget's range."""
    if cfg.budgeted:
        from .mixed import check_budget

        check_budget(model, cfg)
        return
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            layer_plan(name, mod, cfg)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def head_codes(w: torch.Tensor, bits: int, group_size: int = -1, search: bool = False,
               hessian: torch.Tensor | None = None, importance: bool = False, damp: float = 0.01):
    """(codes, scales, zeros) of an embedding / LM head table: RTN, with the range search when asked; with a
    ``hessian`` (of the LM head's inputs) GPTQ, the range search weighted by diag(H) when ``importance``."""
    if hessian is not None:
        return gptq_quantize(w.detach().float(), hessian, bits, group_size, damp=damp, search=search,
                             importance=importance)
    return rtn_quantize(w.detach().float(), bits, group_size, search=search)


@torch.no_grad()
def head_hessian(model, calib: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """H = 2/n·XᵀX of the LM head's inputs (the final hidden states) over the calibration ids, from ``model`` as it
    is now (after its decoder layers were quantized, so GPTQ on the head sees the inputs it will get)."""
    head = model.lm_head
    acc = {"H": torch.zeros(head.in_features, head.in_features), "n": 0}

    def hook(mod, inp, out):
        a = inp[0].reshape(-1, inp[0].shape[-1]).float()
        acc["H"] += a.T @ a
        acc["n"] += a.shape[0]

    h = head.register_forward_hook(hook)
    model.clear_cache()
    try:
        for i in range(0, calib.shape[0], chunk):
            model(calib[i : i + chunk])
    finally:
        h.remove()
        model.clear_cache()
    return acc["H"] * (2.0 / max(acc["n"], 1))


def quantize_head(model, bits: int = 8, group_size: int = -1, search: bool = False,
                  hessian: torch.Tensor | None = None, importance: bool = False, damp: float = 0.01) -> dict:
    """Embeddings and LM head as integer rows (int8 per row by default); tied ones stay one table. With ``hessian``
    the LM head is rounded by GPTQ (``head_codes``); an untied embedding table stays RTN (GPTQ serves the head role)."""
    head = model.lm_head
    qhead = QuantLinear.from_codes(*head_codes(head.weight, bits, group_size, search, hessian, importance, damp), bits)
    tied = model.config.tie_word_embeddings
    model.lm_head = qhead
    if tied:
        model.model.embed_tokens = QuantEmbedding(qhead, shared=True)
    else:
        emb = model.model.embed_tokens.weight
        model.model.embed_tokens = QuantEmbedding(QuantLinear.from_codes(*head_codes(emb, bits, group_size, search),
                                                                         bits), shared=False)
    return {"bits": bits, "group_size": qhead.group_size if group_size != -1 else -1, "tied": tied,
            **({"method": "gptq"} if hessian is not None else {})}


@torch.no_grad()
def quantize_model(model, cfg: QuantizeConfig, calib: torch.Tensor | None = None) -> dict:
    """Quantize ``model`` in place; returns per-module metadata {name: {bits, group_size, ...}}."""
    if is_quantized(model):
        raise SlimswarmError("model is already quantized: quantize its float parent instead")
    if cfg.budgeted:
        from .mixed import check_budget

        check_budget(model, cfg)  # a bad budget fails before anything else, with the reachable range
    needs_calib = cfg.needs_calibration
    if needs_calib and calib is None:
        if cfg.budgeted:
            raise SlimswarmError("quantize.budget: the sensitivity pass needs calibration text")
        what = (f"method {cfg.method}" if cfg.method != "rtn" else f"range_search {cfg.range_search}"
                if cfg.range_search == "imatrix" else "head_method gptq")
        raise SlimswarmError(f"{what} needs calibration text")
    search = cfg.range_search != "minmax"
    imatrix = cfg.range_search == "imatrix"
    meta: dict[str, dict] = {}
    mixed = head_fmt = None
    if cfg.budgeted:
        from .formats import WeightFormat
        from .mixed import plan_mixed

        mixed = plan_mixed(model, cfg, calib)
        chosen = {n: WeightFormat.parse(f) for n, f in mixed["formats"].items()}
        head_fmt = chosen.pop("lm_head", None)

    def visit(li, layer, names, stats):
        if mixed is None:
            plans = {n: layer_plan(n, m, cfg) for n, m in names.items()}
        else:
            plans = {n: (chosen[n].bits, chosen[n].group_size) for n in names}
        if cfg.method == "awq":
            _awq_layer(layer, li, stats, plans, cfg, meta)
        for name, lin in names.items():
            plan = plans[name]
            if plan is None:
                continue
            bits, gs = plan
            w = lin.weight.detach().float()
            if cfg.method == "gptq":
                codes, s, z = gptq_quantize(w, stats[name]["H"], bits, gs, cfg.symmetric, cfg.act_order, cfg.damp,
                                            search=search, importance=imatrix)
            else:
                imp = torch.diag(stats[name]["H"]) if imatrix else None
                codes, s, z = rtn_quantize(w, bits, gs, cfg.symmetric, per_tensor=cfg.per_tensor, search=search,
                                           importance=imp)
            q = QuantLinear.from_codes(codes, s, z, bits, lin.bias)
            set_module(model, name, q)
            meta.setdefault(name, {}).update(bits=bits, group_size=q.group_size,
                                             **({"per_tensor": True} if cfg.per_tensor else {}))

    label = f"quantize ({cfg.method}, {'mixed' if mixed else f'{cfg.bits}-bit'})"
    walk_layers(model, calib if needs_calib else None, label, visit)
    if head_fmt is not None or cfg.head_bits:
        bits, gs = (head_fmt.bits, head_fmt.group_size) if head_fmt is not None else (cfg.head_bits, -1)
        h = head_hessian(model, calib) if cfg.head_method == "gptq" else None
        meta["lm_head"] = quantize_head(model, bits, gs, search if head_fmt is not None or h is not None else False,
                                        h, imatrix, cfg.damp)
    if mixed is not None:
        meta["plan"] = mixed
    return meta


def _awq_layer(layer, li: int, stats, plans, cfg: QuantizeConfig, meta: dict) -> None:
    """Search and fold scales for (q,k,v) after input_layernorm, (gate,up) after post_attention_layernorm,
    and down_proj after up_proj. o_proj is left unscaled (its input is a mix of heads)."""
    p = f"model.layers.{li}."
    a, m = layer.self_attn, layer.mlp
    groups = [
        ([a.q_proj, a.k_proj, a.v_proj], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         layer.input_layernorm.weight, "cols"),
        ([m.gate_proj, m.up_proj], ["mlp.gate_proj", "mlp.up_proj"], layer.post_attention_layernorm.weight, "cols"),
        ([m.down_proj], ["mlp.down_proj"], m.up_proj.weight, "rows"),
    ]
    for lins, names, prev, how in groups:
        full = [p + n for n in names]
        if any(plans[n] is None for n in full):
            continue
        bits, gs = plans[full[0]]
        s, err, base = awq_search([lin.weight for lin in lins], stats[full[0]]["x"], bits, gs, cfg.symmetric)
        for lin in lins:
            lin.weight.mul_(s[None, :].to(lin.weight.dtype))
        if how == "cols":
            prev.div_(s.to(prev.dtype))
        else:
            prev.div_(s[:, None].to(prev.dtype))
            if m.up_proj.bias is not None:
                m.up_proj.bias.div_(s.to(m.up_proj.bias.dtype))
        for n in full:
            meta.setdefault(n, {})["awq_error_ratio"] = err / base if base else 1.0
