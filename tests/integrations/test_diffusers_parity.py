"""Parity by default: ``from_diffusers(model, scheduler)`` + ``sample(model, shape,
schedule=schedule, steps=N, x_T=noise)`` with no other keyword (plus ``generator=`` where the
scheduler draws noise) equals diffusers' own loop (``set_timesteps(N)``, ``scale_model_input``,
``step``) on the same model and noise, for every supported scheduler configuration; every
configuration gradguide cannot reproduce raises an error naming the class or option.

Models: a deterministic toy denoiser (the Gaussian-data optimum, mixed with a fixed conv, in
the scheduler's prediction type, at fractional timesteps too) for the full matrix, and a tiny
random ``UNet2DModel`` for a representative subset.
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler,
                       PNDMScheduler, SASolverScheduler, TCDScheduler, UniPCMultistepScheduler)

import gradguide  # noqa: E402
from helpers import DIFFUSERS_SHAPE as SHAPE, DiffusersToy as Toy, diffusers_loop, run_both, tiny_unet  # noqa: E402

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


SUPPORTED = [
    # DDIM: spacings, offsets, final alpha, clipping (range), prediction types, zero terminal SNR
    (DDIMScheduler, {}),
    (DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (DDIMScheduler, dict(timestep_spacing="linspace", set_alpha_to_one=False)),
    (DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.5)),
    (DDIMScheduler, dict(prediction_type="v_prediction", clip_sample=True)),
    (DDIMScheduler, dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.3)),
    (DDIMScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    (DDIMScheduler, dict(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    # DDPM: variances and the t > 0 final-noise rule (trailing spacing, steps_offset=1)
    (DDPMScheduler, {}),
    (DDPMScheduler, dict(variance_type="fixed_large", timestep_spacing="trailing")),
    (DDPMScheduler, dict(variance_type="fixed_large", steps_offset=1)),
    (DDPMScheduler, dict(variance_type="learned_range", timestep_spacing="trailing")),
    (DDPMScheduler, dict(variance_type="learned_range", steps_offset=1, clip_sample=False)),
    (DDPMScheduler, dict(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")),
    (DDPMScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    # Euler: spacings, Karras / exponential / beta σ's, final σ, continuous timesteps, log-linear σ's
    (EulerDiscreteScheduler, {}),
    (EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (EulerDiscreteScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    (EulerDiscreteScheduler, dict(use_exponential_sigmas=True, prediction_type="sample")),
    (EulerDiscreteScheduler, dict(interpolation_type="log_linear")),
    (EulerDiscreteScheduler, dict(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True)),
    (EulerDiscreteScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing")),
    # Euler ancestral
    (EulerAncestralDiscreteScheduler, {}),
    (EulerAncestralDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction")),
    # Heun
    (HeunDiscreteScheduler, {}),
    (HeunDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (HeunDiscreteScheduler, dict(timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.4)),
    # KDPM2 (k-diffusion's dpm_2: the derivative at the log-midpoint, Euler onto σ = 0)
    (KDPM2DiscreteScheduler, {}),
    (KDPM2DiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (KDPM2DiscreteScheduler, dict(timestep_spacing="trailing", beta_schedule="scaled_linear")),
    (KDPM2DiscreteScheduler, dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    # KDPM2 ancestral (k-diffusion's dpm_2_ancestral, η = 1; the noise drawn at each step's second evaluation)
    (KDPM2AncestralDiscreteScheduler, {}),
    (KDPM2AncestralDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (KDPM2AncestralDiscreteScheduler, dict(timestep_spacing="trailing", beta_schedule="scaled_linear")),
    # DEIS (log-ρ multistep on ε, orders 1–3, diffusers' lower-order final steps below 15 steps)
    (DEISMultistepScheduler, {}),
    (DEISMultistepScheduler, dict(solver_order=3)),
    (DEISMultistepScheduler, dict(solver_order=3, lower_order_final=False, timestep_spacing="trailing")),
    (DEISMultistepScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (DEISMultistepScheduler, dict(solver_order=1, prediction_type="sample", timestep_spacing="leading", steps_offset=1)),
    (DEISMultistepScheduler, dict(use_exponential_sigmas=True, solver_order=3, beta_schedule="scaled_linear")),
    # DPM-Solver++(2M) and SDE: σ schedules, final σ, order, solver type, final-step rules
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min")),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True, prediction_type="v_prediction")),
    (DPMSolverMultistepScheduler, dict(solver_type="heun", timestep_spacing="trailing")),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    (DPMSolverMultistepScheduler, dict(solver_order=1, prediction_type="sample")),
    (DPMSolverMultistepScheduler, dict(solver_order=3)),
    (DPMSolverMultistepScheduler, dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                       timestep_spacing="trailing")),
    (DPMSolverMultistepScheduler, dict(solver_order=3, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction")),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing")),
    # PLMS (PNDM with skip_prk_steps=True: Stable Diffusion 1.x's scheduler)
    (PNDMScheduler, dict(skip_prk_steps=True)),
    (PNDMScheduler, dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012)),
    (PNDMScheduler, dict(skip_prk_steps=True, prediction_type="v_prediction")),
    # LMS (order 4, the default of LMSDiscreteScheduler.step)
    (LMSDiscreteScheduler, {}),
    (LMSDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (LMSDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1, prediction_type="sample")),
    # UniPC (bh2 is diffusers' default)
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (UniPCMultistepScheduler, dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    (UniPCMultistepScheduler, dict(solver_order=1)),
    (UniPCMultistepScheduler, dict(solver_order=3)),
    (UniPCMultistepScheduler, dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                   timestep_spacing="trailing", prediction_type="v_prediction", disable_corrector=[2])),
    (UniPCMultistepScheduler, dict(disable_corrector=[0, 3], timestep_spacing="trailing")),
    (UniPCMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    # TCD at its step's default γ = 0.3 (its own tests: tests/integrations/test_diffusers_tcd.py)
    (TCDScheduler, {}),
    (TCDScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    (TCDScheduler, dict(prediction_type="sample", original_inference_steps=25, beta_schedule="linear")),
]


def _id(case):
    cls, cfg = case
    return cls.__name__.replace("Scheduler", "") + "".join(f"-{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("case", SUPPORTED, ids=[_id(c) for c in SUPPORTED])
def test_supported_configuration_matches_diffusers_by_default(case):
    cls, cfg = case
    sched = cls(**cfg)
    ptype = sched.config.prediction_type
    learned = sched.config.get("variance_type") == "learned_range"
    continuous = sched.config.get("timestep_type") == "continuous"
    got, ref = run_both(Toy(sched.alphas_cumprod, ptype, learned, continuous), sched)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    print(f"PARITY {_id(case)} max_err={err:.2e} scale={scale:.2f}")
    assert 0.05 < scale < 20      # outputs of size ~1
    assert err <= TOL, f"max error {err:.3g} for outputs of size {scale:.3g}"


UNET_CASES = [(DDIMScheduler, dict(clip_sample=True)), (DDPMScheduler, dict(variance_type="fixed_large", steps_offset=1)),
              (EulerAncestralDiscreteScheduler, {}), (HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
              (KDPM2DiscreteScheduler, {}), (KDPM2AncestralDiscreteScheduler, {}),
              (DEISMultistepScheduler, dict(solver_order=3)),
              (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
              (UniPCMultistepScheduler, {}), (PNDMScheduler, dict(skip_prk_steps=True)),
              (LMSDiscreteScheduler, dict(use_karras_sigmas=True)), (TCDScheduler, {})]


@pytest.mark.parametrize("case", UNET_CASES, ids=[_id(c) for c in UNET_CASES])
def test_unet_matches_diffusers_by_default(unet, case):
    cls, cfg = case
    got, ref = run_both(unet, cls(**cfg), steps=6)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    print(f"PARITY unet {_id(case)} max_err={err:.2e} scale={scale:.2f}")
    assert err <= TOL * max(1.0, scale), f"max error {err:.3g} for outputs of size {scale:.3g}"


def test_defaults_travel_and_user_overrides_win():
    sched = DDIMScheduler(prediction_type="v_prediction", clip_sample=True, timestep_spacing="trailing")
    model = Toy(sched.alphas_cumprod, "v_prediction")
    gmodel, schedule = gradguide.from_diffusers(model, sched)
    assert schedule.sampler_config == gradguide.Sampler("ddim", prediction="v", clip=(-1.0, 1.0), clip_eps="model")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    default = gradguide.sample(gmodel, SHAPE, schedule=schedule, steps=6, x_T=noise)
    bare = copy.copy(schedule)   # the same timesteps, nothing learnt: the call says it all
    bare.sampler_config = None
    explicit = gradguide.sample(gmodel, SHAPE, schedule=bare, steps=6, x_T=noise,
                                sampler=gradguide.Sampler("ddim", prediction="v", clip=True, clip_eps="model"))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    # an override is used, and really changes the result
    eps_read = gradguide.sample(gmodel, SHAPE, schedule=schedule, steps=6, x_T=noise,
                                sampler=gradguide.Sampler(prediction="eps"))
    assert (eps_read - default).abs().max() > 1e-2
    unclipped = gradguide.sample(gmodel, SHAPE, schedule=schedule, steps=6, x_T=noise,
                                 sampler=gradguide.Sampler(clip=False))
    assert (unclipped - default).abs().max() > 1e-3
    # a plain Schedule has no learnt configuration: DDPM is the default sampler
    assert gradguide.Schedule.linear(50).sampler_config is None
    assert gradguide.sampling.prepare_run(gmodel, SHAPE, schedule=gradguide.Schedule.linear(50)).tables.name == "ddpm"


UNSUPPORTED = [
    # PNDM's Runge–Kutta warm-up, IPNDM and SA-Solver: tests/integrations/test_diffusers_pndm_sasolver.py
    (PNDMScheduler, dict(skip_prk_steps=True, timestep_spacing="trailing"), "timestep_spacing"),
    # the DPM-Solver family, thresholding and DDPM's variances: tests/integrations/test_diffusers_dpmsolver.py
    (DPMSolverSinglestepScheduler, dict(algorithm_type="dpmsolver", thresholding=True,
                                        final_sigmas_type="sigma_min"), "thresholding"),
    (DEISMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "use_flow_sigmas"),
    (SASolverScheduler, dict(variance_type="learned_range"), "variance_type"),
    (KDPM2DiscreteScheduler, dict(prediction_type="sample"), "prediction_type"),
    (KDPM2AncestralDiscreteScheduler, dict(prediction_type="sample"), "prediction_type"),
    (DDPMScheduler, dict(variance_type="fixed_large_log"), "variance_type"),
    (DPMSolverMultistepScheduler, dict(solver_order=4), "solver_order"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver", solver_order=3,
                                       final_sigmas_type="sigma_min"), "solver_order"),
    (DPMSolverMultistepScheduler, dict(variance_type="learned_range", prediction_type="sample"), "variance_type"),
    # flow σ's with flow_prediction are supported (tests/integrations/test_flow_diffusers.py); with another prediction, not
    (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True), "prediction_type"),
    (UniPCMultistepScheduler, dict(solver_order=4), "solver_order"),
    (UniPCMultistepScheduler, dict(predict_x0=False), "predict_x0"),
    (EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), "prediction_type"),
]


@pytest.mark.parametrize("case", UNSUPPORTED, ids=[_id(c[:2]) for c in UNSUPPORTED])
def test_unsupported_configuration_is_refused(case):
    cls, cfg, named = case
    with pytest.raises(ValueError, match=named):
        gradguide.from_diffusers(torch.nn.Identity(), cls(**cfg))


@pytest.mark.parametrize("case", [
    (UniPCMultistepScheduler, dict(solver_type="bh1"), "bh1", True),
    (UniPCMultistepScheduler, dict(lower_order_final=False), "lower_order_final", True),
    (DPMSolverMultistepScheduler, dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                       use_karras_sigmas=True), "equal σ", True),
    (DDIMScheduler, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), "zero terminal SNR", False)])
def test_configurations_that_fail_at_sampling_are_refused(case):
    """Settings where diffusers' own loop returns NaN or inf (UniPC bh1 or second order onto σ = 0,
    third order between the two equal final σ's of Karras + final σ_min) or that have no
    meaning (an ε model at ᾱ = 0) raise when sampling, naming the reason."""
    cls, cfg, named, nonfinite_in_diffusers = case
    sched = cls(**cfg)
    toy = Toy(sched.alphas_cumprod, "epsilon")
    if nonfinite_in_diffusers:
        with torch.no_grad():
            ref = diffusers_loop(toy, cls(**cfg), 6, torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), 0)
        assert not torch.isfinite(ref).all()
    model, schedule = gradguide.from_diffusers(toy, sched)
    with pytest.raises(ValueError, match=named):
        gradguide.sample(model, SHAPE, schedule=schedule, steps=6)


def test_dpmpp_3m_sde_is_reproduced_with_one_warning_and_the_correct_solver_is_one_setting_away():
    """diffusers 0.42's third-order sde-dpmsolver++ weight is first order (docs/diffusers.md):
    from_diffusers reproduces it (parity above) but says so once, naming the option and the docs
    section; d2_weight='published' then gives k-diffusion's weight on diffusers' own steps."""
    import warnings
    cfg = dict(solver_order=3, algorithm_type="sde-dpmsolver++")
    sched = DPMSolverMultistepScheduler(**cfg)
    toy = Toy(sched.alphas_cumprod, "epsilon")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmodel, schedule = gradguide.from_diffusers(toy, sched)
    messages = [str(w.message) for w in caught if "sde-dpmsolver++" in str(w.message)]
    assert len(messages) == 1 and "solver_order=3" in messages[0] and "docs/diffusers.md" in messages[0]
    assert schedule.sampler_config.options["d2_weight"] == "diffusers"
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=20, x_T=noise, generator=torch.Generator().manual_seed(3))
    as_diffusers = gradguide.sample(gmodel, SHAPE, schedule=schedule, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    corrected = gradguide.sample(gmodel, SHAPE, schedule=schedule,
                                 sampler=gradguide.Sampler("dpmpp-2m-sde", d2_weight="published"), **kw)
    assert (corrected - as_diffusers).abs().max() > 1e-3
    with warnings.catch_warnings():   # other configurations do not warn
        warnings.simplefilter("error")
        gradguide.from_diffusers(toy, DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
        gradguide.from_diffusers(toy, DPMSolverMultistepScheduler(solver_order=3))
