"""The reference ops against float64 sums written out here."""
import pytest
import torch

import gradguide as gg


def test_reduce_gram_and_sums_float64():
    g = torch.Generator().manual_seed(0)
    ops_ = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    gram, sums = gg.ops.reduce(ops_, backend="reference")
    assert gram.shape == (3, 1, 3, 3) and sums.shape == (3, 1, 3)
    for b in range(3):
        for i in range(3):
            assert sums[b, 0, i].item() == pytest.approx(ops_[i][b].sum().item())
            for j in range(3):
                assert gram[b, 0, i, j].item() == pytest.approx((ops_[i][b] * ops_[j][b]).sum().item())


def test_reduce_groups_are_channel_chunks():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    gram, sums = gg.ops.reduce([a, b], groups=3)
    assert torch.allclose(gram[:, :, 0, 1], (a.double() * b.double()).sum(-1), atol=1e-5)
    assert torch.allclose(sums[:, :, 1], b.double().sum(-1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_reduce_accumulates_in_float64(dtype):
    x = torch.full((1, 4096), 1.0, dtype=dtype)
    gram, sums = gg.ops.reduce([x])
    assert gram.dtype == torch.float64 and gram.item() == 4096.0 and sums.item() == 4096.0
    # 2^24 + 1 is not a float32: a float32 accumulator would stop at 2^24
    y = torch.ones(1, 2 ** 24 + 1, dtype=dtype)
    assert gg.ops.reduce([y])[1].item() == 2 ** 24 + 1


def test_combine_per_sample_and_per_group_and_clamp():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    coef = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    out = gg.ops.combine(coef, [a, b])
    assert torch.allclose(out, coef[:, 0, None, None] * a + coef[:, 1, None, None] * b, atol=1e-6)
    per_group = torch.randn(2, 3, 2, generator=g)
    out = gg.ops.combine(per_group, [a, b])
    want = per_group[..., 0, None] * a + per_group[..., 1, None] * b
    assert torch.allclose(out, want, atol=1e-6)
    dest = torch.empty_like(a)
    res = gg.ops.combine(coef, [a, b], out=dest, clamp=(-0.5, 0.5))
    assert res is dest and dest.abs().max() <= 0.5


def test_non_finite_inputs_poison_even_with_zero_coefficient():
    a = torch.ones(2, 3)
    b = torch.ones(2, 3)
    b[0, 1] = float("inf")
    out = gg.ops.combine(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), [a, b])
    assert torch.isnan(out[0, 1]) and torch.isfinite(out[1]).all()
    gram, _ = gg.ops.reduce([a, b])
    assert torch.isinf(gram[0, 0, 1, 1]) and torch.isfinite(gram[1]).all()


def test_available_backends_reports_reference():
    assert gg.ops.available_backends()["reference"] is True
    assert gg.ops.resolve_backend("reference", torch.device("cpu")) == "reference"
