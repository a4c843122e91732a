"""Triton ``reduce``: per-row Gram matrix and sums of K <= 8 operands (DESIGN.md, pass 1).

Design
------
A row is one sample (or one group of a sample: G equal contiguous chunks of the flattened
sample), N elements long; rows are few (B <= 64) and long (up to millions), so one program
per row cannot fill a GPU. Stage 1 runs a 2-D grid ``(rows, splits)``: program (r, s) walks
its contiguous slice of row r in tiles of ``[R, VEC]`` elements (R = 128 thread rows, VEC =
one 128-bit vector per thread), loads each operand from its own pointer (``_common.py``: the
loads compile to ``ld.global.v4`` when rows keep 16-byte alignment), converts to the
accumulation type (fp32; fp64 for fp64 inputs) and adds, per thread, the VEC-element dot
products of every pair ``i <= j`` and the VEC-element sums into one register each: these
K(K+1)/2 + K accumulators are the whole per-thread state. At the end each program reduces
its accumulators over the tile and writes one partial ``[K, K]`` Gram (both triangles from
the same value, so it is exactly symmetric) and ``[K]`` sums in fp32 (fp64). Stage 2 (one
program per row) adds a row's partials in a fixed order. No atomics: the result is
deterministic for a given split count.

The accumulators are written out one by one (``g{i}{j}``, ``s{j}``) rather than as a
``[K, K, BLOCK]`` tensor: an outer-product tile keeps K*K values per element and per thread
and compiled to ~110 registers (25 % occupancy) in the previous design.

Limits: K <= 8 operands of one dtype (fp16, bf16, fp32, fp64), contiguous (the Python glue
makes them so), all on one device; any N and B (masking, no power-of-two assumption); rows
shorter than 2**31 elements. Non-finite inputs poison the Gram entries and sums that involve
them, as the reference does.

Reference: :func:`reference` below (the same maths as ``gradguide.ops.reference.reduce``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, next_pow2, pointers, row_align, target_programs, tile_rows, vec, NUM_WARPS


def reference(operands, groups: int = 1):
    """Plain-torch truth: ``gram[b, g] = R R^T`` with ``R = [op_k[b, g]]_k`` in the accumulation dtype."""
    b = operands[0].shape[0]
    rows = torch.stack([op.reshape(b, groups, -1).to(acc_dtype(op.dtype)) for op in operands], dim=2)
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


@triton.jit
def _store_pair(pg, i: tl.constexpr, j: tl.constexpr, K: tl.constexpr, v):
    tl.store(pg + i * K + j, v)
    if i != j:
        tl.store(pg + j * K + i, v)


@triton.jit(do_not_specialize=["NR", "ITERS"])
def _reduce_partials(x0, x1, x2, x3, x4, x5, x6, x7, part, NR, ITERS,
                     K: tl.constexpr, ALIGN: tl.constexpr, R: tl.constexpr, VEC: tl.constexpr,
                     ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    N = NR * ALIGN  # a multiple of ALIGN that Triton can see: row starts keep their alignment
    base = row * N
    t = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [R, VEC]: VEC contiguous per thread
    zero = tl.zeros([R], dtype=ACC)
    g00, g01, g11, g02, g12, g22, g03, g13, g23, g33, g04 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    g14, g24, g34, g44, g05, g15, g25, g35, g45, g55, g06 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    g16, g26, g36, g46, g56, g66, g07, g17, g27, g37, g47 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    g57, g67, g77, s0, s1, s2, s3, s4, s5, s6, s7 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    for i in range(ITERS):
        e = (split * ITERS + i) * (R * VEC) + t
        m = e < N
        a0 = tl.load(x0 + base + e, mask=m, other=0.0).to(ACC)
        s0 += tl.sum(a0, 1)
        g00 += tl.sum(a0 * a0, 1)
        if K > 1:
            a1 = tl.load(x1 + base + e, mask=m, other=0.0).to(ACC)
            s1 += tl.sum(a1, 1)
            g01 += tl.sum(a0 * a1, 1)
            g11 += tl.sum(a1 * a1, 1)
        if K > 2:
            a2 = tl.load(x2 + base + e, mask=m, other=0.0).to(ACC)
            s2 += tl.sum(a2, 1)
            g02 += tl.sum(a0 * a2, 1)
            g12 += tl.sum(a1 * a2, 1)
            g22 += tl.sum(a2 * a2, 1)
        if K > 3:
            a3 = tl.load(x3 + base + e, mask=m, other=0.0).to(ACC)
            s3 += tl.sum(a3, 1)
            g03 += tl.sum(a0 * a3, 1)
            g13 += tl.sum(a1 * a3, 1)
            g23 += tl.sum(a2 * a3, 1)
            g33 += tl.sum(a3 * a3, 1)
        if K > 4:
            a4 = tl.load(x4 + base + e, mask=m, other=0.0).to(ACC)
            s4 += tl.sum(a4, 1)
            g04 += tl.sum(a0 * a4, 1)
            g14 += tl.sum(a1 * a4, 1)
            g24 += tl.sum(a2 * a4, 1)
            g34 += tl.sum(a3 * a4, 1)
            g44 += tl.sum(a4 * a4, 1)
        if K > 5:
            a5 = tl.load(x5 + base + e, mask=m, other=0.0).to(ACC)
            s5 += tl.sum(a5, 1)
            g05 += tl.sum(a0 * a5, 1)
            g15 += tl.sum(a1 * a5, 1)
            g25 += tl.sum(a2 * a5, 1)
            g35 += tl.sum(a3 * a5, 1)
            g45 += tl.sum(a4 * a5, 1)
            g55 += tl.sum(a5 * a5, 1)
        if K > 6:
            a6 = tl.load(x6 + base + e, mask=m, other=0.0).to(ACC)
            s6 += tl.sum(a6, 1)
            g06 += tl.sum(a0 * a6, 1)
            g16 += tl.sum(a1 * a6, 1)
            g26 += tl.sum(a2 * a6, 1)
            g36 += tl.sum(a3 * a6, 1)
            g46 += tl.sum(a4 * a6, 1)
            g56 += tl.sum(a5 * a6, 1)
            g66 += tl.sum(a6 * a6, 1)
        if K > 7:
            a7 = tl.load(x7 + base + e, mask=m, other=0.0).to(ACC)
            s7 += tl.sum(a7, 1)
            g07 += tl.sum(a0 * a7, 1)
            g17 += tl.sum(a1 * a7, 1)
            g27 += tl.sum(a2 * a7, 1)
            g37 += tl.sum(a3 * a7, 1)
            g47 += tl.sum(a4 * a7, 1)
            g57 += tl.sum(a5 * a7, 1)
            g67 += tl.sum(a6 * a7, 1)
            g77 += tl.sum(a7 * a7, 1)
    pg = part + (row * splits + split) * (K * K + K)  # partial Gram [K, K], then sums [K]
    ps = pg + K * K
    tl.store(ps + 0, tl.sum(s0, 0))
    _store_pair(pg, 0, 0, K, tl.sum(g00, 0))
    if K > 1:
        tl.store(ps + 1, tl.sum(s1, 0))
        _store_pair(pg, 0, 1, K, tl.sum(g01, 0))
        _store_pair(pg, 1, 1, K, tl.sum(g11, 0))
    if K > 2:
        tl.store(ps + 2, tl.sum(s2, 0))
        _store_pair(pg, 0, 2, K, tl.sum(g02, 0))
        _store_pair(pg, 1, 2, K, tl.sum(g12, 0))
        _store_pair(pg, 2, 2, K, tl.sum(g22, 0))
    if K > 3:
        tl.store(ps + 3, tl.sum(s3, 0))
        _store_pair(pg, 0, 3, K, tl.sum(g03, 0))
        _store_pair(pg, 1, 3, K, tl.sum(g13, 0))
        _store_pair(pg, 2, 3, K, tl.sum(g23, 0))
        _store_pair(pg, 3, 3, K, tl.sum(g33, 0))
    if K > 4:
        tl.store(ps + 4, tl.sum(s4, 0))
        _store_pair(pg, 0, 4, K, tl.sum(g04, 0))
        _store_pair(pg, 1, 4, K, tl.sum(g14, 0))
        _store_pair(pg, 2, 4, K, tl.sum(g24, 0))
        _store_pair(pg, 3, 4, K, tl.sum(g34, 0))
        _store_pair(pg, 4, 4, K, tl.sum(g44, 0))
    if K > 5:
        tl.store(ps + 5, tl.sum(s5, 0))
        _store_pair(pg, 0, 5, K, tl.sum(g05, 0))
        _store_pair(pg, 1, 5, K, tl.sum(g15, 0))
        _store_pair(pg, 2, 5, K, tl.sum(g25, 0))
        _store_pair(pg, 3, 5, K, tl.sum(g35, 0))
        _store_pair(pg, 4, 5, K, tl.sum(g45, 0))
        _store_pair(pg, 5, 5, K, tl.sum(g55, 0))
    if K > 6:
        tl.store(ps + 6, tl.sum(s6, 0))
        _store_pair(pg, 0, 6, K, tl.sum(g06, 0))
        _store_pair(pg, 1, 6, K, tl.sum(g16, 0))
        _store_pair(pg, 2, 6, K, tl.sum(g26, 0))
        _store_pair(pg, 3, 6, K, tl.sum(g36, 0))
        _store_pair(pg, 4, 6, K, tl.sum(g46, 0))
        _store_pair(pg, 5, 6, K, tl.sum(g56, 0))
        _store_pair(pg, 6, 6, K, tl.sum(g66, 0))
    if K > 7:
        tl.store(ps + 7, tl.sum(s7, 0))
        _store_pair(pg, 0, 7, K, tl.sum(g07, 0))
        _store_pair(pg, 1, 7, K, tl.sum(g17, 0))
        _store_pair(pg, 2, 7, K, tl.sum(g27, 0))
        _store_pair(pg, 3, 7, K, tl.sum(g37, 0))
        _store_pair(pg, 4, 7, K, tl.sum(g47, 0))
        _store_pair(pg, 5, 7, K, tl.sum(g57, 0))
        _store_pair(pg, 6, 7, K, tl.sum(g67, 0))
        _store_pair(pg, 7, 7, K, tl.sum(g77, 0))


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


def launch_config(n: int, rows: int, dtype: torch.dtype, device: torch.device):
    """(R, VEC, splits, iters): tiles of R x VEC elements, ``splits`` programs per row of n
    elements, each walking ``iters`` consecutive tiles."""
    # unaligned rows load one element per thread and step: scalar loads gain nothing from a
    # wider tile, and a [R, 8] fp16 tile of scalar loads crashes LLVM's optimiser for sm_90
    r, v = tile_rows(), (vec(dtype) if row_align(n, dtype) > 1 else 1)
    tiles = -(-n // (r * v))
    splits = max(1, min(MAX_SPLITS, -(-target_programs(device) // rows), tiles))
    iters = -(-tiles // splits)
    return r, v, -(-tiles // iters), iters


def reduce(operands, groups: int = 1):
    """``(gram[B, G, K, K], sums[B, G, K])`` of K contiguous operands, accumulated in fp32
    (fp64 for fp64 inputs)."""
    first = operands[0]
    k = len(operands)
    b = first.shape[0]
    n = first[0].numel() // groups
    rows = b * groups
    r, v, splits, iters = launch_config(n, rows, first.dtype, first.device)
    align = row_align(n, first.dtype)
    acc = acc_dtype(first.dtype)
    part = torch.empty(rows * splits * (k * k + k), device=first.device, dtype=acc)
    _reduce_partials[(rows, splits)](*pointers(operands), part, n // align, iters, K=k, ALIGN=align, R=r, VEC=v,
                                     ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                     num_warps=NUM_WARPS)
    gram = torch.empty(b, groups, k, k, device=first.device, dtype=acc)
    sums = torch.empty(b, groups, k, device=first.device, dtype=acc)
    _reduce_finish[(rows,)](part, gram, sums, splits, K=k, PP=next_pow2(k * k + k), CHUNK=16, num_warps=NUM_WARPS)
    return gram, sums
