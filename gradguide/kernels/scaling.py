"""Row-strided and Σ-scaled operands: what the reduce and fused-combine kernels share.

Row-strided: an operand whose every sample ``t[b]`` is contiguous but whose batch stride is
anything (the halves ``out[:, :C]`` and ``out[:, C:]`` of a model output ``[B, 2C, H, W]``).
Row (b, g) of such a tensor starts at ``b * stride(0) + g * N`` (N = the row length); the glue
passes each operand's batch stride as ``SB = stride(0) // ALIGN`` (0 for B = 1, where the
stride is never used), so ``b * SB * ALIGN`` keeps the row start a visible multiple of
ALIGN (128-bit loads, ``_common.py``); ALIGN is VEC only when every batch stride is a multiple
of VEC too.

Σ-scaled: operand k with bit k of the constexpr ``SCALED`` set is read as
``op_k · exp(slope[b, k] · v + offset[b, k])`` with ``v`` the ``log_scale`` tensor (shaped like
the operands, row-strided too). The factor is formed as ``exp2(slope' · v + offset')`` with
``slope' = slope · log2(e)`` and ``offset' = offset · log2(e)`` taken in float64 once per
program and rounded to F: one FMA and one ``ex2`` per element and scaled operand. F is fp32
for fp16/bf16/fp32 operands and fp64 for fp64 operands; the product is the operand's value
from then on (never rounded to the operand's dtype). ``SCALED = 0`` compiles none of this.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e), made a float64 constant where used


@triton.jit
def row_pointers(x0, x1, x2, x3, x4, x5, x6, x7, xv, row, GROUPS, N, SB0, SB1, SB2, SB3, SB4, SB5, SB6, SB7, SBV,
                 ALIGN: tl.constexpr):
    """Where row (b, g) = (row // GROUPS, row % GROUPS) starts in each operand and the log-scale:
    each its own batch stride (``SB* · ALIGN`` elements), then g chunks of N."""
    b = row // GROUPS
    gN = (row % GROUPS) * N
    return (x0 + (b * SB0 * ALIGN + gN), x1 + (b * SB1 * ALIGN + gN), x2 + (b * SB2 * ALIGN + gN),
            x3 + (b * SB3 * ALIGN + gN), x4 + (b * SB4 * ALIGN + gN), x5 + (b * SB5 * ALIGN + gN),
            x6 + (b * SB6 * ALIGN + gN), x7 + (b * SB7 * ALIGN + gN), xv + (b * SBV * ALIGN + gN))


@triton.jit
def log2_coef(p, sb, sk, b, k: tl.constexpr, SCALED: tl.constexpr, F: tl.constexpr):
    """``p[b, k] · log2(e)`` of a float64 ``[1 or B, K]`` tensor read through strides (sb = 0 on
    a broadcast batch), rounded to F; 0 where bit k of SCALED is clear (never read)."""
    if (SCALED >> k) & 1:
        return (tl.load(p + b * sb + k * sk).to(tl.float64) * tl.full([], LOG2E, tl.float64)).to(F)
    else:
        return tl.zeros([], dtype=F)


@triton.jit
def scaled(w, k: tl.constexpr, SCALED: tl.constexpr, v, s, o, F: tl.constexpr):
    """Operand k's loaded values ``w``: ``w · 2^(s v + o)`` in F when bit k of SCALED is set, else ``w``."""
    if (SCALED >> k) & 1:
        return w.to(F) * tl.math.exp2(tl.fma(v, s, o))
    else:
        return w


@triton.jit
def scaled_masked(w, m, k: tl.constexpr, SCALED: tl.constexpr, v, s, o, F: tl.constexpr):
    """:func:`scaled` that is 0 where ``m`` is false (a reduce's padding lanes: an overflowing
    factor times a padded 0 would be NaN)."""
    if (SCALED >> k) & 1:
        return tl.where(m, w.to(F) * tl.math.exp2(tl.fma(v, s, o)), 0.0)
    else:
        return w


@triton.jit
def scaled_inline(w, k: tl.constexpr, SCALED: tl.constexpr, v, slope_row, offset_row, SLK: tl.constexpr,
                  OFK: tl.constexpr, F: tl.constexpr):
    """:func:`scaled` reading operand k's slope and offset (``slope_row``, ``offset_row``: row b
    of the ``[1 or B, K]`` tensors; SLK, OFK: their constexpr strides over K, so every k is an
    immediate offset from one base register) where it is formed in a streaming loop: two
    uniform loads (cache hits) instead of two registers per scaled operand live through the
    loop. For fp32 F they are rounded to fp32 before the log2(e) product (one more fp32
    rounding of the exponent; no fp64 operation in the loop)."""
    if (SCALED >> k) & 1:
        s = tl.load(slope_row + k * SLK)
        o = tl.load(offset_row + k * OFK)
        if F == tl.float64:
            s = s * tl.full([], LOG2E, tl.float64)
            o = o * tl.full([], LOG2E, tl.float64)
        else:
            s = s.to(tl.float32) * LOG2E
            o = o.to(tl.float32) * LOG2E
        return w.to(F) * tl.math.exp2(tl.fma(v, s, o))
    else:
        return w
