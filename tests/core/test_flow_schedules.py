"""FlowSchedule: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps, value for value."""
import math

import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide.schedules import flow_abar, flow_sigma

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

SPACING = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
CONFIGS = [{}, {"shift": 3.0}, {"use_dynamic_shifting": True}, {"use_dynamic_shifting": True, "time_shift_type": "linear"},
           {"shift": 3.0, "shift_terminal": 0.1}, {"shift": 2.0, "use_karras_sigmas": True},
           {"shift": 3.0, "use_exponential_sigmas": True}, {"use_beta_sigmas": True}, {"num_train_timesteps": 500, "shift": 1.5}]


def _ours(config, mu):
    kw = {k: v for k, v in config.items() if k not in SPACING}
    spacing = [SPACING[k] for k in config if k in SPACING]
    return gg.FlowSchedule(**kw, sigma_spacing=spacing[0] if spacing else "linear", mu=mu)


def _sigmas(ts):
    return flow_sigma(torch.cat([ts.abar, ts.abar_prev[-1:]]))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("how", ["steps", "sigmas", "timesteps"])
def test_flow_schedule_is_diffusers_set_timesteps(config, how):
    mu = 0.8 if config.get("use_dynamic_shifting") else None
    for n in (2, 5, 28):
        extra = {}
        if how == "sigmas":
            extra = {"sigmas": list(np.linspace(1.0, 1 / n, n))}     # what the Flux pipeline passes
        elif how == "timesteps":
            T = config.get("num_train_timesteps", 1000)
            extra = {"timesteps": list(np.linspace(float(T), T / n, n))}
        ref = FlowMatchEulerDiscreteScheduler(**config)
        ref.set_timesteps(n, mu=mu, **extra)
        ts = _ours(config, mu).flow_timesteps(None if extra else n, **extra)
        assert torch.equal(ts.t, ref.timesteps.to(torch.float64)), (n, ts.t, ref.timesteps)
        assert torch.allclose(_sigmas(ts), ref.sigmas.to(torch.float64), rtol=0, atol=1e-12)
        assert ts.init_scale == pytest.approx(1 / math.sqrt((1 - float(ref.sigmas[0])) ** 2 + float(ref.sigmas[0]) ** 2))
        assert ts.final_scale == 1.0


def test_steps_and_sigmas_reach_the_schedule_through_sample_arguments():
    sched = gg.FlowSchedule(shift=3.0)
    assert torch.equal(sched.timesteps(7).t, sched.flow_timesteps(7).t)
    assert torch.equal(sched.timesteps_from_sigmas([0.9, 0.5, 0.2]).abar, sched.flow_timesteps(sigmas=[0.9, 0.5, 0.2]).abar)
    assert torch.equal(sched.timesteps([1000.0, 500.0]).t, torch.tensor([1000.0, 500.0], dtype=torch.float64))


def test_the_model_timestep_convention():
    sigma_as_t = gg.FlowSchedule(shift=3.0, timestep_scale=1.0).timesteps(4)
    per_1000 = gg.FlowSchedule(shift=3.0).timesteps(4)
    assert torch.allclose(sigma_as_t.t * 1000, per_1000.t)
    assert torch.equal(sigma_as_t.abar, per_1000.abar)
    assert torch.allclose(per_1000.t / 1000, _sigmas(per_1000)[:-1].to(torch.float32).to(torch.float64), atol=1e-6)


def test_calculate_shift_is_the_flux_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for seq in (256, 1024, 4096, 700):
        assert gg.calculate_shift(seq) == calculate_shift(seq)
        assert gg.calculate_shift(seq, 256, 4096, 0.5, 1.16) == calculate_shift(seq, 256, 4096, 0.5, 1.16)
    sched = gg.FlowSchedule(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert sched.mu_for(1024) == calculate_shift(1024)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(10, mu=sched.mu_for(1024))
    assert torch.equal(sched.with_mu(sched.mu_for(1024)).timesteps(10).t, ref.timesteps.to(torch.float64))


def test_flow_abar_is_the_rescaled_variance_preserving_state():
    sig = torch.linspace(0, 1, 101, dtype=torch.float64)
    abar = flow_abar(sig)
    r = ((1 - sig) ** 2 + sig ** 2).sqrt()
    assert torch.allclose(abar.sqrt(), (1 - sig) / r) and torch.allclose((1 - abar).sqrt(), sig / r)
    assert torch.allclose(flow_sigma(abar), sig, atol=1e-15)


def test_flow_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="mu"):
        gg.FlowSchedule(use_dynamic_shifting=True).timesteps(4)
    with pytest.raises(ValueError, match="mu"):
        gg.FlowSchedule(shift=3.0).with_mu(0.5)
    with pytest.raises(ValueError, match="shift"):
        gg.FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="spacing"):
        gg.FlowSchedule().timesteps(4, spacing="trailing")
    with pytest.raises(ValueError, match="sigmas"):
        gg.FlowSchedule().flow_timesteps(sigmas=[0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="sigmas"):
        gg.FlowSchedule().flow_timesteps(sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match="time_shift_type"):
        gg.FlowSchedule(time_shift_type="cosine")
    with pytest.raises(ValueError, match="sigma_spacing"):
        gg.FlowSchedule(sigma_spacing="lu")


def test_flow_prediction_and_flow_schedule_go_together():
    model = lambda x, t: torch.zeros_like(x)
    with pytest.raises(ValueError, match="FlowSchedule"):
        gg.sample(model, (2, 3), schedule=gg.Schedule.linear(), sampler=gg.Sampler(prediction="flow"), steps=3)
    with pytest.raises(ValueError, match="prediction"):
        gg.sample(model, (2, 3), schedule=gg.FlowSchedule(), sampler=gg.Sampler(prediction="eps"), steps=3)
    out = gg.sample(model, (2, 3), schedule=gg.FlowSchedule(), steps=3, x_T=torch.ones(2, 3))
    assert torch.allclose(out, torch.ones(2, 3))   # zero velocity: x_σ never moves


def test_a_model_taking_sigma_samples_like_one_taking_sigma_times_1000():
    from gradguide.experiments.analytic import FlowGaussianMixture
    per_1000 = FlowGaussianMixture([0.4, 0.6], [[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3])
    per_sigma = FlowGaussianMixture([0.4, 0.6], [[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3], timestep_scale=1.0)
    seen = []
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = gg.sample(per_1000, (8, 2), schedule=gg.FlowSchedule(shift=3.0), steps=6, x_T=x_T)
    b = gg.sample(lambda x, t: seen.append(t) or per_sigma(x, t), (8, 2),
                  schedule=gg.FlowSchedule(shift=3.0, timestep_scale=1.0), steps=6, x_T=x_T)
    assert torch.allclose(a, b, atol=1e-12)
    assert 0 < float(seen[-1][0]) < float(seen[0][0]) <= 1.0   # the model saw σ itself
