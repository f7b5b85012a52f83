"""Our C kernels against PyTorch on the shapes that matter and on awkward ones."""

import pytest
import torch
import torch.nn.functional as F

from slimswarm import kernels
from slimswarm.compress.quant.packing import pack
from slimswarm.models.llama import Linear


def test_kernels_build_here():
    assert kernels.available(), kernels.why_unavailable()


@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576), (576, 1536), (49152, 576), (37, 77), (5, 3)])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_float_rows_match_f_linear(n, k, m, wdtype):
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(wdtype)
    b = torch.randn(n, generator=g)
    # fp32 accumulation in a different order than MKL: relative error ~1e-6 of the row norm.
    torch.testing.assert_close(kernels.linear_float(x, w, b), F.linear(x, w.float(), b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [16, 64, 96, 576])
def test_quant_rows_match_dequantized_reference(bits, gs):
    g = torch.Generator().manual_seed(bits * gs)
    n, k = 200, 576
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // gs, generator=g) * 0.01
    zero = torch.randint(0, 2**bits, (n, k // gs), generator=g).float()
    w = ((codes.float().view(n, -1, gs) - zero[..., None]) * scale[..., None]).view(n, k)
    for m in (1, 8):
        x = torch.randn(m, k, generator=g)
        y = kernels.linear_quant(x, pack(codes, bits), scale, zero, bits, gs)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_linear_module_falls_back_for_prefill_and_training():
    lin = Linear(64, 32)
    x = torch.randn(2, 40, 64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    x1 = torch.randn(1, 1, 64, requires_grad=True)
    lin(x1).sum().backward()  # grad path goes through F.linear
    assert x1.grad is not None
