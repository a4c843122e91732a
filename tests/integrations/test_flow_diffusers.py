"""from_diffusers with flow-matching schedulers reproduces diffusers' own loop (≤ 1e-4).

``sample(model, shape, schedule=schedule, steps=N, x_T=...)`` with no other keyword against
``scheduler.set_timesteps(N); for t: latents = scheduler.step(model(latents, t), t, latents)``,
same model, same x_T, same generator for the stochastic steps; on a small random module and
on a tiny SD3 transformer built in code.
"""
import numpy as np
import pytest
import torch

import gradguide as gg

diffusers = pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FlowMatchHeunDiscreteScheduler, FlowMatchLCMScheduler, UniPCMultistepScheduler)

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


class Tiny(torch.nn.Module):
    """A small random velocity model (nonlinear in x and t)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(4, generator=g) * 0.3)

    def forward(self, x, t, return_dict=True):
        tt = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return (torch.tanh(h + self.b.view(1, -1, 1, 1) * tt) + 0.3 * x * torch.cos(3 * tt),)


def diffusers_loop(module, scheduler, x, n, mu=None, sigmas=None, seed=3, **cond):
    g = torch.Generator().manual_seed(seed)
    kw = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, **kw)
    else:
        scheduler.set_timesteps(n, **kw)
    step_kw = {} if isinstance(scheduler, UniPCMultistepScheduler) else {"generator": g}
    for t in scheduler.timesteps:
        out = module(x, t.expand(x.shape[0]), **cond)[0]
        x = scheduler.step(out, t, x, return_dict=False, **step_kw)[0]
    return x


CASES = [
    (FlowMatchEulerDiscreteScheduler, {}, None),
    (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, None),
    (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True}, 0.9),
    (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 1.1),
    (FlowMatchEulerDiscreteScheduler, {"shift": 3.0, "shift_terminal": 0.05}, None),
    (FlowMatchEulerDiscreteScheduler, {"shift": 3.0, "stochastic_sampling": True}, None),
    (FlowMatchEulerDiscreteScheduler, {"shift": 2.0, "use_karras_sigmas": True}, None),
    (FlowMatchHeunDiscreteScheduler, {}, None),
    (FlowMatchHeunDiscreteScheduler, {"shift": 3.0}, None),
    (FlowMatchLCMScheduler, {"shift": 3.0}, None),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0), None),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=5.0, solver_order=3), None),
    (UniPCMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), 0.7),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0), None),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0, algorithm_type="sde-dpmsolver++"), None),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0, solver_order=3, final_sigmas_type="sigma_min"), None),
]


def _id(case):
    cls, cfg, mu = case
    return cls.__name__.replace("Scheduler", "") + "".join(f"-{k}={v}" for k, v in cfg.items() if k not in FLOW) + \
        ("" if mu is None else f"-mu={mu}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_from_diffusers_reproduces_the_flow_scheduler_loop(case):
    cls, config, mu = case
    module = Tiny()
    x_T = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    # one step with shift_terminal or a final σ_min is degenerate in diffusers (NaN σ's, a zero-length step)
    degenerate_one = "shift_terminal" in config or config.get("final_sigmas_type") == "sigma_min"
    for n in (2, 7, 20) if degenerate_one else (1, 2, 7, 20):
        with torch.no_grad():
            ref = diffusers_loop(module, cls(**config), x_T.clone(), n, mu)
            model, schedule = gg.from_diffusers(module, cls(**config), mu=mu)
            out = gg.sample(model, x_T.shape, schedule=schedule, steps=n, x_T=x_T.clone(),
                            generator=torch.Generator().manual_seed(3))
        assert isinstance(schedule, gg.FlowSchedule)
        assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max())), (n, (out - ref).abs().max())


def test_user_sigmas_as_the_flux_pipeline_passes_them():
    module = Tiny()
    x_T = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    n = 6
    sigmas = np.linspace(1.0, 1 / n, n)   # an array: diffusers' UniPC does arithmetic on it
    for cls, config, mu in [(FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True}, 0.9),
                            (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0), None)]:
        with torch.no_grad():
            ref = diffusers_loop(module, cls(**config), x_T.clone(), n, mu, sigmas=sigmas)
            model, schedule = gg.from_diffusers(module, cls(**config), mu=mu)
            out = gg.sample(model, x_T.shape, schedule=schedule, sampler=gg.Sampler(sigmas=sigmas), x_T=x_T.clone())
        assert (out - ref).abs().max() <= 1e-4, cls.__name__


class SD3Adapter(torch.nn.Module):
    """The tiny SD3 transformer behind ``model(x, t, **cond, return_dict=False)``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, encoder_hidden_states=None, pooled_projections=None, return_dict=False):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)


@pytest.mark.parametrize("cls,config", [(FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
                                        (FlowMatchHeunDiscreteScheduler, {"shift": 3.0})])
def test_tiny_sd3_transformer(cls, config):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4).eval()
    module = SD3Adapter(tr)
    g = torch.Generator().manual_seed(2)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g)}
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref = diffusers_loop(module, cls(**config), x_T.clone(), 6, **cond)
        model, schedule = gg.from_diffusers(module, cls(**config))
        out = gg.sample(model, x_T.shape, schedule=schedule, steps=6, x_T=x_T.clone(), cond=cond)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_dynamic_shifting_needs_mu_at_sampling_time():
    module = Tiny()
    model, schedule = gg.from_diffusers(module, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="mu"):
        gg.sample(model, (1, 4, 2, 2), schedule=schedule, steps=3)
    x = gg.sample(model, (1, 4, 2, 2), schedule=schedule.with_mu(schedule.mu_for(1024)), steps=3)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="mu"):
        gg.from_diffusers(module, diffusers.DDIMScheduler(), mu=0.5)


REFUSED = [
    (FlowMatchEulerDiscreteScheduler, {"invert_sigmas": True}, "invert_sigmas"),
    (FlowMatchLCMScheduler, {"scale_factors": [1.0, 1.5], "upscale_mode": "bicubic"}, "scale_factors"),
    (UniPCMultistepScheduler, {"use_flow_sigmas": True}, "prediction_type"),
    (UniPCMultistepScheduler, {"prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    (UniPCMultistepScheduler, dict(FLOW, use_karras_sigmas=True), "use_karras_sigmas"),
    (DPMSolverMultistepScheduler, dict(FLOW, algorithm_type="dpmsolver"), "algorithm_type"),
    (UniPCMultistepScheduler, dict(FLOW, predict_x0=False), "predict_x0"),
    (UniPCMultistepScheduler, dict(FLOW, final_sigmas_type="sigma_min"), "final_sigmas_type"),
]


@pytest.mark.parametrize("cls,config,name", REFUSED, ids=[r[2] for r in REFUSED])
def test_unreproduced_flow_settings_are_refused_by_name(cls, config, name):
    with pytest.raises(ValueError, match=name):
        gg.from_diffusers(Tiny(), cls(**config))


@pytest.mark.parametrize("name", ["TCDScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_few_step_and_edm_schedulers_are_not_flow_schedules(name):
    """They map to variance-preserving samplers (tests/integrations/test_diffusers_tcd.py, _edm.py, _lcm.py)."""
    _, schedule = gg.from_diffusers(Tiny(), getattr(diffusers, name)())
    assert not isinstance(schedule, gg.FlowSchedule) and schedule.sampler_config.prediction != "flow"
