"""diffusers' DPM-Solver family, dynamic thresholding (DDIM, DDPM, DPM-Solver, UniPC, DEIS, LCM)
and DDPM's variance types, drop-in:
``from_diffusers(model, scheduler)`` + ``sample(model, shape, schedule=schedule, steps=N,
x_T=noise)`` (plus ``generator=`` where the scheduler draws noise) equals diffusers 0.42's own
loop, on the toy Gaussian denoiser and the tiny random UNet of ``tests/helpers.py``; what
cannot be reproduced raises naming the class and option.

diffusers computes these steps in float32, gradguide's tables in float64; outputs are asserted to
be of order 1 and equal to 1e-4 (the largest difference measured is ~1e-5, the noise-prediction
solvers through ``e^h`` of the first, long step).
"""
import types
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       DPMSolverSinglestepScheduler, LCMScheduler, UniPCMultistepScheduler)

import gradguide  # noqa: E402

from helpers import DIFFUSERS_SHAPE as SHAPE, DiffusersToy as Toy, diffusers_loop, run_both, tiny_unet  # noqa: E402

TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread_module")

M, S = DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
NOISE_MIN = dict(final_sigmas_type="sigma_min")

CASES = [
    # multistep, noise prediction (dpmsolver / sde-dpmsolver): orders, solver types, σ schedules, predictions
    (M, dict(algorithm_type="dpmsolver", **NOISE_MIN), 8),
    (M, dict(algorithm_type="dpmsolver", solver_type="heun", prediction_type="v_prediction", **NOISE_MIN), 8),
    (M, dict(algorithm_type="dpmsolver", solver_order=1, prediction_type="sample", **NOISE_MIN), 8),
    (M, dict(algorithm_type="dpmsolver", solver_order=3, **NOISE_MIN), 9),
    (M, dict(algorithm_type="dpmsolver", solver_order=3, lower_order_final=False, beta_schedule="scaled_linear",
             **NOISE_MIN), 10),
    (M, dict(algorithm_type="dpmsolver", euler_at_final=True, timestep_spacing="trailing", **NOISE_MIN), 8),
    (M, dict(algorithm_type="dpmsolver", solver_order=3, use_karras_sigmas=True, **NOISE_MIN), 10),
    (M, dict(algorithm_type="sde-dpmsolver", **NOISE_MIN), 15),
    (M, dict(algorithm_type="sde-dpmsolver", solver_type="heun", use_karras_sigmas=True, **NOISE_MIN), 14),
    (M, dict(algorithm_type="sde-dpmsolver", solver_order=1, prediction_type="v_prediction", **NOISE_MIN), 15),
    # singlestep: the three algorithms, orders 1–3, both solver types, the order list's tails
    (S, {}, 8),
    (S, dict(solver_order=1), 8),
    (S, dict(solver_order=2, lower_order_final=True), 9),
    (S, dict(solver_order=2, solver_type="heun", final_sigmas_type="sigma_min"), 10),
    (S, dict(solver_order=3), 9),
    (S, dict(solver_order=3, lower_order_final=True), 10),
    (S, dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"), 9),
    (S, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction"), 8),
    (S, dict(solver_order=3, solver_type="heun", use_exponential_sigmas=True, prediction_type="sample"), 10),
    (S, dict(solver_order=2, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 8),
    (S, dict(solver_order=3, use_beta_sigmas=True, beta_schedule="scaled_linear"), 9),
    (S, dict(algorithm_type="dpmsolver", **NOISE_MIN), 8),
    (S, dict(algorithm_type="dpmsolver", solver_order=3, **NOISE_MIN), 9),
    (S, dict(algorithm_type="dpmsolver", solver_order=3, solver_type="heun", prediction_type="v_prediction",
             **NOISE_MIN), 10),
    (S, dict(algorithm_type="sde-dpmsolver++"), 8),
    (S, dict(algorithm_type="sde-dpmsolver++", solver_order=3), 9),
    (S, dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun", use_karras_sigmas=True), 10),
    # DDPM's other variance types (learned_range is in test_diffusers_parity)
    (DDPMScheduler, dict(variance_type="fixed_small_log"), 8),
    (DDPMScheduler, dict(variance_type="learned"), 8),
    (DDPMScheduler, dict(variance_type="learned", steps_offset=1, prediction_type="v_prediction"), 8),
    (DDPMScheduler, dict(variance_type="learned", timestep_spacing="trailing"), 8),
]


def _id(case):
    cls, cfg, steps = case
    return cls.__name__.replace("Scheduler", "") + "".join(f"-{k}={v}" for k, v in cfg.items()) + f"-n{steps}"


class VarianceToy(Toy):
    """The toy denoiser with ``learned`` extra channels that are a positive variance (diffusers'
    ``variance_type="learned"`` takes them as Σ) or in [−1, 1] (``learned_range``)."""

    def __init__(self, alphas_cumprod, ptype, vtype=None):
        super().__init__(alphas_cumprod, ptype, learned=vtype in ("learned", "learned_range"))
        self.vtype = vtype

    def forward(self, x, t, return_dict=False):
        out = super().forward(x, t)[0]
        if self.vtype == "learned":
            out = torch.cat([out[:, :x.shape[1]], 0.02 * (1 + torch.tanh(x))], 1)
        return (out,)


def _assert_parity(got, ref):
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert 0.05 < scale < 20, scale
    assert err <= TOL, f"max error {err:.3g} for outputs of size {scale:.3g}"
    return err, scale


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_diffusers_by_default(case):
    cls, cfg, steps = case
    sched = cls(**cfg)
    toy = VarianceToy(sched.alphas_cumprod, sched.config.prediction_type, sched.config.get("variance_type"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # diffusers deprecates algorithm_type="dpmsolver"
        got, ref = run_both(toy, cls(**cfg), steps=steps)
    err, scale = _assert_parity(got, ref)
    print(f"PARITY {_id(case)} max_err={err:.2e} scale={scale:.2f}")


def test_the_singlestep_order_list_is_diffusers_own():
    """gradguide's order list (with set_timesteps' switch to lower_order_final) is diffusers'."""
    from gradguide.samplers.dpmsolver import order_list
    for order in (1, 2, 3):
        for lof in (False, True):
            for final in ("zero", "sigma_min"):
                for n in range(1, 14):
                    sched = S(solver_order=order, lower_order_final=lof, final_sigmas_type=final)
                    sched.set_timesteps(n)
                    assert order_list(n, order, lof, final == "zero") == sched.order_list, (order, lof, final, n)


THRESHOLDED = [
    (DDIMScheduler, dict(dynamic_thresholding_ratio=0.9, sample_max_value=2.0)),
    (DDIMScheduler, dict(sample_max_value=1.5, prediction_type="v_prediction")),
    (DDIMScheduler, dict(sample_max_value=1.5, clip_sample=True)),   # thresholding wins over clip_sample
    (DDPMScheduler, dict(sample_max_value=1.5)),
    (DDPMScheduler, dict(sample_max_value=1.5, variance_type="fixed_large", prediction_type="sample")),
    (M, dict(sample_max_value=1.5)),
    (M, dict(sample_max_value=1.5, algorithm_type="sde-dpmsolver++", solver_order=3)),
    (M, dict(sample_max_value=1.5, algorithm_type="dpmsolver", **NOISE_MIN)),
    (S, dict(sample_max_value=1.5, solver_order=3)),
    (S, dict(sample_max_value=1.2, dynamic_thresholding_ratio=0.8, algorithm_type="sde-dpmsolver++")),
    (UniPCMultistepScheduler, dict(sample_max_value=1.5, solver_order=3)),
    (DEISMultistepScheduler, dict(sample_max_value=1.5)),
    (LCMScheduler, dict(sample_max_value=1.5)),
]


@pytest.mark.parametrize("case", THRESHOLDED, ids=[_id(c + (8,)) for c in THRESHOLDED])
def test_dynamic_thresholding_matches_diffusers(case):
    """thresholding=True: x̂_0 past ±1 (a stronger conv in the toy) is thresholded, as diffusers
    does it; the same scheduler without thresholding gives a clearly different result."""
    cls, cfg = case
    sched = cls(thresholding=True, **cfg)
    toy = Toy(sched.alphas_cumprod, sched.config.prediction_type)
    toy.w = toy.w * 8   # x̂_0 of size ~2: the threshold bites
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, ref = run_both(toy, cls(thresholding=True, **cfg))
        plain, _ = run_both(toy, cls(thresholding=False, **cfg))
    _assert_parity(got, ref)
    assert (plain - ref).abs().max() > 0.1
    assert isinstance(gradguide.from_diffusers(toy, sched)[1].sampler_config.clip, gradguide.DynamicThreshold)


@pytest.mark.parametrize("cls,cfg", [(M, dict(variance_type="learned_range")), (M, dict(variance_type="learned")),
                                     (M, dict(variance_type="learned_range", algorithm_type="dpmsolver", **NOISE_MIN)),
                                     (S, dict(variance_type="learned_range", solver_order=3))],
                         ids=["multistep-learned_range", "multistep-learned", "multistep-dpmsolver", "singlestep"])
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_dpm_solver_drops_learned_variance_channels(cls, cfg, declared):
    """DPM-Solver with variance_type set drops the model's variance channels (diffusers keeps
    model_output[:, :3]), whether or not the model declares out_channels = 2 in_channels."""
    sched = cls(**cfg)
    toy = Toy(sched.alphas_cumprod, "epsilon", learned=True)
    if declared:
        toy.config = types.SimpleNamespace(in_channels=3, out_channels=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        got, ref = run_both(toy, cls(**cfg))
    _assert_parity(got, ref)


def test_unet_matches_diffusers():
    unet = tiny_unet()
    for cls, cfg in [(S, dict(solver_order=3)), (M, dict(algorithm_type="dpmsolver", solver_order=3, **NOISE_MIN)),
                     (M, dict(algorithm_type="sde-dpmsolver", **NOISE_MIN))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got, ref = run_both(unet, cls(**cfg), steps=6)
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        assert err <= TOL * max(1.0, scale), (cls.__name__, cfg, err, scale)   # as the UNet cases of the parity file


REFUSED = [
    (DDPMScheduler, dict(variance_type="fixed_large_log"), "fixed_large_log"),
    (M, dict(algorithm_type="sde-dpmsolver", solver_order=3, **NOISE_MIN), "solver_order"),
    (M, dict(solver_order=4), "solver_order"),
    (M, dict(variance_type="learned_range", prediction_type="v_prediction"), "variance_type"),
    (S, dict(algorithm_type="dpmsolver", thresholding=True, **NOISE_MIN), "thresholding"),
    (S, dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (S, dict(prediction_type="flow_prediction"), "prediction_type"),
    (UniPCMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction", thresholding=True),
     "thresholding"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[_id(c[:2] + (0,)) for c in REFUSED])
def test_refused_with_the_option_named(case):
    cls, cfg, named = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sched = cls(**cfg)
    with pytest.raises(ValueError, match=named) as info:
        gradguide.from_diffusers(torch.nn.Identity(), sched)
    assert cls.__name__ in str(info.value)


def test_refusals_are_what_diffusers_cannot_run():
    """The two refusals that say 'diffusers fails / gives NaN' are checked against diffusers."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sched = DDPMScheduler(variance_type="fixed_large_log")
    with torch.no_grad():
        out = diffusers_loop(Toy(sched.alphas_cumprod, "epsilon"), sched, 6, noise.clone(), 0)
    assert torch.isnan(out).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for sched in (M(algorithm_type="sde-dpmsolver", solver_order=3, **NOISE_MIN),
                      S(algorithm_type="dpmsolver", thresholding=True, **NOISE_MIN)):
            with pytest.raises(Exception), torch.no_grad():
                diffusers_loop(Toy(sched.alphas_cumprod, "epsilon"), sched, 6, noise.clone(), 0)


def test_singlestep_sde_third_order_heun_warns_once():
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun")
    sched = S(**cfg)
    toy = Toy(sched.alphas_cumprod, "epsilon")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradguide.from_diffusers(toy, sched)
    messages = [str(w.message) for w in caught if "DPMSolverSinglestepScheduler" in str(w.message)]
    assert len(messages) == 1 and "docs/diffusers.md" in messages[0]
    got, ref = run_both(toy, S(**cfg), steps=9)   # reproduced all the same
    assert (got - ref).abs().max() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradguide.from_diffusers(toy, S(algorithm_type="sde-dpmsolver++", solver_order=3))
