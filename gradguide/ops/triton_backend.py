"""Glue to the Triton kernels in ``gradguide.kernels``, as torch custom ops.

Triton runs on CUDA tensors, and on CPU tensors only through Triton's interpreter
(``TRITON_INTERPRET=1``, for tests). The interpreter is chosen when a kernel is *defined*,
so what counts is the value of ``TRITON_INTERPRET`` when ``gradguide.kernels`` is first imported:
this module imports it lazily and remembers that mode.

The kernels are registered as custom ops ``torch.ops.gradguide_triton.{reduce, combine,
combine_out, fused_combine, fused_combine_out, clip_shift}`` with fake (meta) kernels, so a step that
calls them runs under ``FakeTensorMode`` (shapes and devices without data) and is one opaque
node under ``torch.compile(fullgraph=True)`` (no graph break; Inductor calls the op). The
public functions below (``reduce``, ``combine``, ``fused_combine``, ``clip_shift``, ``status``)
call the ops.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from . import opchecks

_state = {"module": None, "reason": None, "interpret": None}

# the policies gradguide/kernels/fused.py evaluates in its prologue: every built-in program of
# gradguide/ops/policies.py (tests check the lists agree); any other name is refused
FUSED_POLICIES = ("linear", "cfg", "pxp-a", "pxp-b", "pxp-c", "apg", "lookahead", "tcfg", "mambo")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load():
    if _state["module"] is None and _state["reason"] is None:
        try:
            import triton  # noqa: F401
            from gradguide.kernels import clip_shift, combine, fused, reduce  # noqa: F401
        except Exception as exc:
            _state["reason"] = f"triton or the kernels package cannot be imported ({exc})"
        else:
            from gradguide import kernels
            _state["module"] = kernels
            _state["interpret"] = _interpret_env()
    if _state["module"] is None:
        raise RuntimeError(f"the Triton backend is unavailable: {_state['reason']}")
    return _state["module"]


def status(device: Optional[torch.device] = None):
    """``True`` or the reason the Triton backend cannot run on ``device``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    interpret = _state["interpret"] if _state["module"] is not None else _interpret_env()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if interpret:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
    elif device.type == "cpu":
        if not interpret:
            return "Triton needs a CUDA device (on CPU only under TRITON_INTERPRET=1, set before import)"
    else:
        return f"Triton does not run on {device.type}"
    try:
        _load()
    except RuntimeError:
        return _state["reason"]
    return True


def supports_policy(policy: str) -> bool:
    """Whether the fused Triton kernel evaluates ``policy``."""
    return policy in FUSED_POLICIES


def _acc(dtype: torch.dtype) -> torch.dtype:
    from .reference import accumulation_dtype   # the kernels' rule (gradguide/kernels/_common.py)
    return accumulation_dtype(dtype)


def _clamp(low: Optional[float], high: Optional[float]):
    return None if low is None and high is None else (low, high)


# -- argument checks of the custom ops (gradguide/ops/opchecks.py) ---------------------------------
# ``gradguide.ops`` validates before it calls the ops; these make a direct call
# (``torch.ops.gradguide_triton.*``) fail with a TypeError/ValueError naming the argument, as the
# native ops do, instead of an IndexError or a kernel reading out of bounds.

def _check_combine(op, coef, operands, low, high, out=None):
    opchecks.combine(op, coef, operands, low, high, out)


def _check_fused(op, policy, gram, vectors, scalars, operands, low, high, out=None, scaling=(None, None, None, 0)):
    return opchecks.fused(op, FUSED_POLICIES, policy, gram, vectors, scalars, operands, low, high, out, *scaling,
                          row_strided=True)


def _check_reduce(op, operands, groups, scaling):
    return opchecks.reduce(op, operands, groups, *scaling, row_strided=True)


def _scaling(log_scale, slope, offset, scaled):
    """The kernels' ``scaling`` (gradguide/kernels/scaling.py): None or (log_scale, slope, offset, mask)."""
    return (log_scale, slope, offset, scaled) if scaled else None


def _check_clip_shift(op, coef_p, coef_s, operands, low, high):
    opchecks.clip_shift(op, coef_p, coef_s, operands, low, high, coef_dtypes=(torch.float64,))


# -- custom ops: the kernels, and their fake kernels (shapes only) ---------------------------------

@torch.library.custom_op("gradguide_triton::reduce", mutates_args=())
def _reduce_op(operands: List[torch.Tensor], groups: int, log_scale: Optional[torch.Tensor] = None,
               slope: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
               scaled: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_reduce("gradguide_triton::reduce", operands, groups, (log_scale, slope, offset, scaled))
    return _load().reduce.reduce(list(operands), groups, scaling=_scaling(log_scale, slope, offset, scaled))


@_reduce_op.register_fake
def _(operands, groups, log_scale=None, slope=None, offset=None, scaled=0):
    first = _check_reduce("gradguide_triton::reduce", operands, groups, (log_scale, slope, offset, scaled))
    k = len(operands)
    acc = _acc(first.dtype)
    return first.new_empty((first.shape[0], groups, k, k), dtype=acc), first.new_empty((first.shape[0], groups, k),
                                                                                          dtype=acc)


@torch.library.custom_op("gradguide_triton::combine", mutates_args=())
def _combine_op(coef: torch.Tensor, operands: List[torch.Tensor], low: Optional[float],
                high: Optional[float]) -> torch.Tensor:
    _check_combine("gradguide_triton::combine", coef, operands, low, high)
    return _load().combine.combine(coef, list(operands), clamp=_clamp(low, high))


@_combine_op.register_fake
def _(coef, operands, low, high):
    _check_combine("gradguide_triton::combine", coef, operands, low, high)
    return torch.empty_like(operands[0], memory_format=torch.contiguous_format)


@torch.library.custom_op("gradguide_triton::combine_out", mutates_args=("out",))
def _combine_out_op(coef: torch.Tensor, operands: List[torch.Tensor], low: Optional[float], high: Optional[float],
                    out: torch.Tensor) -> None:
    _check_combine("gradguide_triton::combine_out", coef, operands, low, high, out)
    _load().combine.combine(coef, list(operands), out=out, clamp=_clamp(low, high))


@_combine_out_op.register_fake
def _(coef, operands, low, high, out):
    _check_combine("gradguide_triton::combine_out", coef, operands, low, high, out)
    return None


@torch.library.custom_op("gradguide_triton::fused_combine", mutates_args=())
def _fused_op(policy: str, gram: Optional[torch.Tensor], vectors: List[torch.Tensor], scalars: List[torch.Tensor],
              operands: List[torch.Tensor], low: Optional[float], high: Optional[float],
              log_scale: Optional[torch.Tensor] = None, slope: Optional[torch.Tensor] = None,
              offset: Optional[torch.Tensor] = None, scaled: int = 0) -> torch.Tensor:
    _check_fused("gradguide_triton::fused_combine", policy, gram, vectors, scalars, operands, low, high,
                 scaling=(log_scale, slope, offset, scaled))
    return _load().fused.fused_combine(policy, gram, list(vectors), list(scalars), list(operands),
                                       clamp=_clamp(low, high), scaling=_scaling(log_scale, slope, offset, scaled))


@_fused_op.register_fake
def _(policy, gram, vectors, scalars, operands, low, high, log_scale=None, slope=None, offset=None, scaled=0):
    _check_fused("gradguide_triton::fused_combine", policy, gram, vectors, scalars, operands, low, high,
                 scaling=(log_scale, slope, offset, scaled))
    return torch.empty_like(operands[0], memory_format=torch.contiguous_format)


@torch.library.custom_op("gradguide_triton::fused_combine_out", mutates_args=("out",))
def _fused_out_op(policy: str, gram: Optional[torch.Tensor], vectors: List[torch.Tensor],
                  scalars: List[torch.Tensor], operands: List[torch.Tensor], low: Optional[float],
                  high: Optional[float], out: torch.Tensor, log_scale: Optional[torch.Tensor] = None,
                  slope: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                  scaled: int = 0) -> None:
    _check_fused("gradguide_triton::fused_combine_out", policy, gram, vectors, scalars, operands, low, high, out,
                 scaling=(log_scale, slope, offset, scaled))
    _load().fused.fused_combine(policy, gram, list(vectors), list(scalars), list(operands), out=out,
                                clamp=_clamp(low, high), scaling=_scaling(log_scale, slope, offset, scaled))


@_fused_out_op.register_fake
def _(policy, gram, vectors, scalars, operands, low, high, out, log_scale=None, slope=None, offset=None, scaled=0):
    _check_fused("gradguide_triton::fused_combine_out", policy, gram, vectors, scalars, operands, low, high, out,
                 scaling=(log_scale, slope, offset, scaled))
    return None


@torch.library.custom_op("gradguide_triton::clip_shift", mutates_args=())
def _clip_shift_op(coef_p: torch.Tensor, coef_s: torch.Tensor, operands: List[torch.Tensor], low: float,
                   high: float) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_clip_shift("gradguide_triton::clip_shift", coef_p, coef_s, operands, low, high)
    return _load().clip_shift.clip_shift(coef_p, coef_s, list(operands), (low, high))


@_clip_shift_op.register_fake
def _(coef_p, coef_s, operands, low, high):
    _check_clip_shift("gradguide_triton::clip_shift", coef_p, coef_s, operands, low, high)
    first = operands[0]
    return (torch.empty_like(first, memory_format=torch.contiguous_format),
            torch.empty_like(first, memory_format=torch.contiguous_format))


# -- the backend interface (gradguide.ops calls these, after validating the inputs) ----------------

def _bounds(clamp) -> Tuple[Optional[float], Optional[float]]:
    if clamp is None:
        return None, None
    return (None if clamp[0] is None else float(clamp[0])), (None if clamp[1] is None else float(clamp[1]))


def _scaling_args(scaling):
    """The ops' trailing ``(log_scale, slope, offset, scaled)`` of ``scaling`` (a
    :class:`gradguide.ops.reference.Scaling` or None), as they are: read through their strides
    by the kernels (no expand, cast or copy here: each would be a launch)."""
    if scaling is None:
        return ()
    log_scale, slope, offset, mask = scaling
    if isinstance(mask, bool) or not isinstance(mask, int):
        raise TypeError(f"scaling.mask: expected an int, got {type(mask).__name__}")
    return (log_scale, slope, offset, mask) if mask else ()


def reduce(operands, groups: int = 1, scaling=None):
    """``(gram, sums)`` of K operands, contiguous or row-strided (every sample contiguous, any
    batch stride: read in place); ``scaling``: the operands its mask marks read Σ-scaled
    (gradguide/kernels/scaling.py)."""
    return torch.ops.gradguide_triton.reduce(list(operands), groups, *_scaling_args(scaling))


def combine(coef, operands, out=None, clamp=None):
    low, high = _bounds(clamp)
    if out is None:
        return torch.ops.gradguide_triton.combine(coef, list(operands), low, high)
    torch.ops.gradguide_triton.combine_out(coef, list(operands), low, high, out)
    return out


def fused_combine(policy, gram, vectors, scalars, operands, out=None, clamp=None, scaling=None):
    """``policy``'s coefficient program (float64) and the combine in one kernel launch.

    The inputs go to the kernel as the step holds them (gradguide/kernels/fused.py): ``gram`` ``[B, G,
    Kg, Kg]`` over the first Kg operands in the reduce's dtype, ``vectors`` ``[1 or B, 1 or G,
    K]`` views, ``scalars`` 1- or B-element tensors, ``operands`` contiguous or row-strided,
    ``scaling`` (:func:`reduce`) as it is; nothing is padded, expanded or cast here (each would
    be a launch). ``policy`` must be one of :data:`FUSED_POLICIES`."""
    if not supports_policy(policy):
        raise NotImplementedError(f"policy {policy!r}: the fused Triton kernel implements {FUSED_POLICIES}")
    low, high = _bounds(clamp)
    extra = _scaling_args(scaling)
    if out is None:
        return torch.ops.gradguide_triton.fused_combine(policy, gram, list(vectors), list(scalars), list(operands),
                                                        low, high, *extra)
    torch.ops.gradguide_triton.fused_combine_out(policy, gram, list(vectors), list(scalars), list(operands), low,
                                                 high, out, *extra)
    return out


def clip_shift(coef_p, coef_s, operands, clip):
    """``(clamp(p), clamp(p + s) − clamp(p))`` in one launch (gradguide/kernels/clip_shift.py); the
    float64 ``[1 or B, K]`` coefficient rows go to the kernel as they are (strides, no copy)."""
    return torch.ops.gradguide_triton.clip_shift(coef_p, coef_s, list(operands), float(clip[0]), float(clip[1]))
