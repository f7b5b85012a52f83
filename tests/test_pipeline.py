"""Pipeline split: stages in their own processes on loopback give the whole model's logits, each with its own KV
slice; the DP split is used by the planner when a variant fits on no single device."""

import torch

from slimswarm.deploy.devices import DeviceSet
from slimswarm.deploy.pipeline_run import PipelineRunner
from slimswarm.deploy.planner import solve

from test_planner import agent, dev, table, team


def _whole(model, ids, prefill):
    with torch.inference_mode():
        model.setup_cache(1, 64)
        out = [model(ids[:, :prefill], 0)]
        out += [model(ids[:, i:i + 1], i) for i in range(prefill, ids.shape[1])]
        model.clear_cache()
    return out


def test_pipeline_logits_equal_whole_model_for_2_and_3_stages(stories):
    m = stories.model
    n = m.config.num_hidden_layers
    ids = torch.randint(3, m.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = _whole(m, ids, 16)
    kv_layer = 2 * 64 * m.config.num_key_value_heads * m.config.head_dim * 4  # K and V, 64 slots, fp32
    for ranges in ([(0, 2), (2, n)], [(0, 1), (1, 3), (3, n)]):
        with PipelineRunner(m, ranges) as p:
            kv = p.setup_cache(1, 64)
            assert kv == [(hi - lo) * kv_layer for lo, hi in ranges]  # each stage holds only its layers' KV
            got = [p.forward(ids[:, :16], 0)] + [p.forward(ids[:, i:i + 1], i) for i in range(16, 24)]
            assert len(p.stats) == 9 and p.per_hop_overhead_s() > 0
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5


def test_planner_splits_a_model_that_fits_on_no_device():
    t = {"smollm2-135m": table()}
    # fp32 (538 MB + KV + 50 MB runtime) fits neither 400 MB device alone; split over both it does
    d = DeviceSet(devices=[dev("a", 400, links=["b"]), dev("b", 400, links=["a"])])
    plan = solve(team(agent("big", max_delta_ppl=0.0, p95_budget_s=30)), t, d, "latency")
    (p,) = plan.placements
    assert p.variant == "fp32" and sorted(p.devices) == ["a", "b"]
    assert p.layers[0][0] == 0 and p.layers[-1][1] == 30 and p.layers[0][1] == p.layers[1][0]
    for name, parts in plan.device_bytes.items():
        assert sum(parts.values()) <= plan.capacity[name]
    # without a link between them there is no split, and the error says why
    import pytest

    from slimswarm.deploy.planner import Infeasible

    with pytest.raises(Infeasible, match="fits on no device"):
        solve(team(agent("big", max_delta_ppl=0.0)), t, DeviceSet(devices=[dev("a", 400), dev("b", 400)]))
