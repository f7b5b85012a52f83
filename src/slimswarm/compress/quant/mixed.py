"""Sensitivity-aware mixed precision: per decoder linear, the format (bits, group size) that minimises the summed
predicted KL (``sensitivity``) under a byte budget for the whole checkpoint (``knapsack``).

Bytes are counted as ``model.safetensors`` stores them: each linear's packed codes + fp16 scales + uint8 zeros
(+ bias), the embeddings / LM head at ``head_bits``, every float leftover (norms) at its dtype, and an upper bound
for the safetensors header. The budget is checked against the reachable range before any calibration work.
"""

from __future__ import annotations

import torch

from ...errors import SlimswarmError
from .formats import WeightFormat
from .knapsack import choose
from .sensitivity import decoder_linears, sensitivities

HEADER_BYTES_PER_TENSOR = 128  # safetensors header entry: name + dtype + shape + offsets (measured ~80 + len(name))


def _head_bytes(model, head_bits: int | None) -> int:
    """Bytes of the embeddings + LM head as the checkpoint stores them (tied: one table)."""
    emb = model.model.embed_tokens.weight
    vocab, dim = emb.shape
    tied = model.config.tie_word_embeddings
    if head_bits:
        one = WeightFormat(head_bits, -1).nbytes(vocab, dim)
    else:
        one = emb.numel() * emb.element_size()
    return one if tied else 2 * one


def head_option_bytes(model, fmt: WeightFormat) -> int:
    vocab, dim = model.model.embed_tokens.weight.shape
    return fmt.nbytes(vocab, dim) * (1 if model.config.tie_word_embeddings else 2)


def fixed_bytes(model, head_bits: int | None, planned_head: bool = False) -> tuple[int, int]:
    """(bytes of everything the plan does not choose: norms, the head/embeddings unless ``planned_head``; the number
    of tensors the checkpoint will hold)."""
    planned = set(decoder_linears(model))
    sd = model.state_dict()
    total, count = 0, 0
    for k, v in sd.items():
        if k.rsplit(".", 1)[0] in planned:  # weight (and bias) become qweight, scales, zeros (, bias)
            count += 3 if k.endswith(".weight") else 1
            continue
        if k.startswith(("model.embed_tokens.", "lm_head.")):
            continue
        total += v.numel() * v.element_size()
        count += 1
    count += 3 * (1 if model.config.tie_word_embeddings else 2)
    return total + (0 if planned_head else _head_bytes(model, head_bits)), count


def budget_range(model, formats: list[WeightFormat], head_bits: int | None,
                 head_formats: list[WeightFormat] | None = None) -> tuple[int, int]:
    """(fewest bytes the formats can reach, bytes of the float32 checkpoint)."""
    fixed, count = fixed_bytes(model, head_bits, bool(head_formats))
    lins = decoder_linears(model)
    least = fixed + HEADER_BYTES_PER_TENSOR * count
    if head_formats:
        dim = model.model.embed_tokens.weight.shape[1]
        fit = [f for f in head_formats if f.fits(dim)]
        if not fit:
            raise SlimswarmError(f"quantize.head_formats: none of {', '.join(f.name for f in head_formats)} fits "
                                 f"the embedding width {dim}")
        least += min(head_option_bytes(model, f) for f in fit)
    for n, m in lins.items():
        opts = [f.nbytes(m.out_features, m.in_features, m.bias is not None) for f in formats if f.fits(m.in_features)]
        if not opts:
            raise SlimswarmError(f"quantize.formats: none of {', '.join(f.name for f in formats)} fits {n} "
                                 f"(in_features {m.in_features})")
        least += min(opts)
    seen = {id(p): p for p in model.parameters()}
    fp32 = 4 * sum(p.numel() for p in seen.values()) + HEADER_BYTES_PER_TENSOR * len(model.state_dict())
    return least, fp32


def budget_bytes_of(model, cfg) -> int:
    if cfg.budget_bytes is not None:
        return cfg.budget_bytes
    return int(cfg.budget_bpw * model.num_parameters() / 8)


def check_budget(model, cfg) -> tuple[int, list[WeightFormat], list[WeightFormat]]:
    """The budget in bytes, the formats and the head's formats, or a one-line error naming the reachable range."""
    formats = [WeightFormat.parse(f) for f in cfg.formats]
    head_formats = [WeightFormat.parse(f) for f in cfg.head_formats or []]
    budget = budget_bytes_of(model, cfg)
    lo, hi = budget_range(model, formats, cfg.head_bits, head_formats)
    n = model.num_parameters()
    if not lo <= budget <= hi:
        field = "budget_bytes" if cfg.budget_bytes is not None else "budget_bpw"
        given = f"{cfg.budget_bytes:,} bytes" if cfg.budget_bytes is not None else f"{cfg.budget_bpw} bits/weight"
        raise SlimswarmError(f"quantize.{field}: {given} is outside the reachable range {lo:,}..{hi:,} bytes "
                             f"({8 * lo / n:.3f}..{8 * hi / n:.3f} bits/weight) with formats "
                             f"{', '.join(f.name for f in formats)}")
    return budget, formats, head_formats


def plan_mixed(model, cfg, calib: torch.Tensor | None, cache: bool = True) -> dict:
    """{"formats": {linear: format name}, "budget_bytes", "planned_bytes", "predicted_kl", ...} for ``cfg``'s budget."""
    budget, formats, head_formats = check_budget(model, cfg)
    if calib is None:
        raise SlimswarmError("quantize.budget: the sensitivity pass needs calibration text")
    if cfg.sensitivity_samples:
        calib = calib[: cfg.sensitivity_samples]
    sens = sensitivities(model, calib, formats, cfg, cache=cache, head_formats=head_formats)
    fixed, count = fixed_bytes(model, cfg.head_bits, bool(head_formats))
    lins = decoder_linears(model)
    names = list(lins) + (["lm_head"] if head_formats else [])
    opts = [[f for f in (head_formats if n == "lm_head" else formats) if f.name in sens[n]] for n in names]
    costs = [[head_option_bytes(model, f) if n == "lm_head" else
              f.nbytes(lins[n].out_features, lins[n].in_features, lins[n].bias is not None) for f in o]
             for n, o in zip(names, opts)]
    losses = [[sens[n][f.name] for f in o] for n, o in zip(names, opts)]
    header = HEADER_BYTES_PER_TENSOR * count
    sol = choose(costs, losses, budget - fixed - header)
    chosen = {n: opts[i][c].name for i, (n, c) in enumerate(zip(names, sol["choice"]))}
    tally: dict[str, int] = {}
    for n, f in chosen.items():
        if n != "lm_head":
            tally[f] = tally.get(f, 0) + 1
    return {
        "budget_bytes": budget, "planned_bytes": fixed + header + sol["bytes"],
        "predicted_kl": sol["loss"], "dp_unit_bytes": sol["unit"],
        "head": chosen.get("lm_head", f"w{cfg.head_bits}" if cfg.head_bits else "float"),
        "sensitivity_tokens": int(calib.numel()),
        "measure": "predicted KL: 0.5 * sum_j E[g_j^2] (dW E[xx^T] dW^T)_jj (diagonal Fisher at the linear's outputs)",
        "count": dict(sorted(tally.items())), "formats": chosen,
        "sensitivity": {n: {k: float(f"{v:.4g}") for k, v in sens[n].items()} for n in names},
    }
