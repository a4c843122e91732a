"""ComfyUI's ``KSampler`` by names: a sampler name, a scheduler name and a step count give the
:class:`gradguide.Sampler` (σ list included) that runs ComfyUI's loop (docs/samplers.md, "ComfyUI").

Every ComfyUI sampler name is either mapped onto the gradguide sampler that reproduces it (with the
options that make it so) or refused by name with the reason; nothing is mapped approximately.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .comfy_schedules import comfy_percent_to_sigma, comfy_sigmas
from .config import Sampler
from .schedules import Schedule

# ComfyUI sampler name -> (gradguide sampler, the options that reproduce it)
COMFY_SAMPLERS = {
    "euler": ("euler", {}), "euler_ancestral": ("euler_a", {}), "heun": ("heun", {}), "heunpp2": ("heunpp2", {}),
    "exp_heun_2_x0": ("seeds_2", {"eta": 0.0, "r": 1.0, "solver_type": "phi_2"}),
    "exp_heun_2_x0_sde": ("seeds_2", {"r": 1.0, "solver_type": "phi_2"}),
    "dpm_2": ("dpm_2", {}), "dpm_2_ancestral": ("dpm_2_ancestral", {}), "lms": ("lms", {}),
    "dpm_fast": ("dpm_fast", {}), "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("dpmpp_sde", {}), "dpmpp_sde_gpu": ("dpmpp_sde", {}),
    # k-diffusion's 2M takes the first-order step only onto σ = 0: never lowers the order otherwise
    "dpmpp_2m": ("dpmpp-2m", {"lower_order_final": False}),
    "dpmpp_2m_sde": ("dpmpp-2m-sde", {}), "dpmpp_2m_sde_gpu": ("dpmpp-2m-sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp-2m-sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp-2m-sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("dpmpp-3m-sde", {}), "dpmpp_3m_sde_gpu": ("dpmpp-3m-sde", {}),
    "ddim": ("euler", {}),   # ComfyUI's "ddim" runs its Euler loop
    "lcm": ("lcm_comfy", {}),   # the plain step: ComfyUI's model wrapper holds LCM's boundary scalings
    **{name: (name, {}) for name in ("ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_ancestral",
                                     "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                                     "sa_solver_pece")},
}
_CFG_PP = ("its CFG++ form takes the unconditional prediction from inside ComfyUI's CFG; not checked against "
           "gradguide.CFGPlusPlus")
COMFY_REFUSED = {
    "euler_cfg_pp": _CFG_PP, "euler_ancestral_cfg_pp": _CFG_PP, "dpmpp_2s_ancestral_cfg_pp": _CFG_PP,
    "dpmpp_2m_cfg_pp": _CFG_PP,
    "res_multistep_cfg_pp": "its CFG++ form carries the unconditional prediction as history",
    "res_multistep_ancestral_cfg_pp": "its CFG++ form carries the unconditional prediction as history",
    "gradient_estimation_cfg_pp": "its CFG++ form carries the unconditional derivative as history",
    "dpm_adaptive": "its steps are chosen on the host: use gradguide.adaptive.sample_dpm_adaptive",
    "ddpm": "ComfyUI's DDPM on a σ list is not reproduced (gradguide's 'ddpm' steps on training timesteps)",
    "uni_pc": "ComfyUI's own UniPC is not checked against gradguide's 'unipc'",
    "uni_pc_bh2": "ComfyUI's own UniPC is not checked against gradguide's 'unipc'",
}
# ComfyUI asks the scheduler for one step more and drops the last nonzero σ for these
DISCARD_PENULTIMATE = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")


def comfy_sampler(sampler: str, scheduler: str, steps: int, *, schedule: Schedule, denoise: float = 1.0,
                  scheduler_options: Optional[dict] = None, **options) -> Sampler:
    """The :class:`gradguide.Sampler` of ComfyUI's ``KSampler(sampler, scheduler, steps, denoise)``
    for ``schedule`` (a discrete ε/v schedule): its σ list (:func:`gradguide.comfy_sigmas`, with
    ComfyUI's extra step for ``dpm_2``/``dpm_2_ancestral`` and its ``denoise`` slicing) and the
    gradguide sampler and options that reproduce the named sampler. ``options`` are passed on
    (e.g. ``eta``, ``s_noise``, ``noise_sampler``); ``sa_solver``'s noise window defaults to
    ComfyUI's, ``percent_to_sigma`` of 0.2 and 0.8. Sample with ``schedule=gg.comfy_schedule(schedule)``
    (ComfyUI's σ → timestep rule) and ``x_T=gg.comfy_initial_noise(noise, sampler.sigmas, schedule)``."""
    if sampler in COMFY_REFUSED:
        raise ValueError(f"sampler: ComfyUI's {sampler!r} is not available: {COMFY_REFUSED[sampler]}")
    if sampler not in COMFY_SAMPLERS:
        raise ValueError(f"sampler: expected a ComfyUI sampler name ({', '.join(sorted(COMFY_SAMPLERS))}), "
                         f"got {sampler!r}")
    if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
        raise ValueError(f"denoise: expected a number in (0, 1], got {denoise!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    scheduler_options = dict(scheduler_options or {})

    def calculate(n: int) -> torch.Tensor:
        if sampler in DISCARD_PENULTIMATE:
            sig = comfy_sigmas(schedule, scheduler, n + 1, **scheduler_options)
            return torch.cat([sig[:-2], sig[-1:]])
        return comfy_sigmas(schedule, scheduler, n, **scheduler_options)
    if denoise > 0.9999:
        sigmas = calculate(steps)
    else:   # ComfyUI: the last steps + 1 σ's of a longer schedule
        sigmas = calculate(int(steps / denoise))[-(steps + 1):]
    name, fixed = COMFY_SAMPLERS[sampler]
    options = {**fixed, **options}
    if name == "dpm_fast":   # ComfyUI: σ_max = σ_0, σ_min = the last nonzero σ, n = the number of steps
        last = sigmas[-1] if float(sigmas[-1]) > 0 else sigmas[-2]
        options.setdefault("nfe", len(sigmas) - 1)
        sigmas = torch.stack([sigmas[0], last])
    if name in ("sa_solver", "sa_solver_pece") and "sde_sigmas" not in options:
        options["sde_sigmas"] = (comfy_percent_to_sigma(schedule, 0.2), comfy_percent_to_sigma(schedule, 0.8))
    return Sampler(name, sigmas=sigmas, **options)


def comfy_initial_noise(noise: torch.Tensor, sigmas, schedule: Schedule) -> torch.Tensor:
    """The ``x_T`` that starts gradguide where ComfyUI starts from ``noise``: ComfyUI's latent is
    ``√(1 + σ_0²) · noise`` when σ_0 is the schedule's σ_max (a full denoise) and ``σ_0 · noise``
    otherwise; gradguide's is ``σ_0 · x_T``."""
    s0 = float(torch.as_tensor(sigmas)[0])
    smax = float(schedule.sigmas.to(torch.float32)[-1])
    full = math.isclose(smax, s0, rel_tol=1e-5) or s0 > smax
    return noise * (math.sqrt(1 + s0 * s0) / s0) if full else noise
