"""Triton ``reduce``: per-row Gram matrix and sums of K <= 8 operands (DESIGN.md, pass 1).

Design
------
A row is one sample (or one group of a sample: G equal contiguous chunks of the flattened
sample), N elements long; rows are few (B <= 64) and long (up to millions), so one program
per row cannot fill a GPU. Stage 1 runs a 1-D grid over ``rows x splits``: each program
walks its contiguous slice of a row in BLOCK-wide steps, loads the ``[KP, BLOCK]`` tile of all
K operands with one masked load (operands addressed as base + per-operand element offset,
see ``_common.py``), converts to the accumulation type (fp32; fp64 for fp64 inputs) and
accumulates ``x[:, None, :] * x[None, :, :]`` and ``x`` elementwise; it reduces over BLOCK only
at the end and writes one fp32 partial ``[KP, KP]`` Gram and ``[KP]`` sums. Stage 2 (one
program per row) adds the partials of a row in a fixed tree order and writes the ``[K, K]``
Gram and ``[K]`` sums. No atomics: the result is deterministic for a given split count.

Limits: K <= 8 operands, one dtype (fp16, bf16, fp32, fp64), contiguous (the Python glue
makes them so), all on one device; any N and B (masking, no power-of-two assumption);
``KP * KP * BLOCK`` is capped at 8192 accumulators per program. The whole Gram is computed
(both triangles) with identical products, so it is exactly symmetric. Non-finite inputs
poison the Gram entries and sums that involve them, as the reference does.

Reference: :func:`reference` below (the same maths as ``gradguide.ops.reference.reduce``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, element_offsets, interpreted, k_padded, next_pow2, target_programs


def reference(operands, groups: int = 1):
    """Plain-torch truth: ``gram[b, g] = R R^T`` with ``R = [op_k[b, g]]_k`` in the accumulation dtype."""
    b = operands[0].shape[0]
    rows = torch.stack([op.reshape(b, groups, -1).to(acc_dtype(op.dtype)) for op in operands], dim=2)
    return rows @ rows.transpose(-1, -2), rows.sum(-1)


@triton.jit
def _offsets(d0, d1, d2, d3, d4, d5, d6, d7, ks):
    """The [KP] vector of per-operand element offsets, from scalar arguments."""
    d = tl.where(ks == 0, d0, 0).to(tl.int64)
    d += tl.where(ks == 1, d1, 0).to(tl.int64)
    d += tl.where(ks == 2, d2, 0).to(tl.int64)
    d += tl.where(ks == 3, d3, 0).to(tl.int64)
    d += tl.where(ks == 4, d4, 0).to(tl.int64)
    d += tl.where(ks == 5, d5, 0).to(tl.int64)
    d += tl.where(ks == 6, d6, 0).to(tl.int64)
    d += tl.where(ks == 7, d7, 0).to(tl.int64)
    return d


@triton.jit
def _reduce_partials(base, d0, d1, d2, d3, d4, d5, d6, d7, part_gram, part_sums, N, SPLIT_LEN, SPLITS,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // SPLITS
    split = pid % SPLITS
    ks = tl.arange(0, KP)
    kmask = ks < K
    offs = _offsets(d0, d1, d2, d3, d4, d5, d6, d7, ks) + row.to(tl.int64) * N
    lo = split.to(tl.int64) * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    acc = tl.zeros([KP, KP, BLOCK], dtype=ACC)
    sacc = tl.zeros([KP, BLOCK], dtype=ACC)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        m = kmask[:, None] & (e < hi)[None, :]
        x = tl.load(base + offs[:, None] + e[None, :], mask=m, other=0.0).to(ACC)
        sacc += x
        acc += x[:, None, :] * x[None, :, :]
    gram = tl.sum(acc, axis=2)
    sums = tl.sum(sacc, axis=1)
    out = pid.to(tl.int64) * KP * KP + ks[:, None] * KP + ks[None, :]
    tl.store(part_gram + out, gram)
    tl.store(part_sums + pid.to(tl.int64) * KP + ks, sums)


@triton.jit
def _reduce_finish(part_gram, part_sums, gram, sums, SPLITS, K: tl.constexpr, KP: tl.constexpr,
                   SP2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SP2)
    idx = tl.arange(0, KP * KP)
    smask = sp < SPLITS
    pg = tl.load(part_gram + (row * SPLITS + sp[:, None]) * (KP * KP) + idx[None, :], mask=smask[:, None],
                 other=0.0)
    g = tl.sum(pg, axis=0)
    i = idx // KP
    j = idx % KP
    tl.store(gram + row * K * K + i * K + j, g, mask=(i < K) & (j < K))
    ks = tl.arange(0, KP)
    ps = tl.load(part_sums + (row * SPLITS + sp[:, None]) * KP + ks[None, :], mask=smask[:, None], other=0.0)
    tl.store(sums + row * K + ks, tl.sum(ps, axis=0), mask=ks < K)


MAX_SPLITS = 1024


def launch_config(k: int, n: int, rows: int, device: torch.device):
    """(KP, BLOCK, splits, split_len) for K operands, rows of N elements."""
    kp = k_padded(k)
    block = max(16, min(8192 // (kp * kp), 4096))
    if interpreted():
        block = 2048 // kp  # the interpreter pays per step, not per element: few, wide steps
    block = min(block, max(16, next_pow2(n)))
    splits = max(1, min(MAX_SPLITS, -(-target_programs(device) // rows), -(-n // block)))
    split_len = -(-(-(-n // splits)) // block) * block  # ceil(n / splits) rounded up to BLOCK
    splits = -(-n // split_len)
    return kp, block, splits, split_len


def reduce(operands, groups: int = 1):
    """``(gram[B, G, K, K], sums[B, G, K])`` of K contiguous operands, accumulated in fp32
    (fp64 for fp64 inputs)."""
    first = operands[0]
    k = len(operands)
    b = first.shape[0]
    n = first[0].numel() // groups
    rows = b * groups
    kp, block, splits, split_len = launch_config(k, n, rows, first.device)
    acc = acc_dtype(first.dtype)
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    part_gram = torch.empty(rows * splits * kp * kp, device=first.device, dtype=acc)
    part_sums = torch.empty(rows * splits * kp, device=first.device, dtype=acc)
    _reduce_partials[(rows * splits,)](first, *element_offsets(operands), part_gram, part_sums, n, split_len,
                                       splits, K=k, KP=kp, BLOCK=block, ACC=tl_acc)
    gram = torch.empty(b, groups, k, k, device=first.device, dtype=acc)
    sums = torch.empty(b, groups, k, device=first.device, dtype=acc)
    _reduce_finish[(rows,)](part_gram, part_sums, gram, sums, splits, K=k, KP=kp, SP2=max(2, next_pow2(splits)))
    return gram, sums
