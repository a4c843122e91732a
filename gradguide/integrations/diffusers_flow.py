"""diffusers' flow-matching schedulers as :class:`~gradguide.FlowSchedule` s (used by
:func:`gradguide.from_diffusers`; the mapping table is in docs/flow.md).

- ``FlowMatchEulerDiscreteScheduler`` -> sampler ``flow-euler`` (``stochastic`` with
  ``stochastic_sampling=True``), ``FlowMatchHeunDiscreteScheduler`` -> ``flow-heun``,
  ``FlowMatchLCMScheduler`` -> ``flow-lcm``: a native :class:`FlowSchedule` with the
  scheduler's configuration (``shift``, dynamic shifting and its ``mu``, ``shift_terminal``,
  ``time_shift_type``, ``use_karras/exponential/beta_sigmas``).
- ``UniPCMultistepScheduler`` / ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas=True``
  and ``prediction_type="flow_prediction"`` (Wan, Sana) -> ``unipc`` / ``dpmpp-2m(-sde)``:
  the exponential integrators are unchanged by the rescaling ``x = x_σ/√((1−σ)²+σ²)``
  (they are written in ``λ = log(α/σ)``, which the rescaling keeps), so the existing tables run
  on the flow σ's; the σ's and (integer) timesteps are read from a copy of the scheduler after
  its own ``set_timesteps``.

Every other setting of these classes is refused by name.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from ..config import Sampler
from ..flow_schedules import FlowSchedule
from ..schedules import Timesteps

FLOW_MATCH = {"FlowMatchEulerDiscreteScheduler": "flow-euler", "FlowMatchHeunDiscreteScheduler": "flow-heun",
              "FlowMatchLCMScheduler": "flow-lcm"}
FLOW_SIGMA_SOLVERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def _refuse(scheduler, option: str, value, why: str):
    raise ValueError(f"scheduler: {type(scheduler).__name__}({option}={value!r}) is not supported: {why}")


def is_flow(scheduler) -> bool:
    """Whether ``scheduler`` drives a flow-matching model (its class, or flow σ's / flow prediction)."""
    name = type(scheduler).__name__
    if name in FLOW_MATCH:
        return True
    config = getattr(scheduler, "config", {}) or {}
    return name in FLOW_SIGMA_SOLVERS and (bool(config.get("use_flow_sigmas", False))
                                           or config.get("prediction_type") == "flow_prediction")


def flow_schedule(scheduler, mu: Optional[float] = None, vp_sampler=None) -> FlowSchedule:
    """The :class:`FlowSchedule` reproducing a flow scheduler (``vp_sampler``: the
    ``(sampler, options)`` of a UniPC / DPM-Solver scheduler, from ``scheduler_sampler``)."""
    name = type(scheduler).__name__
    config = scheduler.config
    if name in FLOW_MATCH:
        if config.get("invert_sigmas", False):
            _refuse(scheduler, "invert_sigmas", True, "σ running from 0 to 1 is not a sampling schedule")
        if name == "FlowMatchLCMScheduler" and (config.get("scale_factors") or getattr(scheduler, "_scale_factors", None)):
            _refuse(scheduler, "scale_factors", config.get("scale_factors") or scheduler._scale_factors,
                    "scale-wise generation resizes x̂_0 between steps")
        spacing = [k for k in ("karras", "exponential", "beta") if config.get(f"use_{k}_sigmas", False)]
        sched = FlowSchedule(config.get("num_train_timesteps", 1000), config.get("shift", 1.0),
                             use_dynamic_shifting=config.get("use_dynamic_shifting", False),
                             base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 1.15),
                             base_image_seq_len=config.get("base_image_seq_len", 256),
                             max_image_seq_len=config.get("max_image_seq_len", 4096),
                             shift_terminal=config.get("shift_terminal"),
                             time_shift_type=config.get("time_shift_type", "exponential"),
                             sigma_spacing=spacing[0] if spacing else "linear",
                             stochastic_sampling=bool(config.get("stochastic_sampling", False)))
        if hasattr(scheduler, "_shift") and scheduler._shift != config.get("shift", 1.0):
            _refuse(scheduler, "set_shift", scheduler._shift, "a shift changed after construction; build the scheduler "
                    "with shift= instead")
        options = {"stochastic": True} if config.get("stochastic_sampling", False) else None
        sched.sampler_config = Sampler(FLOW_MATCH[name], prediction="flow", options=options)
        if mu is not None:
            sched = sched.with_mu(mu)
        return sched
    return SolverFlowSchedule(scheduler, mu, vp_sampler)


def check_flow_solver(scheduler) -> None:
    """Refuse the UniPC / DPM-Solver flow settings gradguide does not reproduce."""
    config = scheduler.config
    if config.get("prediction_type") != "flow_prediction":
        _refuse(scheduler, "prediction_type", config.get("prediction_type"), "flow σ's drive a flow-matching model: "
                "use prediction_type='flow_prediction'")
    if not config.get("use_flow_sigmas", False):
        _refuse(scheduler, "use_flow_sigmas", False, "a flow_prediction model needs flow σ's (use_flow_sigmas=True)")
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if config.get(flag, False):
            _refuse(scheduler, flag, True, "only the plain flow σ's (shifted linspace) are reproduced with use_flow_sigmas")
    if type(scheduler).__name__ == "UniPCMultistepScheduler" and config.get("final_sigmas_type", "zero") == "sigma_min":
        _refuse(scheduler, "final_sigmas_type", "sigma_min", "with flow σ's diffusers' UniPC repeats its last σ, a "
                "zero-length final step (use 'zero')")
    if config.get("time_shift_type", "exponential") != "exponential":
        _refuse(scheduler, "time_shift_type", config.get("time_shift_type"), "only the exponential time shift")


class SolverFlowSchedule(FlowSchedule):
    """A UniPC / DPM-Solver scheduler with flow σ's: σ's and timesteps from a copy of the
    scheduler after ``set_timesteps`` (its ``flow_shift``, dynamic ``mu``, ``shift_terminal``,
    ``final_sigmas_type``; the first σ nudged below 1 and integer timesteps, as diffusers does)."""

    def __init__(self, scheduler, mu: Optional[float] = None, vp_sampler=None):
        check_flow_solver(scheduler)
        config = scheduler.config
        super().__init__(config.get("num_train_timesteps", 1000), config.get("flow_shift", 1.0),
                         use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)), mu=mu)
        self.scheduler = copy.deepcopy(scheduler)
        sampler, options = vp_sampler
        self.sampler_config = Sampler(sampler, prediction="flow", options=options)

    def __repr__(self) -> str:
        return f"SolverFlowSchedule({type(self.scheduler).__name__}, mu={self.mu})"

    def flow_timesteps(self, n: Optional[int] = None, *, sigmas=None, timesteps=None, mu=None) -> Timesteps:
        name = type(self.scheduler).__name__
        if timesteps is not None:
            raise ValueError(f"timesteps: {name} with flow σ's takes a step count or sigmas=")
        if sigmas is not None and name != "UniPCMultistepScheduler":
            raise ValueError(f"sigmas: {name}.set_timesteps takes no sigmas")
        mu = self.mu if mu is None else mu
        if self.use_dynamic_shifting and mu is None and name == "UniPCMultistepScheduler":   # DPM-Solver: optional
            raise ValueError("mu: this scheduler uses dynamic shifting (use_dynamic_shifting=True), so mu is required, "
                             "as diffusers' set_timesteps requires it: from_diffusers(..., mu=...) or "
                             "schedule.with_mu(mu)")
        key = (n, mu, None if sigmas is None else tuple(float(s) for s in sigmas))
        if key not in self._cache:
            sched = copy.deepcopy(self.scheduler)   # set_timesteps mutates it (DPM-Solver's flow_shift too)
            kwargs = {} if mu is None or not self.use_dynamic_shifting else {"mu": mu}
            if sigmas is not None:
                sched.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float64), **kwargs)
            else:
                sched.set_timesteps(n, **kwargs)
            t = torch.as_tensor(sched.timesteps).cpu()
            sig = torch.as_tensor(sched.sigmas).cpu().to(torch.float64)
            self._cache[key] = self.make_timesteps(sig, t)
        return self._cache[key]
