"""The cost model: the probe's fit recovers known decode and prefill coefficients from timings (a fake-measurement
round trip on real random-weight models, so the bytes and parameter counts are the real ones), and the planner
prices a quantized prefill's per-call de-quantization."""

import pytest

from slimswarm.deploy import costmodel
from slimswarm.deploy.costmodel import (bytes_by_format, fit_decode_cost, linear_params_by_format,
                                        prefill_call_seconds)
from slimswarm.deploy.devices import DecodeCost, DeviceSet
from slimswarm.deploy.planner import prefill_s, service_s, solve

from test_planner import COST, agent, dev, table, team

BW = 10.0  # GB/s
TRUE = {"eff": {"float32": 0.8, "bfloat16": 0.7, "int8": 0.4, "int4": 0.2, "kv": 0.3}, "fixed": 1e-4,
        "per_layer": 5e-5, "group": {"int8": 2e-9, "int4": 6e-9},
        "pre_layer": 2e-3, "pre_tok": {"float32": 5e-11, "bfloat16": 3e-11, "int8": 6e-11, "int4": 7e-11},
        "dequant": {"int8": 3e-10, "int4": 9e-10}}


def _fake_decode(model, prompt_len, steps):
    by = bytes_by_format(model)
    n = model.config.num_hidden_layers
    kv = costmodel.kv_read_bytes(model, prompt_len, steps)
    groups = costmodel.groups_by_format(model)
    return (TRUE["fixed"] + n * TRUE["per_layer"] + kv / (BW * 1e9 * TRUE["eff"]["kv"])
            + sum(b / (BW * 1e9 * TRUE["eff"][f]) for f, b in by.items())
            + sum(g * TRUE["group"][f] for f, g in groups.items()))


def _fake_interleaved(jobs, rounds=5, steps=32):
    # round 2 is a slow spell of the machine (every job 3x slower): the medians over the rounds drop it
    return {k: [_fake_decode(m, n, steps) * (3.0 if r == 1 else 1.0) for r in range(rounds)]
            for k, (m, n) in jobs.items()}


def _fake_prefill_times(model, lengths, repeats):
    return {n: [_fake_prefill(model, n)] * repeats for n in lengths}


def _fake_prefill(model, n):
    lin = linear_params_by_format(model)
    t = model.config.num_hidden_layers * TRUE["pre_layer"]
    return t + sum(p * (TRUE["dequant"].get(f, 0.0) + n * TRUE["pre_tok"][f]) for f, p in lin.items())


def test_probe_fit_recovers_the_decode_and_prefill_coefficients_it_was_timed_with(monkeypatch):
    monkeypatch.setattr(costmodel, "interleaved_decode_times", _fake_interleaved)
    monkeypatch.setattr(costmodel, "prefill_times", _fake_prefill_times)
    wide = (("float32", None, 2), ("bfloat16", None, 2), ("int8", "w8", 2), ("int4", "w4g128-rtn", 3))
    grouped = (("int8", "w8", 2, 32), ("int4", "w4g128-rtn", 3, 32))
    cost, rows = fit_decode_cost(BW, log=lambda m: None, hidden=576, intermediate=256, vocab=512, wide_models=wide,
                                 prefill_layers=2, grouped_models=grouped)
    assert cost.fixed_s == pytest.approx(TRUE["fixed"], rel=1e-6)
    assert cost.fixed_s_per_layer == pytest.approx(TRUE["per_layer"], rel=1e-6)
    for f, e in TRUE["eff"].items():
        assert cost.efficiency[f] == pytest.approx(e, rel=1e-6), f
    for f, c in TRUE["group"].items():  # the small-group models split each format's time: bytes and groups
        assert cost.group_s[f] == pytest.approx(c, rel=1e-6), f
    assert cost.prefill_fixed_s_per_layer == pytest.approx(TRUE["pre_layer"], rel=1e-6)
    for f, s in TRUE["pre_tok"].items():
        assert cost.prefill_s_per_param_token[f] == pytest.approx(s, rel=1e-6), f
    for f, s in TRUE["dequant"].items():
        assert cost.dequant_s_per_param[f] == pytest.approx(s, rel=1e-6), f
    assert set(cost.dequant_s_per_param) == {"int8", "int4"}  # float layers de-quantize nothing
    # the rows say which decode step was timed (the native one wherever it runs, as generate and the engine do)
    assert {r["decode_path"] for r in rows} <= {"native", "python"}
    # a layout it never timed (4-bit codes in groups of 64 on every linear, 5 layers) is priced by its own bytes and
    # groups: the same figure as the timing model gives it
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe

    g64 = costmodel.random_model(576, 5, 256, 512)
    quantize_model(g64, load_recipe("w4g128-rtn").quantize.model_copy(update={"group_size": 64}))
    kv = costmodel.kv_read_bytes(g64, 100, 32)
    pred = costmodel.decode_seconds_per_token(cost, bytes_by_format(g64), 5, BW, kv, costmodel.groups_by_format(g64))
    assert pred == pytest.approx(_fake_decode(g64, 100, 32), rel=1e-6)
    # fitted on 2 layers, it predicts the same fake timing of a model 4x deeper (the per-layer split is right)
    deep = costmodel.random_model(576, 8, 256, 512)
    lin = linear_params_by_format(deep)
    assert prefill_call_seconds(cost, lin, 8, 96) == pytest.approx(_fake_prefill(deep, 96), rel=1e-6)


def test_quantized_prefill_pays_its_dequantization_once_a_call():
    cost = DecodeCost(efficiency={"float32": 0.5, "int8": 0.3}, fixed_s_per_layer=0, fixed_s=0, prefill_gflops=20,
                      runtime_bytes=0, prefill_fixed_s_per_layer=1e-3,
                      prefill_s_per_param_token={"float32": 5e-11, "int8": 5e-11}, dequant_s_per_param={"int8": 1e-9})
    p = 100_000_000
    f32 = prefill_call_seconds(cost, {"float32": p}, 30, 64)
    i8 = prefill_call_seconds(cost, {"int8": p}, 30, 64)
    assert f32 == pytest.approx(0.03 + 64 * p * 5e-11)
    assert i8 - f32 == pytest.approx(p * 1e-9)  # 0.1 s a call, whatever the prompt length
    assert prefill_call_seconds(cost, {"int8": p}, 30, 256) - prefill_call_seconds(cost, {"float32": p}, 30, 256) \
        == pytest.approx(p * 1e-9)
    # a profile without the per-format fit keeps the flat price: 2 x params / GFLOP/s a token
    old = COST
    assert prefill_call_seconds(old, {"int8": p}, 30, 64) == pytest.approx(64 * 2 * p / 20e9)


def test_planner_prefers_the_float_base_when_dequantizing_per_call_costs_more_than_it_reads():
    t = table()
    slow_dequant = COST.model_copy(update={"prefill_fixed_s_per_layer": 1e-3,
                                           "prefill_s_per_param_token": {"float32": 5e-11, "int8": 5e-11,
                                                                         "int4": 5e-11},
                                           "dequant_s_per_param": {"int8": 2e-8, "int4": 2e-8}})
    t.machine = t.machine.model_copy(update={"cost": slow_dequant})
    for v in t.variants:
        v.linear_params_by_format = {next(iter(v.bytes_by_format)): 120_000_000}
    d = DeviceSet(devices=[dev("box", 3000, bw=10)])
    chatty = agent("reader", prompt_tokens=512, max_tokens=2, p95_budget_s=10)
    v = {x.name: x for x in t.variants}
    box = d.devices[0]
    # 2.4 s of de-quantization a call outweighs reading 4x the bytes in one decode step
    assert prefill_s(v["w8"], box, t, 512) - prefill_s(v["fp32"], box, t, 512) == pytest.approx(2.4)
    assert service_s(chatty, v["fp32"], box, t) < service_s(chatty, v["w8"], box, t)
    plan = solve(team(chatty), {"smollm2-135m": t}, d, "latency")
    assert plan.placements[0].variant == "fp32"
    # with the flat price (no per-call term) the smaller read wins: the term is what changes the choice
    plain = {"smollm2-135m": table()}
    assert solve(team(chatty), plain, d, "latency").placements[0].variant == "w4g128-rtn"


def test_p95_prices_a_neighbours_prefill_not_its_batched_decode():
    """The engine shares decode steps across rows but a prefill holds up the batch: a decode-heavy neighbour delays an
    agent less than a prefill-heavy one carrying the same load, and the figures are the docstring's formula."""
    from slimswarm.deploy.planner import P95_TAIL, assess, candidates

    t = {"smollm2-135m": table()}
    d = DeviceSet(devices=[dev("box", 3000)])
    me = agent("me", variants=["w8"], rate_per_s=0.1, prompt_tokens=32, max_tokens=4)
    writer = agent("writer", variants=["w8"], rate_per_s=0.1, prompt_tokens=8, max_tokens=120)
    reader = agent("reader", variants=["w8"], rate_per_s=0.15, prompt_tokens=300, max_tokens=2)
    got = {}
    for other in (writer, reader):
        tm = team(me, other)
        cs = candidates(tm, t, d)
        pick = {a.name: cs[a.name][0] for a in tm.agents}
        r = assess(tm, t, d, pick)
        S = pick["me"].service_s
        pre = {n: c.stage_pre["box"] for n, c in pick.items()}
        rate = {a.name: a.rate_per_s for a in tm.agents}
        rho = sum(rate[n] * c.service_s for n, c in pick.items())
        rho_p, w0 = sum(rate[n] * p for n, p in pre.items()), sum(rate[n] * p * p / 2 for n, p in pre.items())
        assert r["p95"]["me"] == pytest.approx((S + P95_TAIL * (rho_p * S + w0)) / (1 - rho), rel=1e-12)
        got[other.name] = (r["p95"]["me"], r["load"]["box"])
    # about the same load on the device, but the writer's is decode, the reader's prefill
    assert got["writer"][1] == pytest.approx(got["reader"][1], rel=0.05)
    assert got["writer"][0] < 0.2 * got["reader"][0]  # 2.9 s against 38.5 s here


def test_probe_rows_keep_every_rounds_timing_and_fit_the_median(monkeypatch):
    monkeypatch.setattr(costmodel, "interleaved_decode_times", _fake_interleaved)
    monkeypatch.setattr(costmodel, "prefill_times", _fake_prefill_times)
    wide = (("float32", None, 2), ("int8", "w8", 2))
    _, rows = fit_decode_cost(BW, log=lambda m: None, hidden=576, intermediate=256, vocab=512, wide_models=wide,
                              rounds=5, grouped_models=())
    byname = {r["probe"]: r for r in rows}
    assert set(byname) == {"narrow-2-layers", "narrow-8-layers", "wide-float32", "wide-int8", "attention-short",
                           "attention-long"}
    for r in rows:
        runs = r["seconds_per_token_runs"]
        assert len(runs) == 5 and r["seconds_per_token"] == sorted(runs)[2]  # the median, not the slow round
        assert max(runs) == pytest.approx(3 * r["seconds_per_token"])
    # attention's price comes from one model decoded after a short and a long prompt: its KV reads are a large
    # share of the long step's bytes, the weights the same
    short, long = byname["attention-short"], byname["attention-long"]
    assert long["bytes_by_format"] == short["bytes_by_format"]
    assert long["kv_read_bytes"] > 0.5 * long["bytes_per_token"] > 10 * short["kv_read_bytes"]


def test_the_probes_int4_model_has_the_real_smollm2_w4g128_layout(smollm2):
    """The int4 efficiency is fitted on a random model; its 4-bit linears must have the group sizes the real
    checkpoint uses (96 where 128 does not divide 576, 128 on down_proj's 1536 inputs) and its tied head int8 rows,
    so that each tensor is priced in the format and layout it really has."""
    import copy

    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.quant.linear import QuantEmbedding, QuantLinear
    from slimswarm.compress.recipe import load_recipe

    fmt, recipe, layers = next(w for w in costmodel.WIDE if w[0] == "int4")
    cfg = smollm2.model.config
    assert layers == cfg.num_hidden_layers
    probe = costmodel.random_model(cfg.hidden_size, layers, cfg.intermediate_size, cfg.vocab_size,
                                   heads=cfg.num_attention_heads, kv=cfg.num_key_value_heads)
    real = copy.deepcopy(smollm2.model)
    for m in (probe, real):
        quantize_model(m, load_recipe(recipe).quantize)

    def layout(m):
        return {n: (type(x).__name__, x.bits, x.group_size, x.in_features, x.out_features)
                for n, x in m.named_modules() if isinstance(x, QuantLinear)}

    lp, lr = layout(probe), layout(real)
    assert lp == lr
    groups = {(k[1], k[2], k[3]) for k in lr.values()}
    assert (4, 96, 576) in groups and (4, 128, 1536) in groups
    assert isinstance(real.model.embed_tokens, QuantEmbedding) and isinstance(probe.model.embed_tokens, QuantEmbedding)
    assert bytes_by_format(probe) == bytes_by_format(real)
    assert set(bytes_by_format(real)) == {"int4", "int8", "float32"}  # the head is priced as int8, not int4
    assert bytes_by_format(real)["int8"] > cfg.vocab_size * cfg.hidden_size  # the 49152 x 576 table, 1 byte a code
