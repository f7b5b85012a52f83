"""deploy/: the decode cost model (bytes read per token by weight format / (bandwidth × efficiency) + fixed cost per
layer) and its fit on this machine with random-weight models, as `devices probe` runs it."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from ..evaluate.size import _unique_tensors, decode_bytes_per_token
from .devices import DecodeCost


def weight_format(module: torch.nn.Module) -> str:
    """The format a leaf module's weights are read in at decode: int8 / int4 for packed codes (3- and 2-bit codes run
    through a 4-bit copy, 5- and 6-bit codes through an 8-bit one), else the float dtype."""
    from ..compress.quant.linear import QuantEmbedding, QuantLinear

    if isinstance(module, QuantLinear):
        return "int8" if module.bits >= 5 else "int4"
    if isinstance(module, QuantEmbedding):
        return weight_format(module.rows)
    for p in module.parameters(recurse=False):
        return str(p.dtype).removeprefix("torch.")
    return "float32"


def bytes_by_format(model) -> dict[str, int]:
    """Weight bytes one batch-1 decode step reads, split by format; sums to ``decode_bytes_per_token(model)``."""
    out: dict[str, int] = {}
    seen: set = set()
    emb = model.model.embed_tokens
    for mod in model.modules():
        if list(mod.children()) and mod is not emb:
            continue
        fmt = weight_format(mod)
        for t in _unique_tensors(mod):
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            out[fmt] = out.get(fmt, 0) + t.numel() * t.element_size()
    total = decode_bytes_per_token(model)
    extra = sum(out.values()) - total  # an untied table is read one row a token, not in full
    if extra > 0:
        fmt = weight_format(emb)
        out[fmt] -= extra
    return out


def decode_seconds_per_token(cost: DecodeCost, by_format: dict[str, int], layers: int, bandwidth_gb_s: float,
                             kv_read_bytes: int = 0) -> float:
    """One batch-1 decode step: every weight byte read at its format's efficiency, the KV cache read so far
    (``kv_read_bytes``, float32 speed), plus the fixed per-token and per-layer costs."""
    t = cost.fixed_s + layers * cost.fixed_s_per_layer
    t += kv_read_bytes / (bandwidth_gb_s * 1e9 * cost.efficiency.get("float32", 0.5))
    for fmt, b in by_format.items():
        eff = cost.efficiency.get(fmt, cost.efficiency.get("float32", 0.5))
        t += b / (bandwidth_gb_s * 1e9 * eff)
    return t


def prefill_seconds_per_token(cost: DecodeCost, params: int, compute_scale: float = 1.0) -> float:
    return 2.0 * params / (cost.prefill_gflops * 1e9 * compute_scale)


# -- the fit -------------------------------------------------------------------------------------------------------


def random_model(hidden: int, layers: int, intermediate: int, vocab: int, heads: int = 9, kv: int = 3, seed: int = 0):
    """A Llama-shaped model with random weights: timing needs the shapes, not the values."""
    from ..models.llama import CausalLM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                      max_position_embeddings=512)
    m = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        for mod in m.modules():
            if hasattr(mod, "eps"):
                mod.weight.fill_(1.0)
    return m


@torch.inference_mode()
def seconds_per_token(model, steps: int = 16, repeats: int = 3) -> float:
    """Median time of one batch-1 decode forward at a short context (what a chat turn's decode costs)."""
    model.setup_cache(1, 64)
    tok = torch.tensor([[5]])
    model(torch.tensor([[1, 2, 3, 4]]), 0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(steps):
            model(tok, 4 + i, last_only=True)
        times.append((time.perf_counter() - t) / steps)
    model.clear_cache()
    return statistics.median(times)


@torch.inference_mode()
def prefill_gflops(model, n: int = 128) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, n))
    model(ids[:, :8])
    t = time.perf_counter()
    model(ids, last_only=True)
    dt = time.perf_counter() - t
    return 2.0 * model.num_parameters() * n / dt / 1e9


def fit_decode_cost(bandwidth_gb_s: float, log=print, hidden: int = 576, intermediate: int = 1536, layers: int = 8,
                    vocab: int = 49152, runtime_bytes: int = 0) -> tuple[DecodeCost, list[dict]]:
    """Fit the cost model here: two narrow random models (2 and 8 layers, negligible bytes) give the fixed cost per
    layer and per token; a SmolLM2-wide one in float32, bfloat16, int8 and int4 gives each format's efficiency."""
    from ..compress.quant.apply import quantize_model
    from ..compress.recipe import load_recipe

    rows = []
    small = {}
    for n in (2, 8):
        m = random_model(64, n, 128, 256, heads=4, kv=2)
        small[n] = seconds_per_token(m, steps=32)
        rows.append({"probe": f"narrow-{n}-layers", "layers": n, "bytes_per_token": decode_bytes_per_token(m),
                     "seconds_per_token": small[n]})
        log(f"  narrow model, {n} layers: {small[n] * 1e3:.2f} ms/token")
    per_layer = max(0.0, (small[8] - small[2]) / 6)
    fixed = max(0.0, small[2] - 2 * per_layer)
    eff: dict[str, float] = {}
    gfl = None
    for fmt, recipe in (("float32", None), ("bfloat16", None), ("int8", "w8"), ("int4", "w4g128-rtn")):
        m = random_model(hidden, layers, intermediate, vocab)
        if fmt == "bfloat16":
            m = m.to(torch.bfloat16)
        if recipe:
            quantize_model(m, load_recipe(recipe).quantize)
        if fmt == "float32":
            gfl = prefill_gflops(m)
        by = bytes_by_format(m)
        t = seconds_per_token(m)
        mem_t = max(t - fixed - layers * per_layer, 1e-9)
        # Each format's efficiency is fitted on its own bytes; the small float parts (norms) are taken at float32's.
        # Formats fitted earlier (the int8 head of the int4 model, float norms) are taken at their efficiency.
        rest = sum(b / (bandwidth_gb_s * 1e9 * eff.get(f, eff.get("float32", 1.0))) for f, b in by.items() if f != fmt)
        eff[fmt] = min(1.5, by[fmt] / (bandwidth_gb_s * 1e9 * max(mem_t - rest, 1e-9)))
        rows.append({"probe": f"wide-{fmt}", "layers": layers, "bytes_per_token": sum(by.values()),
                     "bytes_by_format": by, "seconds_per_token": t, "efficiency": eff[fmt]})
        log(f"  SmolLM2-wide random model, {layers} layers, {fmt}: {t * 1e3:.1f} ms/token, "
            f"{sum(by.values()) / 1e6:.0f} MB a token, efficiency {eff[fmt]:.2f}")
        del m
        gc.collect()
    cost = DecodeCost(efficiency=eff, fixed_s_per_layer=per_layer, fixed_s=fixed, prefill_gflops=gfl,
                      runtime_bytes=runtime_bytes)
    return cost, rows
