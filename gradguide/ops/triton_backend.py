"""Glue to the Triton kernels in the top-level ``kernels`` package.

Triton runs on CUDA tensors, and on CPU tensors only through Triton's interpreter
(``TRITON_INTERPRET=1``, for tests). The interpreter is chosen when a kernel is *defined*,
so what counts is the value of ``TRITON_INTERPRET`` when ``kernels`` is first imported:
this module imports it lazily and remembers that mode.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_state = {"module": None, "reason": None, "interpret": None}


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load():
    if _state["module"] is None and _state["reason"] is None:
        try:
            import triton  # noqa: F401
            from kernels import combine, fused, reduce  # noqa: F401
        except Exception as exc:
            _state["reason"] = f"triton or the kernels package cannot be imported ({exc})"
        else:
            import kernels
            _state["module"] = kernels
            _state["interpret"] = _interpret_env()
    return _state["module"]


def status(device: Optional[torch.device] = None):
    """``True`` or the reason the Triton backend cannot run on ``device``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    interpret = _state["interpret"] if _state["module"] is not None else _interpret_env()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if interpret:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
    elif device.type == "cpu":
        if not interpret:
            return "Triton needs a CUDA device (on CPU only under TRITON_INTERPRET=1, set before import)"
    else:
        return f"Triton does not run on {device.type}"
    if _load() is None:
        return _state["reason"]
    return True


def reduce(operands, groups: int = 1):
    return _load().reduce.reduce(list(operands), groups)


def combine(coef, operands, out=None, clamp=None):
    return _load().combine.combine(coef, list(operands), out=out, clamp=clamp)


def fused_combine(policy, gram, vectors, scalars, operands, out=None, clamp=None):
    return _load().fused.fused_combine(policy, gram, vectors, scalars, list(operands), out=out, clamp=clamp)
