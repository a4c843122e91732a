"""Helpers shared by the Triton kernels: operand addressing and launch sizes.

The K operands of a step are separate tensors of one shape and dtype. A Triton kernel takes
one base pointer (operand 0) and K element offsets ``d_k = (ptr_k - ptr_0) / itemsize``
passed as scalar arguments, so the kernel can load a ``[K, BLOCK]`` tile with one masked
``tl.load`` and no host-to-device copy of a pointer table (graph-capturable). Every tensor's
address is a multiple of its itemsize, so the offsets are exact integers.
"""
from __future__ import annotations

import os

import torch

MAX_K = 8


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def element_offsets(operands):
    """Offsets (in elements) of each operand from operand 0, padded to MAX_K with zeros."""
    base = operands[0].data_ptr()
    size = operands[0].element_size()
    offsets = []
    for k, op in enumerate(operands):
        diff = op.data_ptr() - base
        if diff % size:  # cannot happen for tensors of one dtype; guard the assumption anyway
            raise ValueError(f"operands[{k}]: address not aligned to its element size")
        offsets.append(diff // size)
    return offsets + [0] * (MAX_K - len(offsets))


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def k_padded(k: int) -> int:
    return max(2, next_pow2(k))  # tl.arange needs a power of two; 2 keeps reductions 2-D


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few waves of SMs on CUDA; few (large) programs
    under the interpreter, which runs programs one after another."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
