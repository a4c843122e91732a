"""Glue to the native (csrc/) ops ``torch.ops.gradguide.reduce / combine / combine_out /
fused_combine / fused_combine_out / clip_shift``.

The extension ``gradguide._C`` is built by ``setup.py`` where a compiler (and, for CUDA,
nvcc with a CUDA torch) exists; importing it registers the ops with the dispatcher. This
module loads it on first use, registers the fake (meta) kernels that let the ops run under
``torch.compile`` and ``FakeTensor`` tracing, and says why the backend is missing otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

_state = {"loaded": None, "reason": None, "kernels": frozenset(), "devices": {}}


def load() -> bool:
    """Import the extension once; ``True`` if the ops are registered."""
    if _state["loaded"] is None:
        try:
            from gradguide import _C  # noqa: F401  (registration happens at import)
        except Exception as exc:  # not built, or built against another torch
            _state["loaded"] = False
            _state["reason"] = (f"the csrc extension gradguide._C is not built or does not load ({exc}); "
                                "reinstall with `pip install --no-build-isolation -e .` where a C++ compiler exists")
        else:
            _register_fakes()
            _state["kernels"] = frozenset(
                (op, dev) for op in ("fused_combine", "fused_combine_out", "clip_shift") for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"gradguide::{op}", key))
            _state["loaded"] = True
    return _state["loaded"]


def status(device: Optional[torch.device] = None):
    """``True`` or the reason the native backend cannot run on ``device``."""
    if not load():
        return _state["reason"]
    if device is not None:
        built = _state["devices"].get(device.type)
        if built is None:   # asked once per device type (every sample() call resolves its backend)
            key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
            built = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("gradguide::reduce", key)
            _state["devices"][device.type] = built
        if not built:
            return f"the native ops were not built for {device.type} (CUDA needs a CUDA torch and nvcc at build time)"
    return True


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``gradguide::<op>`` has a kernel for ``device`` in this build (CPU and CUDA
    builds register ``fused_combine`` and ``clip_shift``; older builds may lack them). Plain
    Python on a set found at load time, so torch.compile traces it without a graph break."""
    return load() and (op, device.type) in _state["kernels"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    # the fake kernels check what the C++ ops check (shapes, dtypes, devices: opchecks.py), so a
    # fake or meta call, or mixed devices that dispatch to Meta, fail as a real call would
    from . import opchecks, policies
    from .reference import accumulation_dtype as reference_acc
    names = tuple(policies.POLICIES)

    @torch.library.register_fake("gradguide::reduce")
    def _reduce_fake(operands, groups, log_scale=None, slope=None, offset=None, scaled=0):
        first = opchecks.reduce("gradguide::reduce", operands, groups, log_scale, slope, offset, scaled,
                                row_strided=True)
        b, k = first.shape[0], len(operands)
        # the CPU op accumulates the Gram in float64 (reference.py); the CUDA op in float64 for
        # float32/float64 data and float32 for fp16/bf16 (csrc/gradguide_ops_cuda.cu, AccOf)
        acc = torch.float64 if first.device.type == "cpu" else reference_acc(first.dtype)
        return first.new_empty((b, groups, k, k), dtype=acc), first.new_empty((b, groups, k), dtype=acc)

    @torch.library.register_fake("gradguide::combine")
    def _combine_fake(coef, operands, low, high):
        opchecks.combine("gradguide::combine", coef, operands, low, high)
        return torch.empty_like(operands[0], memory_format=torch.contiguous_format)

    @torch.library.register_fake("gradguide::combine_out")
    def _combine_out_fake(coef, operands, low, high, out):
        opchecks.combine("gradguide::combine_out", coef, operands, low, high, out)
        return None

    if torch._C._dispatch_has_kernel_for_dispatch_key("gradguide::fused_combine", "CPU"):
        @torch.library.register_fake("gradguide::fused_combine")
        def _fused_combine_fake(policy, operands, gram, vectors, scalars, low, high, log_scale=None, slope=None,
                                offset=None, scaled=0):
            opchecks.fused("gradguide::fused_combine", names, policy, gram, vectors, scalars, operands, low, high,
                           None, log_scale, slope, offset, scaled, row_strided=True)
            return torch.empty_like(operands[0], memory_format=torch.contiguous_format)

    if torch._C._dispatch_has_kernel_for_dispatch_key("gradguide::fused_combine_out", "CPU"):
        @torch.library.register_fake("gradguide::fused_combine_out")
        def _fused_combine_out_fake(policy, operands, gram, vectors, scalars, low, high, out, log_scale=None,
                                    slope=None, offset=None, scaled=0):
            opchecks.fused("gradguide::fused_combine_out", names, policy, gram, vectors, scalars, operands, low, high,
                           out, log_scale, slope, offset, scaled, row_strided=True)
            return None

    if torch._C._dispatch_has_kernel_for_dispatch_key("gradguide::clip_shift", "CPU"):
        @torch.library.register_fake("gradguide::clip_shift")
        def _clip_shift_fake(coef_p, coef_s, operands, low, high):
            like = opchecks.clip_shift("gradguide::clip_shift", coef_p, coef_s, operands, low, high)
            return (torch.empty_like(like, memory_format=torch.contiguous_format),
                    torch.empty_like(like, memory_format=torch.contiguous_format))

    _register_autograd()


def _register_autograd() -> None:
    """Gradients of the raw ops (``torch.ops.gradguide.reduce / combine``), written with torch
    ops as the reference's: without them autograd would drop the graph with only a warning.
    ``combine_out`` and ``fused_combine_out`` write into ``out`` and stay non-differentiable
    (the glue never calls them with grad-tracking inputs: ``ops.fused_unchecked`` refuses an
    ``out`` with them). A Σ-scaled ``reduce`` is non-differentiable too, like the fused op it
    feeds: a call with grad-tracking inputs is refused by name (the reference differentiates)."""

    def reduce_setup(ctx, inputs, output):
        operands, groups = inputs[0], inputs[1]
        scaled = inputs[5] if len(inputs) > 5 else 0
        if scaled:
            raise ValueError("gradguide::reduce: log_scale: Σ-scaled operands are not differentiable here "
                             "(inputs that require grad: use gradguide.ops.reference.reduce(..., scaling=...))")
        ctx.groups = groups
        ctx.save_for_backward(*operands)

    def reduce_backward(ctx, grad_gram, grad_sums):
        operands = ctx.saved_tensors
        b, k, groups = operands[0].shape[0], len(operands), ctx.groups
        acc = _acc(operands[0].dtype)
        rows = torch.stack([op.reshape(b, groups, -1).to(acc) for op in operands], 2)      # [B, G, K, N]
        grad = torch.zeros_like(rows)
        if grad_gram is not None:
            sym = grad_gram.to(acc) + grad_gram.to(acc).transpose(-1, -2)
            grad = grad + sym @ rows
        if grad_sums is not None:
            grad = grad + grad_sums.to(acc).unsqueeze(-1)
        return ([grad[:, :, j].reshape(operands[j].shape).to(operands[j].dtype) for j in range(k)],
                *[None] * (len(ctx.needs_input_grad) - 1))   # one per argument the call passed

    torch.library.register_autograd("gradguide::reduce", reduce_backward, setup_context=reduce_setup)

    def combine_setup(ctx, inputs, output):
        coef, operands, low, high = inputs
        ctx.low, ctx.high = low, high
        ctx.save_for_backward(coef, *operands)

    def combine_backward(ctx, grad_out):
        coef, *operands = ctx.saved_tensors
        b, groups = operands[0].shape[0], coef.shape[1]
        acc = coef.dtype
        rows = torch.stack([op.reshape(b, groups, -1).to(acc) for op in operands], 2)      # [B, G, K, N]
        g = grad_out.reshape(b, groups, -1).to(acc)
        if ctx.low is not None or ctx.high is not None:   # torch.clamp's rule: pass where low <= x <= high
            x = (coef.unsqueeze(-1) * rows).sum(2)
            keep = torch.ones_like(x, dtype=torch.bool)
            if ctx.low is not None:
                keep &= x >= ctx.low
            if ctx.high is not None:
                keep &= x <= ctx.high
            g = g * keep
        grad_coef = (g.unsqueeze(2) * rows).sum(-1)
        grad_ops = [(coef[:, :, j:j + 1] * g).reshape(op.shape).to(op.dtype) for j, op in enumerate(operands)]
        return grad_coef, grad_ops, None, None

    torch.library.register_autograd("gradguide::combine", combine_backward, setup_context=combine_setup)


def fused_combine(policy, operands, gram, vectors, scalars, clamp=None, out=None, scaling=None):
    """``gradguide::fused_combine``: the policy's coefficient program (float64) and the combine;
    with ``out``, ``gradguide::fused_combine_out`` writes it there (any overlap with the inputs
    other than exactly an operand goes through a temporary inside the op) and returns ``out``.
    Operands may be row-strided (contiguous samples, any batch stride: read in place);
    ``scaling``: a :class:`gradguide.ops.reference.Scaling`, the operands it marks read scaled."""
    low, high = (None, None) if clamp is None else clamp
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    if scaling is None:   # the call of every unscaled step, unchanged
        if out is None:   # the overload itself: the packet's Python __call__ is a frame per step
            return torch.ops.gradguide.fused_combine.default(policy, operands, gram, vectors, scalars, low, high)
        if has_kernel("fused_combine_out", out.device):
            torch.ops.gradguide.fused_combine_out(policy, operands, gram, vectors, scalars, low, high, out)
            return out
        # an older build without the out= op: a fresh output, copied
        return out.copy_(torch.ops.gradguide.fused_combine(policy, operands, gram, vectors, scalars, low, high))
    v, a, c, mask = scaling
    if out is None:
        return torch.ops.gradguide.fused_combine.default(policy, operands, gram, vectors, scalars, low, high, v, a, c,
                                                         mask)
    if has_kernel("fused_combine_out", out.device):
        torch.ops.gradguide.fused_combine_out.default(policy, operands, gram, vectors, scalars, low, high, out, v, a,
                                                      c, mask)
        return out
    return out.copy_(torch.ops.gradguide.fused_combine(policy, operands, gram, vectors, scalars, low, high, v, a, c,
                                                       mask))


def clip_shift(coef_p, coef_s, operands, clip):
    """``gradguide::clip_shift``: ``clamp(p)`` and ``clamp(p + s) − clamp(p)`` in one pass."""
    return torch.ops.gradguide.clip_shift(coef_p, coef_s, list(operands), float(clip[0]), float(clip[1]))


def reduce(operands, groups: int = 1, scaling=None):
    """``gradguide::reduce``: the Gram matrix and sums (float64 on CPU); operands may be row-strided
    (read in place); ``scaling``: a :class:`gradguide.ops.reference.Scaling` (the marked operands
    read scaled)."""
    if scaling is None:
        return torch.ops.gradguide.reduce(list(operands), groups)
    v, a, c, mask = scaling
    return torch.ops.gradguide.reduce(list(operands), groups, v, a, c, mask)


def combine(coef, operands, out=None, clamp=None):
    low, high = (None, None) if clamp is None else (clamp[0], clamp[1])
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    if out is None:
        return torch.ops.gradguide.combine(coef, list(operands), low, high)
    torch.ops.gradguide.combine_out(coef, list(operands), low, high, out)
    return out
