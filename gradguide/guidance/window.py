"""What diffusers' guiders share: a step window, an on/off rule, guidance rescale, conventions.

The guiders that came with diffusers' modular pipelines (TCFG, MAMBO-G, the APG/CFG mix,
FDG) are each a per-sample rule on the two branches of the model's raw output ``p`` (ε, v,
x̂_0 or a flow velocity: whatever the model predicts). Around the rule they all do the same:

- **Window.** With ``N`` steps, guidance is on at step ``i`` when
  ``int(start·N) <= i < int(stop·N)`` (diffusers' ``start`` / ``stop`` fractions, truncated as
  diffusers truncates them); outside, and where the scale makes the rule the identity (``w = 1``,
  or ``w = 0`` with ``use_original_formulation``), the output is ``p_c``. gradguide still
  evaluates both branches in those steps (the unconditional half of the batched call is wasted
  there; diffusers skips it).
- **Rescale.** ``guidance_rescale = φ > 0`` applies Lin et al.'s rescale to the result against
  ``p_c`` (diffusers' ``rescale_noise_cfg``; per-sample unbiased standard deviations from the
  step's sums and Gram matrix, ratio 1 where the guided output is constant).
- **Conventions.** ``"diffusers"`` (default): the result is anchored at the unconditional
  branch (``p_u + w·shift``); ``"diffusers-original"``: diffusers' ``use_original_formulation``
  (``p_c + w·shift``). These guiders have no separate paper convention in gradguide; ``"paper"``
  is refused by name.

``N`` is the run's number of timesteps, which ``sample`` hands to the bound term
(:meth:`~gradguide.guidance.base.GuidanceTerm.for_steps`); ``i`` counts from 0 as diffusers'
``set_state(step=i, ...)`` does in a one-evaluation-per-step loop.
"""
from __future__ import annotations

import copy
import math

from ..linear import LinComb
from ..ops.policies import safe_div
from .base import StepContext, check_number
from .cfg import _TwoBranch
from .rescale import _std

GUIDER_CONVENTIONS = ("diffusers", "diffusers-original")


def check_fraction(name: str, value, owner: str) -> float:
    return check_number(name, value, 0.0, 1.0, owner=owner)


def window_open(start: float, stop: float, steps, index: int) -> bool:
    """diffusers' ``int(start·N) <= i < int(stop·N)`` (always on when ``N`` is unknown)."""
    if steps is None:
        return True
    return int(start * steps) <= index < int(stop * steps)


def rescale_against(ops, pred: LinComb, p_c: LinComb, phi: float) -> LinComb:
    """diffusers' ``rescale_noise_cfg(pred, p_c, φ)``: ``pred (φ std(p_c)/std(pred) + 1 − φ)``."""
    std_pred = _std(ops, pred)
    ratio = safe_div(_std(ops, p_c), std_pred).where(std_pred > 0, std_pred.new_ones(()))
    return pred * (ratio * phi + (1.0 - phi))


class DiffusersGuider(_TwoBranch):
    """Base of the window / rescale / convention handling above; subclasses write
    :meth:`guide` (the rule on the raw outputs while guidance is on)."""

    def __init__(self, scale: float, *, start: float = 0.0, stop: float = 1.0, guidance_rescale: float = 0.0,
                 uncond=None, convention: str = "diffusers"):
        super().__init__(scale, uncond)
        owner = type(self).__name__
        if convention not in GUIDER_CONVENTIONS:
            raise ValueError(f"{owner}: convention: expected one of {GUIDER_CONVENTIONS} (this guider is "
                             f"diffusers'; it has no separate paper convention in gradguide), got {convention!r}")
        self.convention = convention
        self.start = check_fraction("start", start, owner)
        self.stop = check_fraction("stop", stop, owner)
        self.guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, owner=owner)
        self.steps = None

    def for_steps(self, steps: int) -> "DiffusersGuider":
        bound = copy.copy(self)
        bound.steps = int(steps)
        return bound

    @property
    def original(self) -> bool:
        return self.convention == "diffusers-original"

    def identity_scale(self, scale: float) -> bool:
        """Where diffusers switches the guider off: its formula would return ``p_c`` anyway."""
        return math.isclose(scale, 0.0 if self.original else 1.0)

    def on(self, index: int) -> bool:
        return window_open(self.start, self.stop, self.steps, index) and not self.identity_scale(self.scale)

    def variant(self, index: int):
        return self.on(index)

    def anchor(self, p_c: LinComb, p_u: LinComb) -> LinComb:
        return p_c if self.original else p_u

    def guide(self, ctx: StepContext, p_c: LinComb, p_u: LinComb) -> LinComb:
        """The guided prediction from the two branches' (each subclass's formula)."""
        raise NotImplementedError(f"{type(self).__name__}.guide: each windowed guider defines its combination")

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        p_c, p_u = ctx.output_of_eps(eps_c), ctx.output_of_eps(eps_u)
        if not self.on(ctx.index):   # host-side step count, not a tensor value
            return eps_c, None       # rescaling p_c against itself is the identity
        pred = self.guide(ctx, p_c, p_u)
        if self.guidance_rescale > 0.0:
            pred = rescale_against(ctx.ops, pred, p_c, self.guidance_rescale)
        return ctx.eps_of_output(pred), None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale}, start={self.start}, stop={self.stop}, "
                f"guidance_rescale={self.guidance_rescale}, convention={self.convention!r})")
