"""Tangential CFG (TCFG, Kwon et al. 2025) and MAMBO-G (magnitude-aware guidance): two
per-sample rules on the branches that need only the 2 × 2 Gram matrix of ``p_c`` and ``p_u``.

**TCFG.** diffusers stacks ``A = [p_c; p_u]`` (2 × N per sample), takes its SVD
``A = U S Vᵀ`` and replaces ``p_u`` by its projection onto the first right singular vector
``v₁``; then CFG: ``p_u' + w (p_c − p_u')`` (or ``p_c + w (p_c − p_u')``).
``v₁ = Aᵀ e / s₁`` where ``e`` is the unit principal eigenvector of the Gram
``G = A Aᵀ = [[a, b], [b, d]]`` (``a = ‖p_c‖²``, ``b = <p_c, p_u>``, ``d = ‖p_u‖²``) and
``s₁² = λ₁`` its eigenvalue. So ``<p_u, v₁> = (G e)₁ / s₁ = s₁ e₁`` (indices 0, 1) and
``p_u' = <p_u, v₁> v₁ = e₁ (e₀ p_c + e₁ p_u)``: a combination of the two branches whose
coefficients depend on ``e`` only (its sign cancels). With ``e = (cos θ, sin θ)``,
``r = √((a − d)² + 4b²)``, ``cos 2θ = (a − d)/r`` and ``sin 2θ = 2b/r``, so
``p_u' = (sin 2θ / 2) p_c + ((1 − cos 2θ)/2) p_u``. Where ``r = 0`` (``G`` a multiple of the
identity: both branches zero, or orthogonal with equal norms) the principal direction is not
defined (diffusers' SVD returns whatever LAPACK picks); gradguide takes ``v₁ ∝ p_u`` there
(``p_u' = p_u``: plain CFG). diffusers computes the SVD in float32; gradguide in float64 from
the Gram matrix (the same up to float32 rounding).

**MAMBO-G.** ``r = ‖p_c − p_u‖ / ‖p_u‖`` per sample; the weight is
``1 + (w − 1) e^{−α r}`` (diffusers convention) or ``w e^{−α r}`` (original), applied as CFG.
Where ``‖p_u‖ = 0`` the ratio is infinite: the weight is its α > 0 limit (``e^{−α r} = 0``;
diffusers divides by zero there and returns NaN for α = 0).
"""
from __future__ import annotations

from ..linear import LinComb
from .base import StepContext, check_number
from .window import DiffusersGuider


class TCFG(DiffusersGuider):
    """Tangential classifier-free guidance: diffusers'
    ``TangentialClassifierFreeGuidance(guidance_scale=scale, guidance_rescale=..., start=..., stop=...)``
    (``convention="diffusers-original"`` ↔ ``use_original_formulation=True``), on the model's raw
    output. The projection is a coefficient program: the step's reduce gives the Gram entries,
    and the result is one combination of the two branches (no extra pass over the data)."""
    name = "tcfg"

    def __init__(self, scale: float = 7.5, *, guidance_rescale: float = 0.0, start: float = 0.0,
                 stop: float = 1.0, uncond=None, convention: str = "diffusers"):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond,
                         convention=convention)

    def guide(self, ctx: StepContext, p_c: LinComb, p_u: LinComb) -> LinComb:
        return ctx.ops.policy("tcfg", cond=p_c, uncond=p_u, scale=self.scale, original=float(self.original))


class MamboG(DiffusersGuider):
    """MAMBO-G (magnitude-aware mitigation for boosted guidance): diffusers'
    ``MagnitudeAwareGuidance(guidance_scale=scale, alpha=alpha, ...)``: CFG whose weight decays
    with the relative size of the branch difference, ``1 + (w − 1) exp(−α ‖p_c − p_u‖/‖p_u‖)``
    (``"diffusers-original"``: ``w exp(−α ...)`` anchored at ``p_c``)."""
    name = "mambo-g"

    def __init__(self, scale: float = 10.0, alpha: float = 8.0, *, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, uncond=None, convention: str = "diffusers"):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond,
                         convention=convention)
        self.alpha = check_number("alpha", alpha, 0.0, owner="MamboG")

    def guide(self, ctx: StepContext, p_c: LinComb, p_u: LinComb) -> LinComb:
        return ctx.ops.policy("mambo", cond=p_c, uncond=p_u, scale=self.scale, alpha=self.alpha,
                              original=float(self.original))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", alpha={self.alpha})"
