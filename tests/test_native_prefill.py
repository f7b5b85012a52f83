"""The native prefill (kernels/decode.c ss_prefill_rows: prompts through the decode step, 32 positions a call, causal
inside each call) against the Python prefill: logits of the last position and every key/value it leaves in the
cache, across call boundaries, after a cached prefix, with left padding, at another cache row, with a LoRA adapter;
which forwards take it; the engine's batched admission through it."""

import copy
import os

import pytest
import torch

from slimswarm.compress.lora import AdapterBank, LoRAConfig
from slimswarm.compress.quant.apply import quantize_model
from slimswarm.compress.recipe import QuantizeConfig
from slimswarm.engine.engine import Engine
from slimswarm.kernels import native
from slimswarm.models.generate import generate_ids
from slimswarm.models.sampling import SamplingParams

from test_native import TOL, _adapters, _model


def _kv(model, row, slots):
    """Every layer's cached K and V of ``row`` at ``slots``, de-quantized to fp32: [layers, 2, kv, len(slots), hd]."""
    out = []
    for layer in model.model.layers:
        c = layer.self_attn.cache
        k, v = c.k[row, :, slots].float(), c.v[row, :, slots].float()
        if getattr(c, "ks", None) is not None:
            k, v = k * c.ks[row, :, slots, None], v * c.vs[row, :, slots, None]
        out.append(torch.stack([k, v]))
    return torch.stack(out)


def _prefill(model, toks, start, prefix, row, native_on, lslot=0, bank=None, adapter=None):
    """Prefill ``prefix`` (Python path) then ``toks`` at slots start.. of cache ``row`` (Python, or the native step's
    ``prefill``). Returns (last logits [V], K/V of every written slot)."""
    model.setup_cache(3, 48)
    os.environ["SLIMSWARM_NATIVE"] = "0"
    try:
        with torch.inference_mode():
            if bank is not None:
                bank.set_rows([adapter])
            if prefix:
                model(torch.tensor([prefix]), 0, row0=row)
            if native_on:
                os.environ["SLIMSWARM_NATIVE"] = "1"
                step = native.step_for(model)
                assert step is not None, native.why_not(model)
                lg = step.prefill(model, torch.tensor(toks), start, 0, row, lslot)
            else:
                lg = model(torch.tensor([toks]), start, None, last_only=True, row0=row)[0, -1]
        return lg.float(), _kv(model, row, list(range(start + len(toks))))
    finally:
        os.environ.pop("SLIMSWARM_NATIVE", None)
        model.clear_cache()


@pytest.mark.parametrize("fmt", ["fp32", "q8", "q4g32", "q4g64"])
@pytest.mark.parametrize("n,prefix", [(2, 0), (8, 0), (13, 0), (21, 5), (9, 8)])
def test_native_prefill_matches_the_python_prefill(fmt, n, prefix):
    """fp32 activations (exact mode): the last position's logits within TOL and every cached K/V within 1e-5 of the
    Python path's, for prompts shorter than, equal to and across the 8-position calls, after a cached prefix, in
    cache row 1."""
    m = _model(seed=3)
    if fmt != "fp32":
        bits, gs = (8, -1) if fmt == "q8" else (4, int(fmt[3:]))
        quantize_model(m, QuantizeConfig(method="rtn", bits=bits, group_size=gs, head_bits=8))
    native.set_act_int8(m, False)
    toks = [(7 * i + 3) % 96 for i in range(prefix + n)]
    py, kv_py = _prefill(m, toks[prefix:], prefix, toks[:prefix], 1, False)
    nat, kv_nat = _prefill(m, toks[prefix:], prefix, toks[:prefix], 1, True)
    assert (py - nat).abs().max().item() <= TOL
    assert (kv_py - kv_nat).abs().max().item() <= 1e-5
    assert kv_nat[:, :, :, prefix:].abs().sum() > 0  # the native call wrote them


def test_native_prefill_with_an_adapter_and_an_int8_kv_cache():
    m = _model(seed=4)
    adapters = _adapters(m, n=2)
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=64, head_bits=8))
    native.set_act_int8(m, False)
    bank = AdapterBank(m, adapters)
    toks = [(5 * i + 1) % 96 for i in range(19)]
    base, _ = _prefill(m, toks, 0, [], 0, True, bank=bank, adapter=None)
    slot_b = bank._slot["a1"]
    py, kv_py = _prefill(m, toks, 0, [], 0, False, bank=bank, adapter="a1")
    nat, kv_nat = _prefill(m, toks, 0, [], 0, True, lslot=slot_b, bank=bank, adapter="a1")
    assert (py - nat).abs().max().item() <= TOL
    assert (kv_py - kv_nat).abs().max().item() <= 1e-5
    assert (nat - base).abs().max().item() > 10 * TOL  # the adapter took part
    m.kv_dtype = "int8"
    py8, kv_py8 = _prefill(m, toks, 0, [], 2, False, bank=bank, adapter=None)
    nat8, kv_nat8 = _prefill(m, toks, 0, [], 2, True, bank=bank, adapter=None)
    # int8 cache: a value on a rounding boundary may land one code apart (see test_native's KV cache test)
    assert (py8 - nat8).abs().max().item() <= 3e-3
    assert (kv_py8 - kv_nat8).abs().max().item() <= 0.05 * kv_py8.abs().max().item()


def test_which_forwards_prefill_natively(monkeypatch):
    """Default: quantized layers with int8 activations prefill in C (a cached, last-position forward), fp32 weights and
    fp32 activations in Python; ``SLIMSWARM_NATIVE_PREFILL=always`` / ``0`` override; full-logit forwards (eval) never.
    Left-padded batches (generate) prefill row by row and give the Python path's greedy tokens (exact mode)."""
    calls = []
    orig = native.NativeStep.prefill_rows
    monkeypatch.setattr(native.NativeStep, "prefill_rows", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    m = _model(seed=5)
    assert native.step_for(m).prefill_fast is False  # fp32 weights
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=64, head_bits=8))
    native.set_act_int8(m, True)
    assert native.step_for(m).prefill_fast is True
    native.set_act_int8(m, False)
    assert native.step_for(m).prefill_fast is False
    prompts = [[5, 9, 17, 3, 4, 4, 1, 2, 9, 10, 11], [40, 2, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    sp = SamplingParams(max_tokens=12)
    monkeypatch.setenv("SLIMSWARM_NATIVE_PREFILL", "0")
    want = [c.tokens for c in generate_ids(m, prompts, sp)]
    assert not calls
    monkeypatch.setenv("SLIMSWARM_NATIVE_PREFILL", "always")
    got = [c.tokens for c in generate_ids(m, prompts, sp)]
    assert len(calls) == 1 and got == want  # the three left-padded rows in one packed prefill
    m.setup_cache(1, 32)
    with torch.inference_mode():
        full = m(torch.tensor([prompts[0]]), 0)  # every position's logits: the Python path
    assert full.shape[1] == len(prompts[0]) and len(calls) == 1
    m.clear_cache()
    monkeypatch.setenv("SLIMSWARM_NATIVE_PREFILL", "1")
    native.set_act_int8(m, True)
    generate_ids(m, prompts, sp)
    assert len(calls) == 2


def test_engine_admission_through_the_native_prefill(stories, monkeypatch):
    """The engine's batched admission (several new requests, a shared cached prefix, different adapters) prefills each
    row through the native step and answers what the Python batched prefill answers (exact mode, greedy)."""
    m = copy.deepcopy(stories.model)
    adapters = _adapters(m, n=2)
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=-1, head_bits=8))
    native.set_act_int8(m, False)
    bank = AdapterBank(m, adapters)
    tok = stories.tokenizer
    system = tok.encode("Once upon a time there was a little girl who lived in a house by the sea. One day")
    prompts = [system + tok.encode(x, bos=False) for x in (" she", " her mother said", " a big dog came to the door and")]

    def run(mode):
        monkeypatch.setenv("SLIMSWARM_NATIVE_PREFILL", mode)
        eng = Engine(m, tok, max_batch=4, max_len=128, adapters=bank)
        p = SamplingParams(max_tokens=8)
        first = eng.generate([prompts[0]], p)  # fills the prefix cache
        rest = eng.generate(prompts, p, adapters=["a0", None, "a1"])
        return [r.tokens for r in first + rest], eng.counters["cached_prompt_tokens"]

    calls = []
    orig = native.NativeStep.prefill_rows
    monkeypatch.setattr(native.NativeStep, "prefill_rows", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    want, cached_py = run("0")
    assert not calls
    got, cached_nat = run("always")
    assert len(calls) == 2  # the first request alone, then the three admitted together in one packed prefill
    assert got == want
    assert cached_nat == cached_py > 0


@pytest.mark.parametrize("bits,gs", [(4, 64), (4, 32), (8, -1)])
def test_int8_activation_prefill_equals_a_python_emulation_of_its_rounding(bits, gs, monkeypatch):
    """The default mode for quantized layers: the prefill rounds each quantized layer's input rows to int8 (one scale
    per activation block) as the decode step does; the Python prefill with its inputs rounded the same way
    (test_native's emulation) gives the same last logits to fp32 order, across two 8-position calls and a tail.
    (An input within ~1e-7 of a rounding boundary may round apart in the two paths: the bound leaves room for one
    such code, far below int8's own effect.)"""
    from slimswarm.compress.quant.linear import QuantLinear

    from test_native import act_rounded

    m = _model(seed=7, layers=1, inter=256)
    quantize_model(m, QuantizeConfig(method="rtn", bits=bits, group_size=gs, head_bits=8))
    orig = QuantLinear.forward

    def emulated(self, x, kernel=None):
        return orig(self, act_rounded(x, self.group_size, self.bits), kernel)

    toks = [(11 * i + 5) % 96 for i in range(19)]
    native.set_act_int8(m, True)
    nat, kv_nat = _prefill(m, toks, 0, [], 0, True)
    with monkeypatch.context() as mp:
        mp.setattr(QuantLinear, "forward", emulated)
        emu, kv_emu = _prefill(m, toks, 0, [], 0, False)
    native.set_act_int8(m, False)
    exact, _ = _prefill(m, toks, 0, [], 0, False)
    err, effect = (nat - emu).abs().max().item(), (nat - exact).abs().max().item()
    assert effect > 100 * TOL and err <= 0.1 * effect, (err, effect)
    assert (kv_nat - kv_emu).abs().max().item() <= 1e-4


def test_native_prefill_on_the_forced_avx2_build(monkeypatch):
    """The AVX2-only build (SLIMSWARM_ISA=avx2: no VNNI, maddubs for 4-bit x int8) prefills like the Python path
    (exact mode) and like the default build (int8 activations, to the rounding-boundary bound of the emulation test)."""
    m = _model(seed=8)
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=32, head_bits=8))
    toks = [(13 * i + 7) % 96 for i in range(17)]
    native.set_act_int8(m, False)
    py, _ = _prefill(m, toks, 0, [], 0, False)
    monkeypatch.setenv("SLIMSWARM_ISA", "avx2")
    native.reset(m)
    nat, _ = _prefill(m, toks, 0, [], 0, True)
    assert native.step_for(m).isa == "avx2"
    assert (py - nat).abs().max().item() <= TOL
    native.set_act_int8(m, True)
    native.reset(m)
    forced8, _ = _prefill(m, toks, 0, [], 0, True)
    monkeypatch.delenv("SLIMSWARM_ISA")
    native.reset(m)
    default8, _ = _prefill(m, toks, 0, [], 0, True)
    native.set_act_int8(m, False)
    assert (forced8 - default8).abs().max().item() <= 0.1 * (default8 - py).abs().max().item()


def test_more_than_8_rows_decode_in_one_call_with_int8_activations():
    """Past 8 rows (up to 32) a one-token forward of a quantized model with int8 activations still runs natively,
    8 rows of x per pass over each weight piece: 13 rows in one call give exactly what 8 + 5 rows give in two (each
    row's math is the same), and fp32-activation models keep the Python path there."""
    m = _model(seed=9)
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=64, head_bits=8))
    native.set_act_int8(m, True)
    toks = torch.tensor([[(5 * i + 2) % 96] for i in range(13)])
    start = torch.arange(13) % 5

    def run(split):
        m.setup_cache(13, 16)
        with torch.inference_mode():
            for i in range(13):  # a different short history per row
                m(torch.tensor([[(i * 3 + j) % 96 for j in range(int(start[i]))] + [1]]), 0, row0=i)
            if split:
                a = m(toks[:8], start[:8] + 1, None, last_only=True, row0=0)[:, -1]
                b = m(toks[8:], start[8:] + 1, None, last_only=True, row0=8)[:, -1]
                out = torch.cat([a, b])
            else:
                out = m(toks, start + 1, None, last_only=True, row0=0)[:, -1]
        m.clear_cache()
        return out

    assert native.step_for_rows(m, 13) is not None
    assert torch.equal(run(False), run(True))
    native.set_act_int8(m, False)
    assert native.step_for_rows(m, 13) is not None and native.step_for_rows(m, 33) is None  # any format


@pytest.mark.parametrize("act8", [False, True])
def test_sequences_packed_into_shared_prefill_calls_equal_one_at_a_time(act8):
    """ss_prefill_rows packs the positions of several sequences (different lengths, cached prefixes, cache rows,
    adapters) into shared calls: the logits of each one's last position and every cached K/V equal prefilling them one
    at a time, in exact mode and with int8 activations."""
    m = _model(seed=10)
    adapters = _adapters(m, n=2)
    quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=64, head_bits=8))
    native.set_act_int8(m, act8)
    bank = AdapterBank(m, adapters)
    seqs = [[(3 * i + j) % 96 for j in range(n)] for i, n in enumerate((3, 40, 1, 29, 9))]
    starts, rows = [0, 4, 2, 0, 7], [4, 0, 2, 1, 3]
    names = ["a0", None, "a1", "a1", None]
    step = native.step_for(m)
    lsl = [0 if a is None else bank._slot[a] for a in names]

    def prefill(packed):
        m.setup_cache(5, 64)
        with torch.inference_mode():
            for i, s0 in enumerate(starts):  # the cached prefixes (same tokens either way)
                if s0:
                    bank.set_rows([names[i]])
                    os.environ["SLIMSWARM_NATIVE"] = "0"
                    m(torch.tensor([[(7 * j + i) % 96 for j in range(s0)]]), 0, row0=rows[i])
                    os.environ.pop("SLIMSWARM_NATIVE")
            if packed:
                lg = step.prefill_rows(m, seqs, starts, None, rows, lsl)
            else:
                lg = torch.stack([step.prefill(m, torch.tensor(x), s0, 0, r, sl)
                                  for x, s0, r, sl in zip(seqs, starts, rows, lsl)])
        kv = [_kv(m, r, list(range(s0 + len(x)))) for x, s0, r in zip(seqs, starts, rows)]
        m.clear_cache()
        return lg, kv

    try:
        one, kv1 = prefill(False)
        packed, kv2 = prefill(True)
    finally:
        native.set_act_int8(m, False)
    # the same per-row math, but a row's matmul loop differs with the call's row count (one row: four accumulator
    # chains), so fp32 order; an int8 code on a rounding boundary could flip (none does here)
    assert (one - packed).abs().max().item() <= TOL
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(kv1, kv2))


def test_python_prefill_in_pieces_equals_one_forward(monkeypatch):
    """A long cached prompt on the Python path goes PREFILL_CHUNK tokens a forward (its activations bounded by the
    piece): the same last logits and cache as one forward, with left padding and after a cached prefix."""
    import slimswarm.models.llama as llama

    m = _model(seed=11)
    b = 2
    x = torch.tensor([[(5 * i + 3 * r) % 96 for i in range(13)] for r in range(b)])
    pad = torch.tensor([0, 3])

    def run(chunk, start):
        monkeypatch.setattr(llama, "PREFILL_CHUNK", chunk)
        m.setup_cache(b, 32)
        os.environ["SLIMSWARM_NATIVE"] = "0"
        try:
            with torch.inference_mode():
                if start:
                    m(torch.zeros(b, start, dtype=torch.long) + 7, 0, pad, last_only=True)
                lg = m(x, start, pad, last_only=True)[:, -1].clone()
            kv = torch.stack([_kv(m, r, list(range(start + 13))) for r in range(b)])
        finally:
            os.environ.pop("SLIMSWARM_NATIVE")
            m.clear_cache()
        return lg, kv

    for start in (0, 4):
        whole, kv_whole = run(256, start)
        pieces, kv_pieces = run(5, start)
        assert (whole - pieces).abs().max().item() <= TOL
        assert (kv_whole - kv_pieces).abs().max().item() <= 1e-5
