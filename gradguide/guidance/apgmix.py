"""CFG, then APG: diffusers' ``AdaptiveProjectedMixGuidance`` (HunyuanImage 2.1's guider).

At step ``i`` (of ``N``), on the model's raw output ``p``:

- off (outside ``int(start·N) <= i < int(stop·N)``, or ``scale`` CFG's identity): ``p_c``; the
  momentum buffer is left as it is;
- CFG phase (``i <= apg_start_step``): ``p_u + w Δ`` with ``Δ = p_c − p_u`` (``p_c + w Δ``
  original); the buffer still accumulates ``Δ_run ← Δ + m Δ_run``;
- APG phase (``i > apg_start_step``, and ``apg_scale`` not APG's identity; otherwise the CFG
  phase goes on): ``Δ_run ← Δ + m Δ_run``, ``Δ = Δ_run`` (no momentum: ``Δ = p_c − p_u``),
  clipped to norm ``norm_threshold`` if it is > 0, split along ``p_c`` into ``Δ_∥ + Δ_⊥``;
  output ``p_u + w_apg (Δ_⊥ + η Δ_∥)`` (``p_c + ...`` original).

The buffer starts at zero with the run (diffusers resets it at step 0) and is carried between
steps as APG's momentum is (one materialised tensor per step). Everything else is per-sample
inner-product algebra on the step's Gram matrix. Defaults are diffusers':
``scale=3.5, apg_scale=10, momentum=-0.5, norm_threshold=10, eta=0, apg_start_step=5``.
"""
from __future__ import annotations

import math

from ..linear import LinComb
from ..ops import policies
from .base import StepContext, check_number
from .window import DiffusersGuider


class APGMix(DiffusersGuider):
    """diffusers' ``AdaptiveProjectedMixGuidance``: ``scale`` ↔ ``guidance_scale``,
    ``apg_scale`` ↔ ``adaptive_projected_guidance_scale``, ``momentum`` ↔
    ``adaptive_projected_guidance_momentum`` (``None`` or 0: none), ``norm_threshold`` ↔
    ``adaptive_projected_guidance_rescale``, ``apg_start_step`` ↔
    ``adaptive_projected_guidance_start_step`` (a step index, not a fraction)."""
    name = "apg-mix"

    def __init__(self, scale: float = 3.5, apg_scale: float = 10.0, *, momentum=-0.5, norm_threshold: float = 10.0,
                 eta: float = 0.0, apg_start_step: int = 5, guidance_rescale: float = 0.0, start: float = 0.0,
                 stop: float = 1.0, uncond=None, convention: str = "diffusers"):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond,
                         convention=convention)
        self.apg_scale = check_number("apg_scale", apg_scale, owner="APGMix")
        self.momentum = 0.0 if momentum is None else check_number("momentum", momentum, owner="APGMix")
        self.norm_threshold = check_number("norm_threshold", norm_threshold, 0.0, owner="APGMix", allow_inf=True)
        self.eta = check_number("eta", eta, owner="APGMix")
        if isinstance(apg_start_step, bool) or not isinstance(apg_start_step, int):
            raise TypeError(f"APGMix: apg_start_step: expected an integer step index, got {apg_start_step!r}")
        self.apg_start_step = apg_start_step

    def initial_state(self, x):
        return {"apgmix_running": x.new_zeros(x.shape)} if self.momentum != 0.0 else {}

    def phase(self, index: int) -> str:
        if not self.on(index):
            return "off"
        if index > self.apg_start_step and not math.isclose(self.apg_scale, 0.0 if self.original else 1.0):
            return "apg"
        return "cfg"

    def variant(self, index: int):
        return self.phase(index)

    def guide(self, ctx: StepContext, p_c: LinComb, p_u: LinComb) -> LinComb:
        ops = ctx.ops
        delta = p_c - p_u
        phase = self.phase(ctx.index)
        if self.momentum != 0.0:
            running = delta + ops.add("apgmix_running", ctx.state["apgmix_running"]) * self.momentum
            ctx.new_state["apgmix_running"] = ops.combine(running)
            if phase == "apg":
                delta = running
        if phase == "cfg":
            return self.anchor(p_c, p_u) + (p_c - p_u) * self.scale
        update = policies.apg_update(ops.algebra(), p_c, delta, self.norm_threshold, self.eta)
        return self.anchor(p_c, p_u) + update * self.apg_scale

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", apg_scale={self.apg_scale}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, eta={self.eta}, apg_start_step={self.apg_start_step})")
