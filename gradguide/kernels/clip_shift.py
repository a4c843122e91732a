"""Triton ``clip_shift``: ``clamp(p)`` and ``clamp(p + s) - clamp(p)`` in one pass (docs/architecture.md#precision).

With ``p = sum_k coef_p[b, k] op_k`` and ``s = sum_k coef_s[b, k] op_k``, a clipped x̂_0 and its
clipped guidance shift (policy C's clipped branch difference). The shift is ``s`` itself where
neither ``p`` nor ``p + s`` lies outside ``(low, high)`` and ``clamp(p + s) - clamp(p)``
elsewhere: formed as a difference of the two clamped values it would keep only ``p``'s
absolute precision, which is most of a small ``s``.

Design
------
Grid, tiles and loads of ``combine.py``: ``(rows, blocks)`` with a row a sample, one pointer
argument per operand, 128-bit loads when rows keep 16-byte alignment, K <= 8 operands loaded
once each and accumulated into both ``p`` and ``s`` in float64 for every dtype, as the
reference and the native CPU op do: ``p`` is an x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ whose weights (~160
at t = 999) cancel to a result of size 1, and a float32 accumulator here put the pinned precision case's
float32-vs-float64 sample error over 1e-4 (1.4-3.9e-4, tests/core/test_precision.py); products of
fp16/bf16/fp32 values are exact in float64. The cost is 2K float64 FMAs per element, under
the memory bound on A100/H100 (fp64 at half the fp32 rate). The float64 coefficient rows
``[1 or B, K]`` are read through strides (0 on a broadcast batch dimension; no expand, cast or
copy in the glue). Two stores in the operands' dtype (fp16/bf16 through fp32: a double
rounding, at most one unit in the last place on a tie).

NaN and inf follow the reference: every operand is multiplied by both weights (0 * inf =
NaN), the clamp keeps NaN (comparisons with NaN are false), and a NaN ``p`` or ``p + s`` is
never "inside", so its shift is ``clamp(q) - clamp(p)`` = NaN.

Limits: those of ``combine.py`` (one dtype and device, contiguous operands, rows shorter than
2**31 elements); ``low < high`` (checked by ``gradguide.ops``), passed as fp32 kernel
arguments like combine's clamp bounds (exact for the usual ±1; a bound not representable in
fp32 is rounded to it, also for fp64 operands).

Reference: :func:`reference` below (the maths of ``gradguide.ops.reference.clip_shift``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, pointers, tile_rows
from .combine import MAX_GRID_1, launch_config


def reference(coef_p, coef_s, operands, clip):
    """Plain torch, accumulated in float64 as the kernel; coefs ``[1 or B, K]``."""
    first = operands[0]
    acc = torch.float64
    b, k = first.shape[0], len(operands)
    rows = torch.stack([op.reshape(b, -1).to(acc) for op in operands], dim=1)     # [B, K, N]
    p = (coef_p.to(acc).expand(b, k).unsqueeze(-1) * rows).sum(1)
    s = (coef_s.to(acc).expand(b, k).unsqueeze(-1) * rows).sum(1)
    low, high = clip
    q = p + s
    inside = (p > low) & (p < high) & (q > low) & (q < high)
    shift = torch.where(inside, s, q.clamp(low, high) - p.clamp(low, high))
    return p.clamp(low, high).reshape(first.shape).to(first.dtype), shift.reshape(first.shape).to(first.dtype)


@triton.jit
def _clip(v, low, high):
    return tl.where(v < low, low, tl.where(v > high, high, v))   # NaN stays NaN


@triton.jit
def _w(row_ptr, sk, k: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    """Weight k of a coefficient row (float64 in memory; stride sk over K), in ACC."""
    if k < K:
        return tl.load(row_ptr + k * sk).to(ACC)
    else:
        return tl.zeros([], dtype=ACC)


@triton.jit
def _acc2(x, a, b, wp, ws, sp, ss, k: tl.constexpr, offs, m, p, s, ACC: tl.constexpr, LATE: tl.constexpr):
    """Operand k's tile into both sums: p += a * x, s += b * x. LATE: the two float64 weights
    are loaded here, next to their use (one cached 8-byte load each per tile), instead of
    hoisted for all K: fp32 rows (4 float64 lanes of two sums) with 2K hoisted float64 weights
    need 72-80 registers at K = 7, 8; fp16/bf16 rows (8 lanes) fit only with them hoisted."""
    v = tl.load(x + offs, mask=m, other=0.0).to(ACC)
    if LATE:
        a = tl.load(wp + k * sp).to(ACC)
        b = tl.load(ws + k * ss).to(ACC)
    return p + a * v, s + b * v


@triton.jit(do_not_specialize=["NR", "ITERS"])
def _clip_shift(x0, x1, x2, x3, x4, x5, x6, x7, cp, cs, cp_sb, cp_sk, cs_sb, cs_sk, out_c, out_s, NR, ITERS,
                low, high, K: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                NARROW: tl.constexpr, LATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    wp = cp + row * cp_sb
    ws = cs + row * cs_sb
    a0, a1, a2, a3 = _w(wp, cp_sk, 0, K, ACC), _w(wp, cp_sk, 1, K, ACC), _w(wp, cp_sk, 2, K, ACC), _w(wp, cp_sk, 3, K, ACC)
    a4, a5, a6, a7 = _w(wp, cp_sk, 4, K, ACC), _w(wp, cp_sk, 5, K, ACC), _w(wp, cp_sk, 6, K, ACC), _w(wp, cp_sk, 7, K, ACC)
    b0, b1, b2, b3 = _w(ws, cs_sk, 0, K, ACC), _w(ws, cs_sk, 1, K, ACC), _w(ws, cs_sk, 2, K, ACC), _w(ws, cs_sk, 3, K, ACC)
    b4, b5, b6, b7 = _w(ws, cs_sk, 4, K, ACC), _w(ws, cs_sk, 5, K, ACC), _w(ws, cs_sk, 6, K, ACC), _w(ws, cs_sk, 7, K, ACC)
    lo = low + tl.zeros([], dtype=ACC)   # (a float argument is fp32, as combine's clamp bounds)
    hi = high + tl.zeros([], dtype=ACC)
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    base = row * N
    blk = tl.program_id(1)
    blocks = tl.num_programs(1)
    for i in range(ITERS):
        e = (blk + i * blocks) * BLOCK + tl.arange(0, BLOCK)
        m = e < N
        offs = base + e
        p = tl.zeros([BLOCK], dtype=ACC)
        s = tl.zeros([BLOCK], dtype=ACC)
        p, s = _acc2(x0, a0, b0, wp, ws, cp_sk, cs_sk, 0, offs, m, p, s, ACC, LATE)
        if K > 1:
            p, s = _acc2(x1, a1, b1, wp, ws, cp_sk, cs_sk, 1, offs, m, p, s, ACC, LATE)
        if K > 2:
            p, s = _acc2(x2, a2, b2, wp, ws, cp_sk, cs_sk, 2, offs, m, p, s, ACC, LATE)
        if K > 3:
            p, s = _acc2(x3, a3, b3, wp, ws, cp_sk, cs_sk, 3, offs, m, p, s, ACC, LATE)
        if K > 4:
            p, s = _acc2(x4, a4, b4, wp, ws, cp_sk, cs_sk, 4, offs, m, p, s, ACC, LATE)
        if K > 5:
            p, s = _acc2(x5, a5, b5, wp, ws, cp_sk, cs_sk, 5, offs, m, p, s, ACC, LATE)
        if K > 6:
            p, s = _acc2(x6, a6, b6, wp, ws, cp_sk, cs_sk, 6, offs, m, p, s, ACC, LATE)
        if K > 7:
            p, s = _acc2(x7, a7, b7, wp, ws, cp_sk, cs_sk, 7, offs, m, p, s, ACC, LATE)
        q = p + s
        pc = _clip(p, lo, hi)
        inside = (p > lo) & (p < hi) & (q > lo) & (q < hi)
        shift = tl.where(inside, s, _clip(q, lo, hi) - pc)   # exactly s where nothing clips
        if NARROW:   # fp16/bf16: float64 -> fp32 -> dtype (the interpreter's direct float64 -> bf16 is wrong)
            pc = pc.to(tl.float32)
            shift = shift.to(tl.float32)
        tl.store(out_c + offs, pc.to(out_c.dtype.element_ty), mask=m)
        tl.store(out_s + offs, shift.to(out_s.dtype.element_ty), mask=m)


def _strides(c, name):
    """(batch stride, K stride) of a ``[1 or B, K]`` coefficient row set; 0 on a broadcast batch."""
    if c.dtype != torch.float64 or c.dim() != 2:
        raise ValueError(f"{name}: expected a float64 [1 or B, K] tensor, got {c.dtype} {tuple(c.shape)}")
    return (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


def clip_shift(coef_p, coef_s, operands, clip):
    """``(clamp(p), clamp(p + s) - clamp(p))`` of K <= 8 contiguous operands ``[B, ...]``;
    ``coef_p`` / ``coef_s``: float64 ``[1 or B, K]`` (any strides); ``clip = (low, high)``."""
    first = operands[0]
    b = first.shape[0]
    n = first.numel() // b if b else 0
    clipped = torch.empty_like(first, memory_format=torch.contiguous_format)
    shift = torch.empty_like(first, memory_format=torch.contiguous_format)
    if first.numel() == 0:
        return clipped, shift
    block, align, blocks, iters = launch_config(n, first.dtype)
    if align == 1:   # scalar loads: 2 elements a thread (not a vector's worth), so the float64
        block = tile_rows() * 2   # accumulators of fp16/bf16/fp32 rows stay within 64 registers
        tiles = -(-n // block)
        iters = -(-tiles // MAX_GRID_1)
        blocks = -(-tiles // iters)
    _clip_shift[(b, blocks)](*pointers(operands), coef_p, coef_s, *_strides(coef_p, "coef_p"),
                             *_strides(coef_s, "coef_s"), clipped, shift, n // align, iters,
                             float(clip[0]), float(clip[1]), K=len(operands), ALIGN=align, BLOCK=block,
                             ACC=tl.float64,
                             NARROW=first.dtype in (torch.float16, torch.bfloat16),
                             LATE=first.dtype == torch.float32, num_warps=NUM_WARPS)
    return clipped, shift
