"""Low-rank factorization: the truncation error is the discarded spectrum, activation-aware SVD minimises the output
error on real activations, layers are replaced only where parameters shrink, and checkpoints round-trip exactly."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimswarm.compress.lowrank import LowRankLinear, break_even_rank, choose_rank, lowrank_model, svd_factors
from slimswarm.compress.recipe import LowRankConfig, _validate
from slimswarm.errors import SlimswarmError


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 24), inp=st.integers(2, 24), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_svd_error_is_the_discarded_singular_values(out, inp, frac, seed):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = max(1, int(frac * min(out, inp)))
    B, A, s = svd_factors(w, rank=r)
    assert B.shape == (out, r) and A.shape == (r, inp)
    assert torch.linalg.norm(w - B @ A).item() == pytest.approx(s[r:].pow(2).sum().sqrt().item(), abs=1e-9)


def test_energy_picks_the_smallest_sufficient_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, energy=16 / 22) == 1
    assert choose_rank(s, energy=0.8) == 2
    assert choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, rank=9) == 4
    with pytest.raises(SlimswarmError, match="energy"):
        choose_rank(s, energy=1.5)


@pytest.fixture(scope="module")
def real_inputs(stories, data_dir):
    """Inputs of layer 1's gate projection on real text: X [tokens, 64] and the weight."""
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    ids = torch.tensor(stories.tokenizer.encode(text)[:512])[None]
    m = copy.deepcopy(stories.model)
    m.clear_cache()  # a plain full-sequence forward, whatever cache earlier tests left on the shared model
    seen = []
    h = m.model.layers[1].mlp.gate_proj.register_forward_hook(lambda mod, i, o: seen.append(i[0][0].detach()))
    with torch.no_grad():
        m(ids)
    h.remove()
    return seen[0].double(), m.model.layers[1].mlp.gate_proj.weight.detach().double()


def test_activation_aware_error_is_its_discarded_spectrum_and_beats_plain_svd(real_inputs):
    X, w = real_inputs
    H = X.T @ X
    for r in (8, 16, 32):
        B, A, s = svd_factors(w, rank=r, hessian=H, damp=0.0)
        err = torch.linalg.norm((w - B @ A) @ X.T).item()
        assert err == pytest.approx(s[r:].pow(2).sum().sqrt().item(), rel=1e-6)
        Bp, Ap, _ = svd_factors(w, rank=r)
        assert err < torch.linalg.norm((w - Bp @ Ap) @ X.T).item()
        Bs, As, _ = svd_factors(w, rank=r, hessian=H, how="scale")
        assert torch.linalg.norm((w - Bs @ As) @ X.T).item() < torch.linalg.norm((w - Bp @ Ap) @ X.T).item()


def test_replaces_only_where_parameters_shrink(stories):
    m = copy.deepcopy(stories.model)
    cfg = m.config
    h, n = cfg.hidden_size, cfg.intermediate_size
    assert break_even_rank(64, 172) == (64 * 172 - 1) // (64 + 172) == 46
    meta = lowrank_model(m, LowRankConfig(rank=40, activation_aware=False))
    # 64x64 attention projections break even at rank 31: they stay dense; the 64x172 MLP ones are factorized.
    assert not meta["model.layers.0.self_attn.q_proj"]["replaced"]
    assert meta["model.layers.0.mlp.up_proj"]["replaced"]
    assert isinstance(m.model.layers[0].mlp.up_proj, LowRankLinear)
    saved = cfg.num_hidden_layers * 3 * (h * n - 40 * (h + n))
    assert stories.model.num_parameters() - m.num_parameters() == saved


def test_lowrank_checkpoint_round_trips_bit_exactly(stories, tmp_path):
    from slimswarm.models.checkpoint import load_checkpoint, save_checkpoint

    m = copy.deepcopy(stories.model)
    lowrank_model(m, LowRankConfig(rank=16, activation_aware=False, targets=["*.mlp.*"]))
    save_checkpoint(m, stories.tokenizer, tmp_path / "lr", {})
    back = load_checkpoint(tmp_path / "lr").model
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(3, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(m(ids), back(ids))
    tensor_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k != "lm_head.weight" or
                       not m.config.tie_word_embeddings)
    size = (tmp_path / "lr/model.safetensors").stat().st_size
    assert tensor_bytes < size < tensor_bytes + 32_000  # the safetensors header is the only overhead


def test_recipe_errors_are_one_line():
    with pytest.raises(SlimswarmError, match="exactly one of rank or energy"):
        _validate({"lowrank": {"rank": 4, "energy": 0.9}}, "r.yaml")
    with pytest.raises(SlimswarmError, match="lowrank \\+ quantize is not supported"):
        _validate({"lowrank": {"rank": 4}, "quantize": {"bits": 4}}, "r.yaml")
