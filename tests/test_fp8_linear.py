"""The native FP8 linear (serve_app.engines.fp8_linear) against the bf16/fp32 linear it replaces, on CPU
(torch's CPU `_scaled_mm` takes the same per-row scales as the CUDA one)."""

import pytest
import torch

from serve_app.engines.fp8_linear import Float8RowwiseLinear, quantize_linears_fp8


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_linear_within_fp8_rounding(fp8_dtype, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=bias).to(torch.bfloat16)
    # rows of very different magnitude: per-row scales must keep the small rows accurate
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 1, 96).to(torch.bfloat16)[:, None])
    x = torch.randn(3, 50, 256, dtype=torch.bfloat16) * torch.logspace(-2, 2, 50)[None, :, None].to(torch.bfloat16)
    q = Float8RowwiseLinear(lin, fp8_dtype)
    out, ref = q(x), lin(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert q.weight.dtype == fp8_dtype and q.weight_scale.shape == (1, 96)
    # e4m3 has 3 mantissa bits: ~6 % worst-case relative rounding per element, far less on a dot product
    rel = (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)
    assert rel.max() < 0.08, rel.max()
    assert rel.mean() < 0.04, rel.mean()
    # and it is not just the bf16 result: the weights really went through FP8
    assert not torch.equal(out, ref)


def test_quantize_linears_replaces_only_the_chosen_ones():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(64, 32)))
    x = torch.randn(4, 32)
    ref = model(x)
    n = quantize_linears_fp8(model, torch.float8_e4m3fn, lambda m, fqn: fqn.startswith("2."))
    assert n == 1
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2][0], Float8RowwiseLinear)
    out = model(x)
    assert (out - ref).norm() / ref.norm() < 0.08


def test_quantizing_keeps_no_bf16_copy_of_the_replaced_weights():
    """Each replaced linear's weight is freed as it is replaced (an FP8 model's peak must stay below
    bf16's): nothing keeps the old modules alive."""
    import gc
    import weakref

    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32, dtype=torch.bfloat16) for _ in range(4)])
    refs = [weakref.ref(m.weight) for m in model]
    assert quantize_linears_fp8(model, torch.float8_e4m3fn, lambda m, fqn: True) == 4
    gc.collect()
    assert all(r() is None for r in refs)
    assert all(isinstance(m, Float8RowwiseLinear) for m in model)
