"""Adaptive projected guidance (Sadat et al., ICLR 2025).

``Δ = D_c − D_u``; optional momentum ``Δ ← Δ + β Δ_run`` (β < 0, ``Δ_run`` carried between
steps); norm clip ``Δ ← Δ min(1, r/‖Δ‖)`` per sample; ``Δ_∥ = (<Δ, D_c>/‖D_c‖²) D_c``,
``Δ_⊥ = Δ − Δ_∥``; every quantity is a per-sample function of inner products.

Conventions (``convention=``, see :mod:`gradguide.guidance.cfg`):

- ``"paper"`` (default): ``D`` is x̂_0 (the paper's denoiser output), output
  ``D_c + (w − 1)(Δ_⊥ + η Δ_∥)``, η = 0 by default.
- ``"diffusers"``: diffusers' ``AdaptiveProjectedGuidance(guidance_scale=w)``: ``D`` is the
  raw model output (ε, v or x̂_0), output ``D_u + w (Δ_⊥ + η Δ_∥)``, η = 1 by default (with
  η = 1 and no clip this is plain CFG); at ``w = 1`` diffusers switches guidance off and
  returns ``D_c`` (momentum not updated), and so does this.
- ``"diffusers-original"``: the same guider with ``use_original_formulation=True``:
  ``D_c + w (Δ_⊥ + η Δ_∥)`` on the raw output (off at ``w = 0``). For an x̂_0 model this is the
  paper's APG with weight ``w + 1``.
"""
from __future__ import annotations

import math

from ..linear import LinComb
from .base import StepContext, check_number, safe_div
from .cfg import _TwoBranch, check_convention


class APG(_TwoBranch):
    """Adaptive projected guidance. ``eta=None`` takes the convention's default (paper: 0,
    diffusers: 1); no momentum and norm threshold r = 15 (diffusers' default) otherwise.
    ``momentum`` m ↔ diffusers' ``adaptive_projected_guidance_momentum`` (0 ↔ None),
    ``norm_threshold`` ↔ ``adaptive_projected_guidance_rescale``."""
    name = "apg"

    def __init__(self, scale: float, eta=None, momentum: float = 0.0,
                 norm_threshold: float = 15.0, uncond=None, convention: str = "paper"):
        super().__init__(scale, uncond)
        self.convention = check_convention(convention, "APG")
        if eta is None:
            eta = 0.0 if convention == "paper" else 1.0
        self.eta = check_number("eta", eta, owner="APG")
        self.momentum = check_number("momentum", momentum, owner="APG")
        self.norm_threshold = check_number("norm_threshold", norm_threshold, 0.0, owner="APG",
                                           allow_inf=True)  # inf: no norm clipping

    def initial_state(self, x):
        return {"apg_running": x.new_zeros(x.shape)} if self.momentum != 0.0 else {}

    def _off(self) -> bool:
        """diffusers' guider returns the conditional prediction where its formula is CFG's identity."""
        if self.convention == "paper":
            return False
        return math.isclose(self.scale, 0.0 if self.convention == "diffusers-original" else 1.0)

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        if self._off():
            return eps_c, None
        ops = ctx.ops
        if self.convention == "paper":
            d_c, d_u = ctx.x0_of_eps(eps_c), ctx.x0_of_eps(eps_u)
        else:
            d_c, d_u = ctx.output_of_eps(eps_c), ctx.output_of_eps(eps_u)
        delta = d_c - d_u
        if self.momentum != 0.0:
            delta = delta + ops.add("apg_running", ctx.state["apg_running"]) * self.momentum
            ctx.new_state["apg_running"] = ops.combine(delta)
        if self.norm_threshold > 0:
            norm = ops.norm2(delta).sqrt()
            factor = safe_div(norm.new_full(norm.shape, self.norm_threshold), norm).clamp(max=1.0)
            factor = factor.where(norm > 0, norm.new_ones(()))
            delta = delta * factor
        parallel = d_c * safe_div(ops.dot(delta, d_c), ops.norm2(d_c))
        update = (delta - parallel) + parallel * self.eta
        if self.convention == "paper":
            return ctx.eps_of_x0(d_c + update * (self.scale - 1.0)), None
        anchor = d_u if self.convention == "diffusers" else d_c
        return ctx.eps_of_output(anchor + update * self.scale), None

    def __repr__(self) -> str:
        return (f"APG(scale={self.scale}, eta={self.eta}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, convention={self.convention!r})")
