"""Adaptive projected guidance (Sadat et al., ICLR 2025), on the denoised predictions.

``Δ = D_c − D_u``; optional momentum ``Δ ← Δ + β Δ_run`` (β < 0, ``Δ_run`` carried between
steps); norm clip ``Δ ← Δ min(1, r/‖Δ‖)`` per sample; ``Δ_∥ = (<Δ, D_c>/‖D_c‖²) D_c``,
``Δ_⊥ = Δ − Δ_∥``; output ``D_c + (w − 1)(Δ_⊥ + η Δ_∥)``. ``D`` is ``x̂_0`` (the paper's
denoiser output); every quantity is a per-sample function of inner products.
"""
from __future__ import annotations

from ..linear import LinComb
from .base import StepContext, check_number, safe_div
from .cfg import _TwoBranch


class APG(_TwoBranch):
    """Adaptive projected guidance. Defaults follow the paper: η = 0, no momentum,
    norm threshold r = 15 (diffusers' default)."""
    name = "apg"

    def __init__(self, scale: float, eta: float = 0.0, momentum: float = 0.0,
                 norm_threshold: float = 15.0, uncond=None):
        super().__init__(scale, uncond)
        self.eta = check_number("eta", eta, owner="APG")
        self.momentum = check_number("momentum", momentum, owner="APG")
        self.norm_threshold = check_number("norm_threshold", norm_threshold, 0.0, owner="APG",
                                           allow_inf=True)  # inf: no norm clipping

    def initial_state(self, x):
        return {"apg_running": x.new_zeros(x.shape)} if self.momentum != 0.0 else {}

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        ops = ctx.ops
        d_c, d_u = ctx.x0_of_eps(eps_c), ctx.x0_of_eps(eps_u)
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
        orthogonal = delta - parallel
        out = d_c + (orthogonal + parallel * self.eta) * (self.scale - 1.0)
        return ctx.eps_of_x0(out), None
