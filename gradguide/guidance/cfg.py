"""Classifier-free guidance and its relatives that combine two branches linearly.

Convention (diffusers'): ``ε̃ = ε_u + w (ε_c − ε_u)``, ``w = 1`` is the conditional model.
Ho & Salimans' ``w'`` is ``w − 1``.

The unconditional branch is the model called with ``uncond``: ``None`` (default) calls
``model(x_t, t)`` with no conditioning inputs; a dict calls ``model(x_t, t, **uncond)``; a
callable maps the ``cond`` dict to the unconditional one.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

from ..linear import LinComb
from .base import GuidanceTerm, StepContext, check_number, safe_div


class _TwoBranch(GuidanceTerm):
    place = "branches"
    needs_cond = True

    def __init__(self, scale: float, uncond: Optional[Union[dict, Callable]] = None):
        self.scale = check_number("scale", scale, owner=type(self).__name__)
        if uncond is not None and not isinstance(uncond, dict) and not callable(uncond):
            raise TypeError(f"{type(self).__name__}: uncond: expected None, a dict or a callable, "
                            f"got {type(uncond).__name__}")
        self.uncond = uncond

    def uncond_inputs(self, cond: dict) -> dict:
        if self.uncond is None:
            return {}
        if isinstance(self.uncond, dict):
            return dict(self.uncond)
        return dict(self.uncond(cond))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class CFG(_TwoBranch):
    """Classifier-free guidance (Ho & Salimans 2022): ``ε̃ = ε_u + w (ε_c − ε_u)``."""
    name = "cfg"

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        return eps_u + (eps_c - eps_u) * self.scale, None


class CFGZeroStar(_TwoBranch):
    """CFG-Zero* (Fan et al. 2025): scale the unconditional branch by the per-sample
    ``s* = <ε_c, ε_u>/‖ε_u‖²`` first: ``ε̃ = s* ε_u + w (ε_c − s* ε_u)``. The first
    ``zero_init_steps`` steps output zero (the paper's zero-init, meant for flow/velocity
    models)."""
    name = "cfg-zero*"

    def __init__(self, scale: float, zero_init_steps: int = 0, uncond=None):
        super().__init__(scale, uncond)
        if not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"CFGZeroStar: zero_init_steps: expected an integer >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps

    def variant(self, index: int):
        return index < self.zero_init_steps

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        ops = ctx.ops
        s_star = safe_div(ops.dot(eps_c, eps_u), ops.norm2(eps_u))
        scaled_u = eps_u * s_star
        out = scaled_u + (eps_c - scaled_u) * self.scale
        if self.variant(ctx.index):  # host-side step count, not a tensor value
            out = out * 0.0
        return out, None


class CFGPlusPlus(_TwoBranch):
    """CFG++ (Chung et al. 2024): ``ε_λ = ε_u + λ (ε_c − ε_u)``, λ ∈ [0, 1], for the
    prediction ``x̂_0``; the step re-noises with ``ε_u`` instead of ``ε_λ``."""
    name = "cfg++"

    def __init__(self, scale: float, uncond=None):
        super().__init__(scale, uncond)
        check_number("scale", scale, 0.0, 1.0, owner="CFGPlusPlus")

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        return eps_u + (eps_c - eps_u) * self.scale, eps_u
