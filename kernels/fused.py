"""Triton fused combine: a built-in policy's coefficient program folded into ``combine``.

Design
------
Same grid, tiles, loads and store as ``combine.py`` (grid ``(rows, blocks)``, one pointer
argument per operand, 128-bit loads when rows keep 16-byte alignment, sum over K in
fp32/fp64, optional clamp: the loop is combine's ``_stream``). The prologue of every
program evaluates the policy's coefficient program for its row instead of reading
precomputed weights: it loads the row's ``[KP, KP]`` Gram matrix (from ``reduce``), up to
four ``[KP]`` coefficient vectors and up to six per-sample scalars (device tensors,
broadcast with stride 0 when shared by the batch), and computes inner products as
``u^T Gram v``. The programs of one row repeat this ~100-flop prologue; that costs nothing
next to the tile, and it removes the tiny launches of a separate coefficient step and keeps
every per-step scalar on the device (no host sync, graph-capturable). The ``[KP]``
coefficient vector is then split into K scalar weights for the streaming loop.

Policies (the formulas and their plain-torch truth are in ``gradguide/ops/policies.py``):
``cfg``, ``pxp-a``, ``pxp-b``, ``pxp-c``, ``apg`` (no momentum), ``gloss``.

Limits: those of ``combine.py``; the Gram matrix must be the one of these operands (same K,
same rows). Zero-norm partners follow the safe division of the reference (a projection
against a zero vector is the identity; APG's clip leaves a zero Δ alone).

Reference: :func:`reference` below.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, k_padded, pointers
from .combine import _stream, clamp_args, launch_config, tl_acc

POLICY_IDS = {"cfg": 0, "pxp-a": 1, "pxp-b": 2, "pxp-c": 3, "apg": 4, "gloss": 5}


def reference(policy, gram, vectors, scalars, operands, clamp=None):
    """Plain torch: the policy's coefficients, then the reference combine."""
    from gradguide.ops import policies
    from .combine import reference as combine_reference
    return combine_reference(policies.coefficients(policy, gram, vectors, scalars), operands, clamp)


@triton.jit
def _dot(G, u, v):
    return tl.sum(tl.sum(G * u[:, None] * v[None, :], axis=1), axis=0)


@triton.jit
def _safe_div(num, den):
    # 0 where den == 0 (a zero-norm partner); NaN propagates (a non-finite operand poisons the row)
    ok = den != 0
    return tl.where(ok, num / tl.where(ok, den, 1.0), 0.0)


@triton.jit
def _min0(x):  # min(x, 0) keeping NaN, as torch.clamp (tl.minimum may drop NaN)
    return tl.where(x > 0.0, 0.0, x)


@triton.jit
def _max0(x):  # max(x, 0) keeping NaN
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _pc(G, a, b, delta):
    """PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b, a where ‖b‖ = 0."""
    f = _safe_div(_min0(_dot(G, a, b)), _max0(_dot(G, b, b)))
    return a - b * (f * delta)


@triton.jit
def _pick(coef, ks, k: tl.constexpr, K: tl.constexpr):
    """Entry k of the [KP] coefficient vector as a scalar (0 past K)."""
    if k < K:
        return tl.sum(tl.where(ks == k, coef, 0.0), 0)
    else:
        return tl.sum(tl.where(ks == 0, coef, 0.0), 0) * 0.0


@triton.jit(do_not_specialize=["NR", "ITERS", "GROUPS"])
def _fused(x0, x1, x2, x3, x4, x5, x6, x7, gram, v0, v1, v2, v3,
           s0, s1, s2, s3, s4, s5, t0, t1, t2, t3, t4, t5,
           out, NR, ITERS, GROUPS, low, high,
           POLICY: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
           ACC: tl.constexpr, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // GROUPS
    ks = tl.arange(0, KP)
    kmask = ks < K
    # --- prologue: the coefficient program of this row --------------------------------
    vb = tl.load(v0 + row * K + ks, mask=kmask, other=0.0).to(ACC)
    va = tl.load(v1 + row * K + ks, mask=kmask, other=0.0).to(ACC)
    if POLICY != 5:
        vc = tl.load(v2 + row * K + ks, mask=kmask, other=0.0).to(ACC)
    if POLICY != 0:
        G = tl.load(gram + row * K * K + ks[:, None] * K + ks[None, :],
                    mask=kmask[:, None] & kmask[None, :], other=0.0).to(ACC)
    if POLICY == 0:  # cfg: base + uncond + w (cond − uncond)
        w = tl.load(s0 + b * t0).to(ACC)
        coef = vb + vc + w * (va - vc)
    elif POLICY == 1 or POLICY == 2:  # PixelAsParam A / B: v1 = den, v2 = cls, v3 = div
        vd = tl.load(v3 + row * K + ks, mask=kmask, other=0.0).to(ACC)
        dl = tl.load(s0 + b * t0).to(ACC)
        den1 = _pc(G, va, vc, dl)
        cls1 = _pc(G, vc, va, dl)
        if POLICY == 1:
            coef = vb + den1 + cls1 + vd
        else:
            coef = vb + den1 + _pc(G, cls1, vd, dl) + _pc(G, vd, vc, dl)
    elif POLICY == 3:  # PixelAsParam C: v1 = x0_cond, v2 = x0_uncond; s = scale, delta, delta2, post
        w = tl.load(s0 + b * t0).to(ACC)
        dl1 = tl.load(s1 + b * t1).to(ACC)
        dl2 = tl.load(s2 + b * t2).to(ACC)
        post = tl.load(s3 + b * t3).to(ACC)
        dlt = (va - vc) * (w - 1.0)
        coef = vb + post * (_pc(G, va, dlt, dl1) + _pc(G, dlt, va, dl2))
    elif POLICY == 4:  # APG: v1 = d_cond, v2 = d_uncond; s = scale, eta, norm_threshold, post
        w = tl.load(s0 + b * t0).to(ACC)
        eta = tl.load(s1 + b * t1).to(ACC)
        r = tl.load(s2 + b * t2).to(ACC)
        post = tl.load(s3 + b * t3).to(ACC)
        dlt = va - vc
        norm = tl.sqrt(_max0(_dot(G, dlt, dlt)))
        clip = tl.where(norm > 0, tl.minimum(_safe_div(r, norm), 1.0), 1.0)
        dlt = tl.where(r > 0, dlt * clip, dlt)
        par = va * _safe_div(_dot(G, dlt, va), _max0(_dot(G, va, va)))
        coef = vb + post * (va + (dlt - par + par * eta) * (w - 1.0))
    else:  # G_loss: v1 = vjp; s = a, h, sigma, residual, post
        a = tl.load(s0 + b * t0).to(ACC)
        h = tl.load(s1 + b * t1).to(ACC)
        sg = tl.load(s2 + b * t2).to(ACC)
        res = tl.load(s3 + b * t3).to(ACC)
        post = tl.load(s4 + b * t4).to(ACC)
        a2 = a * a
        beta = (a2 / 2) / (a2 * sg * sg + h * _max0(_dot(G, va, va)))
        coef = vb + va * (post * res * beta)
    # --- the combine (combine.py's loop, with these weights) -------------------------------
    _stream(x0, x1, x2, x3, x4, x5, x6, x7,
            _pick(coef, ks, 0, K), _pick(coef, ks, 1, K), _pick(coef, ks, 2, K), _pick(coef, ks, 3, K),
            _pick(coef, ks, 4, K), _pick(coef, ks, 5, K), _pick(coef, ks, 6, K), _pick(coef, ks, 7, K),
            out, row, NR, ITERS, low, high, K, ALIGN, BLOCK, ACC, HAS_LOW, HAS_HIGH)


def fused_combine(policy, gram, vectors, scalars, operands, out=None, clamp=None):
    """``policy``'s coefficients and the combine in one kernel.

    ``gram``: ``[B, G, K, K]`` (ignored by ``cfg``); ``vectors``: the policy's coefficient
    vectors in order, each ``[B, G, K]`` contiguous in the accumulation dtype; ``scalars``: its
    scalars in order, each a 1-element or ``[B]`` tensor in the accumulation dtype.
    """
    if policy not in POLICY_IDS:
        raise NotImplementedError(f"policy {policy!r}: the Triton fused kernel implements {tuple(POLICY_IDS)}")
    first = operands[0]
    k = len(operands)
    b, groups = first.shape[0], vectors[0].shape[1]
    n = first[0].numel() // groups
    if out is None:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
    block, align, blocks, iters = launch_config(n, first.dtype)
    vecs = list(vectors) + [vectors[0]] * (4 - len(vectors))
    sc = list(scalars) + [vectors[0]] * (6 - len(scalars))
    strides = [1 if t.numel() > 1 else 0 for t in scalars] + [0] * (6 - len(scalars))
    low, high, has_low, has_high = clamp_args(clamp)
    g = gram if gram is not None else vectors[0]
    _fused[(b * groups, blocks)](
        *pointers(operands), g, *vecs, *sc, *strides, out, n // align, iters, groups, low, high,
        POLICY=POLICY_IDS[policy], K=k, KP=k_padded(k), ALIGN=align, BLOCK=block, ACC=tl_acc(first.dtype),
        HAS_LOW=has_low, HAS_HIGH=has_high, num_warps=NUM_WARPS)
    return out
