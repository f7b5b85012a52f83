"""GGUF export, checked by running the files in llama.cpp (llama-cpp-python) against our model on the same token ids."""

import numpy as np
import pytest
import torch

from slimswarm.compress.lora import LoRAConfig, add_lora, apply_adapter, save_adapter
from slimswarm.compress.quant.apply import quantize_model
from slimswarm.compress.recipe import Override, QuantizeConfig
from slimswarm.deploy import gguf_blocks as gb
from slimswarm.deploy.export import export
from slimswarm.deploy.export_gguf import export_gguf, permute_rope
from slimswarm.data import data_path
from slimswarm.errors import SlimswarmError
from slimswarm.models.checkpoint import file_sha256, save_checkpoint
from slimswarm.models.generate import generate_ids
from slimswarm.models.gguf import read_gguf, unpermute_rope
from slimswarm.models.load import load, resolve
from slimswarm.models.sampling import SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")  # in the test extra; a missing runtime is an install error, not a skip

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day, she saw a big red ball under a tree. She ran to get it, but a dog took the ball and ran "
         "away. Lily was sad. Her mom said, \"Don't worry, we can find another ball.\"")


def llama(path, lora=None, n_ctx=512):
    # F32 KV cache: llama.cpp's default F16 cache alone moves logits by ~1e-2 on F32 weights
    # one thread: llama.cpp's worker threads spin at barriers, which stalls badly on a busy 2-core machine
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False,
                           type_k=0, type_v=0, lora_path=None if lora is None else str(lora))


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


@torch.no_grad()
def our_logits(model, ids):
    model.clear_cache()
    return model(torch.tensor([ids])).float()[0]


def our_greedy(model, ids, n):
    model.clear_cache()
    return generate_ids(model, [list(ids)], SamplingParams(max_tokens=n, temperature=0.0), eos_ids=())[0].tokens


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item()


@pytest.fixture(scope="module")
def story():
    return load("stories260k")


def _int4(symmetric):
    m = load("stories260k").model
    # stories260K's MLP is 172 wide (no group of 32 divides it): down_proj stays float, like llama.cpp's own fallback
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=symmetric, head_bits=None,
                                     overrides=[Override(pattern="*.down_proj", skip=True)]))
    return m


def test_permute_rope_is_the_inverse_of_the_gguf_reader():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 6), 6), w)
    assert not torch.equal(permute_rope(w, 6), w)


def test_f32_export_matches_ours_in_llama_cpp_and_reads_back(story, tmp_path):
    rep = export_gguf(story.model, story.tokenizer, tmp_path / "s.gguf")
    assert rep.arch == "llama" and rep.tensors == {"F32": 47} and not rep.changed
    ids = story.tokenizer.encode(STORY)
    llm = llama(tmp_path / "s.gguf")
    assert llm.tokenize(STORY.encode()) == ids  # tokenizer embedded: same ids, BOS included
    diff = (llama_logits(llm, ids) - our_logits(story.model, ids)).abs().max().item()
    assert diff < 1e-4, diff  # measured 1.4e-5 (F32 weights, F32 KV cache)
    assert llama_greedy(llm, ids[:8], 64) == our_greedy(story.model, ids[:8], 64)
    cfg, sd, _ = read_gguf(tmp_path / "s.gguf")  # round trip through our own GGUF reader
    ours = story.model.state_dict()
    assert cfg.num_key_value_heads == story.model.config.num_key_value_heads
    assert all(torch.equal(sd[k], ours[k].float()) for k in ours if k != "lm_head.weight")


def test_int4_g32_is_written_as_q4_0_and_q4_1_with_our_codes(story, tmp_path):
    from gguf import GGUFReader

    text = data_path("text/tinystories-sample.txt").read_text()
    ids = story.tokenizer.encode(text)[:512]
    for sym, kind in ((True, "Q4_0"), (False, "Q4_1")):
        m = _int4(sym)
        path = tmp_path / f"{kind}.gguf"
        rep = export_gguf(m, story.tokenizer, path, kl_text=text)
        assert rep.tensors[kind] == 6 * 5 and len(rep.same_codes) == 30
        q = m.model.layers[1].self_attn.k_proj  # a RoPE-permuted tensor: rows move, codes stay
        raw = {t.name: t for t in GGUFReader(str(path)).tensors}["blk.1.attn_k.weight"]
        perm = lambda t: permute_rope(t, m.config.kv_heads(1))  # noqa: E731
        want = gb.encode_exact(kind, perm(q.codes()), perm(q.scales), perm(q.zeros))
        assert np.array_equal(np.asarray(raw.data).reshape(want.shape), want)
        _, sd, _ = read_gguf(path)
        back = sd["model.layers.1.self_attn.k_proj.weight"]
        if kind == "Q4_0":  # same codes and fp16 scales: bit-exact
            assert torch.equal(back, q.dequantize()) and not rep.changed and rep.kl is None
        else:  # m = fp16(-z s): the only rounding
            assert 0 < rep.q4_1_offset_max_abs < 2e-3 and (back - q.dequantize()).abs().max() <= 2e-3
            assert rep.kl["kl"] < 1e-4
        ppl_ours = np.exp(nll(our_logits(m, ids), ids))
        ppl_cpp = np.exp(nll(llama_logits(llama(path), ids), ids))
        assert abs(ppl_cpp / ppl_ours - 1) < 0.01, (kind, ppl_ours, ppl_cpp)


def test_other_groups_are_requantized_with_the_error_reported(story, tmp_path):
    m = load("stories260k").model
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=64, head_bits=8,
                                     overrides=[Override(pattern="*.down_proj", skip=True)]))
    rep = export_gguf(m, story.tokenizer, tmp_path / "r.gguf", gguf_type="Q8_0",
                     kl_text=data_path("text/tinystories-sample.txt").read_text())
    assert rep.tensors["Q8_0"] == 31 and not rep.same_codes and len(rep.changed) == 31
    assert 0 < rep.kl["kl"] < 1e-3 and rep.kl["top1_agreement"] > 0.97
    assert "re-quantized" not in rep.summary() and "KL to ours" in rep.summary()


def test_lora_adapter_runs_in_llama_cpp_like_ours(story, tmp_path):
    base = resolve("stories260k")
    m = load("stories260k").model
    add_lora(m, LoRAConfig(r=4, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "lora_B"):
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.5)
    save_adapter(m, tmp_path / "ad", LoRAConfig(r=4, alpha=8.0), {"base": {"sha256": file_sha256(base)}})
    export("stories260k", "gguf", tmp_path / "base.gguf")
    res = export("stories260k", "gguf", tmp_path / "ad.gguf", adapter=str(tmp_path / "ad"))
    assert res["tensors"] == 2 * 7 * 5
    ours = load("stories260k").model
    apply_adapter(ours, tmp_path / "ad")
    ids = story.tokenizer.encode(STORY * 2)
    llm = llama(tmp_path / "base.gguf", lora=tmp_path / "ad.gguf")
    lc, lo, plain = llama_logits(llm, ids), our_logits(ours, ids), our_logits(story.model, ids)
    assert (plain.argmax(-1) == lo.argmax(-1)).float().mean() < 0.9  # the adapter does change the model
    assert (lc.argmax(-1) == lo.argmax(-1)).float().mean() >= 0.99
    assert llama_greedy(llm, ids[:8], 32) == our_greedy(ours, ids[:8], 32)


def test_structured_pruned_llama_is_written_as_deci_with_per_layer_sizes(tmp_path):
    from slimswarm.compress.prune.structured import remove_channels, remove_heads

    s = load("stories260k")
    remove_heads(s.model, 1, [0, 2, 3])
    remove_channels(s.model, 3, list(range(0, 172, 2)))
    rep = export_gguf(s.model, s.tokenizer, tmp_path / "p.gguf")
    assert rep.arch == "deci"
    ids = s.tokenizer.encode(STORY)
    diff = (llama_logits(llama(tmp_path / "p.gguf"), ids) - our_logits(s.model, ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_bad_input_is_one_line_and_writes_nothing(story, tmp_path, capsys):
    from slimswarm.cli import main
    from slimswarm.compress.lowrank import LowRankLinear

    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(SlimswarmError, match="output exists \\(pass --overwrite"):
        export("stories260k", "gguf", out)
    assert out.read_bytes() == b"keep"
    m = load("stories260k").model
    lin = m.model.layers[2].mlp.up_proj
    m.model.layers[2].mlp.up_proj = LowRankLinear.from_factors(lin.weight[:, :4].clone(), torch.eye(4, lin.in_features))
    with pytest.raises(SlimswarmError, match=r"model.layers.2.mlp.up_proj: a LowRankLinear layer has no GGUF"):
        export_gguf(m, story.tokenizer, tmp_path / "lr.gguf")
    cfg = LoRAConfig(r=2, alpha=4.0)
    add_lora(m2 := load("stories260k").model, cfg)
    save_adapter(m2, tmp_path / "ad", cfg, {"base": {"sha256": "0" * 64}})
    assert main(["export", "stories260k", "--to", "gguf", "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "ad.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained on a base with sha256 000000000000" in err
    assert main(["export", "stories260k", "--to", "gguf", "--gguf-type", "Q3_K", "--out", str(tmp_path / "q.gguf")]) == 2
    assert "--gguf-type 'Q3_K': not one of F32" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "x.gguf"]  # no temporary or partial files


def test_pruned_qwen2_is_refused_naming_the_layer():
    from slimswarm.deploy.export_gguf import gguf_arch
    from slimswarm.models.llama import ModelConfig

    cfg = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, qkv_bias=True, model_type="qwen2", layer_kv_heads=[2, 2, 1])
    with pytest.raises(SlimswarmError, match=r"^layer 2: 2 heads / 1 kv heads / 128 MLP channels differ from layer 0"):
        gguf_arch(cfg)


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


@pytest.mark.slow
def test_smollm2_f32_export_greedy_64_tokens_in_llama_cpp(smollm2, tmp_path):
    export_gguf(smollm2.model, smollm2.tokenizer, tmp_path / "s.gguf")
    text = "In 2024, the café's 12,345 apples\n\ncost $3.50 -- don't they? Yes."
    llm = llama(tmp_path / "s.gguf")
    ids = smollm2.tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    chat = smollm2.tokenizer.chat([{"role": "user", "content": "What is the capital of France?"}])
    prompt = smollm2.tokenizer.encode(chat)
    diff = (llama_logits(llm, prompt) - our_logits(smollm2.model, prompt)).abs().max().item()
    assert diff < 2e-4, diff  # measured 5.8e-5
    assert llama_greedy(llm, prompt, 64) == our_greedy(smollm2.model, prompt, 64)


def test_int8_g32_is_q8_0_and_f16_loads(story, tmp_path):
    m = load("stories260k").model
    quantize_model(m, QuantizeConfig(method="rtn", bits=8, group_size=32, symmetric=True, head_bits=None,
                                     overrides=[Override(pattern="*.down_proj", skip=True)]))
    rep = export_gguf(m, story.tokenizer, tmp_path / "q8.gguf")
    assert rep.tensors["Q8_0"] == 30 and len(rep.same_codes) == 30 and not rep.changed  # bit-exact
    rep = export_gguf(story.model, story.tokenizer, tmp_path / "f16.gguf", gguf_type="F16")
    assert rep.tensors == {"F16": 36, "F32": 11}  # 1-D norms stay F32, as llama.cpp wants
    ids = story.tokenizer.encode(STORY)
    diff = (llama_logits(llama(tmp_path / "f16.gguf"), ids) - our_logits(story.model, ids)).abs().max().item()
    assert 1e-5 < diff < 5e-2, diff  # fp16 weight rounding, nothing else


def test_qwen2_arch_keeps_half_split_rope_and_biases(story, tmp_path):
    from slimswarm.models.llama import ModelConfig

    c = story.model.config
    cfg = ModelConfig(**{**c.as_dict(), "model_type": "qwen2", "qkv_bias": True})
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in story.model.state_dict().items()}
    sd.update({k: torch.randn(v.shape, generator=g) for k, v in sd.items() if k.endswith("norm.weight")})
    for i in range(cfg.num_hidden_layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            rows = sd[f"model.layers.{i}.self_attn.{p}.weight"].shape[0]
            sd[f"model.layers.{i}.self_attn.{p}.bias"] = torch.randn(rows, generator=g) * 0.1
    from slimswarm.models.load import build_model

    model = build_model(cfg, sd, "random qwen2")
    rep = export_gguf(model, story.tokenizer, tmp_path / "q.gguf")
    assert rep.arch == "qwen2"
    ids = story.tokenizer.encode(STORY)
    diff = (llama_logits(llama(tmp_path / "q.gguf"), ids) - our_logits(model, ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_cli_exports_a_saved_int4_checkpoint(story, tmp_path, capsys):
    from slimswarm.cli import main

    m = load("stories260k").model
    q = quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=32, head_bits=None,
                                         overrides=[Override(pattern="*.down_proj", skip=True)]))
    save_checkpoint(m, story.tokenizer, tmp_path / "ckpt", {"quantization": q, "parent": {"source": "stories260k"}})
    assert main(["export", str(tmp_path / "ckpt"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    line = capsys.readouterr().out.strip()
    assert "30 Q4_1" in line and "30 with our codes" in line and "KL to ours" in line, line
    cfg, sd, _ = read_gguf(tmp_path / "m.gguf")
    assert cfg.num_hidden_layers == 5 and "model.layers.4.mlp.down_proj.weight" in sd


def test_5_and_6_bit_layers_are_requantized_to_q5_1_and_q8_0(story, tmp_path):
    m = load("stories260k").model
    quantize_model(m, QuantizeConfig(method="rtn", bits=6, group_size=32, head_bits=8,
                                     overrides=[Override(pattern="*.down_proj", skip=True),
                                                Override(pattern="*.self_attn.*", bits=5)]))
    rep = export_gguf(m, story.tokenizer, tmp_path / "r.gguf",
                      kl_text=data_path("text/tinystories-sample.txt").read_text())
    assert rep.tensors["Q5_1"] > 0 and rep.tensors["Q8_0"] > 0 and 0 < rep.kl["kl"] < 0.05
