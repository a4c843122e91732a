"""GuidanceInterval (guidance in a limited noise interval): CFG's weight inside the interval,
the conditional model outside, on every step of a run; fused and general paths agree."""
import pytest
import torch

import gradguide as gg
from gradguide import sampling

SCHED = gg.Schedule.linear(1000)
SHAPE = (3, 2, 4, 4)
COND = {"y": torch.ones(SHAPE[0])}
UNCOND = {"y": torch.zeros(SHAPE[0])}


def _model(x, t, y):
    abar = SCHED.alphas_cumprod.to(x.dtype)[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return s * x + a * (0.3 * torch.tanh(1.3 * x) + 0.4 * y.reshape(-1, 1, 1, 1) * torch.sin(x + 1.0))


def _run(guidance, model=_model, fused=True, steps=8):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return gg.sample(model, SHAPE, schedule=SCHED, sampler="ddim", steps=steps, guidance=guidance, cond=COND,
                     x_T=x_T, execution=gg.Execution(fused=fused))


def _sigma(t):
    abar = SCHED.alphas_cumprod.double()[t]
    return ((1 - abar) / abar).sqrt()


@pytest.mark.parametrize("fused", [True, False])
def test_the_weight_is_cfg_inside_the_interval_and_one_outside(fused):
    low, high, w = 0.5, 4.0, 3.0
    # the reference: CFG written into the model, with the weight read off the step's σ by hand
    def guided(x, t, y):
        weight = torch.where((_sigma(t) > low) & (_sigma(t) <= high), w, 1.0).reshape(-1, 1, 1, 1)
        c, u = _model(x, t, y), _model(x, t, torch.zeros_like(y))
        return u + weight * (c - u)
    want = _run([], model=guided)
    got = _run([gg.GuidanceInterval(w, low, high, uncond=UNCOND)], fused=fused)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    sigmas = _sigma(sampling.prepare_run(_model, SHAPE, schedule=SCHED, sampler="ddim", steps=8).tables.timesteps.t)
    assert ((sigmas > low) & (sigmas <= high)).any() and ((sigmas <= low) | (sigmas > high)).any()   # both kinds


def test_an_interval_around_every_step_is_cfg_and_the_fused_step_is_one_combine():
    everywhere = _run([gg.GuidanceInterval(3.0, 0.0, float("inf"), uncond=UNCOND)])
    torch.testing.assert_close(everywhere, _run([gg.CFG(3.0, uncond=UNCOND)]), rtol=1e-12, atol=1e-12)
    run = sampling.prepare_run(_model, SHAPE, schedule=SCHED, sampler="ddim", steps=8, cond=COND,
                               guidance=[gg.GuidanceInterval(3.0, 0.5, 4.0, uncond=UNCOND)])
    assert run.plan is not None, run.fused_reason
    assert [st.policy for v in run.plan.variants.values() for st in v.stages] == ["linear"]


def test_refuses_an_empty_or_negative_interval():
    with pytest.raises(ValueError, match="sigma_high"):
        gg.GuidanceInterval(3.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="sigma_low"):
        gg.GuidanceInterval(3.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="sigma_low"):
        gg.GuidanceInterval(3.0, "0.5", 1.0)
