"""gradguide: fast guided sampling for diffusion models.

Implements PixelAsParam (Dinh, Liu & Xu, ICML 2023) and gradient guidance (Guo et al.,
NeurIPS 2024) next to the guidance methods users already know, built around one step shape:
per-sample reductions, then one linear combination (see docs/architecture.md and :mod:`gradguide.ops`).
"""
from . import ops
from .config import Diagnostics, Execution, Sampler
from . import guidance as _guidance
from .guidance import *  # noqa: F401,F403 (the terms, as gradguide.guidance.__all__ lists them)
from .metrics import off_support_ratio
from .predictions import DynamicThreshold
from .projection import PixelAsParam, project
from .sampling import StepRecord, sample
from .comfy_ksampler import comfy_initial_noise, comfy_sampler
from .comfy_schedules import comfy_percent_to_sigma, comfy_schedule, comfy_sigmas
from .flow_schedules import FlowSchedule, calculate_shift
from .schedules import Schedule, Timesteps, sigmas_exponential, sigmas_karras, sigmas_polyexponential, sigmas_vp

__version__ = "0.1.0"


def __getattr__(name):
    # diffusers is an optional extra: import the adapter (and diffusers) only when asked for
    if name == "from_diffusers":
        from .integrations.diffusers import from_diffusers
        return from_diffusers
    raise AttributeError(f"module 'gradguide' has no attribute {name!r}")

# every guidance term (gradguide.guidance lists them: a new term is exported there, once)
__all__ = sorted({name for name in _guidance.__all__ if name != "StepContext"} | {
    "Diagnostics", "DynamicThreshold", "Execution", "FlowSchedule", "PixelAsParam", "Sampler", "Schedule",
    "StepRecord", "Timesteps",
    "calculate_shift", "comfy_initial_noise", "comfy_percent_to_sigma", "comfy_sampler", "comfy_schedule",
    "comfy_sigmas", "off_support_ratio", "ops", "project", "sample", "sigmas_exponential", "sigmas_karras",
    "sigmas_polyexponential", "sigmas_vp"})
