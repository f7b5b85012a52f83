"""ONNX export, checked in ONNX Runtime against our model: prefill and step-by-step decode with past key/values."""

import numpy as np
import pytest
import torch

from slimswarm.compress.quant.apply import quantize_model
from slimswarm.compress.recipe import Override, QuantizeConfig
from slimswarm.deploy.export import export
from slimswarm.deploy.export_onnx import _pack_zero_points, export_onnx
from slimswarm.errors import SlimswarmError
from slimswarm.models.generate import generate_ids
from slimswarm.models.load import load
from slimswarm.models.sampling import SamplingParams

ort = pytest.importorskip("onnxruntime")  # in the test extra

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


def session(folder):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def empty_past(cfg):
    return {f"past_key_values.{i}.{k}": np.zeros((1, cfg.kv_heads(i), 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_hidden_layers) for k in ("key", "value")}


def step(sess, ids, past):
    outs = sess.run(None, {"input_ids": np.array([ids], dtype=np.int64), **past})
    names = [o.name for o in sess.get_outputs()]
    return outs[0][0], {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}


@torch.no_grad()
def ours(model, ids):
    model.clear_cache()
    return model(torch.tensor([ids])).float()[0].numpy()


def test_zero_points_pack_two_a_byte_low_nibble_first_per_row():
    z = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    assert _pack_zero_points(z).tolist() == [1 | 2 << 4, 3, 4 | 5 << 4, 6]


def test_fp32_prefill_and_16_decode_steps_match_ours(tmp_path):
    s = load("stories260k")
    res = export("stories260k", "onnx", tmp_path / "onnx")
    assert (tmp_path / "onnx/tokenizer.json").exists() and res["matmulnbits"] == 0
    sess = session(tmp_path / "onnx")
    ids = s.tokenizer.encode(PROMPT)
    logits, past = step(sess, ids, empty_past(s.model.config))
    assert np.abs(logits - ours(s.model, ids)).max() < 1e-4  # measured 1.1e-5
    seq = list(ids)
    for _ in range(16):
        seq.append(int(logits[-1].argmax()))
        logits, past = step(sess, seq[-1:], past)
        assert past["past_key_values.0.key"].shape[2] == len(seq)
        assert np.abs(logits[-1] - ours(s.model, seq)[-1]).max() < 1e-4  # measured 1.3e-5


def test_int4_groups_run_as_matmulnbits_with_the_same_greedy_tokens(tmp_path):
    s = load("stories260k")
    quantize_model(s.model, QuantizeConfig(method="rtn", bits=4, group_size=32, head_bits=None,
                                           overrides=[Override(pattern="*.down_proj", skip=True)]))
    res = export_onnx(s.model, s.tokenizer, tmp_path / "q")
    assert res["matmulnbits"] == 6 * 5
    sess = session(tmp_path / "q")
    ids = s.tokenizer.encode(PROMPT)
    logits, past = step(sess, ids, empty_past(s.model.config))
    assert np.abs(logits - ours(s.model, ids)).max() < 1e-3
    got = []
    for _ in range(32):
        got.append(int(logits[-1].argmax()))
        logits, past = step(sess, got[-1:], past)
    s.model.clear_cache()
    want = generate_ids(s.model, [ids], SamplingParams(max_tokens=32, temperature=0.0), eos_ids=())[0].tokens
    assert got == want


def test_existing_output_is_refused_and_kept(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx/keep").write_text("x")
    with pytest.raises(SlimswarmError, match="onnx: output exists \\(pass --overwrite"):
        export("stories260k", "onnx", tmp_path / "onnx")
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["keep"]
    with pytest.raises(SlimswarmError, match="--gguf-type applies to --to gguf only"):
        export("stories260k", "onnx", tmp_path / "o2", gguf_type="Q4_0")
