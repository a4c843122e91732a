"""Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules ... are flawed", §3.4).

``x_cfg = x_u + w (x_c − x_u)``, ``x = φ x_cfg std(x_c)/std(x_cfg) + (1 − φ) x_cfg`` with the
standard deviation per sample over all non-batch elements (unbiased, as diffusers'
``rescale_noise_cfg``), computed from the step's sums and Gram entries.
"""
from __future__ import annotations

from ..linear import LinComb
from .base import StepContext, check_number, safe_div
from .cfg import _TwoBranch


def _std(ops, u: LinComb):
    n = ops.numel()
    total = ops.total(u)
    var = (ops.norm2(u) - total * total / n) / max(n - 1, 1)
    return var.clamp_min(0).sqrt()


class Rescale(_TwoBranch):
    """CFG followed by guidance rescale with factor ``phi`` (diffusers' guidance_rescale)."""
    name = "rescale"

    def __init__(self, scale: float, phi: float = 0.7, uncond=None):
        super().__init__(scale, uncond)
        self.phi = check_number("phi", phi, 0.0, 1.0, owner="Rescale")

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        ops = ctx.ops
        cfg = eps_u + (eps_c - eps_u) * self.scale
        ratio = safe_div(_std(ops, eps_c), _std(ops, cfg))
        ratio = ratio.where(_std(ops, cfg) > 0, ratio.new_ones(()))
        return cfg * (ratio * self.phi + (1.0 - self.phi)), None
