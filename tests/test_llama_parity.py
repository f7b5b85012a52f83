"""Our model's logits and greedy tokens against transformers on the same weights."""

import pytest
import torch
from conftest import hf_twin

from slimswarm.models.generate import generate_ids
from slimswarm.models.llama import CausalLM, ModelConfig
from slimswarm.models.sampling import SamplingParams

PROMPTS = ["Once upon a time", "The little dog ran to the big red", "Tom and Sue went to the park to play with"]


def _hf_greedy(hf, tok, prompts, steps):
    """transformers' generate, greedy, on a left-padded batch."""
    ids = [tok.encode(p) for p in prompts]
    longest = max(map(len, ids))
    pad = tok.pad_id
    inp = torch.tensor([[pad] * (longest - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids])
    out = hf.generate(input_ids=inp, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, pad_token_id=pad, eos_token_id=None)
    return [row[longest:].tolist() for row in out]


def _ours_greedy(m, tok, prompts, steps):
    ids = [tok.encode(p) for p in prompts]
    return [c.tokens for c in generate_ids(m, ids, SamplingParams(max_tokens=steps), eos_ids=[], pad_id=tok.pad_id)]


def test_stories260k_logits_match_transformers_loading_the_same_folder(stories, data_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(data_dir / "models/stories260K/hf", dtype=torch.float32).eval()
    ids = torch.tensor([stories.tokenizer.encode(PROMPTS[2] + " a ball and a kite. They were happy.")])
    with torch.no_grad():
        diff = (stories.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3


def test_llama2c_reader_gives_the_same_model_as_the_hf_folder(stories):
    from slimswarm import load

    l2c = load("stories260k-llama2c")
    assert l2c.kind == "llama2c"
    ids = torch.tensor([stories.tokenizer.encode("One day a bird sang a song.")])
    assert l2c.tokenizer.encode("One day a bird sang a song.") == ids[0].tolist()
    with torch.no_grad():
        assert (l2c.model(ids) - stories.model(ids)).abs().max().item() <= 1e-5


def test_stories260k_greedy_64_steps_equal_transformers_batched_and_unbatched(stories):
    hf = hf_twin(stories.model)
    ref = _hf_greedy(hf, stories.tokenizer, PROMPTS, 64)
    assert _ours_greedy(stories.model, stories.tokenizer, PROMPTS, 64) == ref
    for p, r in zip(PROMPTS, ref):
        assert _ours_greedy(stories.model, stories.tokenizer, [p], 64) == [r]


def test_left_padded_batch_logits_equal_single_rows(stories):
    m, tok = stories.model, stories.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    n = max(map(len, ids))
    batch = torch.tensor([[0] * (n - len(i)) + i for i in ids])
    pad = torch.tensor([n - len(i) for i in ids])
    m.setup_cache(len(ids), n)
    with torch.no_grad():
        out = m(batch, 0, pad)
        for r, i in enumerate(ids):
            m.setup_cache(1, n)
            single = m(torch.tensor([i]), 0)
            assert (out[r, n - len(i):] - single[0]).abs().max() < 1e-4
    m.clear_cache()


def test_continuous_batch_rows_at_different_positions_match_their_own_runs(stories):
    """Per-row cache slots (rows at different lengths, stepping together) give each row its solo logits."""
    m, tok = stories.model, stories.tokenizer
    a, b = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])
    with torch.no_grad():
        m.setup_cache(2, 64)
        m(torch.tensor([a[:-1]]), 0)  # row 0 prefill (cache row 0)
        solo_a = m(torch.tensor([[a[-1]]]), len(a) - 1)[0, -1]
        m.setup_cache(2, 64)
        m(torch.tensor([b[:-1]]), 0)
        solo_b = m(torch.tensor([[b[-1]]]), len(b) - 1)[0, -1]
        # now both rows in one cache, each written at its own slots
        m.clear_cache()
        m.setup_cache(2, 64)
        m(torch.tensor([a[:-1], a[:-1]]), 0)  # fill row 0 (row 1 overwritten next)
        k0 = [layer.self_attn.cache.k[0].clone() for layer in m.model.layers]
        v0 = [layer.self_attn.cache.v[0].clone() for layer in m.model.layers]
        m(torch.tensor([b[:-1], b[:-1]]), 0)
        for layer, k, v in zip(m.model.layers, k0, v0):
            layer.self_attn.cache.k[0], layer.self_attn.cache.v[0] = k, v
        out = m(torch.tensor([[a[-1]], [b[-1]]]), torch.tensor([len(a) - 1, len(b) - 1]))[:, -1]
    m.clear_cache()
    assert (out[0] - solo_a).abs().max() < 1e-4 and (out[1] - solo_b).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "linear"])
def test_rope_and_bias_variants_match_transformers(kind):
    """Llama 3 rope scaling, Qwen2's q/k/v biases and linear rope scaling, on small random models."""
    from slimswarm.models.load import build_model

    torch.manual_seed(1)
    hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    if kind == "llama3":
        hf_cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        hf_cfg["rope_theta"] = 500000.0
    elif kind == "linear":
        hf_cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    else:
        hf_cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6)
    cfg = ModelConfig.from_hf(hf_cfg)
    init = CausalLM(cfg)
    sd = {k: torch.randn_like(v) * 0.1 for k, v in init.state_dict().items()}
    ours = build_model(cfg, sd, "random")
    hf = hf_twin(ours)
    ids = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_smollm2_logits_and_64_greedy_steps_match_transformers(smollm2):
    hf = hf_twin(smollm2.model)
    tok = smollm2.tokenizer
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("What is the capital of France?", "Name three colours.")]
    ids = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        assert (smollm2.model(ids) - hf(ids).logits).abs().max().item() <= 1e-3
    ref = _hf_greedy(hf, tok, prompts, 64)
    assert _ours_greedy(smollm2.model, tok, prompts, 64) == ref
    assert _ours_greedy(smollm2.model, tok, prompts[1:], 64) == ref[1:]
