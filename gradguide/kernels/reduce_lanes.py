"""Triton ``reduce`` for fp32, fp16 and bf16 operands, one thread per 128-bit
vector: every thread keeps its own accumulator for each of the K(K+1)/2 Gram entries and K sums
the caller needs, so no 16 x 16 padding is multiplied (the tensor-core tile Gram of
``reduce.py`` spends 16 x 16 x BK products on K x BK elements).

Accumulation, chosen per GPU (``reduce.fp32_method``):
- ``FF`` (float-float, every GPU; the default where fp64 runs at 1/64 of fp32): each product
  ``a b`` is split exactly into ``p + e`` (``p = a b`` rounded, ``e = fma(a, b, -p)``), ``p`` is
  added to the running sum ``s`` by TwoSum (which yields the exact rounding error of the
  addition) and both errors go into a second fp32 accumulator ``c``. ``s + c`` carries about 48
  significant bits: the cancellations the policies make of Gram entries (APG's ‖d_c − d_u‖,
  x̂_0 at high noise) keep the float32 result within 1e-4 of float64, as the previous fp64 DMMA
  design did, on fp32 arithmetic only (about 10 fp32 instructions per product);
- ``F32`` (fp16/bf16 operands): products exact in fp32, summed with ``fma`` in
  fp32 per thread (the tensor-core tile Gram's contract; its 16-row tile loads K rows of 16, so
  its MMA and issue work per byte is 16/K times the useful work, beyond the bound on most GPUs);
- ``F64`` (GPUs with full-rate fp64 on CUDA cores: A100, H100, B200): operands widened to fp64
  (exact) and ``fma`` into fp64 accumulators: exact products, IEEE fp64 sums;
At the end each program sums its threads' accumulators in fp64 (``s`` and ``c`` separately:
both are exact in fp64) and writes one partial ``[K, K]`` Gram (both triangles) and ``[K]``
sums, which ``reduce._reduce_finish`` adds in a fixed order. Non-finite inputs: ``c`` of an
infinite product is NaN, so a non-finite ``s`` is taken as is (inf stays inf, as the reference).

Row-strided and Σ-scaled operands (``scaling.py``): every operand is read from its own row
start; a scaled operand's vector is formed in fp32 as it is loaded (0 in padding lanes) and is
that operand's value from then on (F32: not an exact product any more; F64: widened exactly).

The accumulators are written out per entry (``s01``, ``c01``, ...): Triton carries loop values by
name; entries beyond K are never updated and compile away.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scaling import log2_coef, row_pointers, scaled_masked

FF, F64, F32 = 0, 1, 2  # the MODE constexpr


@triton.jit
def _two_sum(a, b):
    """s + e = a + b exactly (Knuth's TwoSum: no assumption on |a| vs |b|)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _acc_prod(s, c, a, b, MODE: tl.constexpr):
    if MODE == 0:
        p = a * b
        e = tl.fma(a, b, -p)  # the exact rounding error of p
        s, q = _two_sum(s, p)
        c = c + (q + e)
    else:
        s = tl.fma(a, b, s)
    return s, c


@triton.jit
def _acc_sum(s, c, a, MODE: tl.constexpr):
    if MODE == 0:
        s, q = _two_sum(s, a)
        c = c + q
    else:
        s = s + a
    return s, c


@triton.jit
def _total(s, c):
    """A program's sum of its threads' ``s + c`` in fp64 (non-finite s taken as is)."""
    hi = tl.sum(s.to(tl.float64), 0)
    lo = tl.sum(c.to(tl.float64), 0)
    return tl.where(hi == hi + 0.0 * hi, hi + lo, hi)  # finite: hi - hi == 0; inf/NaN: NaN != inf


@triton.jit
def _half(y, Q: tl.constexpr):
    a, b = tl.split(y)
    return b if Q else a


@triton.jit
def _element(y, q: tl.constexpr, VEC: tl.constexpr):
    """Element q of every thread's VEC-element vector: a [BLOCK // VEC] tensor, one value per
    thread (one accumulator register per entry instead of VEC)."""
    R: tl.constexpr = y.shape[0] // VEC
    if VEC == 2:
        return _half(tl.reshape(y, [R, 2]), q % 2)
    elif VEC == 4:
        return _half(_half(tl.reshape(y, [R, 2, 2]), q % 2), (q // 2) % 2)
    else:
        return _half(_half(_half(tl.reshape(y, [R, 2, 2, 2]), q % 2), (q // 2) % 2), q // 4)


@triton.jit(do_not_specialize=["NR", "ITERS", "GROUPS", "SB0", "SB1", "SB2", "SB3", "SB4", "SB5", "SB6", "SB7",
                               "SBV", "SLB", "SLK", "OFB", "OFK"])
def _reduce_lanes(x0, x1, x2, x3, x4, x5, x6, x7, xv, slope, offset, part, NR, ITERS, GROUPS,
                  SB0, SB1, SB2, SB3, SB4, SB5, SB6, SB7, SBV, SLB, SLK, OFB, OFK,
                  K: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                  MODE: tl.constexpr, SCALED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    p0, p1, p2, p3, p4, p5, p6, p7, pv = row_pointers(x0, x1, x2, x3, x4, x5, x6, x7, xv, row, GROUPS, N, SB0, SB1, SB2,
                                                      SB3, SB4, SB5, SB6, SB7, SBV, ALIGN)
    b = row // GROUPS
    ACC: tl.constexpr = tl.float64 if MODE == 1 else tl.float32
    # Σ-scaled operands (scaling.py): formed in fp32 (these are fp32/fp16/bf16 operands)
    F: tl.constexpr = tl.float32
    s0, o0 = log2_coef(slope, SLB, SLK, b, 0, SCALED, F), log2_coef(offset, OFB, OFK, b, 0, SCALED, F)
    s1, o1 = log2_coef(slope, SLB, SLK, b, 1, SCALED, F), log2_coef(offset, OFB, OFK, b, 1, SCALED, F)
    s2, o2 = log2_coef(slope, SLB, SLK, b, 2, SCALED, F), log2_coef(offset, OFB, OFK, b, 2, SCALED, F)
    s3, o3 = log2_coef(slope, SLB, SLK, b, 3, SCALED, F), log2_coef(offset, OFB, OFK, b, 3, SCALED, F)
    s4, o4 = log2_coef(slope, SLB, SLK, b, 4, SCALED, F), log2_coef(offset, OFB, OFK, b, 4, SCALED, F)
    s5, o5 = log2_coef(slope, SLB, SLK, b, 5, SCALED, F), log2_coef(offset, OFB, OFK, b, 5, SCALED, F)
    s6, o6 = log2_coef(slope, SLB, SLK, b, 6, SCALED, F), log2_coef(offset, OFB, OFK, b, 6, SCALED, F)
    s7, o7 = log2_coef(slope, SLB, SLK, b, 7, SCALED, F), log2_coef(offset, OFB, OFK, b, 7, SCALED, F)
    z = tl.zeros([BLOCK // VEC], dtype=ACC)
    s00, s01, s11, s02, s12, s22, s03, s13, s23, s33, s04 = z, z, z, z, z, z, z, z, z, z, z
    s14, s24, s34, s44, s05, s15, s25, s35, s45, s55, s06 = z, z, z, z, z, z, z, z, z, z, z
    s16, s26, s36, s46, s56, s66, s07, s17, s27, s37, s47 = z, z, z, z, z, z, z, z, z, z, z
    s57, s67, s77, c00, c01, c11, c02, c12, c22, c03, c13 = z, z, z, z, z, z, z, z, z, z, z
    c23, c33, c04, c14, c24, c34, c44, c05, c15, c25, c35 = z, z, z, z, z, z, z, z, z, z, z
    c45, c55, c06, c16, c26, c36, c46, c56, c66, c07, c17 = z, z, z, z, z, z, z, z, z, z, z
    c27, c37, c47, c57, c67, c77, t0, t1, t2, t3, t4 = z, z, z, z, z, z, z, z, z, z, z
    t5, t6, t7, d0, d1, d2, d3, d4, d5, d6, d7 = z, z, z, z, z, z, z, z, z, z, z
    for i in range(ITERS):
        e = (split * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        m = e < N
        w0 = tl.load(p0 + e, mask=m, other=0.0)
        w1 = tl.load(p1 + e, mask=m, other=0.0) if K > 1 else w0
        w2 = tl.load(p2 + e, mask=m, other=0.0) if K > 2 else w0
        w3 = tl.load(p3 + e, mask=m, other=0.0) if K > 3 else w0
        w4 = tl.load(p4 + e, mask=m, other=0.0) if K > 4 else w0
        w5 = tl.load(p5 + e, mask=m, other=0.0) if K > 5 else w0
        w6 = tl.load(p6 + e, mask=m, other=0.0) if K > 6 else w0
        w7 = tl.load(p7 + e, mask=m, other=0.0) if K > 7 else w0
        if SCALED != 0:
            v = tl.load(pv + e, mask=m, other=0.0).to(F)
            w0 = scaled_masked(w0, m, 0, SCALED, v, s0, o0, F)
            w1 = scaled_masked(w1, m, 1, SCALED, v, s1, o1, F)
            w2 = scaled_masked(w2, m, 2, SCALED, v, s2, o2, F)
            w3 = scaled_masked(w3, m, 3, SCALED, v, s3, o3, F)
            w4 = scaled_masked(w4, m, 4, SCALED, v, s4, o4, F)
            w5 = scaled_masked(w5, m, 5, SCALED, v, s5, o5, F)
            w6 = scaled_masked(w6, m, 6, SCALED, v, s6, o6, F)
            w7 = scaled_masked(w7, m, 7, SCALED, v, s7, o7, F)
        for q in tl.static_range(VEC):
            y0 = _element(w0, q, VEC).to(ACC)
            y1 = _element(w1, q, VEC).to(ACC)
            y2 = _element(w2, q, VEC).to(ACC)
            y3 = _element(w3, q, VEC).to(ACC)
            y4 = _element(w4, q, VEC).to(ACC)
            y5 = _element(w5, q, VEC).to(ACC)
            y6 = _element(w6, q, VEC).to(ACC)
            y7 = _element(w7, q, VEC).to(ACC)
            if True:
                s00, c00 = _acc_prod(s00, c00, y0, y0, MODE)
                t0, d0 = _acc_sum(t0, d0, y0, MODE)
            if K > 1:
                s01, c01 = _acc_prod(s01, c01, y0, y1, MODE)
                s11, c11 = _acc_prod(s11, c11, y1, y1, MODE)
                t1, d1 = _acc_sum(t1, d1, y1, MODE)
            if K > 2:
                s02, c02 = _acc_prod(s02, c02, y0, y2, MODE)
                s12, c12 = _acc_prod(s12, c12, y1, y2, MODE)
                s22, c22 = _acc_prod(s22, c22, y2, y2, MODE)
                t2, d2 = _acc_sum(t2, d2, y2, MODE)
            if K > 3:
                s03, c03 = _acc_prod(s03, c03, y0, y3, MODE)
                s13, c13 = _acc_prod(s13, c13, y1, y3, MODE)
                s23, c23 = _acc_prod(s23, c23, y2, y3, MODE)
                s33, c33 = _acc_prod(s33, c33, y3, y3, MODE)
                t3, d3 = _acc_sum(t3, d3, y3, MODE)
            if K > 4:
                s04, c04 = _acc_prod(s04, c04, y0, y4, MODE)
                s14, c14 = _acc_prod(s14, c14, y1, y4, MODE)
                s24, c24 = _acc_prod(s24, c24, y2, y4, MODE)
                s34, c34 = _acc_prod(s34, c34, y3, y4, MODE)
                s44, c44 = _acc_prod(s44, c44, y4, y4, MODE)
                t4, d4 = _acc_sum(t4, d4, y4, MODE)
            if K > 5:
                s05, c05 = _acc_prod(s05, c05, y0, y5, MODE)
                s15, c15 = _acc_prod(s15, c15, y1, y5, MODE)
                s25, c25 = _acc_prod(s25, c25, y2, y5, MODE)
                s35, c35 = _acc_prod(s35, c35, y3, y5, MODE)
                s45, c45 = _acc_prod(s45, c45, y4, y5, MODE)
                s55, c55 = _acc_prod(s55, c55, y5, y5, MODE)
                t5, d5 = _acc_sum(t5, d5, y5, MODE)
            if K > 6:
                s06, c06 = _acc_prod(s06, c06, y0, y6, MODE)
                s16, c16 = _acc_prod(s16, c16, y1, y6, MODE)
                s26, c26 = _acc_prod(s26, c26, y2, y6, MODE)
                s36, c36 = _acc_prod(s36, c36, y3, y6, MODE)
                s46, c46 = _acc_prod(s46, c46, y4, y6, MODE)
                s56, c56 = _acc_prod(s56, c56, y5, y6, MODE)
                s66, c66 = _acc_prod(s66, c66, y6, y6, MODE)
                t6, d6 = _acc_sum(t6, d6, y6, MODE)
            if K > 7:
                s07, c07 = _acc_prod(s07, c07, y0, y7, MODE)
                s17, c17 = _acc_prod(s17, c17, y1, y7, MODE)
                s27, c27 = _acc_prod(s27, c27, y2, y7, MODE)
                s37, c37 = _acc_prod(s37, c37, y3, y7, MODE)
                s47, c47 = _acc_prod(s47, c47, y4, y7, MODE)
                s57, c57 = _acc_prod(s57, c57, y5, y7, MODE)
                s67, c67 = _acc_prod(s67, c67, y6, y7, MODE)
                s77, c77 = _acc_prod(s77, c77, y7, y7, MODE)
                t7, d7 = _acc_sum(t7, d7, y7, MODE)
    pg = part + (row * splits + split) * (K * K + K)  # partial Gram [K, K], then sums [K]
    PT = part.dtype.element_ty
    if True:
        v = _total(s00, c00).to(PT)
        tl.store(pg + 0 * K + 0, v)
        tl.store(pg + K * K + 0, _total(t0, d0).to(PT))
    if K > 1:
        v = _total(s01, c01).to(PT)
        tl.store(pg + 0 * K + 1, v)
        tl.store(pg + 1 * K + 0, v)
        v = _total(s11, c11).to(PT)
        tl.store(pg + 1 * K + 1, v)
        tl.store(pg + K * K + 1, _total(t1, d1).to(PT))
    if K > 2:
        v = _total(s02, c02).to(PT)
        tl.store(pg + 0 * K + 2, v)
        tl.store(pg + 2 * K + 0, v)
        v = _total(s12, c12).to(PT)
        tl.store(pg + 1 * K + 2, v)
        tl.store(pg + 2 * K + 1, v)
        v = _total(s22, c22).to(PT)
        tl.store(pg + 2 * K + 2, v)
        tl.store(pg + K * K + 2, _total(t2, d2).to(PT))
    if K > 3:
        v = _total(s03, c03).to(PT)
        tl.store(pg + 0 * K + 3, v)
        tl.store(pg + 3 * K + 0, v)
        v = _total(s13, c13).to(PT)
        tl.store(pg + 1 * K + 3, v)
        tl.store(pg + 3 * K + 1, v)
        v = _total(s23, c23).to(PT)
        tl.store(pg + 2 * K + 3, v)
        tl.store(pg + 3 * K + 2, v)
        v = _total(s33, c33).to(PT)
        tl.store(pg + 3 * K + 3, v)
        tl.store(pg + K * K + 3, _total(t3, d3).to(PT))
    if K > 4:
        v = _total(s04, c04).to(PT)
        tl.store(pg + 0 * K + 4, v)
        tl.store(pg + 4 * K + 0, v)
        v = _total(s14, c14).to(PT)
        tl.store(pg + 1 * K + 4, v)
        tl.store(pg + 4 * K + 1, v)
        v = _total(s24, c24).to(PT)
        tl.store(pg + 2 * K + 4, v)
        tl.store(pg + 4 * K + 2, v)
        v = _total(s34, c34).to(PT)
        tl.store(pg + 3 * K + 4, v)
        tl.store(pg + 4 * K + 3, v)
        v = _total(s44, c44).to(PT)
        tl.store(pg + 4 * K + 4, v)
        tl.store(pg + K * K + 4, _total(t4, d4).to(PT))
    if K > 5:
        v = _total(s05, c05).to(PT)
        tl.store(pg + 0 * K + 5, v)
        tl.store(pg + 5 * K + 0, v)
        v = _total(s15, c15).to(PT)
        tl.store(pg + 1 * K + 5, v)
        tl.store(pg + 5 * K + 1, v)
        v = _total(s25, c25).to(PT)
        tl.store(pg + 2 * K + 5, v)
        tl.store(pg + 5 * K + 2, v)
        v = _total(s35, c35).to(PT)
        tl.store(pg + 3 * K + 5, v)
        tl.store(pg + 5 * K + 3, v)
        v = _total(s45, c45).to(PT)
        tl.store(pg + 4 * K + 5, v)
        tl.store(pg + 5 * K + 4, v)
        v = _total(s55, c55).to(PT)
        tl.store(pg + 5 * K + 5, v)
        tl.store(pg + K * K + 5, _total(t5, d5).to(PT))
    if K > 6:
        v = _total(s06, c06).to(PT)
        tl.store(pg + 0 * K + 6, v)
        tl.store(pg + 6 * K + 0, v)
        v = _total(s16, c16).to(PT)
        tl.store(pg + 1 * K + 6, v)
        tl.store(pg + 6 * K + 1, v)
        v = _total(s26, c26).to(PT)
        tl.store(pg + 2 * K + 6, v)
        tl.store(pg + 6 * K + 2, v)
        v = _total(s36, c36).to(PT)
        tl.store(pg + 3 * K + 6, v)
        tl.store(pg + 6 * K + 3, v)
        v = _total(s46, c46).to(PT)
        tl.store(pg + 4 * K + 6, v)
        tl.store(pg + 6 * K + 4, v)
        v = _total(s56, c56).to(PT)
        tl.store(pg + 5 * K + 6, v)
        tl.store(pg + 6 * K + 5, v)
        v = _total(s66, c66).to(PT)
        tl.store(pg + 6 * K + 6, v)
        tl.store(pg + K * K + 6, _total(t6, d6).to(PT))
    if K > 7:
        v = _total(s07, c07).to(PT)
        tl.store(pg + 0 * K + 7, v)
        tl.store(pg + 7 * K + 0, v)
        v = _total(s17, c17).to(PT)
        tl.store(pg + 1 * K + 7, v)
        tl.store(pg + 7 * K + 1, v)
        v = _total(s27, c27).to(PT)
        tl.store(pg + 2 * K + 7, v)
        tl.store(pg + 7 * K + 2, v)
        v = _total(s37, c37).to(PT)
        tl.store(pg + 3 * K + 7, v)
        tl.store(pg + 7 * K + 3, v)
        v = _total(s47, c47).to(PT)
        tl.store(pg + 4 * K + 7, v)
        tl.store(pg + 7 * K + 4, v)
        v = _total(s57, c57).to(PT)
        tl.store(pg + 5 * K + 7, v)
        tl.store(pg + 7 * K + 5, v)
        v = _total(s67, c67).to(PT)
        tl.store(pg + 6 * K + 7, v)
        tl.store(pg + 7 * K + 6, v)
        v = _total(s77, c77).to(PT)
        tl.store(pg + 7 * K + 7, v)
        tl.store(pg + K * K + 7, _total(t7, d7).to(PT))
