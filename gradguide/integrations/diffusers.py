"""diffusers drop-in: run a diffusers UNet and scheduler with :func:`gradguide.sample`, and use
gradguide's guidance inside diffusers pipelines.

- :func:`from_diffusers` ``(unet, scheduler) -> (model, schedule)``. ``model(x_t, t, **cond)``
  calls the UNet and returns its raw output. Everything the scheduler fixes travels with the
  schedule and is what :func:`gradguide.sample` uses unless overridden, so
  ``sample(model, shape, schedule=schedule, steps=N, x_T=noise)`` runs diffusers' own loop,
  and so does any function of your own wrapped around ``model``: ``schedule.sampler_config``
  (a :class:`gradguide.Sampler`: the sampler, prediction type, ``clip`` from
  ``clip_sample``/``clip_sample_range`` or ``thresholding`` (a :class:`gradguide.DynamicThreshold`),
  DDIM's ``clip_eps``, DDPM's ``variance`` and the sampler's options; :func:`scheduler_sampler`:
  DDIM, DDPM with diffusers' t > 0 final-noise rule, Euler, Euler ancestral, Heun, LMS, KDPM2
  (ancestral), DEIS, PNDM (with or without its Runge–Kutta warm-up), IPNDM, SA-Solver, DPM-Solver
  multistep and singlestep (data- and noise-prediction, ODE and SDE), UniPC, LCM, TCD, the EDM Euler /
  DPM-Solver++ schedulers with the EDM prediction, the flow-matching ones; any other class or setting
  raises), and ``schedule.timesteps(N)`` (the scheduler's own ``set_timesteps``: spacing,
  ``steps_offset``, final ᾱ, σ schedule; see :class:`DiffusersSchedule`; IPNDM, which has no ᾱ
  table, its own :class:`~gradguide.integrations.diffusers_ipndm.IPNDMSchedule`).
- Guiders following diffusers' ``BaseGuidance`` interface, computed with
  :func:`gradguide.ops.reduce` / :func:`gradguide.ops.combine` (one reduction and one
  combination per step): :class:`GradguideCFG` (Ho & Salimans 2022, with Lin et al. 2023's
  rescale), :class:`GradguideAPG` (Sadat et al., ICLR 2025) and
  :class:`GradguidePixelAsParam` (Dinh, Liu & Xu, ICML 2023, policy C).

Clipping: with ``clip_sample=True`` a diffusers DDIM step re-noises with the model's
*unclipped* ε unless ``use_clipped_model_output=True``. ``from_diffusers`` reproduces the
scheduler's default (``sampler_config.clip_eps = "model"`` for DDIM schedulers) and
``from_diffusers(..., use_clipped_model_output=True)`` the other choice (gradguide's own
default, GLIDE's / ADM's convention). DDPM uses the clipped x̂_0 in its posterior mean only.
"""
from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

try:
    import diffusers  # noqa: F401
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
    from diffusers.guiders.guider_utils import GuiderOutput
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("gradguide.integrations.diffusers needs diffusers: pip install diffusers==0.42.1") from exc

from .. import ops
from ..ops import policies
from ..config import Sampler
from ..predictions import DynamicThreshold
from ..schedules import SPACINGS, Schedule, Timesteps
from . import diffusers_flow, diffusers_ipndm

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
# diffusers' 'fixed_small_log' is exp(½ log β̃) = √β̃: fixed_small's noise (equal to float rounding)
VARIANCE_TYPES = {"fixed_small": "fixed-small", "fixed_small_log": "fixed-small", "fixed_large": "fixed-large",
                  "learned_range": "learned-range", "learned": "learned"}


# diffusers scheduler class -> gradguide sampler; every other class is refused (never mapped silently)
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp-2m",
                      "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                      "HeunDiscreteScheduler": "heun", "UniPCMultistepScheduler": "unipc", "PNDMScheduler": "plms",
                      "LMSDiscreteScheduler": "lms", "FlowMatchEulerDiscreteScheduler": "flow-euler",
                      "FlowMatchHeunDiscreteScheduler": "flow-heun", "FlowMatchLCMScheduler": "flow-lcm",
                      "KDPM2DiscreteScheduler": "dpm_2", "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral",
                      "DEISMultistepScheduler": "deis", "LCMScheduler": "lcm",
                      "SASolverScheduler": "sa_solver_diffusers", "IPNDMScheduler": "ipndm_diffusers",
                      "DPMSolverSinglestepScheduler": "dpmpp-single"}
# DPM-Solver's algorithm_type -> sampler, multistep and singlestep (diffusers has no singlestep 'sde-dpmsolver')
DPM_MULTISTEP = {"dpmsolver++": "dpmpp-2m", "sde-dpmsolver++": "dpmpp-2m-sde", "dpmsolver": "dpm-2m",
                 "sde-dpmsolver": "dpm-2m-sde"}
DPM_SINGLESTEP = {"dpmsolver++": "dpmpp-single", "sde-dpmsolver++": "dpmpp-single-sde", "dpmsolver": "dpm-single"}
# refused with the reason (no sampler reproduces them yet); docs/diffusers.md, "Scheduler support"
UNSUPPORTED_SCHEDULERS: Dict[str, str] = {}
# EDM (Karras et al. 2022): preconditioned networks on a σ grid of their own (no ᾱ table); latents are x_σ
EDM_SCHEDULERS = {"EDMEulerScheduler": "euler", "EDMDPMSolverMultistepScheduler": "dpmpp-2m"}
EDM_PREDICTIONS = {"epsilon": "edm", "v_prediction": "edm-v"}
SCHEDULER_SAMPLERS.update(EDM_SCHEDULERS, TCDScheduler="tcd")
# the schedulers whose thresholding=True is reproduced (clip=gradguide.DynamicThreshold)
THRESHOLDING = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-single", "unipc", "deis", "lcm")
SIGMA_SPACE = ("euler", "euler_a", "heun", "lms", "dpm_2", "dpm_2_ancestral")   # latents are x_σ = x/√ᾱ, the model sees x_σ/√(1+σ²)
VP_SIGMA_TABLE = ("dpmpp-2m", "dpmpp-2m-sde", "dpm-2m", "dpm-2m-sde", "dpmpp-single", "dpmpp-single-sde", "dpm-single",
                  "unipc")   # VP latents on the scheduler's own σ table


def sigma_latents(scheduler) -> bool:
    """Whether the scheduler's latents are x_σ = x/√ᾱ (the σ-space samplers' and EDM's) rather than
    the variance-preserving x."""
    name = type(scheduler).__name__
    return name in EDM_SCHEDULERS or SCHEDULER_SAMPLERS.get(name) in SIGMA_SPACE


DIFFUSERS_3M_SDE_WARNING = (
    "scheduler: DPMSolverMultistepScheduler(solver_order=3, algorithm_type='sde-dpmsolver++') is reproduced as "
    "diffusers 0.42 computes it, with a third-order weight that tends to -1 instead of 0 as the step shrinks (a "
    "first-order solver; see docs/diffusers.md, section 'DPM-Solver++(3M) SDE'). For the corrected solver pass "
    "sampler=gradguide.Sampler('dpmpp-2m-sde', d2_weight='published') (k-diffusion's sample_dpmpp_3m_sde "
    "weight; solver_order and the rest stay the scheduler's) or sampler='dpmpp-3m-sde'")
DIFFUSERS_SINGLESTEP_SDE3_WARNING = (
    "scheduler: DPMSolverSinglestepScheduler(solver_order=3, algorithm_type='sde-dpmsolver++', solver_type='heun') "
    "is reproduced as diffusers 0.42 computes it, with a D2 weight that tends to -1 instead of 0: the noise of the "
    "inner evaluations then stays in every step and the samples do not converge as the steps grow (see "
    "docs/diffusers.md, section 'DPM-Solver++(3M) SDE'). solver_type='midpoint' or DPMSolverMultistepScheduler"
    "(algorithm_type='sde-dpmsolver++') converge")


def _refuse(scheduler, option: str, value, why: str):
    raise ValueError(f"scheduler: {type(scheduler).__name__}({option}={value!r}) is not supported: {why}")


def scheduler_sampler(scheduler):
    """``(sampler, options)`` reproducing ``scheduler`` exactly, or a ``ValueError`` naming the
    class or option gradguide cannot reproduce."""
    name = type(scheduler).__name__
    if name in UNSUPPORTED_SCHEDULERS:
        raise ValueError(f"scheduler: {name} is not supported: {UNSUPPORTED_SCHEDULERS[name]}")
    if name not in SCHEDULER_SAMPLERS:
        raise ValueError(f"scheduler: {name} is not supported (gradguide has no sampler that reproduces it exactly); "
                         f"supported: {', '.join(sorted(SCHEDULER_SAMPLERS))}")
    config = scheduler.config
    sampler = SCHEDULER_SAMPLERS[name]
    if name == "IPNDMScheduler":   # no prediction type, σ table or thresholding: its own schedule (diffusers_ipndm)
        return sampler, {}
    flow = diffusers_flow.is_flow(scheduler)
    if name in EDM_SCHEDULERS:
        return _edm_sampler(scheduler)
    if name == "TCDScheduler":
        # TCD's step reads neither clip_sample nor thresholding (diffusers ignores them): nor does its sampler
        ptype = config.get("prediction_type", "epsilon")
        if ptype not in ("epsilon", "v_prediction", "sample"):
            _refuse(scheduler, "prediction_type", ptype, "TCDScheduler takes 'epsilon', 'v_prediction' or 'sample'")
        return sampler, {}
    if name in diffusers_flow.FLOW_MATCH:   # flow-matching schedulers: their own mapping (diffusers_flow)
        options = {"stochastic": True} if name.startswith("FlowMatchEuler") and config.get("stochastic_sampling") else {}
        return sampler, options
    if flow and sampler == "deis":
        _refuse(scheduler, "use_flow_sigmas", True, "DEIS on flow σ's is not implemented")
    if flow:
        diffusers_flow.check_flow_solver(scheduler)
    elif config.get("prediction_type") == "flow_prediction":
        _refuse(scheduler, "prediction_type", "flow_prediction", "diffusers steps flow models with FlowMatch* "
                "schedulers or UniPC / DPM-Solver++ with use_flow_sigmas=True")
    if config.get("thresholding", False) and (sampler not in THRESHOLDING or flow):
        _refuse(scheduler, "thresholding", True, f"dynamic thresholding (gradguide.DynamicThreshold) is reproduced for "
                f"{', '.join(sorted(k for k, v in SCHEDULER_SAMPLERS.items() if v in THRESHOLDING))} on "
                "variance-preserving σ's only (not with flow σ's)")
    ptype = config.get("prediction_type", "epsilon")
    if ptype not in PREDICTION_TYPES:
        _refuse(scheduler, "prediction_type", ptype, f"expected one of {sorted(PREDICTION_TYPES)}")
    for flag, why in (("use_flow_sigmas", "flow-matching σ's"), ("use_dynamic_shifting", "resolution-dependent "
                      "shifting needs the pipeline's mu")):
        if config.get(flag, False) and not flow:
            _refuse(scheduler, flag, True, why + " (with prediction_type='flow_prediction' and use_flow_sigmas=True "
                    "they are supported)")
    options = {}
    if sampler == "ddpm":
        vtype = config.get("variance_type", "fixed_small")
        if vtype == "fixed_large_log":
            _refuse(scheduler, "variance_type", vtype, "diffusers 0.42 scales the noise by √(log β_t), the square root "
                    "of a negative number: its samples are NaN")
        if vtype not in VARIANCE_TYPES:
            _refuse(scheduler, "variance_type", vtype, f"expected one of {sorted(VARIANCE_TYPES)}")
        options["final_noise"] = "t>0"   # diffusers adds noise whenever t > 0
    elif sampler in ("dpmpp-2m", "dpmpp-single"):
        sampler, more = _dpm_solver(scheduler, name, config, ptype, flow)
        options.update(more)
    elif sampler == "unipc":
        if not config.get("predict_x0", True):
            _refuse(scheduler, "predict_x0", False, "only the data-prediction UniPC (predict_x0=True) is implemented")
        if getattr(scheduler, "solver_p", None) is not None:
            _refuse(scheduler, "solver_p", type(scheduler.solver_p).__name__, "a custom predictor is not reproduced")
        if config.get("solver_order", 2) not in (1, 2, 3):
            _refuse(scheduler, "solver_order", config.get("solver_order"), "orders 1, 2 and 3 are implemented")
        options.update(solver_order=config.get("solver_order", 2), solver_type=config.get("solver_type", "bh2"),
                       lower_order_final=config.get("lower_order_final", True),
                       disable_corrector=tuple(config.get("disable_corrector", ()) or ()))
    elif sampler == "plms":
        if ptype == "sample":
            _refuse(scheduler, "prediction_type", ptype, "diffusers' PNDMScheduler does not implement it")
        if not config.get("skip_prk_steps", False):
            # the Runge–Kutta warm-up steps between its listed timesteps itself, for every spacing
            sampler = "pndm"
        elif config.get("timestep_spacing", "leading") != "leading":
            _refuse(scheduler, "timestep_spacing", config.get("timestep_spacing"), "diffusers' PLMS warm-up then steps "
                    "from ᾱ(τ_1 + T/n) instead of the ᾱ of its sample; only 'leading' (the default) is reproduced")
        options["combine"] = "v" if ptype == "v_prediction" else "eps"
    elif sampler == "deis":
        if config.get("algorithm_type", "deis") != "deis" or config.get("solver_type", "logrho") != "logrho":
            _refuse(scheduler, "algorithm_type", config.get("algorithm_type"), "only diffusers' log-ρ DEIS is "
                    "implemented (as diffusers)")
        if config.get("solver_order", 2) not in (1, 2, 3):
            _refuse(scheduler, "solver_order", config.get("solver_order"), "orders 1, 2 and 3 are implemented")
        options.update(deis_mode="logrho", max_order=config.get("solver_order", 2),
                       lower_order_final=bool(config.get("lower_order_final", True)))
    elif sampler == "lcm":
        options["timestep_scaling"] = float(config.get("timestep_scaling", 10.0))
    elif sampler == "sa_solver_diffusers":
        if config.get("variance_type") is not None:
            _refuse(scheduler, "variance_type", config.get("variance_type"), "diffusers' SASolverScheduler then keeps "
                    "the first 3 output channels whatever the model's; learned variances are DDPM's")
        for key in ("predictor_order", "corrector_order"):
            if config.get(key, 2) not in (1, 2, 3, 4):
                _refuse(scheduler, key, config.get(key), "diffusers' SASolverScheduler has weights for 1 to 4 nodes")
        algo = config.get("algorithm_type", "data_prediction")
        options.update(predictor_order=config.get("predictor_order", 2),
                       corrector_order=config.get("corrector_order", 2),
                       algorithm={"data_prediction": "data", "noise_prediction": "noise"}[algo],
                       lower_order_final=bool(config.get("lower_order_final", True)))
        if config.get("tau_func") is not None:
            options["tau_func"] = config.get("tau_func")
    elif sampler in ("euler_a", "dpm_2", "dpm_2_ancestral") and ptype == "sample":
        _refuse(scheduler, "prediction_type", ptype, f"diffusers' {name} does not implement it")
    return sampler, options


def _dpm_solver(scheduler, name: str, config, ptype: str, flow: bool):
    """DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler: ``(sampler, options)``."""
    single = name == "DPMSolverSinglestepScheduler"
    algo = config.get("algorithm_type", "dpmsolver++")
    table = DPM_SINGLESTEP if single else DPM_MULTISTEP
    if algo not in table:
        _refuse(scheduler, "algorithm_type", algo, f"expected one of {sorted(table)}")
    sampler = table[algo]
    noise_prediction = algo in ("dpmsolver", "sde-dpmsolver")
    order = _solver_order(scheduler, algo, "sde-dpmsolver", "with algorithm_type='sde-dpmsolver' diffusers 0.42 has "
                          "no third-order update (its step fails on the third step)")
    if flow and noise_prediction:
        _refuse(scheduler, "algorithm_type", algo, "diffusers' noise-prediction solver does not take flow_prediction")
    vtype = config.get("variance_type")
    if vtype is not None and ptype != "epsilon":
        _refuse(scheduler, "variance_type", vtype, f"diffusers drops the variance channels only for "
                f"prediction_type='epsilon' (with {ptype!r} its step fails on the doubled channels)")
    if single and noise_prediction and config.get("thresholding", False):
        _refuse(scheduler, "thresholding", True, "with algorithm_type='dpmsolver' diffusers 0.42's step reads ᾱ at "
                "timestep None (its whole training table) and fails on the shapes; there is no result to reproduce")
    options = dict(solver_order=order, solver_type=config.get("solver_type", "midpoint"),
                   lower_order_final=bool(config.get("lower_order_final", not single)))
    if not single:
        options["euler_at_final"] = bool(config.get("euler_at_final", False))
    if algo == "sde-dpmsolver++" and order == 3 and not single:
        # reproduced as diffusers computes it, but never silently: its D2 weight does not vanish with the step
        options["d2_weight"] = "diffusers"   # DiffusersSchedule warns (once per from_diffusers)
    return sampler, options


def _solver_order(scheduler, algo: str, no_third_order: str, why: str) -> int:
    """The scheduler's ``solver_order`` (1, 2 or 3), refused at 3 for ``algorithm_type=no_third_order``."""
    order = scheduler.config.get("solver_order", 2)
    if order not in (1, 2, 3):
        _refuse(scheduler, "solver_order", order, "orders 1, 2 and 3 are implemented")
    if algo == no_third_order and order == 3:
        _refuse(scheduler, "solver_order", 3, why)
    return order


def _edm_sampler(scheduler):
    """EDMEuler -> Euler in σ, EDMDPMSolverMultistep -> DPM-Solver++ (2M/3M, SDE) on the EDM σ grid, each
    with the EDM prediction (``sigma_data``)."""
    name, config = type(scheduler).__name__, scheduler.config
    ptype = config.get("prediction_type", "epsilon")
    if ptype not in EDM_PREDICTIONS:
        _refuse(scheduler, "prediction_type", ptype, "diffusers' EDM preconditioning defines 'epsilon' and "
                "'v_prediction' only (its precondition_outputs raises for any other)")
    options = {"sigma_data": float(config.get("sigma_data", 0.5))}
    if name == "EDMEulerScheduler":
        return "euler", options
    if config.get("thresholding", False):
        _refuse(scheduler, "thresholding", True, "dynamic thresholding (gradguide.DynamicThreshold) is not reproduced "
                "for the EDM schedulers")
    algo = config.get("algorithm_type", "dpmsolver++")
    order = _solver_order(scheduler, algo, "sde-dpmsolver++", "diffusers' EDMDPMSolverMultistepScheduler has no "
                          "third-order SDE step (its step fails there with sde-dpmsolver++)")
    options.update(solver_order=order, solver_type=config.get("solver_type", "midpoint"),
                   lower_order_final=config.get("lower_order_final", True),
                   euler_at_final=config.get("euler_at_final", False))
    return ("dpmpp-2m-sde" if algo == "sde-dpmsolver++" else "dpmpp-2m"), options


def _edm_alphas_cumprod(scheduler) -> torch.Tensor:
    """ᾱ = 1/(1 + σ²) over an EDM scheduler's training σ grid, least noisy first (it has no ᾱ table)."""
    sig = torch.as_tensor(scheduler.sigmas).detach().cpu().to(torch.float64)
    sig = sig[sig > 0].flip(0)
    sig = torch.cummax(sig, 0).values   # the final σ (σ_min again) may repeat: keep ᾱ non-increasing
    return 1 / (1 + sig ** 2)


def _float32_zero_steps(sched, sig: torch.Tensor) -> torch.Tensor:
    """The σ's with each step diffusers' float32 arithmetic sees as zero-length made exactly so.

    EDMDPMSolverMultistep with ``final_sigmas_type="sigma_min"`` appends the configured σ_min after its
    grid's own last σ, the same number rounded differently: a step of about one float32 ulp, on which its
    ``λ = −log σ`` (float32) does not move (h = 0: a first-order step is the identity, a higher-order one
    is NaN). In float64 that step would be real and its higher-order weights finite but meaningless, so the
    σ is repeated: the step is then the identity too, or refused like diffusers' NaN (non-finite tables)."""
    if sig.numel() < 2 or type(sched).__name__ != "EDMDPMSolverMultistepScheduler":
        return sig
    lam = -torch.log(sig.to(torch.float32))   # as diffusers' step computes λ (α = 1)
    sig = sig.clone()
    for i in range(1, sig.numel()):
        if bool(sig[i] > 0) and bool(lam[i] == lam[i - 1]):
            sig[i] = sig[i - 1]
    return sig


class DiffusersSchedule(Schedule):
    """A :class:`~gradguide.Schedule` whose :meth:`timesteps` are a diffusers scheduler's own.

    The scheduler is copied (its ``set_timesteps`` state is never touched). ``rule`` says
    where each step lands: ``"ddim"`` (``t − T // n``, ``final_alpha_cumprod`` below 0),
    ``"next"`` (DDPM: the next timestep, ᾱ = 1 after the last) or ``"sigmas"`` (the
    scheduler's own σ table, ``ᾱ = 1/(1+σ²)``: DPM-Solver++, UniPC, Euler, Euler ancestral,
    Heun). ``sampler_config`` is the :class:`gradguide.Sampler` that reproduces the scheduler
    (:func:`scheduler_config`); unsupported schedulers and settings raise.
    """

    def __init__(self, scheduler, use_clipped_model_output: bool = False):
        self.edm = type(scheduler).__name__ in EDM_SCHEDULERS
        if not (hasattr(scheduler, "alphas_cumprod") or self.edm) or not hasattr(scheduler, "set_timesteps"):
            raise TypeError(f"scheduler: expected a diffusers scheduler with alphas_cumprod and set_timesteps, "
                            f"got {type(scheduler).__name__}")
        self.sampler_config = scheduler_config(scheduler, use_clipped_model_output)
        sampler = self.sampler_config.name
        if self.sampler_config.options.get("d2_weight") == "diffusers":
            warnings.warn(DIFFUSERS_3M_SDE_WARNING, UserWarning, stacklevel=3)
        opts = self.sampler_config.options
        if sampler == "dpmpp-single-sde" and opts.get("solver_order") == 3 and opts.get("solver_type") == "heun":
            warnings.warn(DIFFUSERS_SINGLESTEP_SDE3_WARNING, UserWarning, stacklevel=3)
        if self.edm:
            ac = _edm_alphas_cumprod(scheduler)
            # an EDM model's timestep is its noise conditioning log(σ)/4, not a place on the ᾱ table: for the
            # scheduler's σ's, Sampler(sigmas=...) and the samplers that call the model between σ's
            self.sigma_to_t = self.edm_sigma_to_t
        else:
            ac = torch.as_tensor(scheduler.alphas_cumprod).detach().cpu().to(torch.float64)
        if SCHEDULER_SAMPLERS[type(scheduler).__name__] not in ("ddim", "ddpm", "plms", "lcm", "tcd"):
            # zero-SNR σ-table schedulers replace ᾱ_T = 0 by 2**-24, which can exceed ᾱ_{T−1}; they step on
            # their own σ table, so only sigma_to_t (sigmas=) reads this ᾱ: keep it non-increasing
            ac = torch.cummin(ac, 0).values
        super().__init__(ac)
        self.scheduler = copy.deepcopy(scheduler)
        # LCM, like DDPM, steps to the next timestep (its last step returns the consistency prediction); TCD
        # too, but its last step lands on ᾱ_0 (t' = 0)
        self.rule = {"ddim": "ddim", "plms": "ddim", "pndm": "ddim", "ddpm": "next", "lcm": "next",
                     "tcd": "tcd"}.get(sampler, "sigmas")
        final = getattr(scheduler, "final_alpha_cumprod", None)
        self.final_alpha_cumprod = 1.0 if final is None else float(final)
        self._kind = sampler   # the scheduler's own sampler, whatever a user later sets as sampler_config
        # (steps, spacing, steps_offset) -> Timesteps: a step count's timesteps depend on nothing else, and
        # computing them copies the scheduler (set_timesteps mutates it), ~1 ms a call: once per setting
        self._count_timesteps: Dict[tuple, Timesteps] = {}

    def __repr__(self) -> str:
        return f"DiffusersSchedule({type(self.scheduler).__name__}, T={self.T}, rule={self.rule!r})"

    def timesteps(self, steps: Optional[Union[int, str, Sequence[int]]] = None, spacing: str = "adm",
                  steps_offset: int = 0) -> Timesteps:
        """The scheduler's timesteps for ``steps`` inference steps (``None``: all T).

        ``spacing``: ``"adm"`` (the default of :func:`gradguide.sample`) means the scheduler's
        own ``timestep_spacing``; ``"leading"``, ``"trailing"``, ``"linspace"`` override it.
        For DDIM and DDPM schedulers an explicit list of timesteps steps from each to the next
        and an ADM section string uses ADM respacing on the scheduler's ᾱ. A step count's
        timesteps are computed once per ``(steps, spacing, steps_offset)`` and the same
        (read-only) :class:`Timesteps` is returned after that.
        """
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
        if isinstance(steps, (str, list, tuple, np.ndarray, torch.Tensor)) and self.rule == "sigmas":
            raise ValueError(f"steps: {type(self.scheduler).__name__} takes a step count (its own σ table); for "
                             "explicit σ's pass sampler=gradguide.Sampler(sigmas=...) to "
                             "gradguide.sample")
        if isinstance(steps, str):
            return super().timesteps(steps, "adm")
        if isinstance(steps, (list, tuple, np.ndarray, torch.Tensor)):
            t = torch.tensor(sorted({int(s) for s in steps}, reverse=True), dtype=torch.int64)
            if t.numel() == 0 or t[-1] < 0 or t[0] >= self.T:
                raise ValueError(f"steps: explicit timesteps must lie in [0, {self.T - 1}]")
            return self._stepping_to_next(t)
        n = self.T if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.T:
            raise ValueError(f"steps: expected an integer in [1, {self.T}] (the scheduler's num_train_timesteps), "
                             f"got {steps!r}")
        n = int(n)
        if self._kind == "pndm" and n < 4:   # diffusers' set_timesteps fails there (a numpy broadcast error)
            raise ValueError(f"steps: PNDMScheduler(skip_prk_steps=False) needs at least 4 steps (three Runge–Kutta "
                             f"steps, then PLMS), got {n}")
        key = (n, spacing, steps_offset)
        if key not in self._count_timesteps:
            self._count_timesteps[key] = self._scheduler_timesteps(n, spacing, steps_offset)
        return self._count_timesteps[key]

    def custom_timesteps(self, timesteps=None, sigmas=None) -> Timesteps:
        """The scheduler's timesteps after ``set_timesteps(timesteps=...)`` or
        ``set_timesteps(sigmas=...)`` on a copy of it: a diffusers pipeline's ``timesteps=`` /
        ``sigmas=`` lists, with diffusers' meaning (the scheduler validates and converts them).
        A scheduler whose ``set_timesteps`` takes no such list is refused, as diffusers does."""
        if (timesteps is None) == (sigmas is None):
            raise ValueError("timesteps, sigmas: pass exactly one of them")
        name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().tolist()
        elif isinstance(values, np.ndarray):
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or not values:
            raise TypeError(f"{name}: expected a non-empty list, got {values!r}")
        cls = type(self.scheduler).__name__
        if name not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(f"{name}: {cls}.set_timesteps takes no custom {name} list (diffusers refuses it too); "
                             f"use a scheduler that does or pass num_inference_steps")
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(**{name: list(values)})
        if self.rule == "sigmas":
            return self._sigma_timesteps(sched)
        if self.rule not in ("next", "tcd"):   # DDIM/PNDM take no list: refused above
            raise ValueError(f"{name}: {cls} takes a step count")
        # DDPM steps from each custom timestep to the next one, to ᾱ = 1 after the last (TCD: ᾱ_0)
        return self._stepping_to_next(torch.as_tensor(sched.timesteps).to(torch.int64).cpu())

    def _stepping_to_next(self, t: torch.Tensor) -> Timesteps:
        """Integer timesteps, each step moving to the next one; after the last to ᾱ = 1 (clean data), or
        for TCD to ᾱ_0 (its last step lands on timestep 0)."""
        ac = self.alphas_cumprod
        abar = ac[t]
        end = ac[:1] if self.rule == "tcd" else abar.new_ones(1)
        return Timesteps(t, abar, torch.cat([abar[1:], end]), alphas_cumprod=ac)

    def _scheduler_timesteps(self, n: int, spacing: str, steps_offset: int) -> Timesteps:
        """The timesteps of a copy of the scheduler after ``set_timesteps(n)``."""
        ac = self.alphas_cumprod
        sched = self.scheduler
        overrides = {}
        if spacing != "adm" and spacing != sched.config.get("timestep_spacing"):
            overrides["timestep_spacing"] = spacing
        if steps_offset:
            overrides["steps_offset"] = steps_offset
        if overrides:   # as keywords: a merged dict keeps diffusers' _use_default_values, which resets them
            sched = type(sched).from_config(sched.config, **overrides)
        else:
            sched = copy.deepcopy(sched)
        sched.set_timesteps(n)
        if self.rule == "sigmas":
            return self._sigma_timesteps(sched)
        t = torch.as_tensor(sched.timesteps).to(torch.int64).cpu()
        if self._kind == "plms":   # PNDM lists its first step twice; the sampler expands it itself
            t = torch.unique(t).flip(0)
        elif self._kind == "pndm":
            # [τ0, M, M, τ1, τ1, M', M', τ2, τ2, M'', M'', τ3, τ3, τ4, ...]: the Runge–Kutta steps' ends, then PLMS's;
            # the sampler adds the midpoints M (its ᾱ from this schedule's table, through sigma_to_t)
            t = torch.cat([t[0:13:4], t[13:]])
        if self.rule != "ddim":
            return self._stepping_to_next(t)
        abar = ac[t]
        prev = t - self.T // n
        abar_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.tensor(self.final_alpha_cumprod, dtype=torch.float64))
        return Timesteps(t, abar, abar_prev, alphas_cumprod=ac,
                         sigma_to_t=self.sigma_to_t if self._kind == "pndm" else None)

    def _sigma_timesteps(self, sched) -> Timesteps:
        """Timesteps on the scheduler's own σ table (after ``set_timesteps``)."""
        t = torch.as_tensor(sched.timesteps).cpu().to(torch.float64)
        sig = torch.as_tensor(sched.sigmas).cpu().to(torch.float64)
        # Heun and KDPM2 (ancestral) list each step twice (KDPM2's second timestep is its log-midpoint's, which
        # dpm_2 computes from sigma_to_t): un-expand [σ0, σ1, σ1, ..., σ_{n−1}, σ_{n−1}, 0]
        if self._kind in ("heun", "dpm_2", "dpm_2_ancestral"):
            t, sig = t[0::2], torch.cat([sig[0:-1:2], sig[-1:]])
        # step i goes from sigmas[i] to sigmas[i + 1]; diffusers' Euler(interpolation_type="log_linear") has one
        # σ more that its loop never reaches: sampling ends (and returns x_σ) at sigmas[n]
        sig = sig[:t.numel() + 1]
        if t.numel() + 1 != sig.numel():
            raise ValueError(f"scheduler: {type(sched).__name__}: {t.numel()} timesteps for {sig.numel()} σ's; "
                             "expected one σ more (the final one)")
        if torch.equal(t, t.round()):
            t = t.to(torch.int64)
        if self.edm:
            sig = _float32_zero_steps(sched, sig)
        abar = 1 / (1 + sig ** 2)
        init_scale = final_scale = 1.0
        if self._kind in SIGMA_SPACE or self.edm:   # latents in σ-space: x_σ = x/√ᾱ
            init_scale = float(sched.init_noise_sigma) * float(abar[0].sqrt())
            final_scale = float(1 / abar[-1].sqrt())
        return Timesteps(t, abar[:-1], abar[1:], init_scale=init_scale, final_scale=final_scale,
                         sigma_to_t=self.sigma_to_t)

    def edm_sigma_to_t(self, sigma) -> torch.Tensor:
        """An EDM model's timestep at σ: its noise conditioning ``c_noise = log(σ)/4`` (float64)."""
        return 0.25 * torch.log(torch.as_tensor(sigma, dtype=torch.float64))

    edm_sigma_to_t.runkey = "edm c_noise = log(σ)/4"


def scheduler_config(scheduler, use_clipped_model_output: bool = False) -> Sampler:
    """The :class:`gradguide.Sampler` that reproduces ``scheduler``: :func:`scheduler_sampler`'s
    sampler and options, the prediction type, x̂_0 clipping (``clip_sample``,
    ``clip_sample_range``), the ε a clipped DDIM step re-noises with (diffusers' default, the
    unclipped one, unless ``use_clipped_model_output``) and DDPM's variance."""
    sampler, options = scheduler_sampler(scheduler)   # refuses what gradguide cannot reproduce
    config = scheduler.config
    clip, clip_eps = False, None
    name = type(scheduler).__name__
    # diffusers thresholds instead of clipping when both are set (TCD's step does neither)
    if config.get("thresholding", False) and name != "TCDScheduler":
        clip = DynamicThreshold(float(config.get("dynamic_thresholding_ratio", 0.995)),
                                float(config.get("sample_max_value", 1.0)))
    elif config.get("clip_sample", False) and name != "TCDScheduler":   # TCD's step never clips
        r = float(config.get("clip_sample_range", 1.0))
        clip = (-r, r)
    if clip and type(scheduler).__name__.startswith("DDIM") and not use_clipped_model_output:
        clip_eps = "model"
    vtype = config.get("variance_type")
    # DDPM's variance (DPM-Solver's learnt-variance channels are dropped by the model, as diffusers drops them)
    variance = VARIANCE_TYPES[vtype] if sampler == "ddpm" and vtype is not None else None
    ptype = "flow_prediction" if diffusers_flow.is_flow(scheduler) else config.get("prediction_type", "epsilon")
    prediction = EDM_PREDICTIONS[ptype] if name in EDM_SCHEDULERS else PREDICTION_TYPES[ptype]
    if sampler == "ipndm_diffusers":   # its step reads the model's output as a v (ε = σ x + α v)
        prediction = PREDICTION_TYPES["v_prediction"]
    return Sampler(sampler, prediction=prediction, variance=variance, clip=clip, clip_eps=clip_eps, options=options)


class DiffusersModel(torch.nn.Module):
    """``model(x_t, t, **cond)`` over a diffusers UNet or transformer (or any module returning
    ``.sample``).

    The call is adapted to the model's ``forward`` signature, so no wrapper is needed:
    the timestep goes in as the keyword ``timestep`` where ``forward`` has one (a
    ``PixArtTransformer2DModel`` takes ``encoder_hidden_states`` second), positionally
    otherwise; ``cond`` is passed as keywords (``encoder_hidden_states``, ``class_labels``,
    ``encoder_attention_mask``, ``added_cond_kwargs``, ...). A learned-σ transformer
    (``out_channels = 2 × in_channels``: DiT, PixArt) returns only its first ``in_channels``
    channels, as diffusers' ``DiTPipeline`` / ``PixArtAlphaPipeline`` split them off, unless
    the scheduler's ``variance_type`` uses the learned variance (DDPM's ``learned`` and
    ``learned_range``); with a DPM-Solver ``variance_type`` set, a 2C-channel output keeps its
    first C channels even when the model declares no ``out_channels`` (C: the sample's).
    It holds nothing else of the scheduler: that travels with the schedule (``schedule.sampler_config``).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        in_channels = getattr(getattr(unet, "config", None), "in_channels", None)
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        if in_channels is not None and size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            self.sample_shape = (int(in_channels),) + tuple(int(s) for s in size)
        self._dtype_key = self._dtype = self._first_param = None
        self._timestep_keyword = _takes_keyword(unet, "timestep")
        self._needs_added_cond = bool(getattr(unet, "use_additional_conditions", False))
        cfg = getattr(unet, "config", None)
        c_in, c_out = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None)
        # a learned-σ model's channel count; from_diffusers sets drop_variance_channels when the sampler
        # does not read them (everything but DDPM's learned and learned_range)
        self._sigma_channels = c_in if isinstance(c_in, int) and c_out == 2 * c_in else None
        self.drop_variance_channels = False
        self.scheduler_learned_variance = False

    def _unet_dtype(self, default: torch.dtype) -> torch.dtype:
        """The U-Net's compute dtype. diffusers' ``ModelMixin.dtype`` walks every submodule (≈1.5 ms
        for a small U-Net: more than gradguide's whole step), so it is read again only when the
        first parameter's dtype changes (``unet.half()``, ``.to(...)``, layerwise casting: they
        convert the parameters in place). The first parameter is looked up once: walking the
        modules for it costs ≈ 20 µs a step."""
        if self._first_param is None:
            self._first_param = next(iter(self.unet.parameters()), False)
        first = self._first_param
        key = None if first is False else first.dtype
        if self._dtype is None or key != self._dtype_key:
            self._dtype_key, self._dtype = key, getattr(self.unet, "dtype", None)
        return self._dtype or default

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        dtype = self._unet_dtype(x.dtype)
        if t.is_floating_point():   # fractional σ-space timesteps: diffusers passes them as float32
            t = t.to(torch.float32)
        if self._needs_added_cond and cond.get("added_cond_kwargs") is None:
            raise ValueError(f"cond: {type(self.unet).__name__} (use_additional_conditions) needs "
                             "cond['added_cond_kwargs'] = {'resolution': [B, 2], 'aspect_ratio': [B, 1]} (the image's "
                             "height/width, as PixArtAlphaPipeline builds them)")
        if self._timestep_keyword:
            out = self.unet(x.to(dtype), timestep=t, **cond, return_dict=False)[0]
        else:
            out = self.unet(x.to(dtype), t, **cond, return_dict=False)[0]
        channels = self._sigma_channels
        if channels is None and self.scheduler_learned_variance:   # the model declares none: the input's count
            channels = x.shape[1]
        if self.drop_variance_channels and channels is not None and out.shape[1] == 2 * channels:
            out = out[:, :channels]   # as diffusers' DiT/PixArt pipelines (and DPM-Solver's step) split them off
        return out.to(x.dtype)


def _takes_keyword(fn, name: str) -> bool:
    """Whether ``fn`` (a module: its ``forward``) has a parameter ``name`` that can be passed by keyword."""
    target = getattr(fn, "forward", fn)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):   # a builtin without a signature: keep the positional call
        return False
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def from_diffusers(unet, scheduler, use_clipped_model_output: bool = False, mu: Optional[float] = None):
    """``(model, schedule)`` for :func:`gradguide.sample` from a diffusers UNet and scheduler.

    With no other keyword, :func:`gradguide.sample` then reproduces the scheduler's own loop
    (sampler, timesteps, σ's, prediction type, clipping, variance, final-step noise): all of it
    is ``schedule.sampler_config`` and ``schedule.timesteps``, so a function of your own wrapped
    around ``model`` keeps it. A scheduler or setting gradguide cannot reproduce raises a
    ``ValueError`` naming it.
    ``use_clipped_model_output`` mirrors the argument of diffusers' ``DDIMScheduler.step``
    (only matters with clipping). Flow-matching schedulers (``FlowMatchEulerDiscrete``,
    ``FlowMatchHeunDiscrete``, ``FlowMatchLCM``, UniPC / DPM-Solver++ with flow σ's) give a
    :class:`~gradguide.FlowSchedule` (docs/flow.md); ``mu`` is dynamic shifting's, as
    diffusers' ``set_timesteps(mu=...)`` takes it (required for ``use_dynamic_shifting``, at
    sampling time, as diffusers requires it)::

        model, schedule = gradguide.from_diffusers(pipe.unet, pipe.scheduler)
        x = gradguide.sample(model, (4, 3, 64, 64), schedule=schedule, steps=50,
                             generator=torch.Generator().manual_seed(0))
    """
    if not callable(unet):
        raise TypeError(f"unet: expected a callable diffusers model, got {type(unet).__name__}")
    if type(scheduler).__name__ in UNSUPPORTED_SCHEDULERS:
        scheduler_sampler(scheduler)   # refuses it, saying why
    if type(scheduler).__name__ == "IPNDMScheduler":   # no ᾱ table: its own time grid (diffusers_ipndm)
        if mu is not None:
            raise ValueError("mu: only flow-matching schedulers with dynamic shifting take mu, got IPNDMScheduler")
        schedule = diffusers_ipndm.ipndm_schedule(scheduler)
    elif diffusers_flow.is_flow(scheduler):
        schedule = diffusers_flow.flow_schedule(scheduler, mu, scheduler_sampler(scheduler))
    elif mu is not None:
        raise ValueError(f"mu: only flow-matching schedulers with dynamic shifting take mu, got "
                         f"{type(scheduler).__name__}")
    else:
        schedule = DiffusersSchedule(scheduler, use_clipped_model_output)
    model = DiffusersModel(unet)
    # learned-σ channels are read only by DDPM's learned variance; otherwise they are dropped, as
    # diffusers' DiT / PixArt pipelines split them off before the scheduler
    vtype = scheduler.config.get("variance_type")
    model.drop_variance_channels = not (SCHEDULER_SAMPLERS.get(type(scheduler).__name__) == "ddpm" and
                                        vtype in ("learned", "learned_range"))
    # the scheduler says the output carries variance channels (DPM-Solver's step drops them whatever the model declares)
    model.scheduler_learned_variance = vtype in ("learned", "learned_range")
    return model, schedule


# -- guiders ----------------------------------------------------------------------------------

def _flat_std_ratio(gram, sums, a, b, n):
    """std(c) / std(a c + b u) per sample from the Gram matrix and sums of (c, u)."""
    ss_c = gram[:, 0, 0]
    s_c = sums[:, 0]
    ss_p = a * a * gram[:, 0, 0] + 2 * a * b * gram[:, 0, 1] + b * b * gram[:, 1, 1]
    s_p = a * sums[:, 0] + b * sums[:, 1]
    var_c = (ss_c - s_c * s_c / n).clamp_min(0)
    var_p = (ss_p - s_p * s_p / n).clamp_min(0)
    return (var_c / var_p).sqrt()   # the (n − 1) of the unbiased std cancels


class GradguideCFG(ClassifierFreeGuidance):
    """diffusers' ``ClassifierFreeGuidance`` computed with gradguide's ops: one combination
    ``u + w (c − u)`` (``c + w (c − u)`` with ``use_original_formulation``), and with
    ``guidance_rescale = φ > 0`` Lin et al.'s rescale from one reduction (std per sample)."""

    backend = "auto"

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        w = float(self.guidance_scale)
        a, b = (1.0 + w, -w) if self.use_original_formulation else (w, 1.0 - w)
        operands = [pred_cond, pred_uncond]
        bsz = pred_cond.shape[0]
        coef = torch.tensor([a, b], dtype=torch.float32, device=pred_cond.device).expand(bsz, 2)
        if self.guidance_rescale > 0.0:
            gram, sums = ops.reduce(operands, backend=self.backend)
            n = pred_cond[0].numel()
            ratio = _flat_std_ratio(gram[:, 0], sums[:, 0], a, b, n)
            phi = float(self.guidance_rescale)
            coef = coef * (phi * ratio + (1 - phi)).unsqueeze(1).to(coef.dtype)
        pred = ops.combine(coef, operands, backend=self.backend)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class GradguideAPG(AdaptiveProjectedGuidance):
    """diffusers' ``AdaptiveProjectedGuidance`` (its formula: ``u + w (Δ_⊥ + η Δ_∥)`` on the
    model outputs, Δ clipped to norm r, optional momentum) from one reduction of
    ``(c, u[, running Δ])`` and one combination. Only per-sample norms
    (``adaptive_projected_guidance_norm_dim=None``) are supported."""

    backend = "auto"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.adaptive_projected_guidance_norm_dim is not None:
            raise ValueError("GradguideAPG: adaptive_projected_guidance_norm_dim: only None (per-sample norms over "
                             f"all dimensions) is supported, got {self.adaptive_projected_guidance_norm_dim!r}")

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        if not self._is_apg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        w, eta = float(self.guidance_scale), float(self.eta)
        r = float(self.adaptive_projected_guidance_rescale)
        operands = [pred_cond, pred_uncond]
        d = [1.0, -1.0]                                     # Δ over the operands
        buffer = self.momentum_buffer
        if buffer is not None:
            if isinstance(buffer.running_average, torch.Tensor):
                operands.append(buffer.running_average.to(pred_cond.dtype))
                d.append(float(buffer.momentum))
        if self.guidance_rescale > 0.0:
            raise ValueError("GradguideAPG: guidance_rescale > 0 is not supported; use GradguideCFG's rescale")
        gram, _ = ops.reduce(operands, backend=self.backend)
        gram = gram.to(torch.float64)
        k, bsz = len(operands), gram.shape[0]
        unit = torch.eye(k, dtype=torch.float64, device=gram.device)   # operand j as a coefficient vector
        dv = torch.tensor(d, dtype=torch.float64, device=gram.device)
        anchor = unit[0 if self.use_original_formulation else 1]
        update = policies.apg_update(policies.GramAlgebra(gram), unit[0].expand(bsz, 1, k), dv.expand(bsz, 1, k), r, eta)
        coef = (anchor + update * w)[:, 0]
        pred = ops.combine(coef.to(torch.float32), operands, backend=self.backend)
        if buffer is not None:   # diffusers' MomentumBuffer: running = Δ + m · running
            buffer.running_average = ops.combine(dv.to(torch.float32).expand(bsz, k), operands, backend=self.backend)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class GradguidePixelAsParam(ClassifierFreeGuidance):
    """PixelAsParam policy C (Dinh, Liu & Xu, ICML 2023) as a diffusers guider.

    In x̂_0 space, with ``Δ = (w − 1)(x̂_0c − x̂_0u)``:
    ``x̂_0 = clip(PC_δ1(x̂_0c | Δ) + PC_δ2(Δ | x̂_0c))``, ``PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b``
    per sample; the guider returns the prediction (ε, v or x̂_0, the scheduler's
    ``prediction_type``) consistent with that x̂_0, for the scheduler's ``step``.

    Policy C needs ``x_t`` and ``ᾱ_t``: build it with :meth:`from_scheduler` and call
    :meth:`set_sample` with the current latents before each guider call (the timestep comes
    from ``set_state``, which diffusers' denoising loops already call).

    ``convention="official"`` (default, as :class:`gradguide.PixelAsParam`): with ``clip_range``
    set, x̂_0c and x̂_0u are clipped before Δ and the projections (the authors' code);
    ``"paper"``: only the result is clipped.
    """

    backend = "auto"

    def __init__(self, guidance_scale: float = 7.5, alphas_cumprod: Optional[Sequence[float]] = None,
                 prediction_type: str = "epsilon", delta1: float = 1.0, delta2: float = 1.0,
                 clip_range: Optional[float] = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 convention: str = "official"):
        super().__init__(guidance_scale=guidance_scale, start=start, stop=stop, enabled=enabled)
        if convention not in ("official", "paper"):
            raise ValueError(f"GradguidePixelAsParam: convention: expected 'official' or 'paper', got {convention!r}")
        self.convention = convention
        if alphas_cumprod is None:
            raise ValueError("GradguidePixelAsParam: alphas_cumprod: required (use from_scheduler(scheduler, ...))")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"GradguidePixelAsParam: prediction_type: expected one of {sorted(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}")
        self.register_to_config(alphas_cumprod=[float(a) for a in alphas_cumprod], prediction_type=prediction_type,
                                delta1=delta1, delta2=delta2, clip_range=clip_range, convention=convention)
        self._abar = torch.tensor([float(a) for a in alphas_cumprod], dtype=torch.float64)
        self.prediction_type = prediction_type
        self.delta1, self.delta2, self.clip_range = float(delta1), float(delta2), clip_range
        self._sample = None

    @classmethod
    def from_scheduler(cls, scheduler, guidance_scale: float = 7.5, **kwargs) -> "GradguidePixelAsParam":
        config = scheduler.config
        if type(scheduler).__name__ in EDM_SCHEDULERS:
            raise ValueError(f"GradguidePixelAsParam.from_scheduler: {type(scheduler).__name__} drives an EDM "
                             "preconditioned network on σ's (no ᾱ table, no ε/v/x0 output); use gradguide.sample with "
                             "projection=gradguide.PixelAsParam('C') (from_diffusers), which supports it")
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        kwargs.setdefault("clip_range", clip)
        return cls(guidance_scale=guidance_scale, alphas_cumprod=scheduler.alphas_cumprod.tolist(),
                   prediction_type=config.get("prediction_type", "epsilon"), **kwargs)

    def set_sample(self, sample: torch.Tensor) -> None:
        """The current ``x_t`` (the latents the model was called on)."""
        self._sample = sample

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        x = self._sample
        if x is None or x.shape != pred_cond.shape:
            raise ValueError("GradguidePixelAsParam: call guider.set_sample(latents) with the current x_t "
                             f"(shape {tuple(pred_cond.shape)}) before each guider call")
        if self._timestep is None:
            raise ValueError("GradguidePixelAsParam: call guider.set_state(step, num_inference_steps, timestep) "
                             "first (diffusers' denoising loops do)")
        t = torch.as_tensor(self._timestep).reshape(-1)[0].long().cpu()
        abar = float(self._abar[t])
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        bsz = x.shape[0]
        # x̂_0 of each branch as coefficients over (x, c, u); every step below is per-sample linear algebra
        if self.prediction_type == "epsilon":
            x0c, x0u = [1 / a, -s / a, 0.0], [1 / a, 0.0, -s / a]
        elif self.prediction_type == "v_prediction":
            x0c, x0u = [a, -s, 0.0], [a, 0.0, -s]
        else:
            x0c, x0u = [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
        operands = [x, pred_cond, pred_uncond]
        clamp = None if self.clip_range is None else (-float(self.clip_range), float(self.clip_range))
        vc = torch.tensor(x0c, dtype=torch.float64, device=x.device)
        vu = torch.tensor(x0u, dtype=torch.float64, device=x.device)
        if clamp is not None and self.convention == "official":
            # the authors' code clips each branch's x̂_0 before Δ and the projections
            operands = [ops.combine(v.to(torch.float32).expand(bsz, 3), operands, clamp=clamp, backend=self.backend)
                        for v in (vc, vu)]
            vc = torch.tensor([1.0, 0.0], dtype=torch.float64, device=x.device)
            vu = torch.tensor([0.0, 1.0], dtype=torch.float64, device=x.device)
        k = len(operands)
        x0 = ops.fused_combine("pxp-c", operands, base=torch.zeros(bsz, k, dtype=torch.float64, device=x.device),
                               x0_cond=vc.expand(bsz, k), x0_uncond=vu.expand(bsz, k), scale=float(self.guidance_scale),
                               delta=self.delta1, delta2=self.delta2, clamp=clamp, backend=self.backend)
        if self.prediction_type == "sample":
            pred = x0
        else:
            # back to the scheduler's parametrisation: ε = (x − a x̂_0)/s, v = (a x − x̂_0)/s
            cx, c0 = ((1 / s, -a / s) if self.prediction_type == "epsilon" else (a / s, -1 / s))
            coef = torch.tensor([cx, c0], dtype=torch.float32, device=x.device).expand(bsz, 2)
            pred = ops.combine(coef, [x.to(x0.dtype), x0], backend=self.backend)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
