"""Triton ``combine``: ``out[b, g, :] = sum_k C[b, g, k] * op_k[b, g, :]`` (DESIGN.md, pass 2).

Design
------
A 1-D grid over ``rows x blocks`` (a row is a sample, or a group of it; rows on the slow
index, so the grid never hits the 65535 limit of the second axis). Each program loads the
row's ``[KP]`` weights (fp32; fp64 for fp64 operands), the ``[KP, BLOCK]`` tile of all K
operands with one masked load (base pointer + per-operand element offsets, see
``_common.py``), sums ``w[:, None] * x`` over K in the accumulation type, optionally clamps
and stores in the operands' dtype, into a fresh or a preallocated output.

Limits: K <= 8 operands of one dtype (fp16, bf16, fp32, fp64), contiguous, one device; any
B and N (masking). Every operand is multiplied by its weight even when the weight is zero,
so a NaN/inf operand poisons the output exactly as in the reference (0 * inf = NaN); the
clamp keeps NaN (comparisons with NaN are false), as ``torch.clamp`` does.

Reference: :func:`reference` below (the same maths as ``gradguide.ops.reference.combine``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, element_offsets, interpreted, k_padded, next_pow2
from .reduce import _offsets


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
def _combine(base, d0, d1, d2, d3, d4, d5, d6, d7, coef, out, N, BLOCKS, low, high,
             K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
             HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // BLOCKS).to(tl.int64)
    blk = pid % BLOCKS
    ks = tl.arange(0, KP)
    kmask = ks < K
    w = tl.load(coef + row * K + ks, mask=kmask, other=0.0).to(ACC)
    e = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    emask = e < N
    offs = _offsets(d0, d1, d2, d3, d4, d5, d6, d7, ks) + row * N
    x = tl.load(base + offs[:, None] + e[None, :], mask=kmask[:, None] & emask[None, :], other=0.0).to(ACC)
    v = _clamp(tl.sum(w[:, None] * x, axis=0), low, high, HAS_LOW, HAS_HIGH)
    tl.store(out + row * N + e, v.to(out.dtype.element_ty), mask=emask)


def launch_config(k: int, n: int):
    kp = k_padded(k)
    block = 8192 // kp if interpreted() else max(128, 4096 // kp)
    block = min(block, max(16, next_pow2(n)))
    return kp, block, -(-n // block)


def combine(coef, operands, out=None, clamp=None):
    """Weighted sum of K contiguous operands with ``coef[B, G, K]``; writes into ``out`` if given."""
    first = operands[0]
    k = len(operands)
    b, groups = first.shape[0], coef.shape[1]
    n = first[0].numel() // groups
    acc = acc_dtype(first.dtype)
    coef = coef.to(acc).contiguous()
    if out is None:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
    kp, block, blocks = launch_config(k, n)
    has_low = clamp is not None and clamp[0] is not None
    has_high = clamp is not None and clamp[1] is not None
    low = float(clamp[0]) if has_low else 0.0
    high = float(clamp[1]) if has_high else 0.0
    _combine[(b * groups * blocks,)](first, *element_offsets(operands), coef, out, n, blocks, low, high,
                                     K=k, KP=kp, BLOCK=block, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                     HAS_LOW=has_low, HAS_HIGH=has_high)
    return out
