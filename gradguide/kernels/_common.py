"""Helpers shared by the Triton kernels: operand pointers, vector widths and launch sizes.

The K <= 8 operands of a step are separate tensors of one shape and dtype. Each kernel takes
them as eight separate pointer arguments ``x0..x7`` (unused ones repeat ``x0`` and are never
read: ``K`` is a compile-time constant), so Triton sees every operand's own alignment (it
specialises pointers that are 16-byte aligned) and no host pointer arithmetic is needed: the
glue traces under FakeTensor / ``torch.compile`` and is graph-capturable.

Rows (a sample, or one of its G groups) are N contiguous elements; row r starts at ``r * N``
(the reduce and fused kernels also take row-strided operands, whose row (b, g) starts at
``b * stride(0) + g * N``: ``scaling.py``).
The glue passes ``N`` as ``NR = N // ALIGN`` plus the compile-time ``ALIGN``: when N is a
multiple of the 128-bit vector width ``VEC`` (4 fp32, 8 fp16/bf16, 2 fp64 elements), ALIGN =
VEC and Triton can prove every row start 16-byte aligned, so operand loads compile to
``ld.global.v4`` (``gradguide check-kernels`` asserts it); otherwise ALIGN = 1 (scalar loads).
"""
from __future__ import annotations

import os

import torch

MAX_K = 8
NUM_WARPS = 4  # 128 threads; each thread loads one 128-bit vector per operand per step


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def vec(dtype: torch.dtype) -> int:
    """Elements per 128-bit vector."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def row_align(n: int, dtype: torch.dtype) -> int:
    """The ALIGN constexpr: VEC when rows of n elements keep 16-byte alignment, else 1."""
    v = vec(dtype)
    return v if n % v == 0 else 1


def pointers(operands):
    """The eight pointer arguments ``x0..x7``: the operands, padded with operand 0 (never read)."""
    return list(operands) + [operands[0]] * (MAX_K - len(operands))


def tile_rows() -> int:
    """Thread rows of a tile: one vector per thread on a GPU; the interpreter runs programs one
    after another and pays per step, not per element, so it gets few wide steps."""
    return 512 if interpreted() else 32 * NUM_WARPS


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def k_padded(k: int) -> int:
    return max(2, next_pow2(k))  # tl.arange needs a power of two; 2 keeps reductions 2-D


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every kernel: fp64 for fp32 and fp64 data (small combinations of
    large operands: reduce.py's header), fp32 for fp16/bf16 (exact products)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few waves of SMs on CUDA; few (large) programs
    under the interpreter, which runs programs one after another."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def batch_stride(t: torch.Tensor) -> int:
    """A row-strided tensor's batch stride in elements (``scaling.py``); 0 for B = 1 (never used)."""
    return t.stride(0) if t.shape[0] > 1 else 0


def strided_align(n: int, dtype: torch.dtype, tensors) -> int:
    """The ALIGN constexpr of row-strided tensors: VEC when rows of n elements and every batch
    stride keep 16-byte alignment, else 1."""
    v = vec(dtype)
    return v if n % v == 0 and all(batch_stride(t) % v == 0 for t in tensors) else 1


def batch_strides(operands, align: int):
    """The eight ``SB0..SB7`` arguments: each operand's batch stride over ALIGN (0 for padding)."""
    return [batch_stride(t) // align for t in operands] + [0] * (MAX_K - len(operands))


def scaling_args(operands, scaling, align: int):
    """``(xv, slope, offset, SBV, SLB, SLK, OFB, OFK, SCALED)`` of ``scaling`` = None or
    ``(log_scale, slope, offset, mask)``: the log-scale tensor, the float64 ``[1 or B, K]``
    slope and offset read through their strides (0 on a broadcast batch), and the mask;
    placeholders (never read) without scaling."""
    if scaling is None or not int(scaling[3]):
        x = operands[0]
        return x, x, x, 0, 0, 0, 0, 0, 0
    v, slope, offset, mask = scaling
    sb = lambda t: t.stride(0) if t.shape[0] > 1 else 0
    return (v, slope, offset, batch_stride(v) // align, sb(slope), slope.stride(1), sb(offset), offset.stride(1),
            int(mask))
