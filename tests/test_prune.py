"""Pruning: exact N:M and unstructured masks, Wanda/SparseGPT beat magnitude on real activations, structured removal
shrinks the model by exactly what it removes and equals the masked model, compact storage round-trips bit-exactly."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimswarm.compress.prune import magnitude_prune, nm_mask, row_topk_mask, sparsegpt_prune, wanda_prune
from slimswarm.compress.prune.apply import param_counts, prune_model
from slimswarm.compress.prune.schedule import GradualPruner, PolynomialSchedule
from slimswarm.compress.prune.sparse import SparseLinear, storage_bytes
from slimswarm.compress.prune.structured import remove_channels, remove_heads, remove_layers, structured_prune
from slimswarm.compress.recipe import PruneConfig, _validate, load_recipe
from slimswarm.errors import SlimswarmError


@pytest.fixture(scope="module")
def calib(stories, data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    ids = stories.tokenizer.encode(text * 4)
    return torch.tensor(ids[: 8 * 128]).view(8, 128)


@pytest.fixture(scope="module")
def layer_stats(stories, calib):
    """Inputs (Hessian and token sample) of every linear of decoder layer 2, from real calibration text."""
    from slimswarm.compress.layerwise import collect_stats as _collect, run_layer as _run_layer

    m = stories.model
    x = m.model.embed_tokens(calib)
    cos, sin = m.rope(torch.arange(calib.shape[1]).expand(1, -1), x.dtype)
    with torch.no_grad():
        for layer in m.model.layers[:2]:
            x = _run_layer(layer, x, cos, sin)
        layer = m.model.layers[2]
        names = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        stats = _collect(layer, x, cos, sin, names, keep_tokens=1024)
    return {n: (names[n].weight.detach().clone(), s["H"], s["x"]) for n, s in stats.items()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


# -- masks -------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8)]),
       ints=st.booleans(), seed=st.integers(0, 2**16))
def test_nm_keeps_exactly_n_in_every_group_of_m(rows, groups, nm, ints, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    if ints:  # many ties: the mask must still hold exactly n a group
        w = torch.randint(-2, 3, (rows, groups * m), generator=g).float() + 0.5
    mask = nm_mask(w.abs(), n, m)
    assert (mask.view(rows, groups, m).sum(-1) == n).all()
    pruned = magnitude_prune(w, 0.0, f"{n}:{m}")
    assert ((pruned != 0).view(rows, groups, m).sum(-1) == n).all()
    kept = w.abs().view(rows, groups, m).topk(n, -1).values.sum()
    assert torch.isclose(pruned.abs().sum(), kept)  # the n largest of each group survive


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), s=st.floats(0, 0.99), per_row=st.booleans())
def test_unstructured_sparsity_fraction_is_exact(rows, cols, s, per_row):
    w = torch.randn(rows, cols) + 3  # no accidental zeros
    pruned = magnitude_prune(w, s, per_row=per_row)
    if per_row:
        assert ((pruned == 0).sum(1) == round(s * cols)).all()
    else:
        assert int((pruned == 0).sum()) == round(s * rows * cols)


def test_every_method_hits_the_fraction_and_pattern(layer_stats):
    w, H, _ = layer_stats["mlp.gate_proj"]
    for pruned in (wanda_prune(w, torch.diag(H), 0.5), sparsegpt_prune(w, H, 0.5)):
        assert ((pruned == 0).sum(1) == w.shape[1] // 2).all()
    for pruned in (wanda_prune(w, torch.diag(H), 0, "2:4"), sparsegpt_prune(w, H, 0, "2:4")):
        assert ((pruned != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
    w, H, _ = layer_stats["mlp.down_proj"]  # 172 inputs: blocks of 128 + 44, the count must still be exact
    assert ((sparsegpt_prune(w, H, 0.3) == 0).sum(1) == round(0.3 * 172)).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_reconstruct_real_activations_better_than_magnitude(layer_stats, pattern):
    err = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for name, (w, H, x) in layer_stats.items():
        ref = x @ w.T
        outs = {"magnitude": magnitude_prune(w, 0.5, pattern), "wanda": wanda_prune(w, torch.diag(H), 0.5, pattern),
                "sparsegpt": sparsegpt_prune(w, H, 0.5, pattern)}
        for k, wp in outs.items():
            err[k] += float((x @ wp.T - ref).pow(2).sum())
    assert err["wanda"] < err["magnitude"]
    assert err["sparsegpt"] < err["wanda"]


def test_bad_sparsity_and_nm_width_are_one_line_errors():
    w = torch.randn(4, 6)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(SlimswarmError, match=str(bad)):
            row_topk_mask(w, bad)
    with pytest.raises(SlimswarmError, match=r"model.layers.0.mlp.up_proj.*\(6\)"):
        magnitude_prune(w, 0, "2:4", name="model.layers.0.mlp.up_proj")
    with pytest.raises(SlimswarmError, match="prune.sparsity.*1.5") as e:
        _validate({"prune": {"sparsity": 1.5}}, "recipe.yaml")
    assert "\n" not in str(e.value)
    with pytest.raises(SlimswarmError, match="pattern"):
        _validate({"prune": {"pattern": "4:2"}}, "recipe.yaml")
    with pytest.raises(SlimswarmError, match="storage sparse"):
        _validate({"prune": {"sparsity": 0.5}, "quantize": {"bits": 4}}, "recipe.yaml")


def test_nm_width_checked_against_the_model_before_work(stories):
    m = copy.deepcopy(stories.model)
    with pytest.raises(SlimswarmError, match=r"down_proj.*\(172\).*8"):
        prune_model(m, PruneConfig(method="magnitude", pattern="4:8"))


# -- structured --------------------------------------------------------------------------------------------------


def test_removing_heads_shrinks_exactly_and_equals_zeroed_heads(stories):
    cfg = stories.model.config
    hd, h, g = cfg.head_dim, cfg.hidden_size, cfg.num_attention_heads // cfg.num_key_value_heads
    pruned, masked = copy.deepcopy(stories.model), copy.deepcopy(stories.model)
    removed = remove_heads(pruned, 1, [0, 2, 3])  # drop KV head 1 and its query heads 2, 3
    remove_heads(pruned, 4, [])  # a layer may lose every head
    expected = (g * hd * h) * 2 + 2 * hd * h  # q rows + o columns + k, v rows of one group
    assert removed == expected
    assert stories.model.num_parameters() - pruned.num_parameters() == expected + 4 * expected
    assert pruned.config.layer_kv_heads == [4, 3, 4, 4, 0]
    with torch.no_grad():
        for li, kvs in ((1, [1]), (4, [0, 1, 2, 3])):
            a = masked.model.layers[li].self_attn
            for k in kvs:
                a.k_proj.weight[k * hd : (k + 1) * hd] = 0
                a.v_proj.weight[k * hd : (k + 1) * hd] = 0
                a.q_proj.weight[k * g * hd : (k + 1) * g * hd] = 0
                a.o_proj.weight[:, k * g * hd : (k + 1) * g * hd] = 0
    ids = torch.randint(3, cfg.vocab_size, (2, 40))
    torch.testing.assert_close(logits(pruned, ids), logits(masked, ids), atol=1e-5, rtol=1e-5)


def test_removing_channels_and_layers_shrinks_exactly_and_equals_zeroed_model(stories):
    cfg = stories.model.config
    pruned, masked = copy.deepcopy(stories.model), copy.deepcopy(stories.model)
    drop = [0, 5, 17, 100]
    keep = [j for j in range(cfg.intermediate_size) if j not in drop]
    assert remove_channels(pruned, 2, keep) == 3 * cfg.hidden_size * len(drop)
    layer3 = sum(p.numel() for p in stories.model.model.layers[3].parameters())
    assert remove_layers(pruned, [3]) == layer3
    assert stories.model.num_parameters() - pruned.num_parameters() == 3 * cfg.hidden_size * len(drop) + layer3
    assert pruned.config.num_hidden_layers == 4 and pruned.config.layer_intermediate is None or \
        pruned.config.layer_intermediate == [cfg.intermediate_size] * 2 + [len(keep), cfg.intermediate_size]
    with torch.no_grad():
        mlp = masked.model.layers[2].mlp
        mlp.gate_proj.weight[drop] = 0
        mlp.up_proj.weight[drop] = 0
        mlp.down_proj.weight[:, drop] = 0
        masked.model.layers[3].self_attn.o_proj.weight.zero_()  # a layer writing nothing is the identity
        masked.model.layers[3].mlp.down_proj.weight.zero_()
    ids = torch.randint(3, cfg.vocab_size, (2, 40))
    torch.testing.assert_close(logits(pruned, ids), logits(masked, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_structured_prune_from_calibration_matches_config_sizes(stories, calib, scope):
    m = copy.deepcopy(stories.model)
    meta = structured_prune(m, calib, heads=0.25, channels=0.25, layers=1, scope=scope)
    cfg = m.config
    assert cfg.num_hidden_layers == 4 and len(meta["layers_removed"]) == 1
    assert sum(cfg.kv_heads(i) for i in range(4)) == 16 - round(0.25 * 16)
    if scope == "layer":  # every layer loses the same share
        assert [cfg.kv_heads(i) for i in range(4)] == [3] * 4
        assert [cfg.intermediate(i) for i in range(4)] == [172 - round(0.25 * 172)] * 4
    else:
        assert sum(cfg.intermediate(i) for i in range(4)) == 4 * 172 - round(0.25 * 4 * 172)
    hd, h = cfg.head_dim, cfg.hidden_size
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    per_layer = [2 * h + cfg.kv_heads(i) * hd * h * (2 * g + 2) + 3 * h * cfg.intermediate(i) for i in range(4)]
    assert m.num_parameters() == sum(per_layer) + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    from slimswarm.models.generate import generate_ids
    from slimswarm.models.sampling import SamplingParams

    assert len(generate_ids(m, [[1, 2, 3]], SamplingParams(max_tokens=5))[0].tokens) == 5  # KV cache with new sizes


# -- schedule ----------------------------------------------------------------------------------------------------


def test_polynomial_schedule_values():
    s = PolynomialSchedule(initial=0.0, final=0.8, start=10, steps=4, interval=5)
    expect = {0: 0.0, 9: 0.0, 10: 0.0, 14: 0.0, 15: 0.8 - 0.8 * 0.75**3, 17: 0.8 - 0.8 * 0.75**3,
              20: 0.8 - 0.8 * 0.5**3, 29: 0.8 - 0.8 * 0.25**3, 30: 0.8, 1000: 0.8}
    for t, v in expect.items():
        assert s.sparsity_at(t) == pytest.approx(v), t
    assert PolynomialSchedule(initial=0.2, final=0.6, steps=2, interval=1).sparsity_at(0) == pytest.approx(0.2)


def test_gradual_pruner_keeps_masks_between_updates(stories):
    m = copy.deepcopy(stories.model)
    pruner = GradualPruner(PolynomialSchedule(final=0.5, steps=2, interval=2))
    name = "model.layers.0.mlp.up_proj"
    lin = m.get_submodule(name)
    for t in range(6):
        s = pruner.step(m, t)
        assert float((lin.weight == 0).float().mean()) == pytest.approx(s, abs=1 / lin.in_features)
        with torch.no_grad():
            lin.weight.add_(0.01)  # an optimizer step would revive pruned weights; the next call zeroes them again
    assert s == pytest.approx(0.5)


# -- compact storage and checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.5, 0.02])  # CSR wins below ~1/16 density (2-byte columns vs 1 bit each)
def test_sparse_linear_formats_are_exact_and_pick_the_smallest(density):
    w = magnitude_prune(torch.randn(48, 256), 1 - density)
    b = torch.randn(48)
    s = SparseLinear.from_dense(w, b)
    assert torch.equal(s.to_dense(), w)
    x = torch.randn(3, 256)
    torch.testing.assert_close(s(x), x @ w.T + b)
    nnz = int((w != 0).sum())
    assert s.fmt == ("bitmask" if density == 0.5 else "csr")
    assert s.compact_bytes() - 48 * 4 == min(storage_bytes(48, 256, nnz, 4, f) for f in ("bitmask", "csr"))


def test_sparse_checkpoint_round_trips_bit_exactly_and_is_smaller(stories, tmp_path):
    from slimswarm.evaluate.size import disk_bytes
    from slimswarm.models.checkpoint import load_checkpoint, save_checkpoint

    m = copy.deepcopy(stories.model)
    meta = prune_model(m, PruneConfig(method="magnitude", pattern="2:4"))
    assert {v["format"] for v in meta["layers"].values()} == {"nm"}
    save_checkpoint(m, stories.tokenizer, tmp_path / "s", {"pruning": meta})
    save_checkpoint(stories.model, stories.tokenizer, tmp_path / "d", {})
    back = load_checkpoint(tmp_path / "s").model
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(3, 512, (1, 30))
    assert torch.equal(logits(m, ids), logits(back, ids))
    linear = sum(p.numel() for n, p in stories.model.named_parameters() if "layers" in n and "proj" in n)
    expected = linear * 4 * (0.5 + 1 / 32)  # half the values (fp32) + 2 bits per kept value
    saved = (tmp_path / "d/model.safetensors").stat().st_size - (tmp_path / "s/model.safetensors").stat().st_size
    assert saved == pytest.approx(linear * 4 - expected, rel=0.01)
    assert disk_bytes(tmp_path / "s") < disk_bytes(tmp_path / "d")
    total, nonzero = param_counts(m)
    assert total == stories.model.num_parameters() and nonzero == total - linear // 2


def test_presets_load():
    for name in ("wanda-50", "sparsegpt-2:4", "struct-25", "magnitude-50"):
        assert load_recipe(name).prune is not None


# -- CLI ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.5"], "1.5"),
    (["--pattern", "4:8"], "172"),
    (["--structured", "layers=9"], "layers"),
    (["--structured", "heads"], "--structured"),
    (["--method", "magnitude"], "nothing to prune"),
])
def test_cli_bad_input_exits_2_and_leaves_no_folder(tmp_path, capsys, args, msg):
    from slimswarm.cli import main

    out = tmp_path / "out"
    assert main(["prune", "stories260k", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_prune_writes_a_smaller_checkpoint(tmp_path, capsys):
    from slimswarm.cli import main

    out = tmp_path / "out"
    assert main(["prune", "stories260k", "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["params"] == row["params_before"] == 260032 and row["nonzero_params"] < 150_000
    assert row["weight_bytes"] < 0.65 * row["weight_bytes_before"]
    assert (out / "slimswarm.json").exists() and row["disk_bytes"] > 0


def test_structured_checkpoint_reloads_with_its_per_layer_sizes(stories, calib, tmp_path):
    from slimswarm.models.checkpoint import load_checkpoint, save_checkpoint

    m = copy.deepcopy(stories.model)
    structured_prune(m, calib, heads=0.3, channels=0.3)
    save_checkpoint(m, stories.tokenizer, tmp_path / "st", {})
    back = load_checkpoint(tmp_path / "st").model
    assert back.config.layer_kv_heads == m.config.layer_kv_heads
    assert back.num_parameters() == m.num_parameters()
    ids = torch.randint(3, 512, (1, 30))
    assert torch.equal(logits(m, ids), logits(back, ids))


def test_recipe_prune_then_quantize_composes(stories, calib):
    from slimswarm.compress.quant.linear import QuantLinear
    from slimswarm.compress.recipe import apply_recipe

    m = copy.deepcopy(stories.model)
    recipe = _validate({"prune": {"method": "wanda", "pattern": "2:4", "storage": "dense",
                                  "structured": {"channels": 0.25}},
                        "quantize": {"method": "rtn", "bits": 8, "group_size": -1}}, "r")
    meta = apply_recipe(m, recipe, calib)
    assert set(meta) == {"prune", "quantization"}
    up = m.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.out_features == m.config.intermediate(0)
    with pytest.raises(SlimswarmError, match="needs calibration"):
        apply_recipe(copy.deepcopy(stories.model), recipe, None)


@pytest.mark.slow
def test_smollm2_layer_wanda_and_sparsegpt_2_4_beat_magnitude(smollm2):
    from slimswarm.compress.calibrate import calibration_batch
    from slimswarm.compress.layerwise import collect_stats as _collect

    m = smollm2.model
    calib = calibration_batch(smollm2.tokenizer, None, 4, 128)
    x = m.model.embed_tokens(calib)
    cos, sin = m.rope(torch.arange(128).expand(1, -1), x.dtype)
    layer = m.model.layers[0]
    names = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    with torch.no_grad():
        stats = _collect(layer, x, cos, sin, names, keep_tokens=512)
    err = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for n, s in stats.items():
        w, X = names[n].weight.detach(), s["x"]
        ref = X @ w.T
        for k, wp in (("magnitude", magnitude_prune(w, 0, "2:4")), ("wanda", wanda_prune(w, torch.diag(s["H"]), 0, "2:4")),
                      ("sparsegpt", sparsegpt_prune(w, s["H"], 0, "2:4"))):
            err[k] += float((X @ wp.T - ref).pow(2).sum())
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]
