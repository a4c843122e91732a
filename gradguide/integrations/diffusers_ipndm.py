"""diffusers' ``IPNDMScheduler`` as a gradguide schedule (:class:`IPNDMSchedule`).

``IPNDMScheduler`` has no ``alphas_cumprod``: for ``n`` steps it sets, in float32,
``s_k = linspace(1, 0, n + 1)`` (the last exactly 0), ``σ_k = sin²(π s_k / 2)`` (its ``betas``),
``α_k = √(1 − σ_k²)`` (its ``alphas``) and calls the model at ``t_k = atan2(σ_k, α_k) · 2/π``, the
time of a model trained with ``α(t) = cos(πt/2)``, ``σ(t) = sin(πt/2)`` on ``t ∈ [0, 1]`` (Dance
Diffusion's). Since ``α_k² + σ_k² = 1`` the sample is variance preserving with ``ᾱ_k = 1 − σ_k²``:
gradguide runs it on these timesteps, ᾱ_0 = 0 (σ = ∞) first, clean data last. The step is
:func:`gradguide.samplers.pndm.ipndm_tables` (sampler ``ipndm_diffusers``), the model's output read
as a v. With ``trained_betas`` diffusers reads them as the σ_k of the steps themselves: the step
count is then ``len(trained_betas) − 1`` whatever ``num_inference_steps``.
"""
from __future__ import annotations

import math

import torch

from ..config import Sampler
from ..schedules import Schedule, Timesteps


class IPNDMSchedule(Schedule):
    """The timesteps of a diffusers ``IPNDMScheduler`` (module docstring). Its ``alphas_cumprod``
    (the base class's training table) is ``cos²(π/2 · j/(T − 1))`` for ``j = 0..T−1``, for anything
    that reads a table; sampling reads only :meth:`timesteps`, which are continuous (``t ∈ [0, 1]``)."""

    def __init__(self, num_train_timesteps: int = 1000, trained_betas=None):
        T = int(num_train_timesteps)
        grid = torch.linspace(0, 1, T, dtype=torch.float64)
        abar = torch.cos(grid * math.pi / 2) ** 2
        abar[-1] = 0.0
        super().__init__(abar)
        self.trained_betas = None if trained_betas is None else torch.as_tensor(trained_betas, dtype=torch.float32)
        self.sampler_config = Sampler("ipndm_diffusers", prediction="v", clip=False)   # diffusers never clips here
        self._cache = {}

    def __repr__(self) -> str:
        return f"IPNDMSchedule(trained_betas={'set' if self.trained_betas is not None else None})"

    def timesteps(self, steps=None, spacing: str = "adm", steps_offset: int = 0) -> Timesteps:
        """``set_timesteps(steps)`` of diffusers' ``IPNDMScheduler``, value for value (float32)."""
        if spacing != "adm" or steps_offset:
            raise ValueError(f"spacing: IPNDMScheduler spaces its own steps (sin² of a linspace); got "
                             f"spacing={spacing!r}, steps_offset={steps_offset!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: IPNDMScheduler takes a step count (a positive integer), got {steps!r}")
        if steps not in self._cache:
            if self.trained_betas is not None:
                sigma = self.trained_betas
                if sigma.numel() != steps + 1:
                    raise ValueError(f"steps: diffusers' IPNDMScheduler with trained_betas reads them as the σ of each "
                                     f"step: {sigma.numel()} values make {sigma.numel() - 1} steps, whatever "
                                     f"num_inference_steps; pass steps={sigma.numel() - 1}")
            else:
                s = torch.cat([torch.linspace(1, 0, steps + 1)[:-1], torch.tensor([0.0])])
                sigma = torch.sin(s * math.pi / 2) ** 2
            alpha = (1.0 - sigma ** 2) ** 0.5
            t = (torch.atan2(sigma, alpha) / math.pi * 2)[:-1]
            # ᾱ from σ, not α: in float32 α rounds to 1 where σ² < 2⁻²⁴ (n ≳ 80 steps), which would leave no
            # σ to read the model's output with; 1 − σ² keeps it (α then differs from diffusers' by < 1e-7)
            abar = 1 - sigma.to(torch.float64) ** 2
            if not (torch.isfinite(abar).all() and (abar[1:] > 0).all() and (abar[1:] >= abar[:-1]).all()):
                raise ValueError("trained_betas: expected σ's in [0, 1], decreasing (ᾱ = 1 − σ² growing)")
            self._cache[steps] = Timesteps(t.to(torch.float64), abar[:-1], abar[1:])
        return self._cache[steps]


def ipndm_schedule(scheduler) -> IPNDMSchedule:
    config = scheduler.config
    return IPNDMSchedule(config.get("num_train_timesteps", 1000), config.get("trained_betas"))
