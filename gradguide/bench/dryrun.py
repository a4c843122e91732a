"""``gradguide dryrun``: the GPU path of a guided step, run without a GPU on fake tensors.

Every tensor of the step — model weights, ``x_t``, the sampler's tables, guidance inputs — is
a :class:`~torch._subclasses.fake_tensor.FakeTensor` on a fake device: ops propagate shapes,
dtypes and devices, no data is computed. Running :func:`gradguide.sampling.step` (and the graph
stepper's bookkeeping, :class:`gradguide.graphs.GraphCache` in emulation) on them proves:

- **no CPU tensor enters a GPU step**: the mode is strict (``allow_non_fake_inputs=False``):
  a real tensor raises, and a fake CPU tensor mixed with the device's raises
  ``FakeTensorDeviceMismatchError``, as a real CUDA op would;
- **no host sync and no data-dependent Python branch**: a fake tensor has no value, so
  ``.item()``, ``.tolist()``, ``bool(t)``, ``if t:`` raise (and :func:`gradguide.debug.forbid_host_sync`
  is active, naming the call);
- **every op traceable**: every aten op and custom op (``gradguide::reduce/combine``) needs a
  fake/meta kernel to run at all.

A :class:`Counter` (a ``TorchDispatchMode`` inside the fake mode) attributes each op to a phase
— ``forward`` / ``backward`` (the model, classifier, decoder: everything wrapped as a model,
via :func:`gradguide.bench.profiling.phased`), ``guidance`` (the rest of the step: guidance terms,
coefficient programs, reduce/combine, sampler, noise) — and counts per phase: kernel launches
(one per aten or custom op, zero for views and metadata ops: :data:`ZERO_LAUNCH`), bytes read
and written by *large* tensors (at least as many elements as ``x_t``; all bytes too, for the
roofline), FLOPs (torch's flop registry: matmuls, convolutions, attention) and the peak of live
tensor bytes (storages alive, tracked by weak references: what the CUDA allocator would hold).

**Devices.** The fake device is ``cuda``. A CPU-only torch cannot run *autograd* on
CUDA-typed tensors, fake or not (the engine needs a CUDA device guard and accelerator hooks and
aborts the process without them), so steps that take a vector-Jacobian product (classifier, G,
G_loss, DPS — and so all three paper workloads) run on the fake ``meta`` device. It proves the
same three properties (a CPU tensor still raises a device mismatch, values still do not exist);
what it does not exercise is host code that branches on ``device.type == "cuda"`` (backend
resolution is pinned explicitly here; graph capture is emulated on either device). Each row
says which device ran.

Host-side preparation (schedule tables, validation: :func:`gradguide.sampling.prepare_run`) runs
before the mode is entered, on the ``meta`` device; the prepared run's tensors and the modules'
weights are then converted to fake tensors (weights are built on ``meta``: no memory, no init).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
import types
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import gradguide as gg
from gradguide import ops, sampling
from gradguide.debug import forbid_host_sync
from gradguide.tools import guidance_spec

# Ops that launch no kernel on a GPU: views (``func.is_view``) and these metadata/allocation ops.
ZERO_LAUNCH = frozenset({
    "detach", "lift_fresh", "_unsafe_view", "alias", "_reshape_alias", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "view", "expand", "t", "permute", "transpose", "unsqueeze", "squeeze",
    "select", "slice", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal",
    "_to_copy_noop", "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
})
PHASES = ("forward", "backward", "guidance")
FAKE_DEVICES = ("cuda", "meta")


# -- counting -----------------------------------------------------------------------------------------

def _tensors(tree) -> List[torch.Tensor]:
    out = []
    for item in (tree if isinstance(tree, (list, tuple)) else [tree]):
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_tensors(item))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Tracker:
    """The phase stack that :func:`gradguide.bench.profiling.phased` drives (``enter``/``exit``)."""

    def __init__(self):
        self.stack: List[str] = []

    def enter(self, phase: str) -> None:
        self.stack.append(phase)

    def exit(self, phase: str) -> None:
        if phase in self.stack:
            while self.stack and self.stack.pop() != phase:
                pass

    @property
    def phase(self) -> str:
        return self.stack[-1] if self.stack else "outside"


class Counter(TorchDispatchMode):
    """Counts launches, bytes, FLOPs and live memory per phase (see the module doc)."""

    def __init__(self, tracker: Tracker, large: int):
        super().__init__()
        self.tracker = tracker
        self.large = large                # elements: a tensor this big or bigger is "large"
        self.live: Dict[int, tuple] = {}  # storage key -> (weakref, bytes)
        self.live_bytes = 0
        self.reset()

    def reset(self) -> None:
        self.stats = {p: {"launches": 0, "views": 0, "bytes_read": 0, "bytes_written": 0, "all_bytes": 0,
                          "flops": 0, "ops": {}, "roofline": []} for p in PHASES + ("outside",)}
        self.peak = {p: 0 for p in PHASES + ("outside",)}
        self.new_bytes = 0   # bytes allocated since reset (step buffers)

    def _collect(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.live_bytes -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        phase = self.tracker.phase
        s = self.stats[phase]
        name = func._overloadpacket.__name__
        outs = _tensors(out)
        if func.namespace == "prim":   # prim.device, prim.layout: Python-side metadata queries
            return out
        if func.is_view or name in ZERO_LAUNCH:
            s["views"] += 1
            return out
        ins = _tensors(list(args) + list(kwargs.values()))
        read = sum(_nbytes(t) for t in ins)
        written = sum(_nbytes(t) for t in outs)
        big = sum(_nbytes(t) for t in ins if t.numel() >= self.large) + \
            sum(_nbytes(t) for t in outs if t.numel() >= self.large)
        s["launches"] += 1
        key = str(func._overloadpacket)
        count, nb = s["ops"].get(key, (0, 0))
        s["ops"][key] = (count + 1, nb + big)
        s["bytes_read"] += sum(_nbytes(t) for t in ins if t.numel() >= self.large)
        s["bytes_written"] += sum(_nbytes(t) for t in outs if t.numel() >= self.large)
        s["all_bytes"] += read + written
        flops = 0
        fn = flop_registry.get(func._overloadpacket)
        if fn is not None:
            try:
                flops = int(fn(*args, **kwargs, out_val=out))
            except Exception:   # a shape function the counter does not know: no FLOPs counted
                flops = 0
        if func.namespace == "gradguide_triton" and name == "reduce" and ins[0].dtype == torch.float64:
            # gradguide/kernels/reduce.py: fp64 operands' [16, BK] tile Grams on fp64 tensor cores, 2·16·16
            # FLOPs per element of one operand whatever K (the projection's DMMA peak: projection.py);
            # fp32 operands go through the per-thread kernel, memory-bound by its SASS roofline
            # (gradguide check-kernels), so it adds bytes, not FLOPs
            flops = 512 * ins[0].numel()
        s["flops"] += flops
        dtype = outs[0].dtype if outs else (ins[0].dtype if ins else torch.float32)
        s["roofline"].append((read + written, flops, str(dtype).replace("torch.", ""), name))
        # new allocations: output storages that are not an input's (in-place and out= ops reuse)
        in_keys = set()
        for t in ins:
            try:
                in_keys.add(StorageWeakRef(t.untyped_storage()).cdata)
            except Exception:
                pass
        for t in outs:
            try:
                ref = StorageWeakRef(t.untyped_storage())
            except Exception:
                continue
            if ref.cdata in in_keys or ref.cdata in self.live:
                continue
            size = t.untyped_storage().nbytes()
            self.live[ref.cdata] = (ref, size)
            self.live_bytes += size
            self.new_bytes += size
        if self.live_bytes > self.peak[phase]:   # a possible new peak: drop what died, then compare
            self._collect()
            self.peak[phase] = max(self.peak[phase], self.live_bytes)
        return out

    def track_existing(self, tensors) -> int:
        """Count tensors allocated before the step (inputs, state) as live; returns their bytes."""
        total = 0
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata not in self.live:
                size = t.untyped_storage().nbytes()
                self.live[ref.cdata] = (ref, size)
                self.live_bytes += size
                total += size
        return total


# -- fake conversion ------------------------------------------------------------------------------------

class FakeWorld:
    """A strict FakeTensorMode and the conversion of prepared objects into it."""

    def __init__(self, device: str):
        if device not in FAKE_DEVICES:
            raise ValueError(f"device: expected one of {FAKE_DEVICES}, got {device!r}")
        # a CUDA device always has an index (fake tensors report cuda:0; sample() normalises to it)
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        self.memo: Dict[int, torch.Tensor] = {}
        self.weight_bytes = 0
        self.modules: List[nn.Module] = []

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A fake tensor on the fake device with ``t``'s shape, strides, dtype and grad flag."""
        if id(t) in self.memo:
            return self.memo[id(t)]
        with self.mode:
            f = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=self.device)
        if isinstance(t, nn.Parameter):
            f = nn.Parameter(f, requires_grad=t.requires_grad)
        self.memo[id(t)] = f
        return f

    def module(self, m: nn.Module) -> nn.Module:
        """Replace every parameter and buffer of ``m`` (in place) by fake tensors."""
        if any(m is seen for seen in self.modules):
            return m
        self.modules.append(m)
        for sub in m.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    if id(p) not in self.memo:
                        self.weight_bytes += _nbytes(p)
                    sub._parameters[name] = self.tensor(p)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    if id(b) not in self.memo:
                        self.weight_bytes += _nbytes(b)
                    sub._buffers[name] = self.tensor(b)
        return m

    def value(self, v, depth: int = 0):
        """Convert tensors, modules and containers reachable from ``v`` (objects in place)."""
        if depth > 10:   # deep enough for run.plan -> variants -> stages -> scalar specs -> tensor
            return v
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if isinstance(v, nn.Module):
            return self.module(v)
        if isinstance(v, dict):
            return {k: self.value(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(self.value(x, depth + 1) for x in v)
        if isinstance(v, types.MethodType):
            self.value(v.__self__, depth + 1)
            return v
        if isinstance(v, types.FunctionType):
            for cell in v.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                new = self.value(content, depth + 1)
                if isinstance(content, torch.Tensor):
                    cell.cell_contents = new
            return v
        # guidance terms, the projection, and the fused step's plan (its stages hold per-sample
        # tensors such as G_loss's target)
        if (isinstance(v, (gg.GuidanceTerm, gg.PixelAsParam))
                or type(v).__module__ == "gradguide.stepplan" and hasattr(v, "__dict__")):
            for k, x in list(vars(v).items()):
                setattr(v, k, self.value(x, depth + 1))
            return v
        return v

    def run(self, run) -> None:
        """Convert a prepared :class:`gradguide.sampling._Run` in place."""
        import dataclasses
        run.device = self.device
        run.generator = None   # noise comes from the device's default generator (fake: no values)
        # every field: tables, timesteps, step ids, cond / uncond / batched inputs, the model,
        # guidance terms and the projection (tensors inside them are converted in place)
        for f in dataclasses.fields(run):
            if f.name in ("device", "generator", "tables"):
                continue
            setattr(run, f.name, self.value(getattr(run, f.name)))


@contextlib.contextmanager
def _cuda_attention():
    """``F.scaled_dot_product_attention`` as a CUDA build dispatches it: on ``meta`` (and in a
    CPU-only torch) SDPA falls back to the math path, which materialises the attention matrix
    (bmm + softmax); on a GPU torch picks FlashAttention (fp16/bf16, no mask) or the
    memory-efficient kernel. Both have meta kernels and autograd formulas, so the dry run calls
    them directly: the counts and the memory are those of the GPU kernels."""
    import torch.nn.functional as F
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa or query.device.type not in FAKE_DEVICES:
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p,
                                                                      is_causal, scale=scale)[0]
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


_GUARD_SRC = r"""
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
// A no-op CUDA device guard for a CPU-only torch, so that host code touching a CUDA-typed fake
// tensor (indexing, device guards of custom ops) runs. Registered only if no CUDA guard exists.
bool register_noop_cuda_guard() {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
  if (slot.load() != nullptr) return false;
  static c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA> impl;
  slot.store(&impl);
  return true;
}
"""
_guard_state = {"status": None}


def fake_cuda_status() -> Optional[str]:
    """``None`` if fake ``cuda`` tensors work in this process, else why not.

    A CPU-only torch has no CUDA device guard, and Python indexing of a CUDA-typed (fake) tensor
    asks for one; where no CUDA torch is present, a no-op guard is compiled (once, cached by
    torch's extension builder) and registered. Autograd still needs a real CUDA runtime (see the
    module doc)."""
    if _guard_state["status"] is not None:
        return _guard_state["status"] or None
    reason = ""
    if not torch.cuda.is_available() and not torch.backends.cuda.is_built():
        try:
            from torch.utils.cpp_extension import load_inline
            module = load_inline("gradguide_noop_cuda_guard", cpp_sources=_GUARD_SRC,
                                 functions=["register_noop_cuda_guard"], verbose=False)
            module.register_noop_cuda_guard()
        except Exception as exc:   # no compiler: fake cuda is not available, meta still is
            reason = f"no CUDA device guard could be built ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    _guard_state["status"] = reason
    return reason or None


@contextlib.contextmanager
def _backends_on_fake_devices():
    """``ops.resolve_backend`` asks whether a backend runs on the device (a real CUDA device, a
    built extension; never on ``meta``). On a fake device the question is whether its ops trace,
    which :func:`pick_backend` answers by running them: here a named backend resolves to itself
    (``"auto"`` as on a GPU: Triton)."""
    real = ops.resolve_backend

    def resolve(backend, device):
        if torch.device(device).type in FAKE_DEVICES and backend in ("triton", "native", "auto"):
            if backend == "native" and not ops.native_backend.load():
                raise RuntimeError(f"backend='native' is unavailable: {ops.native_backend._state['reason']}")
            return "triton" if backend == "auto" else backend
        return real(backend, device)
    ops.resolve_backend = resolve
    try:
        yield
    finally:
        ops.resolve_backend = real


_probes: Dict[tuple, Optional[str]] = {}


def probe_backend(name: str, device: str = "cuda") -> Optional[str]:
    """``None`` if backend ``name``'s reduce and combine run on fake tensors, else why not."""
    if (name, device) not in _probes:
        _probes[(name, device)] = _probe(name, device)
    return _probes[(name, device)]


def _probe(name: str, device: str) -> Optional[str]:
    if device == "cuda" and fake_cuda_status():
        return fake_cuda_status()
    world = FakeWorld(device)
    try:
        with _backends_on_fake_devices(), world.mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. data_ptr() of a FakeTensor, on the way to the error
            a = torch.randn(3, 40, device=world.device)
            b = torch.randn(3, 40, device=world.device)
            gram, _ = ops.reduce([a, b], backend=name)
            ops.combine(gram[:, :, 0], [a, b], backend=name)
    except Exception as exc:  # report, never crash the dry run: the reason goes into the table
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def pick_backend(backend: str, device: str = "cuda") -> tuple:
    """``(backend, notes)``: ``backend`` if it traces on fake tensors; for ``"auto"`` the first
    of triton, native, reference that does (notes say why the others did not)."""
    candidates = ("triton", "native", "reference") if backend == "auto" else (backend,)
    notes = []
    for name in candidates:
        reason = probe_backend(name, device)
        if reason is None:
            return name, notes
        notes.append(f"{name}: {reason}")
    raise RuntimeError(f"backend={backend!r} does not run on fake tensors: " + "; ".join(notes))


# -- one dry run ----------------------------------------------------------------------------------------

def _term_tensors(run) -> List[torch.Tensor]:
    out = list(t for t in run.cond.values() if isinstance(t, torch.Tensor))
    for term in [run.branch] + run.score_terms + run.mean_terms + run.post_terms:
        if term is not None:
            out += [v for v in vars(term).values() if isinstance(v, torch.Tensor)]
    return out + [run.table_rows, run.timesteps_dev, run.step_ids]


def minimum_bytes(log: dict, run, x: torch.Tensor) -> int:
    """The least big-tensor traffic of the guidance/sampler part of one step (bytes).

    Each operand read once per pass that needs it, each output written once: one reduce pass
    over the operands that enter inner products (the most any reduce of the step took), one
    pass per combined output (x_{t−1}; x̂_0 where the sampler carries it) reading its K
    operands and writing the output (materialised intermediates such as the clipped x̂_0 are
    not operands: a fused pass recomputes them elementwise), the noise written once, and per
    vector-Jacobian product the cotangent's formation (read the reward direction, write the
    cotangent, at the size of what the term differentiates) plus, where a term feeds x̂_0 to a
    callable (decoder, DPS operator), x̂_0 written once from its operands."""
    s = _nbytes(x)
    total = log["reduce_k"] * s + sum((k + 1) * s for k in log["combine_k"])
    total += s * log["noise"]
    for term in run.score_terms + run.mean_terms + run.post_terms:
        if type(term).__name__ in ("LookAhead",):
            # the general path forms the cotangent of the VJP (read g, write it); the fused step
            # asks autograd for Jᵀg with the reward direction itself as the cotangent
            total += 0 if log.get("fused") else 2 * s
        elif type(term).__name__ == "DecodedLookAhead":
            total += 2 * _nbytes(term.grad) + (log["tracked_k"] + 1) * s
        elif type(term).__name__ == "DPS":
            total += 2 * max(s, _nbytes(term.measurement)) + (log["tracked_k"] + 1) * s
    return total


def _plan_structure(log: dict, variant) -> None:
    """:func:`minimum_bytes`' record for a fused step (``gradguide.stepplan``): the most operands
    any stage's Gram takes, and the operands of each stage whose output is not an intermediate
    (the clipped x̂_0 and its shift are recomputable elementwise, as for the general path: a
    stage reading one counts the operands it is recomputed from instead, not nothing)."""
    originals = ("x", "model_cond", "model_uncond")
    clip_pairs = (("x0_clipped", "clip_shift"), ("x0_uncond_clipped", "x0_cfg_diff_clipped"))   # (policy C's)
    intermediates = {name for pair in clip_pairs for name in pair + (",".join(pair),)}
    log["fused"] = True
    sources = {}   # intermediate -> the operands it is recomputed from (a fused pass reads those instead)

    def own(names):
        out = []
        for n in names:
            out += [m for m in sources.get(n, [n]) if m not in out]
        return out

    for stage in variant.stages:
        operands = own(stage.operands)
        if stage.n_gram:
            log["reduce_k"] = max(log["reduce_k"], len(own(stage.operands[:stage.n_gram])))
        if stage.output in intermediates:
            sources.update({name: operands for name in stage.output.split(",")})
        else:
            log["combine_k"].append(len(operands))
        log["tracked_k"] = max(log["tracked_k"], len([n for n in stage.operands if n in originals]))


@contextlib.contextmanager
def _structure_log(log: dict):
    """Record the step's structure for :func:`minimum_bytes`: how many *original* operands each
    reduce and each output combine takes. Operands that the step materialises (clipped x̂_0)
    are intermediates, not operands: a fused kernel recomputes them on the fly (clamp is
    elementwise), so they count in no minimum. A wrapper, not a change: the originals run."""
    from gradguide import linear
    real_reduced, real_combine, real_mat = linear.Operands._reduced, linear.Operands.combine, \
        linear.Operands.materialize
    real_mat_shift = linear.Operands.materialize_clip_shift
    inside = {"materialize": 0}
    originals = ("x", "model_cond", "model_uncond")

    def own(self):
        return len(self.tensors) - len(getattr(self, "_dryrun_materialized", ()))

    def reduced(self):
        log["reduce_k"] = max(log["reduce_k"], own(self))
        log["tracked_k"] = max(log["tracked_k"], len([n for n in self.names if n in originals]))
        return real_reduced(self)

    def combine(self, u, out=None, clamp=None):
        if not inside["materialize"]:
            log["combine_k"].append(own(self))
        log["tracked_k"] = max(log["tracked_k"], len([n for n in self.names if n in originals]))
        return real_combine(self, u, out=out, clamp=clamp)

    def materialize(self, name, u, clamp=None):
        inside["materialize"] += 1
        try:
            result = real_mat(self, name, u, clamp=clamp)
        finally:
            inside["materialize"] -= 1
        self._dryrun_materialized = getattr(self, "_dryrun_materialized", ()) + (name,)
        log["materialized"] += 1
        return result

    def materialize_clip_shift(self, names, p, s, clip):   # clamp(p) and its clipped shift: intermediates too
        result = real_mat_shift(self, names, p, s, clip)
        self._dryrun_materialized = getattr(self, "_dryrun_materialized", ()) + tuple(names)
        log["materialized"] += len(names)
        return result
    linear.Operands._reduced, linear.Operands.combine, linear.Operands.materialize = reduced, combine, materialize
    linear.Operands.materialize_clip_shift = materialize_clip_shift
    try:
        yield
    finally:
        linear.Operands._reduced, linear.Operands.combine, linear.Operands.materialize = \
            real_reduced, real_combine, real_mat
        linear.Operands.materialize_clip_shift = real_mat_shift


def _phase_summary(counter: Counter) -> dict:
    out = {}
    for p in PHASES:
        s = counter.stats[p]
        out[p] = {k: s[k] for k in ("launches", "views", "bytes_read", "bytes_written", "all_bytes", "flops")}
        out[p]["ops"] = {k: {"launches": c, "large_bytes": b}
                         for k, (c, b) in sorted(s["ops"].items(), key=lambda kv: -kv[1][0])}
        out[p]["peak_live_bytes"] = counter.peak[p]
    return out


# the sample() arguments a dry run takes (x_T and generator are its own; of execution, device, backend
# and graph are its own too)
PREPARE_ARGS = frozenset({"schedule", "sampler", "steps", "guidance", "projection", "cond", "execution",
                          "diagnostics"})


def dry_run(model: Callable, shape, *, steps_measured=None, graph: bool = True, backend: str = "auto",
            device: Optional[str] = None, name: str = "", tracker: Optional[Tracker] = None, **sample_kwargs) -> dict:
    """Run guided steps of ``gradguide.sample(model, shape, **sample_kwargs)`` on fake tensors.

    ``model`` and everything in ``sample_kwargs`` are built on the ``meta`` device (or CPU for
    small tensors the preparation reads on the host, such as timesteps). ``device``: the fake
    device (default: ``"cuda"``, or ``"meta"`` when a step needs autograd; see the module doc).
    ``steps_measured``: host step numbers to count (default: step 1, or 0, and the last step).
    ``graph``: also run the graph stepper's bookkeeping (``GraphCache(emulate=True)``: static
    buffers, copy-in, the captured step's body) on the fake device. ``tracker``: the phase stack
    that callables wrapped with :func:`gradguide.bench.profiling.phased` mark (the model is wrapped
    here). Returns a dict (its table row: :func:`summarize`).
    """
    t_start = time.perf_counter()
    kwargs = dict(sample_kwargs)
    requested_backend = backend
    tracker = tracker or Tracker()   # classifiers/decoders wrapped with phased(fn, tracker) count as model
    from gradguide.bench.profiling import phased

    # host-side preparation (validation, tables, the built-in fused step's plan: what sample()
    # does before its loop), on the meta device, before the fake mode
    unsupported = set(kwargs) - PREPARE_ARGS
    if unsupported:
        raise TypeError(f"dry_run: unsupported sample() arguments {sorted(unsupported)}")
    execution = dataclasses.replace(kwargs.pop("execution", None) or gg.Execution(), backend="reference",
                                    device="meta", graph=False)
    run = sampling.prepare_run(phased(model, tracker), tuple(shape), **{"sampler": "ddpm", **kwargs},
                               execution=execution, meta=True)
    fake_device = device or ("meta" if run.needs_input_grad or fake_cuda_status() else "cuda")
    if fake_device == "cuda" and run.needs_input_grad:
        raise ValueError("device='cuda': this step takes a vector-Jacobian product, which a CPU-only torch cannot "
                         "run on CUDA-typed tensors (its autograd engine needs a CUDA device); use device='meta'")
    chosen, backend_notes = pick_backend(backend, fake_device)
    world = FakeWorld(fake_device)
    t_convert = time.perf_counter()
    world.run(run)
    convert_s = time.perf_counter() - t_convert
    run.backend = chosen
    n = len(run.tables.timesteps)
    if steps_measured is None:
        steps_measured = sorted({min(1, n - 1), n - 1})
    x_elems = 1
    for d in shape:
        x_elems *= d

    counter = Counter(tracker, large=x_elems)
    result = {"name": name, "fake_device": fake_device, "backend": chosen, "backend_requested": requested_backend,
              "backend_notes": backend_notes, "shape": list(shape), "dtype": str(run.dtype).replace("torch.", ""),
              "sampler": run.tables.name, "steps": n, "weight_bytes": world.weight_bytes,
              "convert_s": convert_s, "steps_measured": {}, "checks": []}
    with _backends_on_fake_devices(), _cuda_attention(), world.mode, counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(tuple(shape), device=world.device, dtype=run.dtype)
        state = sampling.initial_state(run, x)
        persistent = [x] + list(state.values()) + _term_tensors(run)
        for i in steps_measured:
            counter.reset()
            counter.live.clear()
            counter.live_bytes = 0
            inputs_bytes = counter.track_existing(persistent)
            log = {"reduce_k": 0, "combine_k": [], "noise": 0, "tracked_k": 0, "materialized": 0}
            tracker.stack[:] = ["guidance"]
            with _structure_log(log), forbid_host_sync():
                noise = None
                if run.tables.draws_noise[i]:
                    noise = torch.randn(tuple(shape), device=world.device, dtype=run.dtype)
                    log["noise"] = 1
                x_new, state_new, _ = sampling.step(run, x, i, run.step_ids[i:i + 1], state, noise, False)
                if run.plan is not None:
                    _plan_structure(log, run.plan.variants[bool(run.tables.draws_noise[i])])
            tracker.stack[:] = []
            if x_new.device.type != world.device.type or x_new.shape != x.shape:
                raise AssertionError(f"step {i}: output on {x_new.device} shaped {tuple(x_new.shape)}")
            row = _phase_summary(counter)
            row["inputs_bytes"] = inputs_bytes
            row["roofline_ops"] = {p: counter.stats[p]["roofline"] for p in PHASES}
            row["min_guidance_bytes"] = minimum_bytes(log, run, x)
            row["structure"] = log
            del x_new, state_new, noise
            result["steps_measured"][str(i)] = row
        if graph:
            result["graph"] = _graph_path(run, x, state, steps_measured, counter, tracker, shape, world)
    result["checks"] = ["strict FakeTensorMode: no real (CPU) tensor entered the step",
                        f"every tensor of the step on the fake {fake_device} device (a CPU tensor would raise)",
                        "no host sync / data-dependent branch (fake tensors have no values; forbid_host_sync active)",
                        "every op ran through a fake/meta kernel (traceable)"]
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _graph_path(run, x, state, steps_measured, counter, tracker, shape, world) -> dict:
    """The graph stepper on the fake device: ``GraphCache(emulate=True)`` allocates the static
    buffers and replays the captured step's body on them (the same code as capture, minus
    ``torch.cuda.graph`` itself, which needs a CUDA runtime)."""
    from gradguide.graphs import GraphCache
    cache = GraphCache(emulate=True)
    stepper = cache.stepper(run, sampling.step)
    i = steps_measured[0]
    noise = torch.randn(tuple(shape), device=world.device, dtype=run.dtype) if run.tables.draws_noise[i] else None
    counter.reset()
    tracker.stack[:] = ["guidance"]
    before = counter.live_bytes
    with forbid_host_sync():
        # the first call of a variant "captures" (allocates the static buffers) and replays once:
        # copy-in launches, then the captured body
        stepper(x, i, state, noise, False)
        cap = next(iter(stepper.stepper.captures.values()))
        static_bytes = sum(_nbytes(t) for t in [cap.x, cap.idx] + list(cap.state.values())
                           + ([cap.noise] if cap.noise is not None else []))
    tracker.stack[:] = []
    buffers = 2 + len(cap.state) + (cap.noise is not None)
    return {"captures": cache.captures, "static_buffer_bytes": static_bytes, "static_buffers": buffers,
            "copy_in_launches": buffers,   # one copy_ per static buffer before each replay
            "noise_launches": int(cap.noise is not None),   # the noise is drawn outside the graph
            "first_call_launches": sum(counter.stats[p]["launches"] for p in PHASES),
            "step_peak_live_bytes": max(counter.peak.values()) - before,
            "note": "torch.cuda.graph capture itself not run (no CUDA runtime): static buffers, copy-in and the "
                    "captured body are"}


# -- workloads ------------------------------------------------------------------------------------------

def _load_bench():
    from gradguide.bench import loop
    return loop


class _BigOnMeta(torch.overrides.TorchFunctionMode):
    """Allocate large tensors (>= 4096 elements, no device or generator given) on ``meta``, so
    building an SD-1.5-size network costs no memory and no initialisation time; small tensors
    (schedules, biases, vectors the harness reads on the host) stay real. The harness then
    moves everything to ``meta`` and the dry run makes it fake."""
    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None and kwargs.get("generator") is None:
            size = args[0] if len(args) == 1 or func is torch.full else args
            if func is torch.full:
                size = args[0]
            if isinstance(size, (list, tuple, torch.Size)) and len(size) and isinstance(size[0], (list, tuple)):
                size = size[0]
            try:
                numel = 1
                for d in (size if isinstance(size, (list, tuple, torch.Size)) else [size]):
                    numel *= int(d)
            except (TypeError, ValueError):
                numel = 0
            if numel >= 4096:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def paper_workload(name: str, tracker: Tracker, quick: bool = False, dtype: Optional[torch.dtype] = None) -> tuple:
    """``(model, shape, sample kwargs, facts)`` of a workload of the bench harness
    (``gradguide/bench/loop.py``), built on the ``meta`` device, with its classifier or decoder
    marked as a model phase on ``tracker``. U-Net weights default to float16, as the harness
    runs them on CUDA."""
    from gradguide.bench.profiling import phased
    bench = _load_bench()
    if name not in bench.ALL_WORKLOADS:
        raise ValueError(f"workload: expected one of {', '.join(bench.ALL_WORKLOADS)}, got {name!r}")
    with _BigOnMeta():
        w = bench.build_workload(name, quick=quick, device="meta", seed=0, dtype=dtype or torch.float16)
        kw = dict(w.fixed)
        kw.update(w.per_pass(lambda fn: phased(fn, tracker), 0))
    return w.model, w.shape, kw, {"config": w.config, "params": w.params, "paper_ratio": w.paper_ratio}


def run_workload(name: str, quick: bool = False, backend: str = "auto", graph: bool = True,
                 dtype: Optional[torch.dtype] = None) -> dict:
    """Dry-run a paper/loop workload of the bench harness (see :func:`dry_run`)."""
    t0 = time.perf_counter()
    tracker = Tracker()
    model, shape, kw, facts = paper_workload(name, tracker, quick, dtype)
    build_s = time.perf_counter() - t0
    result = dry_run(model, shape, graph=graph, backend=backend, name=name, tracker=tracker, steps_measured=[1], **kw)
    result.update(workload=name, quick=quick, build_s=build_s, **facts)
    return result


# -- every sampler x guidance x projection -----------------------------------------------------------

# sampler variants: name -> sample() arguments (DDPM's three variances, DDIM deterministic,
# stochastic and with x̂_0 clipping, DPM-Solver++(2M)); "learned-range": the model outputs 2C channels
SAMPLER_VARIANTS = {
    "ddpm": gg.Sampler("ddpm"),
    "ddpm-large": gg.Sampler("ddpm", variance="fixed-large"),
    "ddpm-learned": gg.Sampler("ddpm", variance="learned-range"),
    "ddim": gg.Sampler("ddim"),
    "ddim-eta1": gg.Sampler("ddim", eta=1.0),
    "ddim-clip": gg.Sampler("ddim", clip=(-1.0, 1.0)),   # x̂_0 clipping (image models; ADM clips)
    "dpmpp-2m": gg.Sampler("dpmpp-2m"),
}
SAMPLERS = tuple(SAMPLER_VARIANTS)
# the guidance and projection names: the harness's one factory (gradguide/tools/guidance_spec.py)
GUIDANCE = tuple(n for n in guidance_spec.GUIDANCE if n != "G_loss-decoded")   # (its decoder: a paper workload)
PROJECTIONS = guidance_spec.PROJECTIONS


class _TinyClassifier(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def log_prob(self, x, t, class_labels):
        logits = self.head(torch.nn.functional.silu(self.conv(x)).mean(dim=(2, 3)))
        return logits.log_softmax(-1).gather(1, class_labels[:, None])[:, 0]


def _guidance_terms(name: str, shape, tracker: Tracker):
    """The terms of ``name`` with their model-side inputs on ``meta`` (classifier and DPS operator
    marked as model phases on ``tracker``)."""
    from gradguide.bench.profiling import phased
    meta = torch.device("meta")
    if name not in GUIDANCE:
        raise ValueError(f"guidance: expected one of {GUIDANCE}, got {name!r}")
    inputs = {}
    if name == "classifier":
        inputs["classifier"] = phased(_TinyClassifier(shape[1]).to(meta).log_prob, tracker)
    elif name in ("G", "G_loss"):
        inputs.update(gradient=torch.empty(shape, device=meta), target=torch.empty(shape[0], device=meta))
    elif name == "dps":
        inputs.update(operator=phased(lambda x0: x0 * 0.5, tracker), measurement=torch.empty(shape, device=meta))
    return guidance_spec.guidance_terms(name, **inputs)


def run_combination(sampler: str, guidance: str, projection: str, backend: str = "auto", graph: bool = False,
                    shape=(2, 4, 8, 8), steps: int = 6) -> dict:
    """Dry-run one ``sampler × guidance × projection`` on a small conditional model.
    A combination that ``gradguide.sample`` refuses is returned with ``status: refused``."""
    if sampler not in SAMPLER_VARIANTS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    variant = SAMPLER_VARIANTS[sampler]
    learned = variant.variance == "learned-range"
    tracker = Tracker()
    model = _load_bench().CheapEps(shape[1], out_channels=2 * shape[1] if learned else None).to("meta").eval().requires_grad_(False)
    terms = _guidance_terms(guidance, shape, tracker)
    for term in terms:
        for v in vars(term).values():
            if isinstance(getattr(v, "__self__", None), nn.Module):
                v.__self__.requires_grad_(False)
    labels = torch.zeros(shape[0], dtype=torch.long, device="meta")
    name = f"{sampler} + {guidance} + {projection}"
    try:
        result = dry_run(model, shape, schedule=gg.Schedule.linear(1000), steps=steps, guidance=terms,
                         projection=guidance_spec.projection(projection), cond={"class_labels": labels}, graph=graph,
                         backend=backend, tracker=tracker, name=name, sampler=variant)
    except ValueError as exc:
        if "projection" in str(exc) or "guidance" in str(exc):
            return {"name": name, "status": "refused", "reason": str(exc).splitlines()[0]}
        raise
    result["status"] = "ok"
    result.update(sampler=sampler, guidance=guidance, projection=projection)
    return result


def run_all_combinations(backend: str = "auto", progress: bool = True, graph: bool = True) -> List[dict]:
    combos = [(s, g, p) for s in SAMPLERS for g in GUIDANCE for p in PROJECTIONS]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(combos), desc="dry run: combinations", unit="combo", disable=None)  # off on a non-tty
    out = []
    for s, g, p in combos:
        out.append(run_combination(s, g, p, backend=backend, graph=graph))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


# -- report ---------------------------------------------------------------------------------------------

PAPER = ("sim-gloss", "sd-cfg-gloss", "adm64-cls-pxpA")
PAPER_FIGURES = {"sim-gloss": "4.6 s per pass, one A100 (Guo et al. 2024, Table 1)",
                 "sd-cfg-gloss": "not given per pass", "adm64-cls-pxpA": "not given per pass"}


# the fused step's targets: <= 8 launches beyond the model, bytes <= 1.1x the minimum
TARGETS = (("ddim", "cfg", "none"), ("ddpm", "classifier", "A"), ("ddpm", "G_loss", "none"), ("ddim", "apg", "none"),
           ("ddim", "cfg", "C"))
TARGET_LAUNCHES, TARGET_RATIO = 8, 1.1


def targets_table(report: dict) -> str:
    rows = {(c.get("sampler"), c.get("guidance"), c.get("projection")): c for c in report.get("combinations", [])}
    lines = [f"| step | launches beyond the model (target ≤ {TARGET_LAUNCHES}) | bytes / minimum (target ≤ "
             f"{TARGET_RATIO}) | met |", "|---|---:|---:|---|"]
    for key in TARGETS:
        c = rows.get(key)
        if c is None or c.get("status") != "ok":
            continue
        met = c["guidance_launches"] <= TARGET_LAUNCHES and (c["ratio"] or 0) <= TARGET_RATIO
        lines.append(f"| {' + '.join(k for k in key if k != 'none')} | {c['guidance_launches']} | {c['ratio']:.2f}× | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f}"


def summarize(result: dict) -> dict:
    """The table row of one dry run (its first measured step stands for a guided step)."""
    if result.get("status") == "refused":
        return {"name": result["name"], "status": "refused", "reason": result["reason"]}
    step = next(iter(result["steps_measured"].values()))
    g = step["guidance"]
    big = g["bytes_read"] + g["bytes_written"]
    model_launches = step["forward"]["launches"] + step["backward"]["launches"]
    peaks = {p: step[p]["peak_live_bytes"] for p in PHASES}
    graph = result.get("graph") or {}
    memory = result["weight_bytes"] + max(peaks.values()) + graph.get("static_buffer_bytes", 0)
    return {"name": result["name"], "status": "ok", "fake_device": result["fake_device"], "backend": result["backend"],
            "model_launches": model_launches, "guidance_launches": g["launches"],
            # host-side launches per replayed step: the graph, the copy-ins, the noise draw
            "graph_replay_launches": (1 + graph["copy_in_launches"] + graph["noise_launches"]) if graph else None,
            "guidance_bytes": big, "minimum_bytes": step["min_guidance_bytes"],
            "ratio": big / step["min_guidance_bytes"] if step["min_guidance_bytes"] else None,
            "model_bytes": sum(step[p]["bytes_read"] + step[p]["bytes_written"] for p in ("forward", "backward")),
            "model_flops": step["forward"]["flops"] + step["backward"]["flops"],
            "weight_bytes": result["weight_bytes"], "peak_live_bytes": peaks,
            "graph_static_bytes": graph.get("static_buffer_bytes"), "projected_memory_bytes": memory,
            "top_guidance_ops": list(g["ops"].items())[:8]}


def header() -> dict:
    import platform
    from . import meta
    return {"date": meta.now(), "machine": platform.node(), "cpu": meta.cpu_name(),
            **meta.versions("torch", "triton", "gradguide"), "git_commit": meta.git_commit(),
            "cuda_available": torch.cuda.is_available()}


def markdown(report: dict) -> str:
    from . import projection
    lines = [f"# gradguide dry run (fake CUDA, no GPU) — {report['date'][:10]}", "",
             f"Command: `{report['command']}`. Machine: {report['machine']} ({report['cpu']}), torch {report['torch']}, "
             f"triton {report['triton']}, commit {report['git_commit'][:12]}. No GPU: every number below comes "
             "from running the step on fake tensors (counts) or from a roofline formula (projections).", "",
             "Launches are aten + custom ops (views/metadata ops count zero: " + ", ".join(sorted(ZERO_LAUNCH)[:12])
             + ", …). Bytes: tensors with at least as many elements as x_t, read + written. Minimum: each operand "
             "read once per pass that needs it, each output written once (gradguide.bench.dryrun.minimum_bytes). "
             "Memory: weights + peak live tensor bytes of the step + graph static buffers.", ""]
    for name, why in (report.get("skipped_workloads") or {}).items():
        lines += [f"Skipped workload `{name}`: {why}.", ""]
    if report.get("workloads"):
        lines += ["## Paper workloads (one guided step)", "",
                  "| workload | fake device | backend | launches: model | launches beyond the model (eager) | "
                  "graph replay launches | guidance bytes / minimum | model GFLOP, GiB moved | weights MiB | "
                  "peak live MiB fwd / bwd / guidance | graph static MiB | projected GPU memory MiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in report["workloads"]:
            s = r["summary"]
            p = s["peak_live_bytes"]
            lines.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {s['fake_device']} | {s['backend']} | "
                         f"{s['model_launches']} | {s['guidance_launches']} | {s['graph_replay_launches']} | "
                         f"{s['ratio']:.2f}× ({_mib(s['guidance_bytes'])} / {_mib(s['minimum_bytes'])} MiB) | "
                         f"{s['model_flops'] / 1e9:.1f}, {s['model_bytes'] / 2 ** 30:.2f} | "
                         f"{_mib(s['weight_bytes'])} | {_mib(p['forward'])} / {_mib(p['backward'])} / "
                         f"{_mib(p['guidance'])} | {_mib(s['graph_static_bytes'])} | {_mib(s['projected_memory_bytes'])} |")
        lines += ["", "Most frequent ops beyond the model (launches, large-tensor bytes):", ""]
        for r in report["workloads"]:
            ops_ = ", ".join(f"{k.replace('aten.', '')} {v['launches']}" for k, v in r["summary"]["top_guidance_ops"])
            lines.append(f"- {r['name']}: {ops_}")
        lines += ["", "## Projected GPU time (PROJECTION)", "", projection_table(report), "",
                  projection.ASSUMPTIONS, ""]
    if report.get("combinations"):
        lines += ["## Targets for the fused step", "", targets_table(report), ""]
        ok = [c for c in report["combinations"] if c["status"] == "ok"]
        lines += ["## Every sampler × guidance × projection (small model, shape 2×4×8×8)", "",
                  f"{len(ok)} combinations ran, {len(report['combinations']) - len(ok)} refused by `sample` "
                  "(projection without a direction to project, or policy C without CFG).", "",
                  "| sampler | guidance | projection | fake device | backend | launches beyond the model | model launches "
                  "| guidance bytes / minimum |", "|---|---|---|---|---|---:|---:|---:|"]
        for c in ok:
            lines.append(f"| {c['sampler']} | {c['guidance']} | {c['projection']} | {c['fake_device']} | {c['backend']} | "
                         f"{c['guidance_launches']} | {c['model_launches']} | "
                         + (f"{c['ratio']:.2f}× |" if c["ratio"] else "- |"))
    lines += ["", "## Checks (each run)", ""] + [f"- {c}" for c in report.get("checks", [])]
    return "\n".join(lines) + "\n"


def projection_table(report: dict) -> str:
    from . import projection
    lines = ["| workload | steps | H100 eager pass s | H100 graph pass s | A100 eager pass s | A100 graph pass s | "
             "beyond-model share of an eager step (A100) | papers' figure |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["workloads"]:
        p = r["projection"]
        a = p["A100-SXM"]
        share = a["guidance_eager_s"] / a["eager_step_s"]   # guidance/sampler kernels + their launches
        lines.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {r['steps']} | "
                     f"{p['H100-SXM']['eager_pass_s']:.3f} | {p['H100-SXM']['graph_pass_s']:.3f} | "
                     f"{a['eager_pass_s']:.3f} | {a['graph_pass_s']:.3f} | {share:.1%} | "
                     f"{PAPER_FIGURES.get(r['workload'], '-')} |")
    return "\n".join(lines)


def build_report(workloads=PAPER, combinations: bool = True, quick: bool = False, backend: str = "auto",
                 progress: bool = True, command: str = "gradguide dryrun") -> dict:
    from . import projection
    report = header()
    report.update(command=command, quick=quick, backend_requested=backend, workloads=[], combinations=[])
    bar = None
    if progress and workloads:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(workloads), desc="dry run: workloads", unit="workload", disable=None)  # off on a non-tty
    checks = set()
    for name in workloads:
        r = run_workload(name, quick=quick, backend=backend)
        checks.update(r["checks"])
        r["summary"] = summarize(r)
        r["projection"] = projection.project_workload(r)
        for step in r["steps_measured"].values():
            step.pop("roofline_ops")   # per-op lists: used for the projection, too long for the JSON
        report["workloads"].append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if combinations:
        for c in run_all_combinations(backend=backend, progress=progress):
            if c["status"] == "ok":
                checks.update(c["checks"])
                s = summarize(c)
                s.update(sampler=c["sampler"], guidance=c["guidance"], projection=c["projection"])
                report["combinations"].append(s)
            else:
                report["combinations"].append(c)
    report["checks"] = sorted(checks)
    return report


def stem(quick: bool, date: str) -> str:
    return f"dryrun-{'quick-' if quick else ''}{date[:10]}"


def write(report: dict, out_dir: str) -> List[str]:
    from . import meta
    return meta.write_report(out_dir, stem(report["quick"], report["date"]), report, markdown(report), indent=1)


def add_arguments(p) -> None:
    p.add_argument("--workload", default=None,
                   help=f"comma-separated workloads of the bench harness, or 'none' (default: {','.join(PAPER)}; "
                        "without diffusers installed, those that need it are skipped with a notice)")
    p.add_argument("--no-combinations", action="store_true",
                   help="skip the sampler x guidance x projection sweep (default: run it)")
    p.add_argument("--quick", action="store_true", help="the workloads' tiny configurations (seconds; for CI)")
    p.add_argument("--backend", default="auto",
                   help="ops backend: auto (default: triton if its ops trace on fake tensors, else native, "
                        "else reference), triton, native or reference")
    p.add_argument("--out", default="benchmarks/results", help="folder for dryrun-*.json/.md (default benchmarks/results)")
    p.add_argument("--write-docs", action="store_true",
                   help="also regenerate the projection table in docs/performance.md (this option is the permission "
                        "to rewrite that file's generated block; the rest of the file is kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", default=None,
                   help="re-render a saved report (dryrun-*.json: rewrites the .md next to it; with --write-docs "
                        "also the docs) instead of running")


def default_workloads(log=None) -> tuple:
    """``(workloads, skipped)``: :data:`PAPER`, less those that need diffusers where it does not
    import (``skipped``: name -> reason; ``log`` gets one line naming them)."""
    from gradguide.tools import extras
    bench = _load_bench()
    why = extras.unavailable("diffusers") if any(bench.needs_diffusers(w) for w in PAPER) else None
    if why is None:
        return list(PAPER), {}
    skipped = {w: f"it builds diffusers modules, and {why}" for w in PAPER if bench.needs_diffusers(w)}
    if log is not None:
        log(f"gradguide dryrun: skipping {', '.join(skipped)} (they build diffusers modules): {why}")
    return [w for w in PAPER if w not in skipped], skipped


def run_cli(args) -> int:
    import sys

    from gradguide.bench import meta
    from gradguide.tools import outputs
    if args.backend not in ops.BACKENDS:
        raise SystemExit(f"gradguide dryrun: --backend: expected one of {ops.BACKENDS}, got {args.backend!r}")
    bench = _load_bench()
    skipped = {}
    if args.workload is None:
        if args.from_json:
            workloads = []
        else:
            workloads, skipped = default_workloads(log=lambda line: print(line, file=sys.stderr))
    else:
        workloads = [] if args.workload == "none" else [w for w in args.workload.split(",") if w]
    unknown = [w for w in workloads if w not in bench.ALL_WORKLOADS]
    if unknown:
        raise SystemExit(f"gradguide dryrun: --workload: unknown {unknown}; expected some of "
                         f"{', '.join(bench.ALL_WORKLOADS)} or 'none'")
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        if args.from_json.endswith(".json"):   # the markdown next to it follows the current renderer
            outputs.claim(args.from_json[:-5] + ".md", option="--from-json")
            with open(args.from_json[:-5] + ".md", "w") as f:
                f.write(markdown(report))
        if args.write_docs:
            print(write_docs(report))
        print(markdown(report))
        return 0
    command = "gradguide " + " ".join(sys.argv[1:]) if sys.argv and "dryrun" in sys.argv else "gradguide dryrun"
    meta.claim_report(args.out, stem(args.quick, meta.today()))   # refused before the run, not after
    report = build_report(workloads, combinations=not args.no_combinations, quick=args.quick, backend=args.backend,
                          progress=not args.no_progress, command=command)
    report["skipped_workloads"] = skipped
    for path in write(report, args.out):
        print(path)
    if args.write_docs:
        print(write_docs(report))
    print(markdown(report))
    return 0


DOCS_BEGIN = "<!-- dryrun:begin (generated by `gradguide dryrun --write-docs`; do not edit by hand) -->"
DOCS_END = "<!-- dryrun:end -->"


def write_docs(report: dict, path: Optional[str] = None) -> str:
    """Replace the generated block of ``docs/performance.md`` with this report's tables (default:
    the checkout's, when the package runs from one; else ``docs/performance.md`` under the
    working directory, never a file inside an installed package)."""
    from . import projection
    if path is None:
        checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "docs", "performance.md")
        path = checkout if os.path.exists(checkout) else os.path.join("docs", "performance.md")
    text = open(path).read() if os.path.exists(path) else f"# Performance\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{path}: the markers {DOCS_BEGIN!r} … {DOCS_END!r} are missing")
    rows = ["| workload | fake device | backend | launches: model | beyond the model (eager) | graph replay | "
            "guidance bytes / minimum | projected GPU memory MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["workloads"]:
        s = r["summary"]
        rows.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {s['fake_device']} | {s['backend']} | "
                    f"{s['model_launches']} | {s['guidance_launches']} | {s['graph_replay_launches']} | "
                    f"{s['ratio']:.2f}× | {_mib(s['projected_memory_bytes'])} |")
    block = "\n".join([DOCS_BEGIN, "",
                       f"Generated {report['date'][:10]} at commit {report['git_commit'][:12]} by `{report['command']}`.",
                       "", "Dry run (counted on fake tensors, one guided step):", ""] + rows +
                      (["", "The targets for the fused step (small model, every combination in the report):", "",
                        targets_table(report)] if report.get("combinations") else []) +
                      ["", "Projected time per sampling pass (PROJECTION, not measured):", "",
                       projection_table(report), "", projection.ASSUMPTIONS, "", DOCS_END])
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    with open(path, "w") as f:
        f.write(text[:start] + block + text[end:])
    return path
