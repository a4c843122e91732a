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
from .base import StepContext, check_number
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
        paper = self.convention == "paper"
        if paper:
            d_c, d_u = ctx.x0_of_eps(eps_c), ctx.x0_of_eps(eps_u)
        else:
            d_c, d_u = ctx.output_of_eps(eps_c), ctx.output_of_eps(eps_u)
        anchor_u = d_u
        if self.momentum != 0.0:
            running = (d_c - d_u) + ops.add("apg_running", ctx.state["apg_running"]) * self.momentum
            ctx.new_state["apg_running"] = ops.combine(running)
            d_u = d_c - running   # the program's Δ = d_c − d_u is then the running Δ
        # the program's output is base + d_c + (scale − 1)·update: the paper's with the paper's
        # weight; diffusers' anchor + w·update with scale = w + 1 (and base = d_u − d_c for its
        # anchor d_u). An infinite threshold never clips, as 0 does (a fused program's inputs
        # must be finite, gradguide.ops.policies)
        threshold = 0.0 if math.isinf(self.norm_threshold) else self.norm_threshold
        base = None if paper or self.convention == "diffusers-original" else anchor_u - d_c
        scale = self.scale if paper else self.scale + 1.0
        out = ops.policy("apg", d_cond=d_c, d_uncond=d_u, scale=scale, eta=self.eta, norm_threshold=threshold,
                         **({} if base is None else {"base": base}))
        return (ctx.eps_of_x0(out) if paper else ctx.eps_of_output(out)), None

    def __repr__(self) -> str:
        return (f"APG(scale={self.scale}, eta={self.eta}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, convention={self.convention!r})")
