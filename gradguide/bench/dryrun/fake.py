"""Fake tensors and dispatch counting for the dry run (see :mod:`gradguide.bench.dryrun`): the
phase :class:`Tracker`, the :class:`Counter` of launches, bytes, FLOPs and live memory, the strict
:class:`FakeWorld` a prepared run is converted into, and which backends trace on fake devices."""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import gradguide as gg
from gradguide import ops

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
        # (and a perturbed guider's branch caller: the cond / uncond inputs it stacks, the module it hooks)
        if (isinstance(v, (gg.GuidanceTerm, gg.PixelAsParam))
                or type(v).__module__ in ("gradguide.stepplan", "gradguide.guidance.perturb")
                and hasattr(v, "__dict__")):
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
        if torch.overrides.has_torch_function((query, key, value)):
            # a torch-function mode sees the call as F.scaled_dot_product_attention, as it would see
            # torch's own (diffusers' PAG hook replaces the attention by its values there)
            return torch.overrides.handle_torch_function(
                sdpa, (query, key, value), query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
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
