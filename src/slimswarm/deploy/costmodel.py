"""deploy/: the cost model (decode: bytes read per token by weight format / (bandwidth × efficiency) + fixed cost per
layer, through the native step as served; prefill: a per-call de-quantization of quantized layers + a per-token
matmul cost) and its fit on this machine with random-weight models, as `devices probe` runs it."""

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
    """The legacy flat prefill price (profiles without the per-format fit)."""
    return 2.0 * params / (cost.prefill_gflops * 1e9 * compute_scale)


def linear_params_by_format(model) -> dict[str, int]:
    """Weight parameters of the decoder layers' linears by the format they are stored in (what a prefill call
    de-quantizes and multiplies; the embedding lookup and the last position's head are left out)."""
    from ..compress.quant.linear import QuantLinear

    out: dict[str, int] = {}
    for mod in model.model.layers.modules():
        if isinstance(mod, QuantLinear):
            n = mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Linear):
            n = mod.weight.numel()
        else:
            continue
        fmt = weight_format(mod)
        out[fmt] = out.get(fmt, 0) + n
    return out


def prefill_call_seconds(cost: DecodeCost, params_by_format: dict[str, int], layers: int, tokens: int,
                         compute_scale: float = 1.0) -> float:
    """One prefill forward of ``tokens`` prompt tokens: the per-layer fixed cost, each quantized format's weights
    de-quantized once, and every weight multiplied once per token at its format's fitted speed. Falls back to the
    flat price for a profile fitted before the per-format figures existed."""
    total = sum(params_by_format.values())
    if not cost.prefill_s_per_param_token:
        return tokens * prefill_seconds_per_token(cost, total, compute_scale)
    flt = cost.prefill_s_per_param_token.get("float32", max(cost.prefill_s_per_param_token.values()))
    t = layers * cost.prefill_fixed_s_per_layer
    for fmt, n in params_by_format.items():
        t += n * cost.dequant_s_per_param.get(fmt, 0.0)
        t += tokens * n * cost.prefill_s_per_param_token.get(fmt, flt)
    return t / compute_scale


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


def decode_path(model) -> str:
    """Which decode step ``model(tok, pos)`` runs here: ``native`` (kernels/decode.c) or ``python``."""
    from ..kernels import native

    return "native" if native.enabled() and native.why_not(model) is None else "python"


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


PREFILL_LENGTHS = (16, 64, 128)


def prefill_seconds(model, n: int, repeats: int = 3) -> float:
    """Median time of one prefill forward of ``n`` tokens into a KV cache, as the engine runs a new prompt."""
    return statistics.median(prefill_times(model, (n,), repeats)[n])


@torch.inference_mode()
def prefill_times(model, lengths: tuple[int, ...], repeats: int) -> dict[int, list[float]]:
    """Times of prefill forwards at each of ``lengths``, interleaved (a slow spell of the machine hits every length
    alike instead of one)."""
    top = max(lengths)
    ids = torch.randint(3, model.config.vocab_size, (1, top), generator=torch.Generator().manual_seed(top))
    model.setup_cache(1, top)
    model(ids[:, :9], 0, last_only=True)  # warm (9 rows: past the small-batch kernels, so the same path)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(repeats):
        for n in lengths:
            t = time.perf_counter()
            model(ids[:, :n], 0, last_only=True)
            times[n].append(time.perf_counter() - t)
    model.clear_cache()
    return times


def fit_prefill_line(model, lengths: tuple[int, ...] = PREFILL_LENGTHS, repeats: int = 5) -> tuple[float, float]:
    """(seconds a call, seconds a token) of prefill on ``model``: a least-squares line through the median times at
    ``lengths`` (interleaved, five each)."""
    med = {n: statistics.median(ts) for n, ts in prefill_times(model, lengths, repeats).items()}
    xs, ys = list(med), list(med.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per_token = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs))
    return max(0.0, my - per_token * mx), per_token


def solve_decode_fit(bandwidth_gb_s: float, narrow: dict[int, tuple[dict[str, int], float]],
                     wide: list[tuple[str, dict[str, int], float]], layers: int, rounds: int = 8):
    """(fixed_s, fixed_s_per_layer, efficiency) from timed models. ``narrow``: layers -> (bytes by format, seconds a
    token) of two narrow models, whose few bytes are mostly fixed cost; ``wide``: (format, bytes by format, seconds a
    token) of ``layers``-deep wide models, in fitting order. The narrow models' bytes are taken off at the
    efficiencies of the previous round, so the split is exact when the timings follow the model."""
    (n0, (b0, t0)), (n1, (b1, t1)) = sorted(narrow.items())
    eff: dict[str, float] = {}

    def read_s(by: dict[str, int]) -> float:
        return sum(b / (bandwidth_gb_s * 1e9 * eff.get(f, eff.get("float32", 1e9))) for f, b in by.items())

    for _ in range(rounds):
        c0, c1 = t0 - read_s(b0), t1 - read_s(b1)
        per_layer = max(0.0, (c1 - c0) / (n1 - n0))
        fixed = max(0.0, c0 - n0 * per_layer)
        new: dict[str, float] = {}
        for fmt, by, t in wide:
            mem_t = max(t - fixed - layers * per_layer, 1e-9)
            # Each format's efficiency is fitted on its own bytes; the other parts (norms, the int8 head of the
            # int4 model) are taken at the efficiency their format has so far.
            rest = sum(b / (bandwidth_gb_s * 1e9 * new.get(f, eff.get(f, new.get("float32", 1e9))))
                       for f, b in by.items() if f != fmt)
            new[fmt] = min(1.5, by[fmt] / (bandwidth_gb_s * 1e9 * max(mem_t - rest, 1e-9)))
        eff = new
    return fixed, per_layer, eff


def fit_decode_cost(bandwidth_gb_s: float, log=print, hidden: int = 576, intermediate: int = 1536, layers: int = 8,
                    vocab: int = 49152, runtime_bytes: int = 0) -> tuple[DecodeCost, list[dict]]:
    """Fit the cost model here: two narrow random models (2 and 8 layers, few bytes) give the fixed cost per
    layer and per token; a SmolLM2-wide one in float32, bfloat16, int8 and int4 gives each format's efficiency and
    its prefill line (a call's cost: float dispatch, or de-quantization for int8/int4; and a token's). Decode is
    timed through ``model(tok, pos)``, which takes the native step when it is on, exactly as generate and the engine
    do; the rows say which path ran."""
    from ..compress.quant.apply import quantize_model
    from ..compress.recipe import load_recipe

    rows = []
    narrow = {}
    for n in (2, 8):
        m = random_model(64, n, 128, 256, heads=4, kv=2)
        t = seconds_per_token(m, steps=32)
        narrow[n] = (bytes_by_format(m), t)
        path = decode_path(m)
        rows.append({"probe": f"narrow-{n}-layers", "layers": n, "bytes_per_token": decode_bytes_per_token(m),
                     "seconds_per_token": t, "decode_path": path})
        log(f"  narrow model, {n} layers: {t * 1e3:.2f} ms/token ({path} decode step)")
    wide = []
    gfl = None
    pre_tok: dict[str, float] = {}
    dequant: dict[str, float] = {}
    pre_fixed_layer = 0.0
    for fmt, recipe in (("float32", None), ("bfloat16", None), ("int8", "w8"), ("int4", "w4g128-rtn")):
        m = random_model(hidden, layers, intermediate, vocab)
        if fmt == "bfloat16":
            m = m.to(torch.bfloat16)
        if recipe:
            quantize_model(m, load_recipe(recipe).quantize)
        lin = linear_params_by_format(m)
        call_s, tok_s = fit_prefill_line(m)
        pre_tok[fmt] = tok_s / lin[fmt]
        if fmt == "float32":
            gfl = 2.0 * m.num_parameters() / max(tok_s, 1e-12) / 1e9
            pre_fixed_layer = call_s / layers  # dispatch and the last position's head, spread over the layers
        elif fmt in ("int8", "int4"):
            dequant[fmt] = max(0.0, call_s - layers * pre_fixed_layer) / lin[fmt]
        by = bytes_by_format(m)
        t = seconds_per_token(m)
        wide.append((fmt, by, t))
        rows.append({"probe": f"wide-{fmt}", "layers": layers, "bytes_per_token": sum(by.values()),
                     "bytes_by_format": by, "seconds_per_token": t, "decode_path": decode_path(m),
                     "prefill_call_s": call_s, "prefill_token_s": tok_s, "linear_params": lin[fmt]})
        log(f"  SmolLM2-wide random model, {layers} layers, {fmt}: {rows[-1]['decode_path']} decode "
            f"{t * 1e3:.1f} ms/token, {sum(by.values()) / 1e6:.0f} MB a token; prefill {call_s * 1e3:.0f} ms a "
            f"call + {tok_s * 1e3:.2f} ms a token")
        del m
        gc.collect()
    fixed, per_layer, eff = solve_decode_fit(bandwidth_gb_s, narrow, wide, layers)
    for r in rows[2:]:
        r["efficiency"] = eff[r["probe"].removeprefix("wide-")]
    cost = DecodeCost(efficiency=eff, fixed_s_per_layer=per_layer, fixed_s=fixed, prefill_gflops=gfl,
                      prefill_fixed_s_per_layer=pre_fixed_layer, prefill_s_per_param_token=pre_tok,
                      dequant_s_per_param=dequant, runtime_bytes=runtime_bytes)
    return cost, rows
