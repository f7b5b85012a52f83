"""Quantization: packing, QuantLinear exactness, GPTQ/AWQ against RTN on real activations, checkpoints, recipes."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from slimswarm import load
from slimswarm.compress.calibrate import calibration_batch
from slimswarm.compress.layerwise import collect_stats as _collect
from slimswarm.compress.quant.apply import quantize_model
from slimswarm.compress.quant.awq import awq_search
from slimswarm.compress.quant.gptq import gptq_quantize
from slimswarm.compress.quant.linear import QuantLinear
from slimswarm.compress.quant.packing import pack, packed_len, unpack
from slimswarm.compress.quant.rtn import dequantize, rtn_quantize
from slimswarm.compress.recipe import load_recipe
from slimswarm.errors import SlimswarmError
from slimswarm.evaluate.perplexity import document_perplexity
from slimswarm.models.checkpoint import save_checkpoint


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_len(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_packed_sizes_are_bits_over_eight():
    assert packed_len(576, 4) == 288 and packed_len(576, 8) == 576
    assert packed_len(576, 3) == 216 and packed_len(576, 2) == 144


@pytest.mark.parametrize("bits,gs", [(4, 64), (4, -1), (8, -1), (8, 32), (3, 64), (2, 32)])
@pytest.mark.parametrize("m", [1, 8, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_equals_dequantized_reference(bits, gs, m, dtype):
    g = torch.Generator().manual_seed(bits * 100 + m)
    w = torch.randn(96, 192, generator=g) * 0.05
    b = torch.randn(96, generator=g)
    ql = QuantLinear.from_codes(*rtn_quantize(w, bits, gs), bits, b)
    x = torch.randn(m, 192, generator=g).to(dtype)
    ref = F.linear(x.float(), ql.dequantize(), b)
    # fp32: summation order only. bf16: activations, weights and products rounded to 8 mantissa bits, so the
    # error is measured against the output's scale (1% of its largest value).
    if dtype == torch.float32:  # our C kernel or fp32 de-quantization: summation order only
        torch.testing.assert_close(ql(x), ref, rtol=1e-4, atol=1e-4)
    else:  # bf16 paths round the weight (or tinygemm's scales) to 8 mantissa bits: ~1% of the output's scale
        assert (ql(x).float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_rtn_error_shrinks_with_bits_and_smaller_groups():
    w = torch.randn(64, 256)
    err = lambda bits, gs: (dequantize(*rtn_quantize(w, bits, gs)) - w).pow(2).mean().item()  # noqa: E731
    assert err(8, -1) < err(4, 32) < err(4, 128) < err(3, 128) < err(2, 128)
    # per tensor: one scale for the whole weight, coarser than per channel at the same bits
    codes, s, z = rtn_quantize(w, 8, -1, per_tensor=True)
    assert s.unique().numel() == 1 and z.unique().numel() == 1
    per_tensor = (dequantize(codes, s, z) - w).pow(2).mean().item()
    assert err(8, -1) < per_tensor < err(4, 128)


@pytest.fixture(scope="module")
def layer0_stats(stories):
    m = stories.model
    calib = calibration_batch(stories.tokenizer, samples=16, seq_len=256)
    x = m.model.embed_tokens(calib).float()
    cos, sin = m.rope(torch.arange(256).expand(1, 256), torch.float32)
    layer = m.model.layers[1]
    x = m.model.layers[0](x, cos, sin, 0, None, 256).detach()
    names = {f"model.layers.1.{n}": mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    with torch.no_grad():
        return names, _collect(layer, x, cos, sin, names)


def _out_err(w, wq, x):
    return (x @ (w - wq).T).pow(2).mean().item()


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, -1), (4, -1)])
def test_gptq_beats_rtn_on_real_activations(layer0_stats, bits, gs):
    names, stats = layer0_stats
    for name, lin in names.items():
        w = lin.weight.detach()
        if w.shape[1] % 32 and gs != -1:
            continue
        x = stats[name]["x"]
        rtn = dequantize(*rtn_quantize(w, bits, gs))
        for act_order in (False, True):
            gq = dequantize(*gptq_quantize(w, stats[name]["H"], bits, gs, act_order=act_order))
            assert _out_err(w, gq, x) < _out_err(w, rtn, x), (name, act_order)


def test_awq_scaling_never_worse_than_plain_rtn(layer0_stats):
    names, stats = layer0_stats
    qkv = [names[f"model.layers.1.self_attn.{p}_proj"].weight.detach() for p in "qkv"]
    s, err, base = awq_search(qkv, stats["model.layers.1.self_attn.q_proj"]["x"], 4, 32)
    assert err <= base and s.shape == (64,) and (s > 0).all()


def _tiny_recipe(method, bits=4, gs=32):
    r = load_recipe("w4g128-gptq")
    r.quantize.method, r.quantize.bits, r.quantize.group_size = method, bits, gs
    r.quantize.group_fallback = True
    return r


def _stories_docs(data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]


def test_gptq_and_awq_models_beat_rtn_in_perplexity(data_dir):
    docs = _stories_docs(data_dir)
    ppl = {}
    for method in ("rtn", "gptq", "awq"):
        m = load("stories260k")
        calib = calibration_batch(m.tokenizer, samples=32, seq_len=256)
        r = _tiny_recipe(method)
        r.quantize.head_bits = None
        quantize_model(m.model, r.quantize, calib)
        ppl[method] = document_perplexity(m.model, m.tokenizer, docs, 512).perplexity
    assert ppl["gptq"] < ppl["rtn"] and ppl["awq"] < ppl["rtn"]
    assert ppl["gptq"] < 3.69 * 1.15


def test_checkpoint_reloads_bit_exactly_and_is_small(tmp_path, stories):
    m = load("stories260k")
    meta = quantize_model(m.model, _tiny_recipe("rtn", 4, 32).quantize)
    out = save_checkpoint(m.model, m.tokenizer, tmp_path / "ck", {"quantization": meta})
    r = load(out)
    a, b = m.model.state_dict(), r.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.tensor([m.tokenizer.encode("Once upon a time, a small dog")])
    with torch.no_grad():
        assert torch.equal(m.model(ids), r.model(ids))
    # bytes: packed codes + fp16 scale + uint8 zero per group, and int8 rows + scale/zero for the tied table
    lin_params = sum(mod.in_features * mod.out_features for mod in stories.model.modules()
                     if isinstance(mod, torch.nn.Linear) and mod is not stories.model.lm_head)
    groups = sum(mod.scales.numel() for mod in r.model.modules() if isinstance(mod, QuantLinear))
    expected = lin_params // 2 + 3 * groups + 512 * 64 + 64 * 5 * 2 * 4 + 64 * 4  # + norms (fp32)
    st = out / "model.safetensors"
    header = 8 + int.from_bytes(st.read_bytes()[:8], "little")  # safetensors: u64 length + JSON header
    assert st.stat().st_size == expected + header
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_quantizing_twice_is_refused(stories):
    m = load("stories260k")
    quantize_model(m.model, _tiny_recipe("rtn").quantize)
    with pytest.raises(SlimswarmError, match="already quantized"):
        quantize_model(m.model, _tiny_recipe("rtn").quantize)


def run(*args):
    p = subprocess.run([sys.executable, "-m", "slimswarm.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_compress_cli_end_to_end_and_eval_the_result(tmp_path, data_dir):
    rc, out, err = run("compress", "stories260k", "--recipe", "w4g128-gptq", "--out", tmp_path / "q", "--json")
    assert rc == 0, err
    row = json.loads(out)
    assert row["weight_bytes"] < row["weight_bytes_before"] / 4
    doc = json.loads((tmp_path / "q/slimswarm.json").read_text())
    assert doc["recipe"]["name"] == "w4g128-gptq" and len(doc["parent"]["sha256"]) == 64
    rc, out, err = run("eval", tmp_path / "q", "--text", data_dir / "text/tinystories-sample.txt", "--doc-sep",
                       "<|endoftext|>", "--window", "512", "--kl-to", "stories260k", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["perplexity"] < 3.69 * 1.2 and 0 < r["kl"] < 0.5


@pytest.mark.parametrize("yaml_text,words", [
    ("quantize:\n  bitz: 4\n", ["quantize.bitz", "Extra inputs"]),
    ("quantize:\n  bits: 7\n", ["quantize.bits"]),
    ("quantize:\n  method: gptq\n  per_tensor: true\n", ["per_tensor works with method rtn"]),
    ("quantize:\n  bits: 4\n  group_size: 48\n", ["group_size 48 does not divide"]),
    ("quantize:\n  method: gptq\n  bits: 4\n  group_size: 32\n  group_fallback: true\n", ["calibration needs"]),
])
def test_bad_recipes_exit_2_and_leave_no_folder(tmp_path, yaml_text, words):
    (tmp_path / "r.yaml").write_text(yaml_text)
    (tmp_path / "calib.txt").write_text("far too short for calibration")
    rc, _, err = run("compress", "stories260k", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "o",
                     "--calib", tmp_path / "calib.txt")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_compressing_a_quantized_checkpoint_is_refused(tmp_path):
    rc, _, err = run("compress", "stories260k", "--recipe", "w8", "--out", tmp_path / "a")
    assert rc == 0, err
    rc, _, err = run("compress", tmp_path / "a", "--recipe", "w8", "--out", tmp_path / "b")
    assert rc == 2 and "already quantized" in err and not (tmp_path / "b").exists()


def test_unknown_preset():
    with pytest.raises(SlimswarmError, match="not a preset"):
        load_recipe("w5-magic")
