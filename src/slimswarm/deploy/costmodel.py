"""deploy/: the cost model (decode: bytes read per token by weight format / (bandwidth × efficiency) + the KV read at
attention's efficiency + fixed cost per layer, a generate step through the native step as served; prefill: a per-call
de-quantization of quantized layers + a per-token matmul cost) and its fit on this machine with random-weight models
timed round-robin, as `devices probe` runs it."""

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


def groups_by_format(model) -> dict[str, int]:
    """(row, group) pairs the quantized matmuls of one decode step run over, by format (the decoder layers and the
    LM head; the embedding lookup reads one row). The native loops pay a fixed cost a group (a horizontal sum, a
    scale and a zero-point term), which is why small groups run slower than their bytes say."""
    from ..compress.quant.linear import QuantLinear

    out: dict[str, int] = {}
    seen: set[int] = set()
    for mod in [*model.model.layers.modules(), model.lm_head]:
        if isinstance(mod, QuantLinear) and id(mod) not in seen:
            seen.add(id(mod))
            f = weight_format(mod)
            out[f] = out.get(f, 0) + mod.out_features * (mod.in_features // mod.group_size)
    return out


def decode_seconds_per_token(cost: DecodeCost, by_format: dict[str, int], layers: int, bandwidth_gb_s: float,
                             kv_read_bytes: int = 0, groups_by_format: dict[str, int] | None = None) -> float:
    """One batch-1 decode step: every weight byte read at its format's efficiency, each quantized matmul's
    (row, group) pairs at the format's fitted cost a group (``groups_by_format``; none given: none priced), the KV
    cache read so far (``kv_read_bytes``: attention, at the fitted ``kv`` efficiency; float32's in profiles fitted
    before it existed), plus the fixed per-token and per-layer costs."""
    t = cost.fixed_s + layers * cost.fixed_s_per_layer
    t += kv_read_bytes / (bandwidth_gb_s * 1e9 * kv_efficiency(cost.efficiency))
    for fmt, b in by_format.items():
        eff = cost.efficiency.get(fmt, cost.efficiency.get("float32", 0.5))
        t += b / (bandwidth_gb_s * 1e9 * eff)
    for fmt, g in (groups_by_format or {}).items():
        t += g * cost.group_s.get(fmt, 0.0)
    return t


def kv_efficiency(eff: dict[str, float]) -> float:
    return eff.get("kv", eff.get("float32", 0.5))


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


def decode_step_seconds(model, prompt_len: int = 8, steps: int = 32) -> float:
    """Seconds a decode step of one greedy ``generate`` of ``steps`` tokens after a ``prompt_len``-token prompt takes:
    generate's own decode timing, so the sampling and the Python around the step count as they do when a variant is
    measured (evaluate.speed.decode_tokens_per_s) or served."""
    from ..evaluate.speed import _prompt
    from ..models.generate import generate_ids
    from ..models.sampling import SamplingParams

    c = generate_ids(model, [_prompt(model.config.vocab_size, prompt_len)], SamplingParams(max_tokens=steps))[0]
    model.clear_cache()
    return c.timings["decode_s"] / max(c.timings["decode_steps"], 1)


def interleaved_decode_times(jobs: dict[str, tuple], rounds: int = 5, steps: int = 32) -> dict[str, list[float]]:
    """``jobs``: key -> (model, prompt_len). Each job's seconds a decode step, ``rounds`` times, round-robin over the
    jobs (a slow spell of the machine then hits every job alike, and the median of each drops it)."""
    for m, n in jobs.values():  # warm: native step built, pool started, pages touched
        decode_step_seconds(m, n, 4)
    out: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for k, (m, n) in jobs.items():
            out[k].append(decode_step_seconds(m, n, steps))
    return out


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


def kv_read_bytes(model, prompt_len: int, steps: int) -> int:
    """KV bytes a decode step reads on average over ``steps`` steps after a ``prompt_len``-token prompt."""
    from .variants import kv_bytes_per_token

    return kv_bytes_per_token(model) * (prompt_len + steps // 2)


def solve_decode_fit(bandwidth_gb_s: float, narrow: dict[int, dict], wide: list[dict], kv: tuple[dict, dict] | None,
                     rounds: int = 8):
    """(fixed_s, fixed_s_per_layer, efficiency, group_s) from timed models; each timing is a dict: ``by`` (weight bytes
    by format), ``groups`` ((row, group) pairs by format), ``layers``, ``kv`` (KV bytes a step reads), ``t`` (seconds
    a step). ``narrow``: layers -> timing of two narrow models, whose few bytes are mostly fixed cost; ``wide``: timings
    of wide models with ``fmt`` set, in fitting order: one per format gives its efficiency; two of one format with
    different group counts split its time into a part per byte and a part per group; ``kv``: one model timed at a
    short and a long context (the difference is attention: the ``kv`` efficiency). Other parts are taken off at the
    figures of the previous round, so the split is exact when the timings follow the model."""
    (n0, a0), (n1, a1) = sorted(narrow.items())
    bw = bandwidth_gb_s * 1e9
    eff: dict[str, float] = {}
    gs: dict[str, float] = {}
    if kv is not None:
        short, long = kv
        dt = long["t"] - short["t"]
        if dt > 0 and long["kv"] > short["kv"]:
            eff["kv"] = min(1.5, max(0.01, (long["kv"] - short["kv"]) / (bw * dt)))

    def other_s(tm: dict, e: dict, g: dict, skip: str | None = None) -> float:
        s = tm["kv"] / (bw * e.get("kv", e.get("float32", 1e9)))
        s += sum(b / (bw * e.get(f, e.get("float32", 1e9))) for f, b in tm["by"].items() if f != skip)
        return s + sum(n * g.get(f, 0.0) for f, n in tm.get("groups", {}).items() if f != skip)

    by_fmt: dict[str, list[dict]] = {}
    for tm in wide:
        by_fmt.setdefault(tm["fmt"], []).append(tm)
    for _ in range(rounds):
        c0, c1 = a0["t"] - other_s(a0, eff, gs), a1["t"] - other_s(a1, eff, gs)
        per_layer = max(0.0, (c1 - c0) / (n1 - n0))
        fixed = max(0.0, c0 - n0 * per_layer)
        new: dict[str, float] = {k: v for k, v in eff.items() if k == "kv"}
        new_g: dict[str, float] = {}
        for fmt, tms in by_fmt.items():
            # this format's own time in each model: the rest (norms, the int8 head of the int4 model, the KV reads)
            # at the figures its formats have so far
            cur, cur_g = {**eff, **new}, {**gs, **new_g}
            pts = [(tm["by"][fmt], tm.get("groups", {}).get(fmt, 0),
                    max(tm["t"] - fixed - tm["layers"] * per_layer - other_s(tm, cur, cur_g, fmt), 1e-9)) for tm in tms]
            u, c = _per_byte_and_group(pts)
            new[fmt] = min(1.5, 1 / (bw * u))
            if c:
                new_g[fmt] = c
        eff, gs = new, new_g
    return fixed, per_layer, eff, gs


def _per_byte_and_group(pts: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(seconds a byte, seconds a group) through points (bytes, groups, seconds): least squares when the group counts
    differ (clamped at no negative part), else all of it a byte."""
    if len(pts) >= 2 and len({g for _, g, _ in pts}) > 1:
        sbb = sum(b * b for b, _, _ in pts)
        sbg = sum(b * g for b, g, _ in pts)
        sgg = sum(g * g for _, g, _ in pts)
        sbt = sum(b * t for b, _, t in pts)
        sgt = sum(g * t for _, g, t in pts)
        det = sbb * sgg - sbg * sbg
        if det > 0:
            u = (sbt * sgg - sgt * sbg) / det
            c = (sbb * sgt - sbg * sbt) / det
            if u > 0 and c >= 0:
                return u, c
    return sum(t for _, _, t in pts) / sum(b for b, _, _ in pts), 0.0


# The models the probe times: (format, recipe, layers). The int4 one has SmolLM2-135M's depth and so its layout:
# 4-bit decoder linears in groups of 96 (576 = 6 x 96; 128 does not divide it) and 128 (down_proj's 1536 inputs),
# beside the int8 tied embedding/head (49152 x 576) that ``head_bits: 8`` keeps. At 8 layers that head was 2/3 of the
# model's bytes and the int4 figure came out of a small difference; at 30 layers the 4-bit codes are 2/3 of them.
# The 4-bit loop with float activations is compute-bound: besides its bytes it pays a fixed cost a group (a
# horizontal sum and the scale/zero terms), which GROUPED fits, so a layout other than this mix is priced too.
# The int8 one is SmolLM2-deep too: with int8 activations (the native step's default) its loop streams at DRAM
# speed, and at 8 layers (57 MB) a good part of it stayed in the 32 MB L3: w8 was then predicted 25% fast.
WIDE = (("float32", None, 8), ("bfloat16", None, 8), ("int8", "w8", 30), ("int4", "w4g128-rtn", 30))
# The same int8 and int4 models again with groups of 32 (5-12x the groups): each format's cost a group, so that a
# recipe with other group sizes (w4g64, the 8-bit copies of 5/6-bit codes in groups of 64) is priced by its own.
GROUPED = (("int8", "w8", 30, 32), ("int4", "w4g128-rtn", 30, 32))
# Attention's price per KV byte: a model with SmolLM2's attention (9 query heads, 3 kv heads of 64) in 30 layers but
# a tiny MLP and vocabulary, int8 weights (~26 MB), decoded after a short and a long prompt: at 480 positions its
# float32 KV cache (22 MB a step) is about half the step, so the difference is well above the timing noise.
ATTENTION_MODEL = {"layers": 30, "intermediate": 64, "vocab": 256, "recipe": "w8"}
KV_PROMPTS = (8, 480)


def fit_decode_cost(bandwidth_gb_s: float, log=print, hidden: int = 576, intermediate: int = 1536,
                    vocab: int = 49152, runtime_bytes: int = 0, wide_models=WIDE, rounds: int = 5,
                    steps: int = 32, prefill_layers: int = 8, attention: bool = True,
                    grouped_models=GROUPED) -> tuple[DecodeCost, list[dict]]:
    """Fit the cost model here: two narrow random models (2 and 8 layers, few bytes) give the fixed cost per
    layer and per token; SmolLM2-wide ones in float32, bfloat16, int8 and int4 (``wide_models``) give each format's
    efficiency and its prefill line (a call's cost: float dispatch, or de-quantization for int8/int4; and a token's);
    the int8 and int4 ones again in small groups (``grouped_models``) split those formats' time into a part a byte
    and a part a (row, group) pair; a model that is mostly attention (``ATTENTION_MODEL``), decoded after a short and
    a long prompt, gives attention's price per KV byte. Decode is timed through ``generate`` (which takes the native
    step when it is on, exactly as the engine does; the rows say which path ran), every model ``rounds`` times
    round-robin, and the medians are fitted (the rows keep every timing)."""
    from ..compress.quant.apply import quantize_model
    from ..compress.recipe import load_recipe

    rows: list[dict] = []
    models: dict[str, tuple] = {}
    for n in (2, 8):
        models[f"narrow-{n}-layers"] = (random_model(64, n, 128, 256, heads=4, kv=2), 8)
    pre_tok: dict[str, float] = {}
    dequant: dict[str, float] = {}
    pre_fixed_layer = 0.0
    gfl = None
    for fmt, recipe, layers in wide_models:
        def build(n):
            m = random_model(hidden, n, intermediate, vocab)
            if fmt == "bfloat16":
                m = m.to(torch.bfloat16)
            if recipe:
                quantize_model(m, load_recipe(recipe).quantize)
            gc.collect()
            return m

        # Prefill is fitted at one depth for every format (the float model's per-call cost, its head's last
        # position included, is spread over its layers, and the quantized ones' de-quantization is what is left);
        # decode at the format's own depth.
        pm = build(prefill_layers)
        lin = linear_params_by_format(pm)
        call_s, tok_s = fit_prefill_line(pm)
        pre_tok[fmt] = tok_s / lin[fmt]
        if fmt == "float32":
            gfl = 2.0 * pm.num_parameters() / max(tok_s, 1e-12) / 1e9
            pre_fixed_layer = call_s / prefill_layers  # dispatch and the last position's head, spread over the layers
        elif fmt in ("int8", "int4"):
            dequant[fmt] = max(0.0, call_s - prefill_layers * pre_fixed_layer) / lin[fmt]
        m = pm if layers == prefill_layers else build(layers)
        del pm
        models[f"wide-{fmt}"] = (m, KV_PROMPTS[0])
        rows.append({"probe": f"wide-{fmt}", "layers": layers, "prefill_layers": prefill_layers,
                     "prefill_call_s": call_s, "prefill_token_s": tok_s, "linear_params": lin[fmt]})
        log(f"  SmolLM2-wide random model, {fmt}: prefill ({prefill_layers} layers) {call_s * 1e3:.0f} ms a call + "
            f"{tok_s * 1e3:.2f} ms a token; decode timed at {layers} layers")
    for fmt, recipe, layers, g in grouped_models:
        m = random_model(hidden, layers, intermediate, vocab)
        quantize_model(m, load_recipe(recipe).quantize.model_copy(update={"group_size": g}))
        gc.collect()
        models[f"wide-{fmt}-g{g}"] = (m, KV_PROMPTS[0])
    if attention:
        a = ATTENTION_MODEL
        am = random_model(hidden, a["layers"], a["intermediate"], a["vocab"])
        quantize_model(am, load_recipe(a["recipe"]).quantize)
        models["attention-short"] = (am, KV_PROMPTS[0])
        models["attention-long"] = (am, KV_PROMPTS[1])
    log(f"  decode: {len(models)} timings x {rounds} rounds, round-robin, {steps} tokens each ...")
    times = interleaved_decode_times(models, rounds, steps)
    timed: dict[str, dict] = {}
    for key, (m, n) in models.items():
        ts = times[key]
        timed[key] = {"by": bytes_by_format(m), "groups": groups_by_format(m), "layers": m.config.num_hidden_layers,
                      "kv": kv_read_bytes(m, n, steps), "t": statistics.median(ts),
                      "fmt": key.removeprefix("wide-").split("-g")[0]}
        row = next((r for r in rows if r["probe"] == key), None)
        if row is None:
            row = {"probe": key, "layers": m.config.num_hidden_layers}
            rows.append(row)
        row.update(prompt_tokens=n, bytes_per_token=sum(timed[key]["by"].values()), bytes_by_format=timed[key]["by"],
                   groups_by_format=timed[key]["groups"],
                   kv_read_bytes=timed[key]["kv"], seconds_per_token=timed[key]["t"], seconds_per_token_runs=ts,
                   spread_pct=round(100 * (max(ts) - min(ts)) / timed[key]["t"], 1), decode_path=decode_path(m))
        log(f"  {key} (prompt {n}): {row['decode_path']} decode {timed[key]['t'] * 1e3:.2f} ms/token median, "
            f"{min(ts) * 1e3:.2f}..{max(ts) * 1e3:.2f} over {len(ts)} rounds")
    narrow = {timed[k]["layers"]: timed[k] for k in timed if k.startswith("narrow-")}
    wide = [timed[f"wide-{f}"] for f, _, _ in wide_models]
    wide += [timed[f"wide-{f}-g{g}"] for f, _, _, g in grouped_models]
    kv = (timed["attention-short"], timed["attention-long"]) if attention else None
    fixed, per_layer, eff, group_s = solve_decode_fit(bandwidth_gb_s, narrow, wide, kv)
    for r in rows:
        f = r["probe"].removeprefix("wide-")
        if f in eff:
            r["efficiency"] = eff[f]
    if "kv" in eff:
        log(f"  attention: {eff['kv']:.2f} of the read bandwidth per KV byte")
    for f, c in group_s.items():
        log(f"  {f}: {c * 1e9:.2f} ns a (row, group) pair beside efficiency {eff[f]:.2f}")
    del models
    gc.collect()
    cost = DecodeCost(efficiency=eff, fixed_s_per_layer=per_layer, fixed_s=fixed, prefill_gflops=gfl,
                      prefill_fixed_s_per_layer=pre_fixed_layer, prefill_s_per_param_token=pre_tok,
                      dequant_s_per_param=dequant, runtime_bytes=runtime_bytes, group_s=group_s)
    return cost, rows
