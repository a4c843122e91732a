"""Parity by default for ``PNDMScheduler`` with its Runge–Kutta warm-up (``skip_prk_steps=False``,
the default), ``IPNDMScheduler`` and ``SASolverScheduler``: ``from_diffusers(model, scheduler)`` +
``sample(model, shape, schedule=schedule, steps=N, x_T=noise)`` (plus ``generator=``, which SA-Solver
draws from at every step) equals diffusers' own loop on the same model, noise and generator; the
settings gradguide does not reproduce raise naming the class and option. Every one of them runs
under CFG with PixelAsParam's policy C on the general step.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import IPNDMScheduler, PNDMScheduler, SASolverScheduler  # noqa: E402
from test_diffusers_parity import SHAPE, TOL, Toy, _id, run_both, unet  # noqa: E402,F401  (unet: a fixture)

import gradguide  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


class TrigToy(torch.nn.Module):
    """A v-model for IPNDM's time t ∈ [0, 1] (α = cos πt/2, σ = sin πt/2): the v of N(0, 0.25 I)
    data's optimal denoiser with a fixed conv mixed in."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05

    def forward(self, x, t, return_dict=False):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1]
        a, s = torch.cos(t * math.pi / 2).float(), torch.sin(t * math.pi / 2).float()
        x0 = a * 0.25 / (a * a * 0.25 + s * s) * (x + torch.nn.functional.conv2d(x, self.w, padding=1))
        return (a * (x - a * x0) / s.clamp_min(1e-6) - s * x0,)


SUPPORTED = [
    # PNDM with the Runge–Kutta warm-up: spacings (odd T//n too: 30 steps), offsets, final ᾱ, ε and v
    (PNDMScheduler, {}, 8),
    (PNDMScheduler, {}, 30),
    (PNDMScheduler, dict(prediction_type="v_prediction"), 8),
    (PNDMScheduler, dict(timestep_spacing="trailing"), 8),
    (PNDMScheduler, dict(timestep_spacing="linspace"), 8),
    (PNDMScheduler, dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), 8),
    (PNDMScheduler, dict(steps_offset=1, set_alpha_to_one=False, beta_schedule="scaled_linear"), 30),
    (PNDMScheduler, {}, 4),
    # SA-Solver: orders, data / noise prediction, σ schedules, lower-order final steps, τ window and a custom τ
    (SASolverScheduler, {}, 8),
    (SASolverScheduler, dict(predictor_order=3, corrector_order=4), 8),
    (SASolverScheduler, dict(predictor_order=4, corrector_order=4), 20),
    (SASolverScheduler, dict(predictor_order=3, corrector_order=3, lower_order_final=False), 20),
    (SASolverScheduler, dict(predictor_order=1, corrector_order=1), 8),
    (SASolverScheduler, dict(algorithm_type="noise_prediction"), 30),
    (SASolverScheduler, dict(algorithm_type="noise_prediction", predictor_order=3, prediction_type="sample"), 30),
    (SASolverScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"), 8),
    (SASolverScheduler, dict(use_exponential_sigmas=True, timestep_spacing="trailing"), 8),
    (SASolverScheduler, dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear"), 8),
    (SASolverScheduler, dict(tau_func=lambda t: 0.5 if t > 300 else 0.0), 8),
]


@pytest.mark.parametrize("case", SUPPORTED, ids=[_id(c[:2]) + f"-n{c[2]}" for c in SUPPORTED])
def test_matches_diffusers_by_default(case):
    cls, cfg, steps = case
    sched = cls(**cfg)
    got, ref = run_both(Toy(sched.alphas_cumprod, sched.config.prediction_type), sched, steps=steps)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert 0.05 < scale < 20
    assert err <= TOL, f"max error {err:.3g} for outputs of size {scale:.3g}"


@pytest.mark.parametrize("steps", [2, 5, 12, 100])
def test_ipndm_matches_diffusers_by_default(steps):
    got, ref = run_both(TrigToy(), IPNDMScheduler(), steps=steps)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert 0.05 < scale < 20
    assert err <= TOL, f"max error {err:.3g} for outputs of size {scale:.3g}"


def test_ipndm_trained_betas_are_its_steps():
    """With trained_betas diffusers reads them as the σ of each step: len − 1 steps whatever
    num_inference_steps. gradguide reproduces that and refuses another step count by name."""
    betas = [math.sin(s * math.pi / 2) ** 2 for s in (1.0, 0.8, 0.55, 0.3, 0.1, 0.0)]
    sched = IPNDMScheduler(trained_betas=betas)
    got, ref = run_both(TrigToy(), sched, steps=5)
    assert (got - ref).abs().max().item() <= TOL
    model, schedule = gradguide.from_diffusers(TrigToy(), sched)
    with pytest.raises(ValueError, match="trained_betas"):
        gradguide.sample(model, SHAPE, schedule=schedule, steps=8)


@pytest.mark.parametrize("case", [(PNDMScheduler, {}), (SASolverScheduler, dict(predictor_order=3, corrector_order=3)),
                                  (IPNDMScheduler, {})], ids=lambda c: c[0].__name__)
def test_unet_matches_diffusers_by_default(unet, case):
    cls, cfg = case
    got, ref = run_both(unet, cls(**cfg), steps=6)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= TOL * max(1.0, scale), f"max error {err:.3g} for outputs of size {scale:.3g}"


UNSUPPORTED = [
    (PNDMScheduler, dict(prediction_type="sample"), "prediction_type"),
    (SASolverScheduler, dict(thresholding=True), "thresholding"),
    (SASolverScheduler, dict(use_flow_sigmas=True), "use_flow_sigmas"),
]


@pytest.mark.parametrize("case", UNSUPPORTED, ids=[_id(c[:2]) for c in UNSUPPORTED])
def test_unsupported_configuration_is_refused(case):
    cls, cfg, named = case
    with pytest.raises(ValueError, match=named):
        gradguide.from_diffusers(torch.nn.Identity(), cls(**cfg))


def test_pndm_needs_four_steps_as_diffusers():
    sched = PNDMScheduler()
    with pytest.raises(ValueError):
        copy = PNDMScheduler()
        copy.set_timesteps(3)   # diffusers' own set_timesteps fails below 4
    model, schedule = gradguide.from_diffusers(Toy(sched.alphas_cumprod, "epsilon"), sched)
    with pytest.raises(ValueError, match="at least 4 steps"):
        gradguide.sample(model, SHAPE, schedule=schedule, steps=3)


def test_sampler_configs_travel():
    pndm_v = gradguide.Sampler("pndm", prediction="v", clip=False, combine="v")
    for sched, want in ((PNDMScheduler(prediction_type="v_prediction"), pndm_v),
                        (IPNDMScheduler(), gradguide.Sampler("ipndm_diffusers", prediction="v", clip=False)),
                        (SASolverScheduler(predictor_order=3), gradguide.Sampler(
                            "sa_solver_diffusers", prediction="eps", clip=False, predictor_order=3, corrector_order=2,
                            algorithm="data", lower_order_final=True))):
        _, schedule = gradguide.from_diffusers(torch.nn.Identity(), sched)
        assert schedule.sampler_config == want


@pytest.mark.parametrize("name", ["pndm", "ipndm_diffusers", "sa_solver_diffusers"])
def test_runs_under_guidance_on_the_general_path(name):
    """CFG with PixelAsParam's policy C on a plain Schedule, on the general step (fused=False):
    finite, the guidance changes the result, and the default execution gives the same."""
    schedule = gradguide.Schedule.linear(1000)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, 3, 3, generator=gen) * 0.05

    def model(x, t, y=None):   # ε of a toy class-conditional model
        shift = 0.0 if y is None else 0.2 * y.view(-1, 1, 1, 1).to(x.dtype)
        return 0.5 * torch.tanh(torch.nn.functional.conv2d(x, w, padding=1)) + shift
    x_T = torch.randn(SHAPE, generator=gen)

    def run(**kw):
        return gradguide.sample(model, SHAPE, schedule=schedule, sampler=name, steps=10, x_T=x_T,
                                generator=torch.Generator().manual_seed(1), **kw)
    guided = dict(guidance=[gradguide.CFG(4.0)], projection=gradguide.PixelAsParam("C", delta=0.8),
                  cond={"y": torch.ones(2)})
    general = run(execution=gradguide.Execution(fused=False), **guided)
    plain = run(execution=gradguide.Execution(fused=False))
    assert torch.isfinite(general).all() and torch.isfinite(plain).all()
    assert (general - plain).abs().max() > 1e-3
    torch.testing.assert_close(run(**guided), general, rtol=1e-5, atol=1e-5)
