"""Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024).

CFG whose weight is ``w`` only while the step's noise level lies in ``(σ_low, σ_high]`` and 1
(the conditional model) elsewhere: ``ε̃ = ε_u + w(σ)(ε_c − ε_u)``. The paper finds guidance
harmful at high noise (it pulls samples toward few modes) and unnecessary at low noise; the
interval keeps it where it helps. ``σ = √((1 − ᾱ_t)/ᾱ_t)`` is the step's EDM noise level (for
a flow model at flow time ``σ_f`` it is ``σ_f/(1 − σ_f)``).

The weight is a per-step number computed from the step's own scalars, not a host-side choice,
so the fused step holds it in its table like any other weight.
"""
from __future__ import annotations

import torch

from ..linear import LinComb
from .base import StepContext, check_number
from .cfg import _TwoBranch


class GuidanceInterval(_TwoBranch):
    """CFG with weight ``scale`` (diffusers' ``w``) for ``sigma_low < σ <= sigma_high``, and the
    conditional model elsewhere. The interval has no default: the paper tunes it per model
    (``sigma_high=inf`` leaves it open above)."""
    name = "guidance-interval"

    def __init__(self, scale: float, sigma_low: float, sigma_high: float, uncond=None):
        super().__init__(scale, uncond)
        self.sigma_low = check_number("sigma_low", sigma_low, 0.0, owner="GuidanceInterval")
        self.sigma_high = check_number("sigma_high", sigma_high, 0.0, owner="GuidanceInterval", allow_inf=True)
        if self.sigma_high <= self.sigma_low:
            raise ValueError(f"GuidanceInterval: sigma_high: expected a value above sigma_low = {self.sigma_low}, "
                             f"got {self.sigma_high}")

    def weight(self, ctx: StepContext) -> torch.Tensor:
        """``w(σ)`` of this step (a tensor: one value per step, or per traced step)."""
        sigma = ctx.s / ctx.a
        inside = (sigma > self.sigma_low) & (sigma <= self.sigma_high)
        return torch.where(inside, torch.full_like(sigma, self.scale), torch.ones_like(sigma))

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        return eps_u + (eps_c - eps_u) * self.weight(ctx), None

    def __repr__(self) -> str:
        return f"GuidanceInterval(scale={self.scale}, sigma_low={self.sigma_low}, sigma_high={self.sigma_high})"
