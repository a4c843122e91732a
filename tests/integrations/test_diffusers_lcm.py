"""from_diffusers with diffusers' LCMScheduler reproduces its own loop (≤ 1e-4): the consistency
step ``x' = √ᾱ'(c_out x̂_0 + c_skip x) + √(1−ᾱ') z`` (the last step without noise) on the
scheduler's own timesteps, ε / v / x̂_0 models, clipping, timestep_scaling, the same generator
for the noise (TCD, its neighbour: tests/integrations/test_diffusers_tcd.py)."""
import pytest
import torch

import gradguide as gg

diffusers = pytest.importorskip("diffusers")
from diffusers import LCMScheduler  # noqa: E402


class Tiny(torch.nn.Module):
    """A small random ε/v/x̂_0 model (nonlinear in x and t)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)

    def forward(self, x, t, return_dict=True):
        tt = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1)
        return (torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + tt) + 0.3 * x * torch.cos(3 * tt),)


def diffusers_loop(module, scheduler, x, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(module(x, t.expand(x.shape[0]))[0], t, x, generator=g, return_dict=False)[0]
    return x


CASES = [
    {},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8},
    {"original_inference_steps": 20, "timestep_scaling": 4.0},
    {"beta_schedule": "linear", "steps_offset": 1},
]


@pytest.mark.parametrize("config", CASES, ids=["eps", "v", "x0-clip", "orig20-scaling4", "linear-offset"])
def test_lcm_reproduces_diffusers(config):
    module = Tiny()
    x_T = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    for n in (1, 2, 4, 8):
        with torch.no_grad():
            ref = diffusers_loop(module, LCMScheduler(**config), x_T.clone(), n)
            model, schedule = gg.from_diffusers(module, LCMScheduler(**config))
            out = gg.sample(model, x_T.shape, schedule=schedule, steps=n, x_T=x_T.clone(),
                            generator=torch.Generator().manual_seed(3))
        assert schedule.sampler_config.name == "lcm"
        assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max())), (n, (out - ref).abs().max())
        if n > 1:   # the noise matters: another seed gives another sample
            with torch.no_grad():
                other = gg.sample(model, x_T.shape, schedule=schedule, steps=n, x_T=x_T.clone(),
                                  generator=torch.Generator().manual_seed(4))
            assert (other - ref).abs().max() > 1e-3


def test_lcm_with_guidance_runs():
    module = Tiny()
    model, schedule = gg.from_diffusers(module, LCMScheduler())
    x = gg.sample(model, (2, 4, 5, 5), schedule=schedule, steps=4, generator=torch.Generator().manual_seed(0),
                  guidance=[gg.NaiveGradient(torch.ones(1, 4, 5, 5) / 10, target=1.0)])
    assert torch.isfinite(x).all()
