"""The only door to the compute backends: ``reduce`` and ``combine``.

A guided step is two passes over its K operands (DESIGN.md): ``reduce`` computes the
per-sample Gram matrix and sums, a tiny coefficient program turns them into weights
``C[B, G, K]``, and ``combine`` writes ``sum_k C[:, :, k] * operand_k``. Nothing below this
module knows what a guidance method is; nothing above it knows which backend ran.

``backend`` is one of ``"reference"`` (plain torch, the truth), ``"triton"``, ``"native"``
or ``"auto"``; :func:`available_backends` says which ones this installation has.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference

BACKENDS = ("reference", "triton", "native", "auto")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends() -> dict:
    """Map each concrete backend to ``True`` or to the reason it is unavailable."""
    return {"reference": True,
            "triton": "not built yet: the Triton kernels are not part of this installation",
            "native": "not built yet: the csrc extension is not part of this installation"}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend that will run for ``backend`` on ``device`` (errors if unavailable)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    have = available_backends()
    if backend == "auto":
        preferred = ("triton", "native") if device.type == "cuda" else ("native",)
        for name in preferred:
            if have.get(name) is True:
                return name
        return "reference"
    if have[backend] is not True:
        raise RuntimeError(f"backend={backend!r} is unavailable: {have[backend]}")
    return backend


def check_operands(operands: Sequence[torch.Tensor], groups: int = 1, name: str = "operands") -> None:
    if not isinstance(operands, (list, tuple)) or len(operands) == 0:
        raise ValueError(f"{name}: expected a non-empty list of tensors")
    first = operands[0]
    for k, op in enumerate(operands):
        if not isinstance(op, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(op).__name__}")
        if op.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{k}]: expected a floating dtype in {FLOAT_DTYPES}, got {op.dtype}")
        if op.shape != first.shape:
            raise ValueError(f"{name}[{k}]: shape {tuple(op.shape)} differs from {name}[0]'s {tuple(first.shape)}")
        if op.device != first.device:
            raise ValueError(f"{name}[{k}]: device {op.device} differs from {name}[0]'s {first.device}")
        if op.dtype != first.dtype:
            raise TypeError(f"{name}[{k}]: dtype {op.dtype} differs from {name}[0]'s {first.dtype}")
    if first.dim() < 1 or first.shape[0] == 0:
        raise ValueError(f"{name}: expected tensors shaped [B, ...] with B >= 1, got {tuple(first.shape)}")
    per_sample = first[0].numel()
    if not isinstance(groups, int) or groups < 1 or per_sample % groups:
        raise ValueError(f"groups: expected a positive divisor of the per-sample size {per_sample}, got {groups!r}")


def reduce(operands: Sequence[torch.Tensor], groups: int = 1, backend: str = "auto"):
    """Per-sample Gram matrix ``[B, G, K, K]`` and sums ``[B, G, K]`` of K operands.

    ``groups`` splits each flattened sample into G equal contiguous chunks (G = channels
    gives per-(sample, channel) statistics for NCHW tensors).
    """
    check_operands(operands, groups)
    resolve_backend(backend, operands[0].device)
    return reference.reduce(operands, groups)


def combine(coef: torch.Tensor, operands: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None,
            clamp: Optional[tuple] = None, backend: str = "auto") -> torch.Tensor:
    """Per-sample weighted sum ``out[b] = sum_k coef[b, k] * operand_k[b]``.

    ``coef`` is ``[B, K]`` (one weight per sample) or ``[B, G, K]`` (per group); ``clamp``
    optionally clips the result elementwise to ``(low, high)``; ``out`` receives the result.
    """
    check_operands(operands)
    if coef.dim() == 2:
        coef = coef.unsqueeze(1)
    b, k = operands[0].shape[0], len(operands)
    if coef.dim() != 3 or coef.shape[0] != b or coef.shape[2] != k:
        raise ValueError(f"coef: expected shape [B={b}, K={k}] or [B={b}, G, K={k}], got {tuple(coef.shape)}")
    check_operands(operands, coef.shape[1])
    if coef.device != operands[0].device:
        raise ValueError(f"coef: device {coef.device} differs from the operands' {operands[0].device}")
    if out is not None and (out.shape != operands[0].shape or out.dtype != operands[0].dtype
                            or out.device != operands[0].device):
        raise ValueError(f"out: expected {tuple(operands[0].shape)} {operands[0].dtype} on {operands[0].device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    resolve_backend(backend, operands[0].device)
    return reference.combine(coef, operands, out=out, clamp=clamp)
