"""Reference (plain torch) implementations of the two passes of a guided step.

These are the truth every other backend is tested against: any device, any float dtype,
float64 capable, differentiable (the look-ahead VJP runs through ``combine``).

Accumulation: float64 inputs accumulate in float64, everything else in float32.
Non-finite inputs propagate: a NaN/inf element in an operand makes the Gram entries of
that operand non-finite, and ``combine`` multiplies every operand by its coefficient even
when the coefficient is zero (0 * inf = NaN), so a non-finite operand always poisons the
output. Every backend follows the same rule.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(operands: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Stack operands as [B, G, K, N/G] in the accumulation dtype."""
    b = operands[0].shape[0]
    acc = accumulation_dtype(operands[0].dtype)
    return torch.stack([op.reshape(b, groups, -1).to(acc) for op in operands], dim=2)


def reduce(operands: Sequence[torch.Tensor], groups: int = 1):
    """Per-sample (and per group) Gram matrix and sums of K operands.

    Returns ``gram[B, G, K, K]`` with ``gram[b, g, i, j] = <op_i[b, g], op_j[b, g]>`` and
    ``sums[B, G, K]`` with ``sums[b, g, k] = sum(op_k[b, g])``. Group ``g`` is the g-th of
    ``groups`` equal contiguous chunks of a flattened sample (channels, for NCHW).
    """
    rows = _rows(operands, groups)
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


def combine(coef: torch.Tensor, operands: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None,
            clamp: Optional[tuple] = None) -> torch.Tensor:
    """``out[b, g] = sum_k coef[b, g, k] * op_k[b, g]``, optionally clamped elementwise.

    ``clamp``: ``(low, high)`` (``None`` for an open side); NaN bounds are refused, the rule
    of every backend (:func:`gradguide.ops.check_clamp`)."""
    from . import check_clamp  # the package's one clamp rule (imported late: the package imports us)
    clamp = check_clamp(clamp)
    if coef.is_complex() or not (coef.is_floating_point()):
        raise TypeError(f"coef: expected a real floating dtype, got {coef.dtype}")
    rows = _rows(operands, coef.shape[1])
    result = (coef.to(rows.dtype).unsqueeze(-1) * rows).sum(2)
    if clamp is not None:
        result = result.clamp(clamp[0], clamp[1])
    result = result.reshape(operands[0].shape).to(operands[0].dtype)
    if out is None:
        return result
    return out.copy_(result)
