"""Reference (plain torch) implementations of the two passes of a guided step.

These are the truth every other backend is tested against: any device, any float dtype,
float64 capable, differentiable (the look-ahead VJP runs through ``combine``).

Accumulation: ``combine`` accumulates float64 inputs in float64, everything else in float32.
``reduce`` accumulates in float64 for every dtype and returns a float64 Gram matrix and sums,
and the coefficient programs run in float64 (:func:`coefficient_dtype`): rules take inner
products of small combinations of large operands (``uᵀ G u`` for a clipped guidance shift,
or where two directions nearly cancel), and a float32 Gram loses ``~1e-7·‖op‖²`` absolutely,
which can be most of such a norm² (issue 12: 8 % off, 2e-2 error in the samples). Products
of float32 values are exact in float64, so a float64 Gram is as good as its inputs; the cost
is one pass's FMAs at double width, under the memory bound.
Non-finite inputs propagate: a NaN/inf element in an operand makes the Gram entries of
that operand non-finite, and ``combine`` multiplies every operand by its coefficient even
when the coefficient is zero (0 * inf = NaN), so a non-finite operand always poisons the
output. Every backend follows the same rule.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of ``combine``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the Gram matrix, sums and coefficient programs: always float64 (module doc)."""
    return torch.float64


def _rows(operands: Sequence[torch.Tensor], groups: int, acc: torch.dtype) -> torch.Tensor:
    """Stack operands as [B, G, K, N/G] in ``acc``."""
    b = operands[0].shape[0]
    return torch.stack([op.reshape(b, groups, -1).to(acc) for op in operands], dim=2)


def reduce(operands: Sequence[torch.Tensor], groups: int = 1):
    """Per-sample (and per group) Gram matrix and sums of K operands.

    Returns ``gram[B, G, K, K]`` with ``gram[b, g, i, j] = <op_i[b, g], op_j[b, g]>`` and
    ``sums[B, G, K]`` with ``sums[b, g, k] = sum(op_k[b, g])``. Group ``g`` is the g-th of
    ``groups`` equal contiguous chunks of a flattened sample (channels, for NCHW).
    """
    rows = _rows(operands, groups, coefficient_dtype(operands[0].dtype))
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


def combine(coef: torch.Tensor, operands: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None,
            clamp: Optional[tuple] = None) -> torch.Tensor:
    """``out[b, g] = sum_k coef[b, g, k] * op_k[b, g]``, optionally clamped elementwise."""
    rows = _rows(operands, coef.shape[1], accumulation_dtype(operands[0].dtype))
    result = (coef.to(rows.dtype).unsqueeze(-1) * rows).sum(2)
    if clamp is not None:
        result = result.clamp(clamp[0], clamp[1])
    result = result.reshape(operands[0].shape).to(operands[0].dtype)
    if out is None:
        return result
    return out.copy_(result)
