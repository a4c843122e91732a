"""Argument checks of the custom ops, for direct calls (``torch.ops.gradguide_triton.*`` and the
fake kernels of ``torch.ops.gradguide.*``).

:mod:`gradguide.ops` validates its arguments before it calls an op; a user who calls an op
directly gets the same kind of error from these: a ``TypeError`` (a wrong type or dtype) or a
``ValueError`` (anything else) whose message starts with the op and names the argument, as
the native C++ ops do (``TORCH_CHECK_TYPE`` / ``TORCH_CHECK_VALUE``), instead of an
``IndexError`` from ``operands[0]`` or a kernel reading out of bounds. Shapes, dtypes and
devices only: no data is read (they run inside fake kernels too).
"""
from __future__ import annotations

import math

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_K = 8


def row_strided(t: torch.Tensor) -> bool:
    """Whether every sample ``t[b]`` is contiguous (any batch stride): how the Triton reduce and
    fused kernels read operands (gradguide/kernels/scaling.py), e.g. a half ``out[:, :C]`` of a
    ``[B, 2C, H, W]`` model output."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected = expected * size
    return True


def _laid_out(t: torch.Tensor, strided: bool) -> bool:
    return t.is_contiguous() or (strided and row_strided(t))


def check_operands(op: str, operands, strided: bool = False) -> torch.Tensor:
    """``operands``: 1 to 8 contiguous tensors ``[B, ...]`` (B >= 1) of one float dtype, shape and
    device (``strided``: row-strided ones too, :func:`row_strided`); returns the first. (A Triton
    op runs this on every eager call: one cheap pass, and the detailed messages only once
    something is wrong.)"""
    if not isinstance(operands, (list, tuple)) or len(operands) == 0:
        raise ValueError(f"{op}: operands: expected a non-empty list of tensors")
    if len(operands) > MAX_K:
        raise ValueError(f"{op}: operands: expected at most {MAX_K} tensors, got {len(operands)}")
    first = operands[0]
    if isinstance(first, torch.Tensor):
        shape, dtype, device = first.shape, first.dtype, first.device
        if dtype in FLOATS and len(shape) >= 1 and shape[0] >= 1 and all(
                isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype and t.device == device
                and _laid_out(t, strided) for t in operands):
            return first
    for k, t in enumerate(operands):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: operands[{k}]: expected a tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: operands[{k}]: expected float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: operands[{k}]: dtype {t.dtype} differs from operands[0]'s {first.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{op}: operands[{k}]: shape {tuple(t.shape)} differs from operands[0]'s "
                             f"{tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: operands[{k}]: device {t.device} differs from operands[0]'s {first.device}")
        if not _laid_out(t, strided):
            raise ValueError(f"{op}: operands[{k}]: expected a contiguous tensor"
                             + (" (or one whose every sample is contiguous)" if strided else ""))
    raise ValueError(f"{op}: operands: expected tensors shaped [B, ...] with B >= 1, got {tuple(first.shape)}")


def check_tensor(op: str, name: str, t, first: torch.Tensor, dtypes=FLOATS) -> None:
    """``name``: a tensor of one of ``dtypes`` on the operands' device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name}: expected a dtype in {dtypes}, got {t.dtype}")
    if t.device != first.device:
        raise ValueError(f"{op}: {name}: device {t.device} differs from the operands' {first.device}")


def check_groups(op: str, name: str, groups, first: torch.Tensor) -> None:
    per_sample = math.prod(first.shape[1:])   # (no indexing: fake tensors of any device, symbolic sizes)
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1 or per_sample % groups:
        raise ValueError(f"{op}: {name}: expected a positive divisor of the per-sample size {per_sample}, "
                         f"got {groups!r}")


def check_bounds(op: str, low, high) -> None:
    for name, value in (("low", low), ("high", high)):
        if value is not None and value != value:
            raise ValueError(f"{op}: {name}: NaN is not a bound")


def check_out(op: str, out, first: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out: expected a tensor, got {type(out).__name__}")
    if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device or not out.is_contiguous():
        raise ValueError(f"{op}: out: expected a contiguous {tuple(first.shape)} {first.dtype} tensor on "
                         f"{first.device} (like operands[0]), got {tuple(out.shape)} {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")


def check_scaling(op: str, first: torch.Tensor, k: int, log_scale, slope, offset, scaled) -> None:
    """The Σ-scaling arguments of an op (``gradguide.ops.reference.Scaling``): ``scaled`` a mask
    of K bits; with a bit set, ``log_scale`` shaped like the operands (same dtype and device,
    row-strided) and ``slope``, ``offset`` float64 ``[1 or B, K]`` on the operands' device."""
    if isinstance(scaled, bool) or not isinstance(scaled, (int, torch.SymInt)) or not 0 <= scaled < 2 ** k:
        raise ValueError(f"{op}: scaled: expected a mask of K={k} bits (0 <= scaled < {2 ** k}), got {scaled!r}")
    if not scaled:
        return
    b = first.shape[0]
    if not isinstance(log_scale, torch.Tensor):
        raise TypeError(f"{op}: log_scale: expected a tensor (scaled={scaled}), got {type(log_scale).__name__}")
    if log_scale.dtype != first.dtype or log_scale.shape != first.shape or log_scale.device != first.device:
        raise ValueError(f"{op}: log_scale: expected a {tuple(first.shape)} {first.dtype} tensor on {first.device} "
                         f"(like the operands), got {tuple(log_scale.shape)} {log_scale.dtype} on {log_scale.device}")
    if not _laid_out(log_scale, True):
        raise ValueError(f"{op}: log_scale: expected a tensor whose every sample is contiguous")
    for name, t in (("slope", slope), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a tensor (scaled={scaled}), got {type(t).__name__}")
        if t.dtype != torch.float64:
            raise TypeError(f"{op}: {name}: expected float64, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] not in (1, b) or t.shape[1] != k or t.device != first.device:
            raise ValueError(f"{op}: {name}: expected a float64 [1 or B={b}, K={k}] tensor on {first.device}, "
                             f"got {tuple(t.shape)} on {t.device}")


def reduce(op: str, operands, groups, strided: bool = False) -> torch.Tensor:
    first = check_operands(op, operands, strided)
    check_groups(op, "groups", groups, first)
    return first


def combine(op: str, coef, operands, low, high, out=None) -> torch.Tensor:
    first = check_operands(op, operands)
    check_tensor(op, "coef", coef, first)
    b, k = first.shape[0], len(operands)
    if coef.dim() != 3 or coef.shape[0] != b or coef.shape[2] != k or not coef.is_contiguous():
        raise ValueError(f"{op}: coef: expected a contiguous [B={b}, G, K={k}] tensor, got {tuple(coef.shape)}")
    check_groups(op, "coef", coef.shape[1], first)
    check_bounds(op, low, high)
    if out is not None:
        check_out(op, out, first)
    return first


def fused(op: str, policies, policy, gram, vectors, scalars, operands, low, high, out=None,
          strided: bool = False) -> torch.Tensor:
    """``policies``: the policy names the op implements. The vectors' and scalars' shapes are
    checked where they are read (the kernels' glue, which knows the policy's arity)."""
    first = check_operands(op, operands, strided)
    if policy not in policies:
        raise ValueError(f"{op}: policy: expected one of {tuple(policies)}, got {policy!r}")
    if gram is not None:
        check_tensor(op, "gram", gram, first)
    b, k = first.shape[0], len(operands)
    device, per_sample = first.device, math.prod(first.shape[1:])
    for name, seq in (("vectors", vectors), ("scalars", scalars)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name}: expected a list of tensors, got {type(seq).__name__}")
        if all(isinstance(t, torch.Tensor) and t.dtype in FLOATS and t.device == device for t in seq):
            continue   # the common case, cheaply; otherwise the message
        for j, t in enumerate(seq):
            check_tensor(op, f"{name}[{j}]", t, first)
    for j, t in enumerate(vectors):
        shape = t.shape
        if len(shape) != 3 or shape[0] not in (1, b) or shape[2] != k or shape[1] < 1 or per_sample % shape[1]:
            raise ValueError(f"{op}: vectors[{j}]: expected a [1 or B={b}, G, K={k}] tensor with G dividing the "
                             f"per-sample size {per_sample}, got {tuple(shape)}")
    check_bounds(op, low, high)
    if out is not None:
        check_out(op, out, first)
    return first


def clip_shift(op: str, coef_p, coef_s, operands, low, high, coef_dtypes=(torch.float32, torch.float64)):
    first = check_operands(op, operands)
    b, k = first.shape[0], len(operands)
    for name, c in (("coef_p", coef_p), ("coef_s", coef_s)):
        check_tensor(op, name, c, first, coef_dtypes)
        if c.dim() != 2 or c.shape[0] not in (1, b) or c.shape[1] != k or c.shape[0] != coef_p.shape[0]:
            raise ValueError(f"{op}: {name}: expected a [1 or B={b}, K={k}] tensor (coef_p and coef_s alike), "
                             f"got {tuple(c.shape)}")
    if not low < high:
        raise ValueError(f"{op}: low, high: expected low < high, got {low!r} and {high!r}")
    return first
