"""Triton fused combine: a built-in policy's coefficient program folded into ``combine``.

Design
------
Same grid, tiles, loads and store as ``combine.py`` (grid ``(rows, blocks)``, one pointer
argument per operand, 128-bit loads when rows keep 16-byte alignment, sum over K in
fp32/fp64, optional clamp: the loop is combine's ``_stream``). The prologue of every
program evaluates the policy's coefficient program for its row instead of reading
precomputed weights: it loads the row's ``[Kg, Kg]`` Gram matrix (from ``reduce``, over the
first Kg <= K operands), up to four ``[K]`` coefficient vectors and up to eight per-sample
scalars, and computes inner products as ``u^T Gram v``. The programs of one row repeat this
~100-flop prologue; that costs nothing next to the tile, and it removes the tiny launches of
a separate coefficient step and keeps every per-step scalar on the device (no host sync,
graph-capturable). The ``[KP]`` coefficient vector is then split into K scalar weights for
the streaming loop.

The prologue runs in float64 whatever the operands' dtype, as the native op
(``csrc/gradguide_ops.cpp``) and the torch truth (``gradguide/ops/policies.py``) do: rules
take inner products of small combinations of large operands (docs/architecture.md#precision), and a float32
``u^T G u`` loses what the float64 Gram keeps. The weights are rounded to the streaming
accumulator's dtype (fp32; fp64 for fp64 operands) only once, for the loop.

Inputs are read as the step holds them, so the glue launches nothing but this kernel: the
Gram in its own dtype and size (``Kg`` is a constexpr; no padding to K), the coefficient
vectors as ``[1 or B, 1 or G, K]`` views (a row reads them through strides, 0 for a
broadcast dimension; no expand/copy), the scalars as 1- or B-element tensors (stride 0 or 1)
of any float dtype (no cast).

Policies (the formulas and their plain-torch truth are in ``gradguide/ops/policies.py``):
``linear``, ``cfg``, ``pxp-a``, ``pxp-b``, ``pxp-c``, ``apg`` (no momentum), ``lookahead``,
``tcfg``, ``mambo``. This prologue is a twin of those Python programs (the one definition of
each formula); ``tests/kernels/test_kernels.py`` holds its table (names, arities) to theirs and every
program to them on random inputs.

Row-strided and Σ-scaled operands (``scaling.py``): the operands and the log-scale are read
from their own row starts (``b * stride(0) + g * N``; the output is contiguous); a scaled
operand is formed in fp32 (fp64 for fp64 operands) as it is loaded, its slope and offset read
where it is formed, and enters the weighted sum like any operand value.

Limits: those of ``combine.py`` (but operands whose every sample is contiguous); the Gram matrix must be the one of the first Kg operands
(same rows). Zero-norm partners follow the safe division of the reference (a projection
against a zero vector is the identity; APG's clip leaves a zero Δ alone). Non-finite values
follow the one rule of every backend (``gradguide/ops/policies.py``): a NaN/inf among a row's
program inputs (Gram block, coefficient vectors, scalars) or computed weights makes all of the
row's weights NaN, so the whole row of the output is NaN.

Reference: ``gradguide.ops.policies.coefficients`` (the float64 truth of every policy) followed
by :func:`combine.reference`; the kernels package sits below ``gradguide.ops`` and imports
nothing from it, so that reference lives there, and ``tests/kernels/test_kernels.py`` holds this kernel
to it for every policy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, batch_strides, k_padded, pointers, scaling_args, strided_align, vec
from .combine import _stream, clamp_args, launch_config, tl_acc

POLICY_IDS = {"cfg": 0, "pxp-a": 1, "pxp-b": 2, "pxp-c": 3, "apg": 4, "linear": 6, "lookahead": 7,
              "tcfg": 8, "mambo": 9}
# coefficient vectors and scalars each policy reads (the order of gradguide/ops/policies.py)
ARITY = {"cfg": (3, 1), "pxp-a": (4, 1), "pxp-b": (4, 1), "pxp-c": (3, 4), "apg": (3, 4), "linear": (1, 0), "lookahead": (4, 8), "tcfg": (3, 3), "mambo": (3, 4)}
NEEDS_GRAM = {p: p not in ("cfg", "linear") for p in POLICY_IDS}
MAX_VECTORS, MAX_SCALARS = 4, 8
# Σ-scaled operands keep a (slope', offset') pair per scaled operand live through the loop: every
# operand scaled at K = 8 took 72-80 registers on sm_86. Up to 6 operands fit a 64-register
# ceiling without spilling (the other kernels' budget); from 7 it spilled 8-64 B (fp64 linear
# K = 8, fp32 clamped K = 7-8, every operand scaled at K = 8 on sm_100/120), and 128 still spilled
# 8 B (bf16 PxP-A, all 8 scaled, sm_100): those get 168, at a half or a third of the resident
# warps (gradguide check-kernels gates it: no spills, <= SCALED_MAXNREG_WIDE registers)
SCALED_MAXNREG, SCALED_MAXNREG_WIDE, SCALED_WIDE_K = 64, 168, 7


def scaled_maxnreg(k: int) -> int:
    """The register ceiling of a fused combine over ``k`` operands with Σ-scaled ones."""
    return SCALED_MAXNREG_WIDE if k >= SCALED_WIDE_K else SCALED_MAXNREG


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
def _min1(x):  # min(x, 1) keeping NaN, as torch.clamp(max=1)
    return tl.where(x > 1.0, 1.0, x)


@triton.jit
def _nonfinite(x):
    """1 where x is NaN or ±inf, else 0 (NaN < inf is false)."""
    return tl.where(tl.abs(x) < float("inf"), 0, 1)


@triton.jit
def _pc(G, a, b, delta):
    """PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b, a where ‖b‖ = 0."""
    f = _safe_div(_min0(_dot(G, a, b)), _max0(_dot(G, b, b)))
    return a - b * (f * delta)


@triton.jit
def _vector(v, sb, sg, b, g, ks, kmask):
    """Row (b, g) of a ``[1 or B, 1 or G, K]`` coefficient vector (stride 0 on a broadcast dim), float64."""
    return tl.load(v + b * sb + g * sg + ks, mask=kmask, other=0.0).to(tl.float64)


@triton.jit
def _scalar(s, st, b):
    """Sample b's value of a 1- or B-element scalar (stride 0 or 1), float64."""
    return tl.load(s + b * st).to(tl.float64)


@triton.jit
def _pick(coef, ks, k: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    """Entry k of the [KP] coefficient vector as a scalar weight in ACC (0 past K)."""
    if k < K:
        return tl.sum(tl.where(ks == k, coef, 0.0), 0).to(ACC)
    else:
        return tl.zeros([], dtype=ACC)


@triton.jit(do_not_specialize=["NR", "ITERS", "GROUPS", "SB0", "SB1", "SB2", "SB3", "SB4", "SB5", "SB6", "SB7",
                               "SBV", "SLB", "OFB"])
def _fused(x0, x1, x2, x3, x4, x5, x6, x7, gram, v0, v1, v2, v3, vb0, vg0, vb1, vg1, vb2, vg2, vb3, vg3,
           s0, s1, s2, s3, s4, s5, s6, s7, t0, t1, t2, t3, t4, t5, t6, t7,
           out, NR, ITERS, GROUPS, low, high, xv, slope, offset,
           SB0, SB1, SB2, SB3, SB4, SB5, SB6, SB7, SBV, SLB, OFB,
           POLICY: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KG: tl.constexpr, ALIGN: tl.constexpr,
           BLOCK: tl.constexpr, ACC: tl.constexpr, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr,
           SCALED: tl.constexpr, SLK: tl.constexpr, OFK: tl.constexpr, OFF32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // GROUPS
    g = row % GROUPS
    ks = tl.arange(0, KP)
    kmask = ks < K
    # --- prologue: the coefficient program of this row, in float64 ---------------------------
    # bad: how many of the row's program inputs (and, at the end, weights) are NaN/inf; any
    # makes every weight NaN (the non-finite rule, module doc). Masked lanes load 0 (finite).
    vb = _vector(v0, vb0, vg0, b, g, ks, kmask)
    bad = tl.sum(_nonfinite(vb), 0)
    if POLICY != 6:   # every policy but linear has a second vector
        va = _vector(v1, vb1, vg1, b, g, ks, kmask)
        bad += tl.sum(_nonfinite(va), 0)
    if POLICY != 6:
        vc = _vector(v2, vb2, vg2, b, g, ks, kmask)
        bad += tl.sum(_nonfinite(vc), 0)
    if POLICY != 0 and POLICY != 6:   # the Gram of the first KG operands (zero beyond them)
        gmask = ks < KG
        G = tl.load(gram + row * KG * KG + ks[:, None] * KG + ks[None, :],
                    mask=gmask[:, None] & gmask[None, :], other=0.0).to(tl.float64)
        bad += tl.sum(tl.sum(_nonfinite(G), 1), 0)
    if POLICY == 6:  # linear: the weights themselves
        coef = vb
    elif POLICY == 0:  # cfg: base + uncond + w (cond − uncond)
        w = _scalar(s0, t0, b)
        bad += _nonfinite(w)
        coef = vb + vc + w * (va - vc)
    elif POLICY == 1 or POLICY == 2:  # PixelAsParam A / B: v1 = den, v2 = cls, v3 = div
        vd = _vector(v3, vb3, vg3, b, g, ks, kmask)
        dl = _scalar(s0, t0, b)
        bad += tl.sum(_nonfinite(vd), 0) + _nonfinite(dl)
        den1 = _pc(G, va, vc, dl)
        cls1 = _pc(G, vc, va, dl)
        if POLICY == 1:
            coef = vb + den1 + cls1 + vd
        else:
            coef = vb + den1 + _pc(G, cls1, vd, dl) + _pc(G, vd, vc, dl)
    elif POLICY == 3:  # PixelAsParam C: v1 = x0_cond, v2 = x0_uncond; s = scale, delta, delta2, post
        w = _scalar(s0, t0, b)
        dl1 = _scalar(s1, t1, b)
        dl2 = _scalar(s2, t2, b)
        post = _scalar(s3, t3, b)
        bad += _nonfinite(w) + _nonfinite(dl1) + _nonfinite(dl2) + _nonfinite(post)
        dlt = (va - vc) * (w - 1.0)
        coef = vb + post * (_pc(G, va, dlt, dl1) + _pc(G, dlt, va, dl2))
    elif POLICY == 4:  # APG: v1 = d_cond, v2 = d_uncond; s = scale, eta, norm_threshold, post
        w = _scalar(s0, t0, b)
        eta = _scalar(s1, t1, b)
        r = _scalar(s2, t2, b)
        post = _scalar(s3, t3, b)
        bad += _nonfinite(w) + _nonfinite(eta) + _nonfinite(r) + _nonfinite(post)
        dlt = va - vc
        norm = tl.sqrt(_max0(_dot(G, dlt, dlt)))
        clip = tl.where(norm > 0, _min1(_safe_div(r, norm)), 1.0)
        dlt = tl.where(r > 0, dlt * clip, dlt)
        par = va * _safe_div(_dot(G, dlt, va), _max0(_dot(G, va, va)))
        coef = vb + post * (va + (dlt - par + par * eta) * (w - 1.0))
    elif POLICY == 8:  # TCFG: v1 = cond, v2 = uncond (raw outputs); s = scale, original, post
        w = _scalar(s0, t0, b)
        orig = _scalar(s1, t1, b)
        post = _scalar(s2, t2, b)
        bad += _nonfinite(w) + _nonfinite(orig) + _nonfinite(post)
        ga = _max0(_dot(G, va, va))
        gd = _max0(_dot(G, vc, vc))
        gb = _dot(G, va, vc)
        r = tl.sqrt((ga - gd) * (ga - gd) + 4.0 * gb * gb)
        cos2 = tl.where(r > 0, _safe_div(ga - gd, r), -1.0)
        sin2 = tl.where(r > 0, _safe_div(2.0 * gb, r), 0.0)
        u1 = va * (0.5 * sin2) + vc * (0.5 * (1.0 - cos2))
        anchor = tl.where(orig != 0, va, u1)
        coef = vb + post * (anchor + w * (va - u1))
    elif POLICY == 9:  # MAMBO-G: v1 = cond, v2 = uncond (raw outputs); s = scale, alpha, original, post
        w = _scalar(s0, t0, b)
        alpha = _scalar(s1, t1, b)
        orig = _scalar(s2, t2, b)
        post = _scalar(s3, t3, b)
        bad += _nonfinite(w) + _nonfinite(alpha) + _nonfinite(orig) + _nonfinite(post)
        diff = va - vc
        norm_u = tl.sqrt(_max0(_dot(G, vc, vc)))
        decay = tl.exp(-alpha * _safe_div(tl.sqrt(_max0(_dot(G, diff, diff))), norm_u))
        decay = tl.where((norm_u > 0) | (alpha <= 0), decay, 0.0)
        weight = tl.where(orig != 0, w * decay, 1.0 + (w - 1.0) * decay)
        coef = vb + post * (tl.where(orig != 0, va, vc) + weight * diff)
    else:  # lookahead: v1 = x0, v2 = vjp, v3 = reward; s = a, h, sigma, target, multiplier, beta,
        #   beta_per_sample, post (G_loss with gᵀx̂_0 from the Gram, as a fused step runs it)
        vr = _vector(v3, vb3, vg3, b, g, ks, kmask)
        a = _scalar(s0, t0, b)
        h = _scalar(s1, t1, b)
        sg = _scalar(s2, t2, b)
        target = _scalar(s3, t3, b)
        mult = _scalar(s4, t4, b)
        beta_fixed = _scalar(s5, t5, b)
        per = _scalar(s6, t6, b)
        post = _scalar(s7, t7, b)
        bad += tl.sum(_nonfinite(vr), 0) + _nonfinite(a) + _nonfinite(h) + _nonfinite(sg) + _nonfinite(target)
        bad += _nonfinite(mult) + _nonfinite(beta_fixed) + _nonfinite(per) + _nonfinite(post)
        a2 = a * a
        beta = (a2 / 2) / (a2 * sg * sg + h * _max0(_dot(G, vc, vc)))
        beta = tl.where(per != 0, beta, beta_fixed)
        residual = 2 * mult * (target - _dot(G, vr, va))
        coef = vb + vc * (post * residual * beta)
    bad += tl.sum(tl.where(kmask, _nonfinite(coef), 0), 0)
    coef = tl.where(bad == 0, coef, float("nan"))
    # --- the combine (combine.py's loop, with these weights) -------------------------------
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    gN = g * N
    # Σ-scaled operands (scaling.py): formed in fp32, fp64 for fp64 operands (ACC is fp64 for
    # fp32 operands too, so F follows the operands' dtype, not ACC)
    F: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    sc = (slope + b * SLB, offset + b * OFB, SLK, OFK)   # read where a scaled operand is formed (scaling.py)
    # row (b, g) of each operand and of the log-scale: their own batch strides (row-strided
    # operands, scaling.py), as int32 offsets where every element is within 2**31 of its
    # tensor's start (OFF32: the glue checks); the output is contiguous
    OT: tl.constexpr = tl.int32 if OFF32 else tl.int64
    bo = b.to(OT)
    gO = gN.to(OT)
    ro = ((bo * SB0) * ALIGN + gO, (bo * SB1) * ALIGN + gO, (bo * SB2) * ALIGN + gO, (bo * SB3) * ALIGN + gO,
          (bo * SB4) * ALIGN + gO, (bo * SB5) * ALIGN + gO, (bo * SB6) * ALIGN + gO, (bo * SB7) * ALIGN + gO,
          (bo * SBV) * ALIGN + gO)
    _stream(x0, x1, x2, x3, x4, x5, x6, x7,
            _pick(coef, ks, 0, K, ACC), _pick(coef, ks, 1, K, ACC), _pick(coef, ks, 2, K, ACC),
            _pick(coef, ks, 3, K, ACC), _pick(coef, ks, 4, K, ACC), _pick(coef, ks, 5, K, ACC),
            _pick(coef, ks, 6, K, ACC), _pick(coef, ks, 7, K, ACC),
            out, (row * N).to(OT), N, ITERS, low, high, K, BLOCK, ACC, HAS_LOW, HAS_HIGH, xv, sc, SCALED, F, ro)


def _offsets_fit_int32(tensors, block: int) -> bool:
    """Whether every element offset a program forms (its row start plus a block's reach) stays
    below 2**31 for each tensor."""
    return all((t.shape[0] - 1) * t.stride(0) + t[0].numel() + block < 2 ** 31 for t in tensors)


def _broadcast_strides(v, b, groups, k):
    """(batch stride, group stride) of a ``[1 or B, 1 or G, K]`` vector; 0 on a broadcast dimension."""
    if v.dim() != 3 or v.shape[0] not in (1, b) or v.shape[1] not in (1, groups) or v.shape[2] != k \
            or v.stride(2) != 1:
        raise ValueError(f"vectors: expected [1 or B={b}, 1 or G={groups}, K={k}] with unit stride over K, "
                         f"got {tuple(v.shape)} strides {tuple(v.stride())}")
    return (v.stride(0) if v.shape[0] > 1 else 0), (v.stride(1) if v.shape[1] > 1 else 0)


def fused_combine(policy, gram, vectors, scalars, operands, out=None, clamp=None, scaling=None):
    """``policy``'s coefficients and the combine in one kernel.

    ``gram``: ``[B, G, Kg, Kg]`` over the first Kg <= K operands, contiguous, any float dtype
    (None for ``cfg``/``linear``); ``vectors``: the policy's coefficient vectors in order, each
    ``[1 or B, 1 or G, K]`` with unit stride over K, any float dtype; ``scalars``: its scalars
    in order, each a 1-element or ``[B]`` contiguous tensor of any float dtype; ``operands``
    (and ``scaling``'s log-scale) row-strided, ``scaling`` None or ``(log_scale, slope, offset,
    mask)`` (``scaling.py``); ``out`` (or the fresh output) contiguous.
    """
    if policy not in POLICY_IDS:
        raise NotImplementedError(f"policy {policy!r}: the Triton fused kernel implements {tuple(POLICY_IDS)}")
    n_vec, n_sc = ARITY[policy]
    if len(vectors) != n_vec or len(scalars) != n_sc:
        raise ValueError(f"policy {policy!r}: expected {n_vec} coefficient vectors and {n_sc} scalars, "
                         f"got {len(vectors)} and {len(scalars)}")
    first = operands[0]
    k, b = len(operands), first.shape[0]
    if NEEDS_GRAM[policy]:
        if gram is None or gram.dim() != 4 or gram.shape[0] != b or gram.shape[2] != gram.shape[3] \
                or not 1 <= gram.shape[2] <= k or not gram.is_contiguous():
            got = None if gram is None else tuple(gram.shape)
            raise ValueError(f"gram: policy {policy!r} needs a contiguous [B={b}, G, Kg, Kg] Gram matrix "
                             f"with Kg <= K={k}, got {got}")
        groups, kg = gram.shape[1], gram.shape[2]
    else:
        groups, kg = max(v.shape[1] for v in vectors), 1
    n = first[0].numel() // groups
    if out is None:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
    scaled = scaling is not None and int(scaling[3]) != 0
    align = strided_align(n, first.dtype, list(operands) + ([scaling[0]] if scaled else []))
    # scaled operands without 128-bit loads: half a vector per thread and tile (scalar loads and
    # their addresses take more registers: fp16 at K = 5 and fp32 at K = 8 spilled a whole one)
    per_thread = max(1, vec(first.dtype) // 2) if scaled and align == 1 else 0
    block, _, blocks, iters = launch_config(n, first.dtype, per_thread)
    sa = scaling_args(operands, scaling, align)
    strides = []
    for v in vectors:
        strides += _broadcast_strides(v, b, groups, k)
    vecs = list(vectors) + [vectors[0]] * (MAX_VECTORS - n_vec)       # unused: never read
    strides += [0] * (2 * MAX_VECTORS - len(strides))
    for j, s in enumerate(scalars):
        if s.numel() not in (1, b) or not s.is_contiguous():
            raise ValueError(f"scalars[{j}]: expected a contiguous tensor of 1 or B={b} elements, "
                             f"got {tuple(s.shape)}")
    sc = list(scalars) + [vectors[0]] * (MAX_SCALARS - n_sc)           # unused: never read
    sc_strides = [1 if s.numel() > 1 else 0 for s in scalars] + [0] * (MAX_SCALARS - n_sc)
    low, high, has_low, has_high = clamp_args(clamp)
    g = gram if NEEDS_GRAM[policy] else vectors[0]                     # unused without a Gram
    _fused[(b * groups, blocks)](
        *pointers(operands), g, *vecs, *strides, *sc, *sc_strides, out, n // align, iters, groups, low, high,
        *sa[:3], *batch_strides(operands, align), sa[3], sa[4], sa[6], SLK=sa[5], OFK=sa[7],
        OFF32=_offsets_fit_int32(list(operands) + [out] + ([scaling[0]] if scaled else []), block),
        POLICY=POLICY_IDS[policy], K=k, KP=k_padded(k), KG=kg, ALIGN=align, BLOCK=block, ACC=tl_acc(first.dtype),
        HAS_LOW=has_low, HAS_HIGH=has_high, SCALED=sa[8], num_warps=NUM_WARPS,
        **({"maxnreg": scaled_maxnreg(k)} if sa[8] else {}))
    return out
