"""Dynamic thresholding (``Sampler(clip=gradguide.DynamicThreshold(ratio, max_value))``): the
rule, its place in the step (x̂_0 and a guidance shift thresholded with it), and the fused
trace's refusal (a per-sample quantile is not a fused combine). Parity with diffusers'
``thresholding=True``: tests/integrations/test_diffusers_dpmsolver.py."""
import pytest
import torch

import gradguide
from gradguide import sampling


def test_thresholded_step_runs_unfused_and_guided():
    """A quantile is not a fused combine: the trace refuses it by name and the general step runs
    (fused=True and False agree). Guidance that shifts x̂_0 (CFG, and G's score shift, whose
    clipped shift is its own operand) is thresholded with it: every guided x̂_0 lies in [−1, 1]
    and is its own threshold, where without thresholding it leaves [−1, 1]. The rule itself is
    torch.quantile's, clamped to [1, max_value], then clip and rescale."""
    schedule = gradguide.Schedule.linear(1000)
    thr = gradguide.DynamicThreshold(0.9, 1.5)
    shape = (2, 3, 4, 4)

    def model(x, t, c=1.0):
        return 0.3 * c * x

    run = sampling.prepare_run(model, shape, schedule=schedule, sampler=gradguide.Sampler("ddim", clip=thr), steps=5)
    assert "dynamic thresholding" in run.fused_reason and "quantile" in run.fused_reason
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x0s = {}

    def run_with(clip, fused=True):
        records = []
        out = gradguide.sample(model, shape, schedule=schedule, steps=5, x_T=x_t, cond={"c": 1.0},
                               sampler=gradguide.Sampler("ddim", clip=clip),
                               guidance=[gradguide.CFG(3.0, uncond={"c": 0.0}), gradguide.NaiveGradient(grad, 5.0)],
                               execution=gradguide.Execution(fused=fused),
                               diagnostics=gradguide.Diagnostics(callback=records.append))
        x0s[(clip is not None, fused)] = [r.x0 for r in records]
        return out
    a, b = run_with(thr), run_with(thr, fused=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    run_with(None)
    assert max(float(x0.abs().max()) for x0 in x0s[(False, True)]) > 1.5
    for x0 in x0s[(True, True)]:
        assert float(x0.abs().max()) <= 1 + 1e-6
        torch.testing.assert_close(thr(x0), x0, rtol=0, atol=1e-6)
    x0 = torch.randn(3, 2, 5, 5) * 2
    s = torch.quantile(x0.reshape(3, -1).abs(), 0.9, dim=1).clamp(1, 1.5).view(-1, 1, 1, 1)
    torch.testing.assert_close(thr(x0), torch.clamp(x0, -s, s) / s, rtol=0, atol=1e-7)
    d = 1e-4 * torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(thr.shift(x0, d), thr(x0 + d) - thr(x0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        gradguide.DynamicThreshold(1.5)
    with pytest.raises(ValueError, match="sampler.clip"):
        gradguide.Sampler("ddim", clip="dynamic")


def test_threshold_is_part_of_the_configuration():
    thr = gradguide.DynamicThreshold(0.95, 2.0)
    assert gradguide.Sampler("ddim", clip=thr) == gradguide.Sampler("ddim", clip=gradguide.DynamicThreshold(0.95, 2.0))
    assert gradguide.Sampler("ddim", clip=thr) != gradguide.Sampler("ddim", clip=(-2.0, 2.0))
    with pytest.raises(ValueError, match="max_value"):
        gradguide.DynamicThreshold(0.9, 0.0)
    # half-precision x̂_0 is thresholded in float32 and returned in its own dtype
    x0 = (torch.randn(2, 3, 4, 4) * 3).half()
    out = thr(x0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), thr(x0.float()), rtol=0, atol=2e-3)
