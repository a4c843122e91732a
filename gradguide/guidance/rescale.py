"""Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules ... are flawed", §3.4).

``x_cfg = x_u + w (x_c − x_u)``, ``x = φ x_cfg std(x_c)/std(x_cfg) + (1 − φ) x_cfg`` with the
standard deviation per sample over all non-batch elements (unbiased, as Lin et al.'s code and
diffusers' ``rescale_noise_cfg``), computed from the step's sums and Gram entries.

``x`` is the model's own prediction — v for a v model, as Lin et al. (who trained v models)
and diffusers do; ε for an ε model, x̂_0 for an x̂_0 model. Rescaling is not affine, so the
choice matters: rescaling ε̂ of a v model differs by O(1).

Conventions (see :mod:`gradguide.guidance.cfg`): ``"paper"`` (default) and ``"diffusers"``
are the same rule (Lin et al.'s, which is diffusers' ``guidance_rescale``, with
``guidance_scale = w``); ``"diffusers-original"`` is diffusers' guider with
``use_original_formulation=True``: ``x_cfg = x_c + w (x_c − x_u)``.
"""
from __future__ import annotations

from ..linear import LinComb
from ..ops.policies import safe_div
from .base import StepContext, check_number
from .cfg import _TwoBranch, check_convention


def _std(ops, u: LinComb):
    n = ops.numel()
    total = ops.total(u)
    var = (ops.norm2(u) - total * total / n) / max(n - 1, 1)
    return var.clamp_min(0).sqrt()


class Rescale(_TwoBranch):
    """CFG followed by guidance rescale with factor ``phi`` (diffusers' guidance_rescale), on
    the model's own prediction."""
    name = "rescale"

    def __init__(self, scale: float, phi: float = 0.7, uncond=None, convention: str = "paper"):
        super().__init__(scale, uncond)
        self.convention = check_convention(convention, "Rescale")
        self.phi = check_number("phi", phi, 0.0, 1.0, owner="Rescale")
        if convention == "diffusers-original":
            self.scale += 1.0   # x_c + w (x_c − x_u) = x_u + (w + 1)(x_c − x_u)

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        ops = ctx.ops
        p_c, p_u = ctx.output_of_eps(eps_c), ctx.output_of_eps(eps_u)
        cfg = p_u + (p_c - p_u) * self.scale
        std_cfg = _std(ops, cfg)
        ratio = safe_div(_std(ops, p_c), std_cfg).where(std_cfg > 0, std_cfg.new_ones(()))
        return ctx.eps_of_output(cfg * (ratio * self.phi + (1.0 - self.phi))), None

    def __repr__(self) -> str:
        return f"Rescale(scale={self.scale}, phi={self.phi})"
