"""Triton ``combine``: ``out[b, g, :] = sum_k C[b, g, k] * op_k[b, g, :]`` (docs/architecture.md, pass 2).

Design
------
A 2-D grid ``(rows, blocks)`` (a row is a sample, or a group of it). Program (r, s) reads the
row's K weights (fp32; fp64 for fp64 operands) once, then for its blocks ``s, s + blocks, ...``
(one block per program unless a row has more than 65535 of them) loads a ``[BLOCK]`` tile of
every operand from the operand's own pointer (BLOCK = one 128-bit vector per thread, so the
loads compile to ``ld.global.v4`` when rows keep 16-byte alignment, see ``_common.py``), sums
``w_k * x_k`` in the accumulation type, optionally clamps and stores in the operands' dtype,
into a fresh or a preallocated output. Per thread the state is K vectors in flight and one
accumulator vector.

Limits: K <= 8 operands of one dtype (fp16, bf16, fp32, fp64), contiguous, one device; any
B and N (masking); rows shorter than 2**31 elements. Every operand is multiplied by its
weight even when the weight is zero, so a NaN/inf operand poisons the output exactly as in
the reference (0 * inf = NaN); the clamp keeps NaN (comparisons with NaN are false), as
``torch.clamp`` does.

Reference: :func:`reference` below (the same maths as ``gradguide.ops.reference.combine``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, acc_dtype, pointers, row_align, tile_rows, vec
from .scaling import scaled_inline

MAX_GRID_1 = 65535  # CUDA's limit on the second grid axis


def reference(coef, operands, clamp=None):
    """Plain-torch truth, coefficients ``[B, G, K]``."""
    b, groups = operands[0].shape[0], coef.shape[1]
    acc = acc_dtype(operands[0].dtype)
    rows = torch.stack([op.reshape(b, groups, -1).to(acc) for op in operands], dim=2)
    out = (coef.to(acc).unsqueeze(-1) * rows).sum(2)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out.reshape(operands[0].shape).to(operands[0].dtype)


@triton.jit
def _clamp(v, low, high, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    if HAS_LOW:
        v = tl.where(v < low, low, v)  # NaN < low is false: NaN stays NaN
    if HAS_HIGH:
        v = tl.where(v > high, high, v)
    return v


@triton.jit
def _weighted_tiles(x0, x1, x2, x3, x4, x5, x6, x7, c0, c1, c2, c3, c4, c5, c6, c7, ro, e, m,
                    K: tl.constexpr, ACC: tl.constexpr, xv, sc, SCALED: tl.constexpr, F: tl.constexpr):
    """sum_k c_k * x_k[ro_k + e] over the first K operands (each from its own pointer and row
    offset ``ro[k]``; ``ro[8]``: the log-scale's); the operands of SCALED's bits read Σ-scaled
    (``scaling.py``; ``sc``: rows b of slope and offset, their constexpr strides over K)."""
    if SCALED != 0:
        v = tl.load(xv + (ro[8] + e), mask=m, other=0.0).to(F)
    else:
        v = 0.0
    acc = c0 * _op(tl.load(x0 + (ro[0] + e), mask=m, other=0.0), 0, SCALED, v, sc, F).to(ACC)
    if K > 1:
        acc += c1 * _op(tl.load(x1 + (ro[1] + e), mask=m, other=0.0), 1, SCALED, v, sc, F).to(ACC)
    if K > 2:
        acc += c2 * _op(tl.load(x2 + (ro[2] + e), mask=m, other=0.0), 2, SCALED, v, sc, F).to(ACC)
    if K > 3:
        acc += c3 * _op(tl.load(x3 + (ro[3] + e), mask=m, other=0.0), 3, SCALED, v, sc, F).to(ACC)
    if K > 4:
        acc += c4 * _op(tl.load(x4 + (ro[4] + e), mask=m, other=0.0), 4, SCALED, v, sc, F).to(ACC)
    if K > 5:
        acc += c5 * _op(tl.load(x5 + (ro[5] + e), mask=m, other=0.0), 5, SCALED, v, sc, F).to(ACC)
    if K > 6:
        acc += c6 * _op(tl.load(x6 + (ro[6] + e), mask=m, other=0.0), 6, SCALED, v, sc, F).to(ACC)
    if K > 7:
        acc += c7 * _op(tl.load(x7 + (ro[7] + e), mask=m, other=0.0), 7, SCALED, v, sc, F).to(ACC)
    return acc


@triton.jit
def _op(w, k: tl.constexpr, SCALED: tl.constexpr, v, sc, F: tl.constexpr):
    return scaled_inline(w, k, SCALED, v, sc[0], sc[1], sc[2], sc[3], F)


@triton.jit
def _coef(coef, k: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    if k < K:
        return tl.load(coef + k).to(ACC)
    else:
        return tl.zeros([], dtype=ACC)


@triton.jit
def _stream(x0, x1, x2, x3, x4, x5, x6, x7, c0, c1, c2, c3, c4, c5, c6, c7, out, base, N, ITERS, low, high,
            K: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, HAS_LOW: tl.constexpr,
            HAS_HIGH: tl.constexpr, xv, sc, SCALED: tl.constexpr, F: tl.constexpr, ro):
    """The combine of one program's blocks of a row with weights c_k (shared with fused.py): the
    row starts at ``ro[k]`` of ``x_k``, ``ro[8]`` of ``xv`` (the log-scale) and ``base`` of
    ``out`` (combine: all of them r * N for row r; fused: each operand's own, int32 where the
    glue allows it, so an operand costs one register beyond its pointer argument)."""
    blk = tl.program_id(1)
    blocks = tl.num_programs(1)
    for i in range(ITERS):
        e = (blk + i * blocks) * BLOCK + tl.arange(0, BLOCK)
        m = e < N
        v = _weighted_tiles(x0, x1, x2, x3, x4, x5, x6, x7, c0, c1, c2, c3, c4, c5, c6, c7, ro, e, m, K, ACC,
                            xv, sc, SCALED, F)
        if SCALED != 0 and ACC == tl.float64 and out.dtype.element_ty == tl.float32:
            # fp32 output of an fp64 sum: clamped after the cast, against the fp32 bounds. The same
            # values (the bounds are fp32 numbers and rounding is monotonic), without fp64 copies
            # of the bounds live through the loop (scaled operands spilled at K >= 5 with them)
            v = _clamp(v.to(tl.float32), low, high, HAS_LOW, HAS_HIGH)
            tl.store(out + base + e, v, mask=m)
        else:
            v = _clamp(v, low, high, HAS_LOW, HAS_HIGH)
            tl.store(out + base + e, v.to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["NR", "ITERS"])
def _combine(x0, x1, x2, x3, x4, x5, x6, x7, coef, out, NR, ITERS, low, high,
             K: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
             HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    base = row * N
    w = coef + row * K
    _stream(x0, x1, x2, x3, x4, x5, x6, x7,
            _coef(w, 0, K, ACC), _coef(w, 1, K, ACC), _coef(w, 2, K, ACC), _coef(w, 3, K, ACC),
            _coef(w, 4, K, ACC), _coef(w, 5, K, ACC), _coef(w, 6, K, ACC), _coef(w, 7, K, ACC),
            out, base, N, ITERS, low, high, K, BLOCK, ACC, HAS_LOW, HAS_HIGH, x0, (x0, x0, 1, 1), 0, ACC,
            (base, base, base, base, base, base, base, base, base))


def launch_config(n: int, dtype: torch.dtype, per_thread: int = 0):
    """(BLOCK, ALIGN, blocks, iters) for rows of n elements: ``blocks`` programs per row, each
    handling ``iters`` blocks (1 unless a row has more than 65535 blocks); ``per_thread``
    elements per thread and tile instead of one 128-bit vector."""
    block = tile_rows() * (per_thread or vec(dtype))
    tiles = -(-n // block)
    iters = -(-tiles // MAX_GRID_1)
    return block, row_align(n, dtype), -(-tiles // iters), iters


def clamp_args(clamp):
    """(low, high, HAS_LOW, HAS_HIGH) of ``clamp`` = None or (low | None, high | None)."""
    has_low = clamp is not None and clamp[0] is not None
    has_high = clamp is not None and clamp[1] is not None
    return float(clamp[0]) if has_low else 0.0, float(clamp[1]) if has_high else 0.0, has_low, has_high


def tl_acc(dtype: torch.dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def combine(coef, operands, out=None, clamp=None):
    """Weighted sum of K contiguous operands with ``coef[B, G, K]`` (contiguous, in the
    accumulation dtype); writes into ``out`` if given."""
    first = operands[0]
    b, groups = first.shape[0], coef.shape[1]
    n = first[0].numel() // groups
    if out is None:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
    block, align, blocks, iters = launch_config(n, first.dtype)
    low, high, has_low, has_high = clamp_args(clamp)
    _combine[(b * groups, blocks)](*pointers(operands), coef, out, n // align, iters, low, high,
                                   K=len(operands), ALIGN=align, BLOCK=block, ACC=tl_acc(first.dtype),
                                   HAS_LOW=has_low, HAS_HIGH=has_high, num_warps=NUM_WARPS)
    return out
