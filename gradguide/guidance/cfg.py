"""Classifier-free guidance and its relatives that combine two branches linearly.

Convention (diffusers'): ``ε̃ = ε_u + w (ε_c − ε_u)``, ``w = 1`` is the conditional model.
Ho & Salimans' ``w'`` is ``w − 1``.

**Conventions.** CFG, CFG-Zero*, APG and Rescale take ``convention=``, which fixes what
``scale`` means, which prediction the rule acts on and the defaults (docs/diffusers.md has
the mapping table, tests/integrations/test_conventions.py a test per row):

- ``"paper"`` — the method's paper (Ho & Salimans: ``ε_c + w'(ε_c − ε_u)``; Sadat et al.'s
  APG on x̂_0; Lin et al.'s rescale on the model's own prediction; CFG-Zero* on ε̂);
- ``"diffusers"`` — diffusers 0.42's guider with ``guidance_scale=scale`` on the raw model
  output (ε, v or x̂_0, whatever the model predicts), with its defaults;
- ``"diffusers-original"`` — the same guider with ``use_original_formulation=True``.

Defaults: ``"paper"`` for APG, CFG-Zero* and Rescale; ``"diffusers"`` for CFG, because docs/mathematics.md
and every CFG weight in gradguide (PixelAsParam policy C's ``w' = w − 1``, the CLI, the
benchmarks) use ``w = 1`` for the conditional model.

The unconditional branch is the model called with ``uncond``: ``None`` (default) calls
``model(x_t, t)`` with no conditioning inputs; a dict calls ``model(x_t, t, **uncond)``; a
callable maps the ``cond`` dict to the unconditional one.

**One model call for both branches.** As diffusers pipelines do, the two branches are
evaluated in one call of batch 2B, ``model(cat[x_t, x_t], cat[t, t], **batched)``, unconditional
rows first, when their inputs can be stacked (:func:`batch_branch_inputs`): the same keys;
tensors with a leading batch dimension B concatenated along dim 0; lists, tuples and dicts
elementwise; ``None`` in both; any other value (numbers, strings, a shared tensor without a
batch dimension) equal in both and passed once. ``Execution(batch_branches=...)`` chooses:
``"auto"`` (default) batches when the inputs stack and calls twice otherwise (e.g. ``uncond=None``
with a non-empty ``cond``); ``True`` requires it (a ``ValueError`` names the input that does not
stack); ``False`` always calls twice (models that cannot take a mixed batch).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from ..linear import LinComb
from ..ops.policies import safe_div
from .base import GuidanceTerm, StepContext, check_number

CONVENTIONS = ("paper", "diffusers", "diffusers-original")


def check_convention(convention, owner: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"{owner}: convention: expected one of {CONVENTIONS}, got {convention!r}")
    return convention


class _TwoBranch(GuidanceTerm):
    place = "branches"
    needs_cond = True
    runtime_attributes = ("uncond",)   # the unconditional branch's model inputs

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


def per_sample(value: torch.Tensor, batch: int) -> bool:
    """The batch rule of model inputs: a tensor with a leading dimension of ``batch`` holds one
    row per sample; any other tensor (a 0-d scalar, or a shared tensor nested in a list or dict)
    is one value for the whole batch. ``sample`` refuses top-level ``cond``/``uncond`` tensors
    that are neither per-sample nor 0-d; the one-call branches concatenate the per-sample ones."""
    return value.dim() >= 1 and value.shape[0] == batch


class BranchInputsError(ValueError):
    """The two branches' model inputs cannot be stacked into one call (the message names the input)."""


def batch_branch_inputs(uncond: dict, cond: dict, batch: int) -> dict:
    """The keyword inputs of one model call of batch ``2 * batch`` evaluating the unconditional
    branch (rows ``[0, B)``) and the conditional one (rows ``[B, 2B)``); raises
    :class:`BranchInputsError` naming the first input that does not stack."""
    if set(uncond) != set(cond):
        only_c, only_u = sorted(set(cond) - set(uncond)), sorted(set(uncond) - set(cond))
        raise BranchInputsError(
            "the branches take different inputs (" + "; ".join(
                part for part in (f"only cond has {only_c}" if only_c else "",
                                  f"only uncond has {only_u}" if only_u else "") if part)
            + "): pass uncond= with the same keys (e.g. the null label or empty-prompt embedding)")
    return {key: _stack(uncond[key], cond[key], batch, f"cond[{key!r}]") for key in cond}


def _stack(u, c, batch: int, where: str):
    if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
        if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)):
            raise BranchInputsError(f"{where}: a tensor in one branch, {type(u if isinstance(c, torch.Tensor) else c).__name__} "
                                    "in the other")
        if per_sample(c, batch):
            if u.shape != c.shape or u.dtype != c.dtype or u.device != c.device:
                raise BranchInputsError(f"{where}: cond is {tuple(c.shape)} {c.dtype} on {c.device}, uncond is "
                                        f"{tuple(u.shape)} {u.dtype} on {u.device}: expected the same shape, dtype "
                                        "and device to concatenate along dim 0")
            return torch.cat([u, c])
        if u is c:   # a shared input without a batch dimension (a 0-d tensor): passed once
            return c
        raise BranchInputsError(f"{where}: shape {tuple(c.shape)} has no leading batch dimension {batch} and "
                                "the branches pass different tensors: cannot stack them")
    if isinstance(c, (list, tuple)) and isinstance(u, (list, tuple)) and type(c) is type(u):
        if len(c) != len(u):
            raise BranchInputsError(f"{where}: {len(c)} items in cond, {len(u)} in uncond")
        return type(c)(_stack(a, b, batch, f"{where}[{j}]") for j, (a, b) in enumerate(zip(u, c)))
    if isinstance(c, dict) and isinstance(u, dict):
        if set(c) != set(u):
            raise BranchInputsError(f"{where}: keys {sorted(c)} in cond, {sorted(u)} in uncond")
        return {k: _stack(u[k], c[k], batch, f"{where}[{k!r}]") for k in c}
    if c is None and u is None:
        return None
    try:
        same = type(c) is type(u) and bool(c == u)
    except Exception:
        same = False
    if not same:
        raise BranchInputsError(f"{where}: {c!r} in cond but {u!r} in uncond: values that are not tensors "
                                "must be equal in both branches to share one model call")
    return c


def split_branches(out: torch.Tensor, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)`` rows of a batched call's output (unconditional rows first)."""
    return out[batch:], out[:batch]


class CFG(_TwoBranch):
    """Classifier-free guidance (Ho & Salimans 2022): ``ε̃ = ε_u + w (ε_c − ε_u)``.

    ``convention="diffusers"`` (default): ``scale`` is diffusers' ``guidance_scale`` w
    (w = 1 is the conditional model). ``"paper"`` and ``"diffusers-original"``: ``scale`` is
    Ho & Salimans' w', ``ε̃ = ε_c + w'(ε_c − ε_u)`` (w' = 0 is the conditional model). CFG is
    affine in the branches, so it is the same on ε, v or x̂_0. ``self.scale`` always holds the
    diffusers-convention weight w (= w' + 1) that the step uses.
    """
    name = "cfg"

    def __init__(self, scale: float, uncond=None, convention: str = "diffusers"):
        super().__init__(scale, uncond)
        self.convention = check_convention(convention, "CFG")
        if convention != "diffusers":
            self.scale += 1.0   # c + w'(c − u) = u + (w' + 1)(c − u)

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale}, convention='diffusers')"

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        return eps_u + (eps_c - eps_u) * self.scale, None


class CFGZeroStar(_TwoBranch):
    """CFG-Zero* (Fan et al. 2025): scale the unconditional branch by the per-sample
    ``s* = <p_c, p_u>/‖p_u‖²`` first: ``p̃ = s* p_u + w (p_c − s* p_u)``. The first
    ``zero_init_steps`` steps output ``p̃ = 0`` (the paper's zero-init, meant for
    flow/velocity models).

    ``convention="paper"`` (default): ``p`` is ε̂ (for ε models the raw output; for flow-matching
    models the velocity, as in the paper), s* exact (0 where ‖p_u‖ = 0), ``zero_init_steps``
    defaults to 0 (the paper zero-inits flow models' first step: ``zero_init_steps=1``; a zero
    velocity leaves ``x_σ`` unchanged). ``"diffusers"``: diffusers'
    ``ClassifierFreeZeroStarGuidance(guidance_scale=scale)``: ``p`` is the raw model output
    (v for v models), s* with diffusers' ``+1e-8`` in the denominator, ``zero_init_steps``
    defaults to 1. ``"diffusers-original"``: the same with ``use_original_formulation=True``
    (``p̃ = p_c + scale (p_c − s* p_u)``, i.e. ``w = scale + 1``).
    """
    name = "cfg-zero*"

    def __init__(self, scale: float, zero_init_steps=None, uncond=None, convention: str = "paper"):
        super().__init__(scale, uncond)
        self.convention = check_convention(convention, "CFGZeroStar")
        if zero_init_steps is None:
            zero_init_steps = 0 if convention == "paper" else 1
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"CFGZeroStar: zero_init_steps: expected an integer >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps
        if convention == "diffusers-original":
            self.scale += 1.0   # p_c + g (p_c − s* p_u) = s* p_u + (g + 1)(p_c − s* p_u)

    def variant(self, index: int):
        return index < self.zero_init_steps

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        ops = ctx.ops
        # the paper's p is ε̂ for diffusion models and the velocity for flow-matching ones (its setting)
        raw = self.convention != "paper" or ctx.prediction == "flow"
        p_c, p_u = (ctx.output_of_eps(eps_c), ctx.output_of_eps(eps_u)) if raw else (eps_c, eps_u)
        if self.convention != "paper":   # diffusers' cfg_zero_star_scale: <c, u> / (‖u‖² + 1e-8)
            s_star = ops.dot(p_c, p_u) / (ops.norm2(p_u) + 1e-8)
        else:
            s_star = safe_div(ops.dot(p_c, p_u), ops.norm2(p_u))
        scaled_u = p_u * s_star
        out = scaled_u + (p_c - scaled_u) * self.scale
        if self.variant(ctx.index):  # host-side step count, not a tensor value
            out = out * 0.0
        return (ctx.eps_of_output(out) if raw else out), None

    def __repr__(self) -> str:
        # an equivalent call ("diffusers-original" is "diffusers" with scale + 1)
        convention = "diffusers" if self.convention == "diffusers-original" else self.convention
        return f"CFGZeroStar(scale={self.scale}, zero_init_steps={self.zero_init_steps}, convention={convention!r})"


class CFGPlusPlus(_TwoBranch):
    """CFG++ (Chung et al. 2024): ``ε_λ = ε_u + λ (ε_c − ε_u)``, λ ∈ [0, 1], for the
    prediction ``x̂_0``; the step re-noises with ``ε_u`` instead of ``ε_λ``."""
    name = "cfg++"

    def __init__(self, scale: float, uncond=None):
        super().__init__(scale, uncond)
        check_number("scale", scale, 0.0, 1.0, owner="CFGPlusPlus")

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        return eps_u + (eps_c - eps_u) * self.scale, eps_u
