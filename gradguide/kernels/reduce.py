"""Triton ``reduce``: per-row Gram matrix and sums of K <= 8 operands (docs/architecture.md, pass 1).

Two stage-1 kernels: the tensor-core tile Gram below (fp64 operands) and the per-thread
accumulators of ``reduce_lanes.py`` (fp32, fp16, bf16), chosen by :func:`method`.

Design
------
A row is one sample (or one group of a sample: G equal contiguous chunks of the flattened
sample), N elements long; rows are few (B <= 64) and long (up to millions), so one program
per row cannot fill a GPU. Stage 1 runs a 2-D grid ``(rows, splits)``: program (r, s) walks
its contiguous slice of row r in tiles ``X[16, BK]``: row k < K of the tile is operand k
(loaded from its own pointer with a row mask, ``_common.py``: one 128-bit ``ld.global.v4``
per thread and tile when rows keep 16-byte alignment: BK = 16 for fp32 (2 warps) and fp64,
64 for fp16/bf16 (4 warps)), row K is ones and the rest zeros. The tile's Gram ``X X^T`` on
tensor cores (``tl.dot``) gives every pair's dot product and, in column K, every operand's sum; each tile's Gram starts from zero and is added
to the program's running fp64 (fp32 for fp16/bf16) ``[16, 16]`` accumulator. At the end each program writes
one partial ``[K, K]`` Gram (both triangles from the upper one, so it is exactly symmetric)
and ``[K]`` sums. Stage 2 (one program per row) adds a row's partials in a fixed order. No
atomics: the result is deterministic for a given split count.

Why tensor cores: the accumulators live in the MMA layout, spread over the warp (a few
registers per thread), instead of K(K+1)/2 + K per thread. The previous design (per-thread
accumulators for every pair, written out as ``g{i}{j}``) needed 92-128 registers for K = 8
(fp32 data of K vectors + 44 accumulators, 88 registers of them in fp64): no layout of
per-thread accumulators fits 64 registers. This design compiles to 30-40 registers (stage 1;
stage 2: 18-48), 0 spills,
for every K, dtype and alignment on sm_80 and sm_90; benchmarks/results/kernels-before-after.md
lists the options measured. Exactness per dtype:
- fp16 / bf16: products are exact in fp32 (11 / 8-bit significands), summed in fp32 (GPUs run
  them through ``reduce_lanes.py`` instead: see ``HALF_LANES_MAX_K``; this kernel remains for
  fp64 operands and ``how="dot"``);
- fp64: DMMA (``mma.m8n8k4.f64``): exact products, IEEE fp64 sums, the same Gram as the
  float64 sums of the native and reference backends;
- fp32: not here. The policies take small combinations of large operands (APG's ‖Δ‖ =
  ‖d_c − d_u‖, x̂_0 = (x − σ ε)/α at high noise) and ``uᵀ G u`` cancels, so Gram entries with
  fp32's ~1e-7 relative error left float32 APG 1.2e-3 from float64. Widening fp32 tiles to fp64
  for this kernel kept that precision but cost 2·16·16 fp64 flops per element: DMMA on
  sm_80/90/100 still 2-8x the memory-bound time, and on GPUs without fp64 tensor cores
  (RTX 30/40/50, L4, L40S: fp64 at 1/64 of fp32) 26-107x. fp32 operands therefore go through
  ``reduce_lanes.py`` (one accumulator per Gram entry and thread, no padding: float-float where
  fp64 is slow, fp64 fma where it is fast), chosen by :func:`method`; its SASS roofline is in
  ``gradguide check-kernels``.
Within a tile the MMA sums BK products; tiles are added one by one in the accumulator's dtype.

Row-strided and Σ-scaled operands (``scaling.py``): each operand (and the log-scale) is read
from its own row start; a scaled operand's tile row is formed in fp32 (fp64 for fp64 operands)
as it is loaded, so the tile of scaled fp16/bf16 operands is fp32 (an ``ieee`` fp32 dot in
this kernel; the per-thread kernel takes the fp32 values as they are).

Limits: K <= 8 operands of one dtype (fp16, bf16, fp32, fp64), each sample contiguous (any
batch stride; the Python glue makes other layouts contiguous), all on one device; any N and B (masking, no power-of-two assumption); rows
shorter than 2**31 elements. Non-finite inputs poison the Gram entries and sums that involve
them, as the reference does.

Reference: :func:`reference` below (the same maths as ``gradguide.ops.reference.reduce``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reduce_lanes
from ._common import (acc_dtype, batch_strides, interpreted, next_pow2, pointers, scaling_args, strided_align,
                      target_programs, vec, NUM_WARPS)
from .scaling import log2_coef, row_pointers


def reference(operands, groups: int = 1):
    """Plain-torch truth: ``gram[b, g] = R R^T`` with ``R = [op_k[b, g]]_k`` in the accumulation dtype."""
    b = operands[0].shape[0]
    rows = torch.stack([op.reshape(b, groups, -1).to(acc_dtype(op.dtype)) for op in operands], dim=2)
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


@triton.jit
def _dot_t(a, b, acc, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a b^T`` on tensor cores. UPCAST (interpreter only): Triton 3.9's interpreter
    multiplies bf16 tiles wrongly, so it gets the same exact products in fp32."""
    if UPCAST and a.dtype != tl.float64:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee", out_dtype=ACC)
    return tl.dot(a, tl.trans(b), acc, out_dtype=ACC)


@triton.jit
def _tile_gram(x, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``x x^T`` of one [16, BK] tile, exact products summed in ACC (see the header)."""
    if x.dtype == tl.float32 and ACC == tl.float32:
        # Σ-scaled fp16/bf16 operands: their fp32 values, products rounded to fp32 as the
        # per-thread kernel's (scaling.py)
        return tl.dot(x, tl.trans(x), None, input_precision="ieee", out_dtype=ACC)
    if x.dtype == tl.float32:
        x = x.to(tl.float64)
    return _dot_t(x, x, None, ACC, UPCAST)


@triton.jit
def _row_coef(p, sb, sk, b, k, SCALED: tl.constexpr, F: tl.constexpr):
    """[16, 1]: row j < 8 of the tile holds ``p[b, j] · log2(e)`` where bit j of SCALED is set, else 0."""
    c = tl.zeros([16, 1], dtype=F)
    for j in tl.static_range(8):
        if (SCALED >> j) & 1:
            c = tl.where(k == j, log2_coef(p, sb, sk, b, j, SCALED, F), c)
    return c


@triton.jit(do_not_specialize=["NR", "ITERS", "GROUPS", "SB0", "SB1", "SB2", "SB3", "SB4", "SB5", "SB6", "SB7",
                               "SBV", "SLB", "SLK", "OFB", "OFK"])
def _reduce_partials(x0, x1, x2, x3, x4, x5, x6, x7, xv, slope, offset, part, NR, ITERS, GROUPS,
                     SB0, SB1, SB2, SB3, SB4, SB5, SB6, SB7, SBV, SLB, SLK, OFB, OFK,
                     K: tl.constexpr, ALIGN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                     UPCAST: tl.constexpr, SCALED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    p0, p1, p2, p3, p4, p5, p6, p7, pv = row_pointers(x0, x1, x2, x3, x4, x5, x6, x7, xv, row, GROUPS, N, SB0, SB1, SB2,
                                                      SB3, SB4, SB5, SB6, SB7, SBV, ALIGN)
    b = row // GROUPS
    k = tl.arange(0, 16)[:, None]  # tile row: operand k < K, ones at K, zeros after
    c = tl.arange(0, BK)[None, :] + 0 * k
    # Σ-scaled rows (scaling.py): formed in fp32 (fp64 for fp64 operands), so the tile of scaled
    # fp16/bf16 operands is fp32 (never rounded back to the operands' dtype)
    F: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    if SCALED != 0:
        sr = _row_coef(slope, SLB, SLK, b, k, SCALED, F)
        orow = _row_coef(offset, OFB, OFK, b, k, SCALED, F)
        on = ((tl.full([16, 1], SCALED, tl.int32) >> k) & 1) != 0
    acc = tl.zeros([16, 16], dtype=ACC)
    for i in range(ITERS):
        e = (split * ITERS + i) * BK + c
        m = e < N
        # each operand fills its own tile row: the masked-off rows issue no memory traffic
        x = tl.load(p0 + e, mask=m & (k == 0), other=0.0)
        if K > 1:
            x = tl.load(p1 + e, mask=m & (k == 1), other=x)
        if K > 2:
            x = tl.load(p2 + e, mask=m & (k == 2), other=x)
        if K > 3:
            x = tl.load(p3 + e, mask=m & (k == 3), other=x)
        if K > 4:
            x = tl.load(p4 + e, mask=m & (k == 4), other=x)
        if K > 5:
            x = tl.load(p5 + e, mask=m & (k == 5), other=x)
        if K > 6:
            x = tl.load(p6 + e, mask=m & (k == 6), other=x)
        if K > 7:
            x = tl.load(p7 + e, mask=m & (k == 7), other=x)
        if SCALED != 0:
            v = tl.load(pv + e, mask=m & on, other=0.0).to(F)
            x = x.to(F)
            x = tl.where(on & m, x * tl.math.exp2(tl.fma(v, sr, orow)), x)
        x = tl.where((k == K) & m, 1.0, x).to(x.dtype)  # G[i, K] = sum of operand i
        acc += _tile_gram(x, ACC, UPCAST)  # a fresh tile Gram, added with one rounding per tile
    pg = part + (row * splits + split) * (K * K + K)  # partial Gram [K, K], then sums [K]
    j = tl.arange(0, 16)[None, :]
    upper = (k <= j) & (j < K)
    tl.store(pg + k * K + j, acc, mask=upper)
    tl.store(pg + j * K + k, acc, mask=upper)
    tl.store(pg + K * K + k + 0 * j, acc, mask=(k < K) & (j == K))


@triton.jit(do_not_specialize=["SPLITS"])
def _reduce_finish(part, gram, sums, SPLITS, K: tl.constexpr, PP: tl.constexpr, CHUNK: tl.constexpr):
    """Row r: the sum over splits of ``part[r, s]`` (Gram then sums), in a fixed order."""
    row = tl.program_id(0).to(tl.int64)
    P: tl.constexpr = K * K + K
    sp = tl.arange(0, CHUNK)
    idx = tl.arange(0, PP)
    acc = tl.zeros([PP], dtype=part.dtype.element_ty)
    for c in range(0, SPLITS, CHUNK):
        s = c + sp
        m = (s < SPLITS)[:, None] & (idx < P)[None, :]
        acc += tl.sum(tl.load(part + (row * SPLITS + s[:, None]) * P + idx[None, :], mask=m, other=0.0), 0)
    tl.store(gram + row * (K * K) + idx, acc, mask=idx < K * K)
    tl.store(sums + row * K + (idx - K * K), acc, mask=(idx >= K * K) & (idx < P))


MAX_SPLITS = 1024


def warps(dtype: torch.dtype) -> int:
    """fp32 (``how="dot"``, tests only) takes 2 warps: BK = 16 is then one 128-bit load per thread
    and tile, and the tile widened to fp64 is 4 values per thread."""
    return 2 if dtype == torch.float32 else NUM_WARPS


def tile_width(dtype: torch.dtype) -> int:
    """BK: a [16, BK] tile is one 128-bit vector per thread on a GPU (BK = 16 for fp32 and fp64,
    32 x 4 warps / 16 rows x VEC = 64 for fp16/bf16); the interpreter pays per step, not per
    element, so it gets few wide tiles."""
    return 1024 if interpreted() else 32 * warps(dtype) * vec(dtype) // 16


def launch_config(n: int, rows: int, dtype: torch.dtype, device: torch.device):
    """(BK, splits, iters): ``splits`` programs per row of n elements, each walking ``iters``
    consecutive tiles of BK elements."""
    bk = tile_width(dtype)
    tiles = -(-n // bk)
    splits = max(1, min(MAX_SPLITS, -(-target_programs(device) // rows), tiles))
    iters = -(-tiles // splits)
    return bk, -(-tiles // iters), iters


FP64_RICH = (80, 90, 100)  # compute capabilities with fp64 at 1/2 of fp32 on CUDA cores (A100, H100, B200)


def target_arch(device: torch.device) -> int:
    """Compute capability (80, 86, ...) the kernels compile for: the device's on CUDA, else the
    active Triton driver's target (the compile gates' fake CUDA driver); 0 under the interpreter."""
    if interpreted():
        return 0
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return int(triton.runtime.driver.active.get_current_target().arch)


def method(dtype: torch.dtype, k: int, arch: int) -> str:
    """How stage 1 accumulates: ``"f64"`` (per-thread fp64 fma: fp32 operands on fp64-rich GPUs),
    ``"ff"`` (per-thread float-float in fp32: fp32 operands elsewhere, and under the
    interpreter), ``"f32"`` (per-thread fp32 fma: fp16/bf16 with K <= HALF_LANES_MAX_K) or
    ``"dot"`` (the tensor-core tile Gram: fp64 operands, fp16/bf16 with more operands)."""
    if dtype == torch.float32:
        return "f64" if arch in FP64_RICH else "ff"
    if dtype in (torch.float16, torch.bfloat16) and k <= HALF_LANES_MAX_K:
        return "f32"
    return "dot"


# fp16/bf16: per-thread fp32 accumulation up to this many operands (all): the tile Gram loads K
# of its 16 rows, so its MMA and issue work per byte is 16/K times the useful work; measured by
# gradguide check-kernels it projected 1.6-3.4x the memory time at K = 2 on RTX 3090/4090/5090 and
# 2-5x (issue-bound) on A100/H100/B200, still 2.1x at K = 8 on B200
HALF_LANES_MAX_K = 8
# ptxas's own register target spilled 8-16 B for fp16/bf16 at K = 4 on sm_100 (56 registers);
# an explicit ceiling above every variant's need (<= 200) lets it allocate what the code needs
LANES_MAXNREG = 224
# Σ-scaled operands add a (slope', offset') pair per scaled operand: every fp32 operand scaled at
# K = 8 spilled 16 B at 224 on sm_86; 255 keeps the same occupancy bound (2 blocks of 4 warps)
LANES_MAXNREG_SCALED = 255
_MODES = {"ff": reduce_lanes.FF, "f64": reduce_lanes.F64, "f32": reduce_lanes.F32}


def reduce(operands, groups: int = 1, how: str = None, scaling=None):
    """``(gram[B, G, K, K], sums[B, G, K])`` of K row-strided operands (``scaling.py``),
    accumulated in fp64 or float-float (fp32 for fp16/bf16 inputs, whose products are exact in
    fp32). ``scaling``: None or ``(log_scale, slope, offset, mask)``, the operands of the mask's
    bits read Σ-scaled (``scaling.py``). ``how`` overrides :func:`method` (tests run every path
    under the interpreter)."""
    first = operands[0]
    k = len(operands)
    b = first.shape[0]
    n = first[0].numel() // groups
    rows = b * groups
    how = how or method(first.dtype, k, target_arch(first.device))
    half = first.dtype in (torch.float16, torch.bfloat16)
    if how not in ("dot", "ff", "f64", "f32") or (how in ("ff", "f64") and first.dtype != torch.float32) \
            or (how == "f32" and not half):
        raise ValueError(f"how: expected 'dot', 'ff' / 'f64' (float32 operands) or 'f32' (float16/bfloat16), "
                         f"got {how!r} for {first.dtype}")
    scaled = scaling is not None and int(scaling[3]) != 0
    align = strided_align(n, first.dtype, list(operands) + ([scaling[0]] if scaled else []))
    acc = acc_dtype(first.dtype)
    sa = scaling_args(operands, scaling, align)
    args = (*pointers(operands), *sa[:3])                      # pointers: operands, log_scale, slope, offset
    ints = (groups, *batch_strides(operands, align), *sa[3:8])  # and the strides they are read through
    mask = sa[8]
    if how == "dot":
        bk, splits, iters = launch_config(n, rows, first.dtype, first.device)
        part = torch.empty(rows * splits * (k * k + k), device=first.device, dtype=acc)
        # num_stages=1: no software pipelining (it would stage the loads through cp.async and shared
        # memory); occupancy hides the load latency
        _reduce_partials[(rows, splits)](*args, part, n // align, iters, *ints, K=k, ALIGN=align, BK=bk,
                                         ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                         UPCAST=interpreted(), SCALED=mask, num_warps=warps(first.dtype),
                                         num_stages=1)
    else:
        block, splits, iters = lanes_config(n, rows, first.dtype, first.device)
        part = torch.empty(rows * splits * (k * k + k), device=first.device, dtype=acc)
        # enable_fp_fusion=False: a product contracted into the next addition would break the
        # error-free transformations (TwoSum needs the rounded product it was given)
        reduce_lanes._reduce_lanes[(rows, splits)](*args, part, n // align, iters, *ints, K=k, ALIGN=align,
                                                   BLOCK=block, VEC=vec(first.dtype), MODE=_MODES[how],
                                                   SCALED=mask, num_warps=NUM_WARPS, num_stages=1,
                                                   enable_fp_fusion=False,
                                                   maxnreg=LANES_MAXNREG_SCALED if mask else LANES_MAXNREG)
    gram = torch.empty(b, groups, k, k, device=first.device, dtype=acc)
    sums = torch.empty(b, groups, k, device=first.device, dtype=acc)
    _reduce_finish[(rows,)](part, gram, sums, splits, K=k, PP=next_pow2(k * k + k), CHUNK=16, num_warps=NUM_WARPS)
    return gram, sums


def lanes_config(n: int, rows: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK, splits, iters) of the per-thread kernel: one 128-bit vector per thread and tile."""
    block = 1024 if interpreted() else 32 * NUM_WARPS * vec(dtype)
    tiles = -(-n // block)
    splits = max(1, min(MAX_SPLITS, -(-target_programs(device) // rows), tiles))
    iters = -(-tiles // splits)
    return block, -(-tiles // iters), iters
