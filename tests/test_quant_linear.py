"""QuantLinear storage and kernels: packing round trips, every kernel path against F.linear(x, dequantize(), bias),
safetensors round trip, packed sizes.

Tolerance (``_check``). The reference is computed in float64 from the exact de-quantized weight. An fp32 kernel
may reorder the sums and fold the zero point as s*(q.x) - s*z*sum(x), so by the standard floating-point
summation bound its error is at most gamma_n * A with gamma_n = n*u / (1 - n*u), u = 2^-24, n = in + groups + 2,
and A = sum_k |x_k| * s * (q_k + z + 16) + |bias| (every magnitude any of the kernels' partial sums can reach).
bf16 outputs are also rounded once (2^-9 |y|), the dequant path rounds each weight to bf16 (2^-9 |w|), and the
int4pack kernel rounds scale and zf = (8 - z) s to bf16 (<= 2^-9 (|w| + 2 s |8 - z|) a weight); together that is
at most 2^-8 * (|y| + sum |x||w| + sum |x| s |8 - z| + |bias|). A wrong code, group or zero point makes errors of
order s*|x|*sqrt(in), tens of times larger than these bounds at the sizes used here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from slimswarm.compress.quant import linear as qlinear
from slimswarm.compress.quant.linear import QuantLinear
from slimswarm.compress.quant.packing import (pack, pack_int2, pack_int3, pack_int4, packed_len, unpack,
                                              unpack_int2, unpack_int3, unpack_int4)

# ----------------------------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), lead=st.lists(st.integers(0, 3), max_size=2),
       n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g, dtype=torch.int64).to(torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (*lead, packed_len(n, bits))
    assert torch.equal(unpack(p, bits, n), codes)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n8=st.integers(1, 12))
def test_specific_packers(data, n8):
    n = 8 * n8
    for bits, pk, up in ((2, pack_int2, unpack_int2), (3, pack_int3, unpack_int3), (4, pack_int4, unpack_int4)):
        vals = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
        c = torch.tensor(vals, dtype=torch.uint8)
        p = pk(c)
        assert p.shape[-1] * 8 == c.shape[-1] * bits  # exactly bits/8 bytes a code
        assert torch.equal(up(p, c.shape[-1]), c)


def test_layout_low_bits_first():
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert pack_int2(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).tolist() == [0b00111001]
    c = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(v) << (3 * i) for i, v in enumerate(c))
    assert pack_int3(c).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    # 3 bits: rows pad up to 8 codes; unpack takes n
    assert pack_int3(torch.ones(5, dtype=torch.uint8)).shape == (3,)
    assert torch.equal(unpack_int3(pack_int3(torch.ones(5, dtype=torch.uint8)), 5), torch.ones(5, dtype=torch.uint8))
    # 5 and 6 bits: 8 codes one 40/48-bit little-endian word
    for bits in (5, 6):
        c = torch.tensor([1, 2, 3, 4, 5, 6, 7, 2**bits - 1], dtype=torch.uint8)
        word = sum(int(v) << (bits * i) for i, v in enumerate(c))
        assert pack(c, bits).tolist() == [(word >> (8 * k)) & 0xFF for k in range(bits)]
    with pytest.raises(ValueError):
        pack(torch.zeros(4, dtype=torch.uint8), 7)


# ----------------------------------------------------------------------------------------------- helpers


def _make(out, inp, bits, group_size, bias=True, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    gs = inp if group_size in (0, -1) else group_size
    ng = inp // gs
    codes = torch.randint(0, 2**bits, (out, inp), generator=g)
    scales = (torch.rand(out, ng, generator=g) * 0.02 + 1e-3).half()
    zeros = torch.randint(0, 2**bits, (out, ng), generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, b, **kw)


_REF: dict = {}


def _ref_parts(m: QuantLinear):
    """Per-module pieces of the reference and the bound, computed once (float64 weight, float32 bound terms)."""
    key = (id(m), m.qweight.data_ptr())
    if key not in _REF:
        W = m.dequantize().double()
        q = m.codes().float()
        ng = m.scales.shape[1]
        s = m.scales.float().repeat_interleave(m.in_features // ng, 1)
        z = m.zeros.float().repeat_interleave(m.in_features // ng, 1)
        b = torch.zeros(m.out_features, dtype=torch.float64) if m.bias is None else m.bias.double()
        # [in, 3*out]: the three magnitudes the bound multiplies by |x|
        mags = torch.cat([s * (q + z + 16), W.abs().float(), s * (8 - z).abs()], 0).t().contiguous()
        _REF.clear()
        _REF[key] = (W, b, mags, ng, m)  # holding m keeps its id from being reused while cached
    return _REF[key][:4]


def _check(m: QuantLinear, x: torch.Tensor, y: torch.Tensor):
    """y against the float64 reference with the bound from the module docstring."""
    W, b, mags, ng = _ref_parts(m)
    xd = x.double().reshape(-1, m.in_features)
    ref = F.linear(xd, W, b)
    a, aw, a8 = (xd.abs().float() @ mags).double().split(m.out_features, -1)
    n = m.in_features + ng + 2
    u = 2.0**-24
    gamma = n * u / (1 - n * u)
    tol = gamma * (a + b.abs()) * 1.01  # 1% for the float32 evaluation of the bound itself
    if y.dtype == torch.bfloat16:
        tol = tol + 2.0**-8 * (ref.abs() + aw + a8 + b.abs())
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert y.shape == (*x.shape[:-1], m.out_features) and y.dtype == x.dtype
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"


# ----------------------------------------------------------------------------------------------- kernels

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [-1, 32, 64, 128]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_every_kernel_matches_dequantized_reference(bits, group_size):
    torch.manual_seed(1)
    m = _make(48, 384, bits, group_size)
    paths = 0
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 8, 512):
            x = torch.randn(rows, 384).to(dtype)
            for k in ("c", "tinygemm", "dequant"):
                if m.supports(k, rows, dtype):
                    _check(m, x, m(x, kernel=k))
                    paths += 1
            _check(m, x, m(x))  # the default dispatch
    assert paths >= 6


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, -1), (3, 64), (8, -1)])
def test_model_shapes_and_leading_dims(bits, group_size):
    """576 wide (9 groups of 64), 3-D input [batch, seq, in], the decode/prefill token counts of the issue."""
    m = _make(192, 576, bits, group_size, seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((1, 1, 576), (8, 1, 576), (1, 512, 576), (2, 3, 576)):
            x = torch.randn(shape).to(dtype)
            _check(m, x, m(x))
            for k in ("c", "tinygemm"):
                if m.supports(k, x.numel() // 576, dtype):
                    _check(m, x, m(x, kernel=k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_catches_small_mistakes(dtype):
    """The tolerance is tight: one zero point off by one, or two neighbouring codes swapped, fails it."""
    m = _make(64, 576, 4, 64, seed=5)
    x = torch.randn(8, 576).to(dtype)
    z = m.zeros.clone()
    z[7, 3] = (int(z[7, 3]) + 1) % 16
    off = QuantLinear.from_codes(m.codes(), m.scales, z, 4, 64, m.bias)
    c = m.codes().clone()
    c[11, [100, 101]] = c[11, [101, 100]]
    c[11, 100] = (int(c[11, 101]) + 5) % 16  # make sure the pair differs
    swapped = QuantLinear.from_codes(c, m.scales, m.zeros, 4, 64, m.bias)
    for bad in (off, swapped):
        with pytest.raises(AssertionError):
            _check(m, x, bad(x))


def test_default_uses_fast_kernels_at_decode():
    m = _make(64, 256, 4, 32)
    assert m.kernel_for(1, torch.bfloat16) == "tinygemm" and m.kernel_for(8, torch.bfloat16) == "tinygemm"
    if qlinear.kernels.available():
        assert m.kernel_for(1, torch.float32) == "c" and m.kernel_for(8, torch.float32) == "c"
    assert m.kernel_for(512, torch.float32) == "dequant"


def test_chunked_dequant(monkeypatch):
    monkeypatch.setattr(qlinear, "DEQUANT_CHUNK", 64 * 16)  # 16 rows a chunk, 48 rows → 3 chunks
    m = _make(48, 64, 4, 32)
    x = torch.randn(20, 64)
    _check(m, x, m(x, kernel="dequant"))
    assert torch.allclose(m(x, kernel="dequant"), F.linear(x, m.dequantize(), m.bias), rtol=0, atol=1e-5)


def test_low_memory_keeps_no_4bit_copy():
    m = _make(32, 128, 3, 32, low_memory=True)
    x = torch.randn(1, 128)
    assert m.kernel_for(1, torch.float32) == "dequant" and m.kernel_for(1, torch.bfloat16) == "dequant"
    _check(m, x, m(x))
    assert "codes4" not in m._cache


def test_act_quant_is_opt_in_and_approximate():
    m = _make(64, 256, 8, -1, act_quant=True)
    assert _make(64, 256, 8, -1).kernel_for(1, torch.float32) != "fbgemm"
    assert m.kernel_for(1, torch.float32) == "fbgemm"
    x = torch.randn(4, 256)
    ref = F.linear(x, m.dequantize(), m.bias)
    y = m(x)
    # activations quantized to 8 bits per call: a different model, only close
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    assert _make(64, 256, 8, 32, act_quant=True).kernel_for(1, torch.float32) != "fbgemm"  # per-channel only


# ----------------------------------------------------------------------------------------------- storage


def test_dequantize_is_exact():
    m = _make(16, 64, 4, 32, bias=False)
    q = m.codes().double().view(16, 2, 32)
    w = ((q - m.zeros.double()[..., None]) * m.scales.double()[..., None]).view(16, 64)
    assert torch.equal(m.dequantize().double(), w)


@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes(bits):
    out, inp = 24, 576
    m = _make(out, inp, bits, 64)
    assert m.qweight.dtype == torch.uint8
    assert m.qweight.numel() == out * math.ceil(inp / 8) * bits  # bits/8 bytes a weight (3 bits: 3 bytes per 8)
    m3 = _make(4, 100, 3, -1)  # 100 codes → 13 groups of 8 → 39 bytes a row
    assert m3.qweight.shape == (4, 39)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, -1), (8, 128)])
def test_safetensors_round_trip(tmp_path, bits, group_size):
    m = _make(48, 384, bits, group_size)
    x1, x8, xp = torch.randn(1, 384), torch.randn(8, 384).bfloat16(), torch.randn(512, 384)
    before = [m(x1), m(x8), m(xp)]
    m.prepare()
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}  # caches are not persistent
    assert sd["scales"].dtype == torch.float16 and sd["zeros"].dtype == torch.uint8
    save_file(sd, str(tmp_path / "q.safetensors"))
    loaded = load_file(str(tmp_path / "q.safetensors"))
    m2 = QuantLinear(384, 48, bits, group_size, bias=True)
    m2.load_state_dict(loaded)
    for k, v in sd.items():
        assert torch.equal(m2.state_dict()[k], v) and m2.state_dict()[k].dtype == v.dtype
    after = [m2(x1), m2(x8), m2(xp)]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_to_dtype_keeps_fp16_scales_and_rebuilds_caches():
    m = _make(32, 128, 4, 32, bias=False)  # (a bias would be rounded by .to(bfloat16): it is a float parameter)
    x = torch.randn(1, 128)
    y = m(x)
    assert m._cache
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and not m._cache
    _check(m, x.bfloat16(), m(x.bfloat16()))
    m.float()
    assert torch.equal(m(x), y)


def test_from_codes_validation_and_legacy_bias():
    codes = torch.randint(0, 16, (16, 64))
    s, z, b = torch.rand(16, 2).half(), torch.randint(0, 16, (16, 2)), torch.randn(16)
    m = QuantLinear.from_codes(codes, s, z, 4, b)  # older call form: bias in 5th place
    assert m.group_size == 32 and torch.equal(m.bias, b)
    assert QuantLinear.from_codes(codes, s, z, 4, group_size=32, bias=b).group_size == 32
    with pytest.raises(ValueError):
        QuantLinear.from_codes(codes + 16, s, z, 4)
    with pytest.raises(ValueError):
        QuantLinear.from_codes(codes, s, z, 4, group_size=16)
