"""Reference (plain torch) implementations of the two passes of a guided step.

These are the truth every other backend is tested against: any device, any float dtype,
float64 capable, differentiable (the look-ahead VJP runs through ``combine``).

Accumulation: ``combine`` accumulates in float64 here and in the native CPU op (weights that
cancel: x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ has weights ~160 at t = 999 for a result of size 1; a
float32 accumulator made the pinned DDIM eta = 1 precision case 2e-4 off, float64 5e-5); the Triton and CUDA
kernels too for float32 and float64 data, in float32 for float16/bfloat16 whose products are
exact there (:func:`accumulation_dtype`). ``reduce`` accumulates in float64 for every dtype here
and returns a float64 Gram matrix and sums (the kernels: the same but float32 for fp16/bf16),
and the coefficient programs run in float64 (:func:`coefficient_dtype`): rules take inner
products of small combinations of large operands (``uᵀ G u`` for a clipped guidance shift,
or where two directions nearly cancel), and a float32 Gram loses ``~1e-7·‖op‖²`` absolutely,
which can be most of such a norm² (docs/architecture.md#precision: 8 % off, 2e-2 error in the samples). Products
of float32 values are exact in float64, so a float64 Gram is as good as its inputs; the cost
is one pass's FMAs at double width, under the memory bound.
Non-finite inputs propagate: a NaN/inf element in an operand makes the Gram entries of
that operand non-finite, and ``combine`` multiplies every operand by its coefficient even
when the coefficient is zero (0 * inf = NaN), so a non-finite operand always poisons the
output. Every backend follows the same rule.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the Triton kernels (gradguide/kernels/_common.py ``acc_dtype``): float64 for
    float32 and float64 data, float32 for float16/bfloat16 (their products are exact in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reference and native CPU ``combine``: float64 (module doc)."""
    return torch.float64


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the Gram matrix, sums and coefficient programs: always float64 (module doc)."""
    return torch.float64


class Scaling(NamedTuple):
    """Operands read through a per-element scale ``exp(slope · log_scale + offset)``: operand ``k``
    with bit ``k`` of ``mask`` set is read as ``op_k · exp(slope[b, k] · log_scale + offset[b, k])``
    (``slope``, ``offset``: float64 ``[1 or B, K]``, zero where the bit is clear; ``log_scale``: a
    tensor shaped like the operands). A learned-range variance Σ = exp(a v + b) times a classifier
    gradient, or √Σ times the noise, is such an operand: the fused kernels form it as they load
    ``op_k`` and ``v``, so it is never written out (docs/architecture.md#learned-range-variance)."""
    log_scale: torch.Tensor
    slope: torch.Tensor
    offset: torch.Tensor
    mask: int


def variance_scaled(op: torch.Tensor, log_scale: torch.Tensor, slope, offset) -> torch.Tensor:
    """``op · exp(slope · log_scale + offset)``: the one formula of a Σ-scaled operand."""
    return op * torch.exp(log_scale * slope + offset)


def _rows(operands: Sequence[torch.Tensor], groups: int, acc: torch.dtype,
          scaling: Optional[Scaling] = None) -> torch.Tensor:
    """Stack operands as [B, G, K, N/G] in ``acc``; scaled operands (``scaling``) formed in ``acc``."""
    b = operands[0].shape[0]
    rows = []
    for k, op in enumerate(operands):
        row = op.reshape(b, groups, -1).to(acc)
        if scaling is not None and scaling.mask >> k & 1:
            v = scaling.log_scale.reshape(b, groups, -1).to(acc)
            row = variance_scaled(row, v, scaling.slope[:, k].to(acc).view(-1, 1, 1),
                                  scaling.offset[:, k].to(acc).view(-1, 1, 1))
        rows.append(row)
    return torch.stack(rows, dim=2)


def reduce(operands: Sequence[torch.Tensor], groups: int = 1, scaling: Optional[Scaling] = None):
    """Per-sample (and per group) Gram matrix and sums of K operands.

    Returns ``gram[B, G, K, K]`` with ``gram[b, g, i, j] = <op_i[b, g], op_j[b, g]>`` and
    ``sums[B, G, K]`` with ``sums[b, g, k] = sum(op_k[b, g])``. Group ``g`` is the g-th of
    ``groups`` equal contiguous chunks of a flattened sample (channels, for NCHW). ``scaling``:
    the operands it marks are read scaled (:class:`Scaling`), formed in float64.
    """
    rows = _rows(operands, groups, coefficient_dtype(operands[0].dtype), scaling)
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


def combine(coef: torch.Tensor, operands: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None,
            clamp: Optional[tuple] = None, scaling: Optional[Scaling] = None) -> torch.Tensor:
    """``out[b, g] = sum_k coef[b, g, k] * op_k[b, g]``, optionally clamped elementwise.

    ``clamp``: ``(low, high)`` (``None`` for an open side); NaN bounds are refused, the rule
    of every backend (:func:`gradguide.ops.check_clamp`). ``scaling``: the operands it marks
    are read scaled (:class:`Scaling`), formed in float64."""
    from . import check_clamp  # the package's one clamp rule (imported late: the package imports us)
    clamp = check_clamp(clamp)
    if coef.is_complex() or not (coef.is_floating_point()):
        raise TypeError(f"coef: expected a real floating dtype, got {coef.dtype}")
    rows = _rows(operands, coef.shape[1], combine_dtype(operands[0].dtype), scaling)
    result = (coef.to(rows.dtype).unsqueeze(-1) * rows).sum(2)
    if clamp is not None:
        result = result.clamp(clamp[0], clamp[1])
    result = result.reshape(operands[0].shape).to(operands[0].dtype)
    if out is None:
        return result
    return out.copy_(result)


def clip_shift(coef_p: torch.Tensor, coef_s: torch.Tensor, operands: Sequence[torch.Tensor], clip: tuple):
    """A clipped x̂_0 and the clipped guidance shift: with ``p = Σ coef_p[b, k] op_k`` and
    ``s = Σ coef_s[b, k] op_k`` (``coef``: ``[B or 1, K]``), returns ``clamp(p)`` and
    ``clamp(p + s) − clamp(p)``, the latter exactly ``s`` where neither side clips (formed as a
    difference of the two clamped values it would keep only ``p``'s absolute precision)."""
    b, k = operands[0].shape[0], len(operands)
    acc = combine_dtype(operands[0].dtype)
    rows = _rows(operands, 1, acc)[:, 0]                                   # [B, K, N]
    p = (coef_p.to(acc).expand(b, k).unsqueeze(-1) * rows).sum(1).reshape(operands[0].shape)
    s = (coef_s.to(acc).expand(b, k).unsqueeze(-1) * rows).sum(1).reshape(operands[0].shape)
    low, high = clip
    q = p + s
    inside = (p > low) & (p < high) & (q > low) & (q < high)
    shift = torch.where(inside, s, q.clamp(low, high) - p.clamp(low, high))
    return p.clamp(low, high).to(operands[0].dtype), shift.to(operands[0].dtype)
