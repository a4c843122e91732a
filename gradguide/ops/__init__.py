"""The only door to the compute backends: ``reduce`` and ``combine``.

A guided step is two passes over its K operands (docs/architecture.md): ``reduce`` computes the
per-sample Gram matrix and sums, a tiny coefficient program turns them into weights
``C[B, G, K]``, and ``combine`` writes ``sum_k C[:, :, k] * operand_k``. Nothing below this
module knows what a guidance method is; nothing above it knows which backend ran.

``backend`` is one of ``"reference"`` (plain torch, the truth), ``"triton"``, ``"native"``
or ``"auto"``; :func:`available_backends` says which ones this installation has.

Non-finite values, one rule on every backend (reference, native CPU and CUDA, Triton):

- ``reduce`` and ``combine`` follow IEEE arithmetic elementwise and multiply every operand by
  its weight, even a zero one: a NaN/inf operand element makes the Gram entries it enters and
  its output element non-finite (``0 · inf = NaN``); a clamp keeps NaN.
- ``fused_combine``'s coefficient program: if any input of a row's program (its Gram block, a
  coefficient vector, a scalar of its sample — APG's ``norm_threshold`` included: ``0``, not
  ``inf``, disables its clip) is NaN or ±inf, or a weight it computes is not finite (e.g. a
  scale of 1e308), all the row's weights are NaN and so is the whole row (sample, or sample ×
  group) of the output (:mod:`gradguide.ops.policies`).

Calling the registered ops directly (``torch.ops.gradguide.*``, ``torch.ops.gradguide_triton.*``)
skips this module's checks but not the ops' own: bad arguments raise a ``TypeError`` or
``ValueError`` that names them (:mod:`gradguide.ops.opchecks`).
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import native_backend, policies, reference, triton_backend

BACKENDS = ("reference", "triton", "native", "auto")
MAX_K = 8  # operands per step the kernels take (their tiles and registers are sized for K <= 8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends(device=None) -> dict:
    """Map each concrete backend to ``True`` or to the reason it is unavailable.

    ``device`` (optional): ask for a device (``"cpu"``, ``"cuda"``); by default CUDA when
    present, else CPU. ``"triton"`` needs triton and a CUDA device, or ``TRITON_INTERPRET=1``
    (set before the kernels are imported) for CPU tensors; ``"native"`` needs the compiled
    ``gradguide._C`` extension with kernels for that device.
    """
    dev = torch.device(device) if device is not None else None
    return {"reference": True, "triton": triton_backend.status(dev), "native": native_backend.status(dev)}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend that will run for ``backend`` on ``device`` (errors if unavailable).

    ``"auto"``: Triton on CUDA, the native ops on CPU when built, else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        if backend == "auto":   # meta / other devices: only the reference (plain torch) runs there
            return "reference"
        raise ValueError(f"backend: {backend!r} runs on cpu and cuda tensors, got tensors on {device.type} "
                         "(use backend='reference' or 'auto')")
    status = {"triton": triton_backend.status, "native": native_backend.status}
    if backend == "auto":   # called on every reduce/combine: ask only the backends that could win
        preferred = ("triton", "native") if device.type == "cuda" else ("native",)
        for name in preferred:
            if status[name](device) is True:
                return name
        return "reference"
    reason = status[backend](device)
    if reason is not True:
        raise RuntimeError(f"backend={backend!r} is unavailable on {device.type}: {reason}")
    return backend


def _implementation(name: str):
    return {"reference": reference, "triton": triton_backend, "native": native_backend}[name]


def _contiguous(operands: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Kernels address rows as contiguous memory: non-contiguous operands are copied (this
    costs one extra pass over that operand; pass contiguous tensors to avoid it)."""
    return [op if op.is_contiguous() else op.contiguous() for op in operands]


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
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or per_sample % groups:
        raise ValueError(f"groups: expected a positive divisor of the per-sample size {per_sample}, got {groups!r}")


def check_clamp(clamp, name: str = "clamp"):
    """``None`` or ``(low, high)`` as floats (``None`` for an open side; both ``None`` is ``None``).

    One rule on every backend: NaN bounds are refused (``torch.clamp`` would return all NaN,
    a comparison-based kernel would ignore the bound), and so is ``low > high``."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)):
        raise TypeError(f"{name}: expected None or a (low, high) pair of numbers, got {type(clamp).__name__} {clamp!r}")
    if len(clamp) != 2:
        raise ValueError(f"{name}: expected a (low, high) pair of numbers, got {len(clamp)} value(s) {tuple(clamp)!r}")
    bounds = []
    for side, value in zip(("low", "high"), clamp):
        if value is None:
            bounds.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: {side}: expected a real number or None, got {type(value).__name__} {value!r}")
        value = float(value)
        if value != value:
            raise ValueError(f"{name}: {side}: NaN is not a bound (expected a number, or None for no bound)")
        bounds.append(value)
    if bounds[0] is None and bounds[1] is None:
        return None
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise ValueError(f"{name}: expected low <= high, got {tuple(bounds)!r}")
    return tuple(bounds)


def _check_float_tensor(name: str, value, expected: str) -> None:
    """A tensor of a real floating dtype (integers and complex numbers are refused, never cast)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a real floating dtype in {FLOAT_DTYPES}, got {value.dtype}")


def _check_out(out, like: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor or None, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out: expected {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.device.type != "meta" and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"out: several of its elements share memory (stride {tuple(out.stride())}, e.g. an "
                         "expanded tensor); pass a tensor with one memory location per element")
    if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
        raise ValueError("out: a leaf tensor that requires grad cannot receive a result in place; "
                         "leave out=None or detach it")


def _span(t: torch.Tensor):
    """[first, last) byte addresses a tensor's elements can touch."""
    if t.is_contiguous():   # the common case, cheaply (a sampling step asks this every step)
        first = t.data_ptr()
        return first, first + t.numel() * t.element_size()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    lowest = t.data_ptr() - t.element_size() * sum((size - 1) * -stride for size, stride in
                                                   zip(t.shape, t.stride()) if stride < 0)
    return lowest, lowest + (extent + 1) * t.element_size()


def _overlap(out: torch.Tensor, t: torch.Tensor) -> str:
    """``"none"``, ``"same"`` (exactly the same elements: safe for the elementwise kernels) or
    ``"partial"`` (shared memory laid out differently: a kernel would read what it already wrote)."""
    if t.device != out.device or t.device.type == "meta" or t.numel() == 0 or out.numel() == 0:
        return "none"
    (a0, a1), (b0, b1) = _span(out), _span(t)
    if a1 <= b0 or b1 <= a0:
        return "none"
    if (t.data_ptr() == out.data_ptr() and t.shape == out.shape and t.stride() == out.stride()
            and t.dtype == out.dtype):
        return "same"
    return "partial"


def _direct_out(out: torch.Tensor, operands: Sequence[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether a kernel may write ``out`` directly; otherwise the result is computed into a
    temporary and copied. The kernels are elementwise, so ``out`` may be exactly an operand (an
    in-place update), but memory shared any other way (a shifted view, a non-contiguous out)
    would be read after it was written; ``inputs`` (weights, Gram matrix, program vectors and
    scalars) are read while the output is written, so they may not share memory with it at all."""
    return out.is_contiguous() and all(_overlap(out, op) != "partial" for op in operands) and \
        all(t is None or _overlap(out, t) == "none" for t in inputs)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _ReferenceBackward(torch.autograd.Function):
    """A fast backend's forward with the reference's backward: the kernels compute no
    gradients, so ``backward`` recomputes the reference forward on the saved inputs and
    differentiates it (exactly the gradient of the reference; it costs one extra forward)."""

    @staticmethod
    def forward(ctx, fast, ref, *inputs):
        ctx.ref = ref
        ctx.save_for_backward(*inputs)
        return fast(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i + 2]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
            outs = ctx.ref(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted],
                                      [g for _, g in pairs], allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * len(inputs)
        for i, g in zip(wanted, got):
            result[i] = g
        return (None, None, *result)


def reduce(operands: Sequence[torch.Tensor], groups: int = 1, backend: str = "auto"):
    """Per-sample Gram matrix ``[B, G, K, K]`` and sums ``[B, G, K]`` of K operands, float64
    for every input dtype (why: :mod:`gradguide.ops.reference`).

    ``groups`` splits each flattened sample into G equal contiguous chunks (G = channels
    gives per-(sample, channel) statistics for NCHW tensors).
    """
    check_operands(operands, groups)
    name = resolve_backend(backend, operands[0].device)
    if name == "reference":
        return reference.reduce(operands, groups)
    if len(operands) > MAX_K:
        raise ValueError(f"operands: backend {name!r} takes at most {MAX_K} operands, got {len(operands)}")
    fast = lambda *ops_: reduce_unchecked(_contiguous(ops_), groups, name)
    if _needs_grad(*operands):  # the kernels compute no gradients: differentiate the reference
        return _ReferenceBackward.apply(fast, lambda *ops_: reference.reduce(ops_, groups), *operands)
    return fast(*operands)


def combine(coef: torch.Tensor, operands: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None,
            clamp: Optional[tuple] = None, backend: str = "auto") -> torch.Tensor:
    """Per-sample weighted sum ``out[b] = sum_k coef[b, k] * operand_k[b]``.

    ``coef`` is ``[B, K]`` (one weight per sample) or ``[B, G, K]`` (per group); ``clamp``
    optionally clips the result elementwise to ``(low, high)``; ``out`` receives the result.
    """
    check_operands(operands)
    _check_float_tensor("coef", coef, "a [B, K] or [B, G, K] tensor")
    if coef.dim() == 2:
        coef = coef.unsqueeze(1)
    b, k = operands[0].shape[0], len(operands)
    if coef.dim() != 3 or coef.shape[0] != b or coef.shape[2] != k:
        raise ValueError(f"coef: expected shape [B={b}, K={k}] or [B={b}, G, K={k}], got {tuple(coef.shape)}")
    if operands[0][0].numel() % coef.shape[1]:
        raise ValueError(f"coef: {coef.shape[1]} groups (its dimension 1) do not divide the per-sample size "
                         f"{operands[0][0].numel()}")
    if coef.device != operands[0].device:
        raise ValueError(f"coef: device {coef.device} differs from the operands' {operands[0].device}")
    _check_out(out, operands[0])
    clamp = check_clamp(clamp)
    name = resolve_backend(backend, operands[0].device)
    if name == "reference":
        return reference.combine(coef, operands, out=out, clamp=clamp)
    if len(operands) > MAX_K:
        raise ValueError(f"operands: backend {name!r} takes at most {MAX_K} operands, got {len(operands)}")
    impl = _implementation(name)
    # native CPU combine accumulates in float64, the Triton/CUDA kernels in float32 (reference.py)
    acc = (reference.combine_dtype if name == "native" else reference.accumulation_dtype)(operands[0].dtype)
    if _needs_grad(coef, *operands):  # the kernels compute no gradients: differentiate the reference
        fast = lambda c, *ops_: impl.combine(c.to(acc).contiguous(), _contiguous(ops_), clamp=clamp)
        result = _ReferenceBackward.apply(fast, lambda c, *ops_: reference.combine(c, ops_, clamp=clamp),
                                          coef, *operands)
        return result if out is None else out.copy_(result)
    coef = coef.to(acc).contiguous()
    direct = out is not None and _direct_out(out, operands, [coef])   # else a temporary, then copy
    result = impl.combine(coef, _contiguous(operands), out=out if direct else None, clamp=clamp)
    return out.copy_(result) if out is not None and not direct else result


def _scalar(name: str, value, b: int, device, dtype) -> torch.Tensor:
    """A policy scalar as a 1-element or ``[B]`` tensor (kept on the device: no host sync)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a 0-d / [B] tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.full((1,), float(value), device=device, dtype=dtype)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a real floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: on {value.device}, but the operands are on {device}")
    if value.numel() == 1:
        return value.reshape(1).to(dtype)
    if value.shape != (b,):
        raise ValueError(f"{name}: expected a number, a 0-d tensor or a [B={b}] tensor, got shape {tuple(value.shape)}")
    return value.to(dtype).contiguous()


def fused_combine(policy: str, operands: Sequence[torch.Tensor], *, gram: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None, clamp: Optional[tuple] = None, backend: str = "auto",
                  **params: Union[torch.Tensor, float]) -> torch.Tensor:
    """A built-in policy's coefficient program and the combine, in one pass where possible.

    ``policy``: one of :data:`gradguide.ops.policies.POLICIES` (``"linear"``, ``"cfg"``,
    ``"pxp-a"``, ``"pxp-b"``, ``"pxp-c"``, ``"apg"``, ``"lookahead"``, ``"tcfg"``, ``"mambo"``; formulas in
    :mod:`gradguide.ops.policies`).
    ``params``: the policy's coefficient vectors (LinCombs over ``operands``, ``[B, K]`` or
    ``[B, G, K]`` tensors) and scalars (numbers, 0-d or ``[B]`` device tensors) by name.
    ``gram``: the Gram matrix ``[B, G, Kg, Kg]`` of the first ``Kg`` <= K operands from
    :func:`reduce` (the vectors whose inner products the policy takes must be zero beyond them;
    computed here over all K when a policy needs it and it is not given). The coefficient
    program runs inside the combine on ``"native"`` (one C++ call on CPU) and ``"triton"`` (the
    fused kernel's prologue, every policy); the reference (and the native CUDA op, which has no
    fused combine yet) evaluates it in torch, then combines. Coefficients are computed in float64.
    A row whose program reads a NaN/inf (Gram entry, vector entry, scalar), or computes a
    non-finite weight, is all NaN on every backend (module doc).
    """
    if not isinstance(policy, str) or policy not in policies.POLICIES:
        raise ValueError(f"policy: expected one of {tuple(policies.POLICIES)}, got {policy!r}")
    check_operands(operands)
    first = operands[0]
    b, k = first.shape[0], len(operands)
    vector_names, scalar_defaults = policies.POLICIES[policy]
    unknown = set(params) - set(vector_names) - set(scalar_defaults)
    if unknown:
        raise TypeError(f"fused_combine({policy!r}): unexpected parameters {sorted(unknown)}; "
                        f"expected vectors {vector_names} and scalars {tuple(scalar_defaults)}")
    groups = None
    vectors: Dict[str, torch.Tensor] = {}
    for name in vector_names:
        if name not in params:
            raise TypeError(f"fused_combine({policy!r}): missing coefficient vector {name!r}")
        v = params[name]
        _check_float_tensor(name, v, f"a [B={b}, K={k}] or [B={b}, G, K={k}] tensor")
        if v.dim() not in (2, 3) or v.shape[0] != b or v.shape[-1] != k:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: expected a [B={b}, K={k}] or [B={b}, G, K={k}] tensor, got {got}")
        if v.device != first.device:
            raise ValueError(f"{name}: on {v.device}, but the operands are on {first.device}")
        v = v.unsqueeze(1) if v.dim() == 2 else v
        if v.shape[1] != 1:
            if groups not in (None, v.shape[1]):
                raise ValueError(f"{name}: {v.shape[1]} groups, but another vector has {groups}")
            groups = v.shape[1]
        vectors[name] = v
    if gram is not None:
        _check_float_tensor("gram", gram, "a [B, G, Kg, Kg] tensor from ops.reduce")
        if gram.device != first.device:
            raise ValueError(f"gram: on {gram.device}, but the operands are on {first.device}")
        if gram.dim() != 4 or gram.shape[0] != b or gram.shape[2] != gram.shape[3] or not 1 <= gram.shape[2] <= k:
            got = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ValueError(f"gram: expected [B={b}, G, Kg, Kg] over the first Kg <= K={k} operands "
                             f"(from ops.reduce), got {got}")
        if groups not in (None, gram.shape[1]):
            raise ValueError(f"gram: {gram.shape[1]} groups, but the coefficient vectors have {groups}")
        groups = gram.shape[1]
    groups = groups or 1
    check_operands(operands, groups)
    coef_dtype = reference.coefficient_dtype(first.dtype)
    vectors = {n: v.to(coef_dtype).contiguous() for n, v in vectors.items()}   # kernels read rows of K
    scalars = {}
    for name, default in scalar_defaults.items():
        if name not in params and default is None:
            raise TypeError(f"fused_combine({policy!r}): missing scalar {name!r}")
        scalars[name] = _scalar(name, params.get(name, default), b, first.device, coef_dtype)
    _check_out(out, first)
    clamp = check_clamp(clamp)
    name = resolve_backend(backend, first.device)
    if name != "reference" and len(operands) > MAX_K:
        raise ValueError(f"operands: backend {name!r} takes at most {MAX_K} operands, got {len(operands)}")
    operands = _contiguous(operands) if name != "reference" else list(operands)
    if policies.NEEDS_GRAM[policy]:
        gram = (reduce(operands, groups, backend=name)[0] if gram is None else gram.to(coef_dtype).contiguous())
    else:
        gram = None
    # the fused kernels compute no gradients: with grad-tracking inputs, take the unfused path
    # (torch coefficient program + combine, differentiable through the reference backward)
    if _needs_grad(gram, *operands, *vectors.values(), *scalars.values()):
        b_, g_ = first.shape[0], groups
        full = {n: v.expand(b_, g_, k) for n, v in vectors.items()}
        coef = policies.coefficients(policy, gram, full, {n: s.reshape(-1, 1, 1) for n, s in scalars.items()})
        return combine(coef, operands, out=out, clamp=clamp, backend=name)
    args = (policy, name, operands, gram, list(vectors.values()), list(scalars.values()), groups, clamp)
    if out is not None and _needs_grad(out):   # an out tracked by autograd receives the result by copy_
        return out.copy_(fused_unchecked(*args))
    return fused_unchecked(*args, out=out)


# -- the unchecked entries a sampling step uses (validated once, when the run was prepared) --------

def reduce_unchecked(operands: List[torch.Tensor], groups: int, backend: str):
    """:func:`reduce` without argument checks (contiguous operands of one dtype/device/shape;
    ``backend`` resolved): a step's per-call overhead is what small batches pay for."""
    if backend == "reference":
        return reference.reduce(operands, groups)
    gram, sums = _implementation(backend).reduce(operands, groups)
    if gram.dtype != torch.float64:  # the Gram contract is float64 (reference.py); a float32 kernel is upcast
        gram, sums = gram.double(), sums.double()
    return gram, sums


def rows_in_place(t: torch.Tensor) -> bool:
    """Whether the kernels read ``t`` where it is: each sample contiguous, any batch stride (the
    halves ``out[:, :C]``, ``out[:, C:]`` of a learned-variance model's output)."""
    return t.is_contiguous() or t[0].is_contiguous()


def _formed(operands: List[torch.Tensor], scaling) -> List[torch.Tensor]:
    """The operands as the fused kernels read them, written out, contiguous: for the torch program
    + ``combine`` path (a native build without the fused op), whose ``combine`` takes neither."""
    out = []
    for k, op in enumerate(operands):
        if scaling is not None and scaling.mask >> k & 1:
            shape = (-1,) + (1,) * (op.dim() - 1)
            op = reference.variance_scaled(op, scaling.log_scale, scaling.slope[:, k].view(shape),
                                           scaling.offset[:, k].view(shape)).to(op.dtype)
        out.append(op.contiguous())
    return out


def gram_unchecked(operands: List[torch.Tensor], groups: int, backend: str,
                   scaling: Optional[reference.Scaling] = None) -> torch.Tensor:
    """The Gram matrix for :func:`fused_unchecked`, in the dtype the backend's reduce wrote it:
    the fused combines read any float Gram and compute in float64, and upcasting a float32 Gram
    here would add two launches (Gram and sums) and no precision (the values are the same).
    ``scaling``: operands read Σ-scaled (:class:`reference.Scaling`); operands may be row-strided
    (each sample contiguous)."""
    if backend == "reference":
        return reference.reduce(operands, groups, scaling)[0]
    if scaling is None:
        return _implementation(backend).reduce(operands, groups)[0]
    return _implementation(backend).reduce(operands, groups, scaling=scaling)[0]


def fused_unchecked(policy: str, backend: str, operands: List[torch.Tensor], gram: Optional[torch.Tensor],
                    vectors: List[torch.Tensor], scalars: List[torch.Tensor], groups: int = 1,
                    clamp: Optional[tuple] = None, out: Optional[torch.Tensor] = None,
                    scaling: Optional[reference.Scaling] = None) -> torch.Tensor:
    """:func:`fused_combine` without argument checks. ``scaling``: operands read Σ-scaled
    (:class:`reference.Scaling`, formed inside the kernels where they can); operands may be
    row-strided (each sample contiguous). ``vectors``: ``[1 or B, 1 or G, K]``
    (broadcast over the batch); ``scalars``: 1- or B-element tensors; ``gram``: ``[B, G, Kg,
    Kg]`` over the first ``Kg`` operands (float64; the fused kernels read a float32 one too),
    or None for a policy without one. native (CPU, and CUDA where the op was built with it): the
    program runs inside ``gradguide::fused_combine``; triton: inside the fused kernel's prologue
    (one launch each, nothing padded, expanded or cast on the way); otherwise the torch program,
    then combine.

    ``out``: an existing tensor like ``operands[0]`` to write the result into (and return), e.g.
    a buffer a caller's own loop keeps, which spares a fresh output's first-touch page faults on
    CPU (``sample()`` allocates fresh: benchmarks/results/native-bandwidth-cpu-2026-11-24.md).
    Where it is not contiguous, or shares memory with the inputs other than by being exactly an
    operand, the result goes through a temporary
    (the native op decides the latter itself, cheaply; elsewhere :func:`_direct_out`). The fused
    kernels compute no gradients, so ``out`` is refused with inputs that require grad."""
    if out is not None and _needs_grad(out, gram, *operands, *vectors, *scalars):
        raise ValueError("out: the fused kernels compute no gradients and do not write into out with inputs "
                         "that require grad (ops.fused_combine takes the differentiable path for those)")
    if out is not None and not out.is_contiguous():   # the kernels write contiguous rows: a temporary, copied
        return out.copy_(fused_unchecked(policy, backend, operands, gram, vectors, scalars, groups, clamp,
                                         scaling=scaling))
    native = backend == "native" and native_backend.has_kernel("fused_combine", operands[0].device)
    if backend == "native" and not native:   # the torch program, then combine
        operands, scaling = _formed(operands, scaling), None
    extra = {} if scaling is None else {"scaling": scaling}
    if native:
        return native_backend.fused_combine(policy, operands, gram, vectors, scalars, clamp, out=out, **extra)
    if backend == "triton":
        if out is not None and not _direct_out(out, operands, [gram, *vectors, *scalars]):
            return out.copy_(triton_backend.fused_combine(policy, gram, vectors, scalars, operands, clamp=clamp,
                                                          **extra))
        return triton_backend.fused_combine(policy, gram, vectors, scalars, operands, out=out, clamp=clamp, **extra)
    b, k = operands[0].shape[0], len(operands)
    g = gram.shape[1] if gram is not None else max(v.shape[1] for v in vectors)
    names_v, names_s = policies.POLICIES[policy]   # (policies._dot reads a Gram over the first Kg operands)
    coef = policies.coefficients(policy, None if gram is None else gram.double(),
                                 {n: v.expand(b, g, k) for n, v in zip(names_v, vectors)},
                                 {n: s.reshape(-1, 1, 1) for n, s in zip(names_s, scalars)})
    if backend == "reference":   # computes into a temporary, then copies into out
        return reference.combine(coef, operands, out=out, clamp=clamp, scaling=scaling)
    acc = reference.combine_dtype if backend == "native" else reference.accumulation_dtype
    coef = coef.expand(b, g, k).to(acc(operands[0].dtype)).contiguous()
    if out is not None and not _direct_out(out, operands, [coef]):
        return out.copy_(_implementation(backend).combine(coef, operands, clamp=clamp))
    return _implementation(backend).combine(coef, operands, out=out, clamp=clamp)


def clip_shift(coef_p: torch.Tensor, coef_s: torch.Tensor, operands: Sequence[torch.Tensor], clip: tuple,
               backend: str = "auto"):
    """A clipped x̂_0 and the clipped guidance shift, in one pass where possible.

    With ``p = Σ_k coef_p[b, k] op_k`` and ``s = Σ_k coef_s[b, k] op_k`` (``coef``: ``[B, K]``
    or ``[1, K]``), returns ``(clamp(p), clamp(p + s) − clamp(p))``; the shift is exactly ``s``
    where neither side clips, so it keeps ``s``'s relative precision (docs/architecture.md#precision)."""
    check_operands(operands)
    b, k = operands[0].shape[0], len(operands)
    for name, c in (("coef_p", coef_p), ("coef_s", coef_s)):
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[0] not in (1, b) or c.shape[1] != k:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"{name}: expected a [B={b} or 1, K={k}] tensor, got {got}")
        if c.device != operands[0].device:
            raise ValueError(f"{name}: on {c.device}, but the operands are on {operands[0].device}")
    if coef_p.shape != coef_s.shape:
        raise ValueError(f"coef_p and coef_s: shapes differ ({tuple(coef_p.shape)} vs {tuple(coef_s.shape)})")
    if not isinstance(clip, (tuple, list)) or len(clip) != 2 or not clip[0] < clip[1]:
        raise ValueError(f"clip: expected (low, high) with low < high, got {clip!r}")
    name = resolve_backend(backend, operands[0].device)
    if name != "reference" and len(operands) > MAX_K:
        raise ValueError(f"operands: backend {name!r} takes at most {MAX_K} operands, got {len(operands)}")
    dtype = reference.coefficient_dtype(operands[0].dtype)
    return clip_shift_unchecked(coef_p.to(dtype), coef_s.to(dtype),
                                _contiguous(operands) if name != "reference" else list(operands), clip, name)


def clip_shift_unchecked(coef_p, coef_s, operands: List[torch.Tensor], clip: tuple, backend: str):
    """:func:`clip_shift` without checks (native: one C++/CUDA pass; triton: one kernel launch;
    else the reference formula)."""
    if backend == "native" and native_backend.has_kernel("clip_shift", operands[0].device):
        return native_backend.clip_shift(coef_p, coef_s, operands, clip)
    if backend == "triton":
        return triton_backend.clip_shift(coef_p, coef_s, operands, clip)
    return reference.clip_shift(coef_p, coef_s, operands, clip)
