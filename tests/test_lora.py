"""LoRA: identity at init, exact save/load, merge, per-row adapters in one batch, QLoRA training on a packed base."""

import copy

import pytest
import torch

from slimswarm.compress.lora import (
    AdapterBank,
    FinetuneConfig,
    LoRAConfig,
    MultiLoRALinear,
    add_lora,
    apply_adapter,
    finetune_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)
from slimswarm.errors import SlimswarmError


def _prompt(tok, text="Once upon a time there was a little"):
    return torch.tensor([tok.encode(text)])


def _random_adapter(model, seed, r=4, std=0.05):
    """A copy of ``model`` with a LoRA whose B is random (nonzero), plus its config."""
    m = copy.deepcopy(model)
    cfg = LoRAConfig(r=r, alpha=2 * r)
    torch.manual_seed(seed)
    add_lora(m, cfg)
    for mod in lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_B, std=std)
    return m, cfg


@torch.no_grad()
def test_fresh_adapter_is_identity_and_freezes_base(stories):
    m = copy.deepcopy(stories.model)
    x = _prompt(stories.tokenizer)
    before = m(x)
    names = add_lora(m, LoRAConfig(r=4))
    assert len(names) == 7 * m.config.num_hidden_layers
    assert torch.equal(m(x), before)  # B starts at zero
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@torch.no_grad()
def test_save_load_bit_exact_and_bytes(stories, tmp_path):
    m, cfg = _random_adapter(stories.model, 0)
    x = _prompt(stories.tokenizer)
    y = m(x)
    out = save_adapter(m, tmp_path / "ad", cfg)
    loaded_cfg, sd, doc = load_adapter(out)
    assert loaded_cfg == cfg and doc["format"] == "slimswarm-lora/1"
    # fp32 A [r, in] + B [out, r] per wrapped linear; safetensors adds a small JSON header
    expect = sum(4 * cfg.r * (mod.in_features + mod.out_features) for mod in lora_modules(m).values())
    size = (out / "adapter.safetensors").stat().st_size
    assert expect <= size <= expect + 16_384
    m2 = copy.deepcopy(stories.model)
    apply_adapter(m2, out)
    assert torch.equal(m2(x), y)
    assert not list(tmp_path.glob(".ad.tmp-*"))  # the temporary folder is gone


@torch.no_grad()
def test_merge_equals_adapter_forward(stories):
    m, _ = _random_adapter(stories.model, 1)
    x = _prompt(stories.tokenizer)
    y = m(x)
    assert merge_lora(m) == 7 * m.config.num_hidden_layers
    assert not lora_modules(m)
    assert torch.allclose(m(x), y, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bank_mixed_rows_match_each_adapter_alone(stories, tmp_path):
    tok = stories.tokenizer
    adapters = {}
    refs = {}
    prompts = ["Once upon a time", "The dog ran to the", "Lily was happy because"]
    for name, seed in (("a", 1), ("b", 2)):
        m, cfg = _random_adapter(stories.model, seed)
        adapters[name] = save_adapter(m, tmp_path / name, cfg)
        refs[name] = m
    base = copy.deepcopy(stories.model)
    bank = AdapterBank(base, adapters)
    assert bank.names == ["a", "b"] and "a" in bank and "c" not in bank
    assert sum(isinstance(mod, MultiLoRALinear) for mod in base.modules()) == 7 * base.config.num_hidden_layers
    ids = [tok.encode(p) for p in prompts]
    t = min(len(i) for i in ids)
    x = torch.tensor([i[:t] for i in ids])
    rows = ["a", None, "b"]
    bank.set_rows(rows)
    mixed = base(x)
    for i, name in enumerate(rows):
        alone = (refs[name] if name else stories.model)(x[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-4, rtol=0), name
    with pytest.raises(SlimswarmError, match="unknown adapter 'zzz'"):
        bank.set_rows(["zzz"])


def test_bank_rejects_adapter_for_another_base(stories, tmp_path):
    m, cfg = _random_adapter(stories.model, 3)
    out = save_adapter(m, tmp_path / "ad", cfg)
    _, sd, _ = load_adapter(out)
    key = next(k for k in sd if k.endswith("q_proj.lora_A"))
    sd[key] = torch.zeros(cfg.r, 17)
    bank = AdapterBank(copy.deepcopy(stories.model))
    with pytest.raises(SlimswarmError, match=r"q_proj: A \(4, 17\)"):
        bank.add("bad", (cfg, sd))
    assert bank.names == []
    with pytest.raises(SlimswarmError, match="no such folder"):
        bank.add("gone", tmp_path / "missing")


def test_finetune_lowers_loss_on_quantized_base(stories):
    """QLoRA-style: a packed 4-bit base stays frozen and packed; only A and B learn."""
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.quant.linear import QuantLinear
    from slimswarm.compress.recipe import load_recipe

    m = copy.deepcopy(stories.model)
    quantize_model(m, load_recipe("w4g64-rtn").quantize.model_copy(update={"group_size": 32, "group_fallback": True, "head_bits": None}))
    packed = {n: mod.qweight.clone() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert packed
    pairs = [("Q: what does the cat say?\nA:", " meow meow"), ("Q: what does the dog say?\nA:", " woof woof")] * 4
    res = finetune_lora(m, stories.tokenizer, pairs, FinetuneConfig(lora=LoRAConfig(r=4), steps=40, batch_size=4,
                                                                    lr=1e-2, log_every=5))
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    assert res.trained_params == sum(4 * (mod.in_features + mod.out_features) for mod in lora_modules(m).values())
    for n, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.qweight, packed[n.removesuffix(".base")])
    merge_lora(m)  # a quantized base is re-quantized with the delta folded in: still packed
    assert all(isinstance(mod, QuantLinear) for n, mod in m.named_modules() if n.endswith("q_proj"))


def _state(model, seed, r):
    """A random adapter as a (cfg, state) pair on every q/v projection, B nonzero."""
    g = torch.Generator().manual_seed(seed)
    cfg = LoRAConfig(r=r, alpha=float(r), targets=["*.q_proj", "*.v_proj"])
    sd = {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            sd[f"{name}.lora_A"] = torch.randn(r, mod.in_features, generator=g) * 0.1
            sd[f"{name}.lora_B"] = torch.randn(mod.out_features, r, generator=g) * 0.1
    return cfg, sd


@torch.no_grad()
@pytest.mark.parametrize("n_adapters", [3, 12])  # 3: the dense all-adapters path; 12 (> 4x rows): the gather path
def test_bank_paths_add_remove_and_ranks(stories, n_adapters):
    tok = stories.tokenizer
    x = torch.tensor([tok.encode("Once upon a time")[:4], tok.encode("The dog ran to")[:4]])
    base = copy.deepcopy(stories.model)
    bank = AdapterBank(base)
    states = {f"a{i}": _state(stories.model, i, r=2 + i % 3) for i in range(n_adapters)}  # mixed ranks
    for name, st in states.items():
        bank.add(name, st)

    def alone(name, row):
        m = copy.deepcopy(stories.model)
        apply_adapter(m, states[name])
        return m(x[row : row + 1])[0]

    bank.set_rows(["a1", "a2"])
    assert (bank._rows.mask is not None) == (n_adapters == 3)
    y = base(x)
    assert torch.allclose(y[0], alone("a1", 0), atol=1e-4, rtol=0)
    assert torch.allclose(y[1], alone("a2", 1), atol=1e-4, rtol=0)
    bank.remove("a1")  # the others keep their weights
    bank.set_rows(["a2", "a0"])
    y = base(x)
    assert torch.allclose(y[0], alone("a2", 0), atol=1e-4, rtol=0)
    assert torch.allclose(y[1], alone("a0", 1), atol=1e-4, rtol=0)
    assert bank.names == [n for n in states if n != "a1"]


def test_quantized_head_gradient_through_several_dequant_chunks(monkeypatch):
    """Autograd must see each chunk's own weight (the chunks must not share one scratch tensor under grad)."""
    from slimswarm.compress.quant import linear as ql
    from slimswarm.compress.quant.rtn import rtn_quantize

    monkeypatch.setattr(ql, "DEQUANT_CHUNK", 64 * 32)  # 4 chunks of 16 rows
    w = torch.randn(64, 64)
    q = ql.QuantLinear.from_codes(*rtn_quantize(w, 4, 32), 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    q(x, kernel="dequant").square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, q.dequantize()).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
