"""Model branches evaluated under a perturbation, and the hooks that let them share one batched call.

PAG, SLG/STG, SEG and AutoGuidance compare the model with a *perturbed* version of itself:
attention replaced by identity, transformer blocks skipped, attention queries blurred. A
perturbation is described here and applied around a model call:

- :class:`LayerSkip` — diffusers' ``LayerSkipConfig`` (blocks, attention or feed-forward skipped, or
  attention scores replaced by identity: PAG); the hooks are diffusers' own
  (``diffusers.hooks.layer_skip``), registered as diffusers registers them;
- :class:`SmoothedEnergy` — diffusers' ``SmoothedEnergyGuidanceConfig`` and blur σ (SEG), with
  diffusers' own hook;
- :class:`Custom` — any callable ``fn(module)`` returning a context manager during which the
  module computes the perturbed model (a plain torch model, a separately trained weak model);
- :class:`Inputs` — extra keyword inputs of the model call (a transformer's own perturbation
  flags). These two perturb every row of a call, so their branch is a call of its own.

**Row-selective hooks.** diffusers' hooks perturb every row of the batch they see, so a perturbed
branch could not share a call with the conditional and unconditional branches. Here each of
diffusers' hooks, once registered by diffusers' code (so the same modules are hooked, with the same
hook), is taken off its module and put back inside a wrapper that perturbs only a contiguous span of
rows (:class:`RowSpan`, set by :class:`BranchCaller` around each call): the wrapped module runs as is
on every row and as perturbed on every row, and the output takes the perturbed rows from the
second. So ``[uncond | cond | cond perturbed]`` is one model call of batch 3B, and every row gets
exactly what a call of its own branch would give. The cost: each *hooked* module runs twice over
the whole batch (a skipped block or PAG's identity attention is cheaper than the module; SEG's blur
reuses the query projection's output); the rest of the model once. Where the span is the whole
batch (a branch called alone) the module runs only perturbed.

One place where gradguide's skip differs from diffusers' hook: diffusers' ``TransformerBlockSkipHook``
returns ``(hidden_states, encoder_hidden_states)`` whatever order the block returns them in; for
blocks returning ``(encoder_hidden_states, hidden_states)`` (SD3's ``JointTransformerBlock``, Flux's
blocks) the streams are swapped and the model fails with a shape error (diffusers 0.42). gradguide
returns them in the block's own order (diffusers' block metadata gives it): the block is skipped,
as ``SD3Transformer2DModel(skip_layers=...)`` skips it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .base import check_number
from .cfg import per_sample


class RowSpan:
    """The rows ``[start, stop)`` of a call of batch ``total`` that a perturbation applies to."""

    def __init__(self, start: int = 0, stop: int = 0, total: int = 0):
        self.start, self.stop, self.total = start, stop, total

    @property
    def everything(self) -> bool:
        return self.start == 0 and self.stop == self.total


class Perturbation:
    """How to evaluate the perturbed model. ``row_selective``: whether it can perturb only some
    rows of a call (then its branch shares the batched call)."""
    row_selective = True

    def applied(self, module, rows: RowSpan, owner: str, cache: Optional[dict] = None):
        """A context manager during which calls of ``module`` are perturbed on ``rows`` (``cache``:
        a dict kept for a run, where a perturbation may keep what it found in the model)."""
        raise NotImplementedError(f"{type(self).__name__}.applied: each perturbation defines how it applies")


def _configs(value, cls, owner: str, name: str) -> list:
    if isinstance(value, dict):
        value = cls.from_dict(value)
    if isinstance(value, cls):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{owner}: {name}: expected a {cls.__name__}, a dict or a non-empty list of them, got {value!r}")
    value = [cls.from_dict(v) if isinstance(v, dict) else v for v in value]
    out = []
    for j, v in enumerate(value):
        if not isinstance(v, cls):
            raise TypeError(f"{owner}: {name}[{j}]: expected a {cls.__name__}, got {type(v).__name__}")
        v = copy.deepcopy(v)   # diffusers resolves fqn="auto" in place
        # diffusers' own guiders build configs with one int index, which its hooks then fail to iterate
        v.indices = layer_indices(v.indices, owner, f"{name}[{j}].indices")
        out.append(v)
    return out


def layer_indices(layers, owner: str, name: str) -> List[int]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or \
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise TypeError(f"{owner}: {name}: expected a block index or a non-empty list of them, got {layers!r}")
    return list(layers)


class LayerSkip(Perturbation):
    """diffusers' layer skip (``LayerSkipConfig`` or a list of them), applied with diffusers' hooks.
    ``dropout`` other than 1 is refused: diffusers then applies ``F.dropout`` with a fresh random
    mask on every call, which no other evaluation (batched or not) reproduces."""

    def __init__(self, configs, owner: str = "LayerSkip", name: str = "config"):
        from diffusers.hooks import LayerSkipConfig
        self.configs = _configs(configs, LayerSkipConfig, owner, name)
        for j, c in enumerate(self.configs):
            if not math.isclose(c.dropout, 1.0):
                raise ValueError(f"{owner}: {name}[{j}].dropout={c.dropout}: diffusers drops the skipped layers' "
                                 "outputs at random (a new F.dropout mask each call), which cannot be reproduced; "
                                 "only dropout=1.0 (skip) is supported")

    def _register(self, module, config, name):
        from diffusers.hooks.layer_skip import _apply_layer_skip_hook
        _apply_layer_skip_hook(module, copy.deepcopy(config), name=name)

    def applied(self, module, rows, owner, cache=None):
        return _row_selective(self, module, rows, owner, cache)

    def __repr__(self) -> str:
        return f"LayerSkip({self.configs})"


class SmoothedEnergy(Perturbation):
    """diffusers' smoothed-energy hook (``SmoothedEnergyGuidanceConfig``s, blur σ) on the query
    projections of the chosen blocks' self-attention. What the blur does is diffusers' hook's:
    for ``σ`` up to 9999.9 the square part of the token sequence of every query channel is replaced
    by its mean, above it by a Gaussian of that σ (reflect padding, the kernel clipped to the grid's
    side); the SEG paper reads σ the other way round (a mean only for σ → ∞). Both are per row."""

    def __init__(self, configs, blur_sigma: float, owner: str = "SmoothedEnergy", name: str = "config"):
        from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
        self.configs = _configs(configs, SmoothedEnergyGuidanceConfig, owner, name)
        self.blur_sigma = check_number("blur_sigma", blur_sigma, owner=owner)
        if self.blur_sigma <= 0:
            raise ValueError(f"{owner}: blur_sigma: expected a value > 0, got {blur_sigma!r}")

    def _register(self, module, config, name):
        from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook
        _apply_smoothed_energy_guidance_hook(module, copy.deepcopy(config), self.blur_sigma, name=name)

    def applied(self, module, rows, owner, cache=None):
        return _row_selective(self, module, rows, owner, cache)

    def __repr__(self) -> str:
        return f"SmoothedEnergy({self.configs}, blur_sigma={self.blur_sigma})"


class Custom(Perturbation):
    """``fn(module)`` returns a context manager inside which the module is the perturbed model (all
    rows). The branch is evaluated by a call of its own."""
    row_selective = False

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"Custom: fn: expected a callable module -> context manager, got {type(fn).__name__}")
        self.fn = fn

    def applied(self, module, rows, owner, cache=None):
        return self.fn(module)

    def __repr__(self) -> str:
        return f"Custom({self.fn!r})"


class Inputs(Perturbation):
    """The branch is the model called with these extra (or overriding) keyword inputs, e.g. a
    transformer's own perturbation flags (LTX-2's ``spatio_temporal_guidance_blocks``,
    ``isolate_modalities``). A call of its own."""
    row_selective = False

    def __init__(self, **extra):
        self.extra = extra

    def applied(self, module, rows, owner, cache=None):
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"Inputs({self.extra})"


# -- row-selective wrappers around diffusers' hooks ---------------------------------------------------

_HOOK_CLASS = None
_PREFIX = "gradguide_perturb"
_TAGS = itertools.count()


def _hook_class():
    """The wrapper class (a diffusers ``ModelHook``; built on first use so importing gradguide
    loads no diffusers)."""
    global _HOOK_CLASS
    if _HOOK_CLASS is None:
        from diffusers.hooks.hooks import ModelHook
        from diffusers.hooks.layer_skip import TransformerBlockSkipHook

        class RowSelectiveHook(ModelHook):
            def __init__(self, inner, rows: RowSpan):
                super().__init__()
                self.inner, self.rows = inner, rows
                self.block_skip = isinstance(inner, TransformerBlockSkipHook)

            def new_forward(self, module, *args, **kwargs):
                rows = self.rows
                if rows.stop <= rows.start:
                    return self.fn_ref.original_forward(*args, **kwargs)
                normal = None if rows.everything else self.fn_ref.original_forward(*args, **kwargs)
                perturbed = self._perturbed(module, normal, args, kwargs)
                return perturbed if normal is None else _splice(normal, perturbed, rows)

            def _perturbed(self, module, normal, args, kwargs):
                inner = self.inner
                inner.fn_ref = self.fn_ref
                if self.block_skip:
                    return _skip_block(inner._metadata, args, kwargs)
                if hasattr(inner, "new_forward"):
                    return inner.new_forward(module, *args, **kwargs)
                out = normal if normal is not None else self.fn_ref.original_forward(*args, **kwargs)
                # diffusers' post-forward hooks may write into their input (SEG's blur does)
                return inner.post_forward(module, _clone(out))

        _HOOK_CLASS = RowSelectiveHook
    return _HOOK_CLASS


def _skip_block(meta, args, kwargs):
    """A skipped transformer block's output: its inputs, in the order the block returns them."""
    hidden = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    encoder = meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)
    out = [None, None]
    out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = hidden, encoder
    return tuple(out)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def _splice(normal, perturbed, rows: RowSpan):
    """``normal`` with rows ``[start, stop)`` taken from ``perturbed`` (recursively in tuples)."""
    if isinstance(normal, torch.Tensor) and isinstance(perturbed, torch.Tensor):
        if normal.shape != perturbed.shape or normal.dim() == 0 or normal.shape[0] != rows.total:
            raise ValueError(f"perturbation: a hooked module returned {tuple(normal.shape)} as is and "
                             f"{tuple(perturbed.shape)} perturbed; expected equal shapes with {rows.total} rows")
        a, b = rows.start, rows.stop
        return torch.cat([normal[:a], perturbed[a:b], normal[b:]])
    if isinstance(normal, (tuple, list)) and isinstance(perturbed, (tuple, list)) and len(normal) == len(perturbed):
        return type(normal)(_splice(n, p, rows) for n, p in zip(normal, perturbed))
    if normal is None and perturbed is None:
        return None
    raise ValueError(f"perturbation: a hooked module returned {type(normal).__name__} as is and "
                     f"{type(perturbed).__name__} perturbed: cannot select rows between them")


def _hooked_modules(perturbation, module, owner: str) -> list:
    """``[(submodule, diffusers' hook)]``: what diffusers' own registration hooks for each config,
    found by letting diffusers register its hooks and taking them off again."""
    from diffusers.hooks import HookRegistry
    found = []
    tag = next(_TAGS)
    for j, config in enumerate(perturbation.configs):
        name = f"{_PREFIX}_{tag}_{j}"
        config = _resolve_auto(config, module, owner)
        try:
            perturbation._register(module, config, name)
        except (ValueError, TypeError, AttributeError) as exc:   # diffusers names what it cannot hook
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=True)
            raise ValueError(f"{owner}: diffusers' hook cannot be applied to {type(module).__name__} with "
                             f"{config}: {exc}") from None
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            inner = None if registry is None else registry.get_hook(name)
            if inner is not None:
                registry.remove_hook(name, recurse=False)
                found.append((sub, inner))
    HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()
    return found


def _resolve_auto(config, module, owner: str):
    """``fqn="auto"`` resolved as diffusers resolves it — the first block-stack name the model has — but
    refused where the model has several: diffusers takes them from a set of strings, whose order
    changes between Python processes (Flux: ``transformer_blocks`` or ``single_transformer_blocks``)."""
    if config.fqn != "auto":
        return config
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    found = sorted(name for name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS if hasattr(module, name))
    if len(found) > 1:
        raise ValueError(f"{owner}: fqn='auto' is ambiguous on {type(module).__name__}, which has {found}: diffusers "
                         "picks one in an order that changes between Python processes; pass a config with the fqn "
                         "of the block stack (e.g. LayerSkipConfig(indices, fqn='transformer_blocks'))")
    config = copy.deepcopy(config)
    if found:
        config.fqn = found[0]
    return config


@contextlib.contextmanager
def _row_selective(perturbation, module, rows: RowSpan, owner: str, cache: Optional[dict] = None):
    """diffusers' hooks of ``perturbation``, each inside a row-selective wrapper, for one call. Where
    to put them is found once per ``cache`` (a run's): finding it walks the whole model (≈ 20 ms
    for SDXL's U-Net), putting them on and off walks only the hooked modules."""
    key = (id(perturbation), id(module))
    targets = None if cache is None else cache.get(key)
    if targets is None:
        targets = _hooked_modules(perturbation, module, owner)
        if cache is not None:
            cache[key] = targets
    wrapper = _hook_class()
    name = f"{_PREFIX}_{next(_TAGS)}"   # several perturbations may hook one module in the same call
    placed = []
    try:
        for sub, inner in targets:
            sub._diffusers_hook.register_hook(wrapper(inner, rows), name)
            placed.append(sub)
        yield
    finally:
        for sub in placed:
            sub._diffusers_hook.remove_hook(name, recurse=False)


# -- evaluating a term's branches -----------------------------------------------------------------------

@dataclass(frozen=True)
class Branch:
    """One model evaluation a term asks for: its name, whose inputs (``"cond"`` or ``"uncond"``)
    and a perturbation (``None``: the model as is)."""
    name: str
    inputs: str
    perturbation: Optional[Perturbation] = None


def denoiser_of(model, given, owner: str):
    """The ``torch.nn.Module`` to hook: ``given``, else the diffusers module inside
    ``gradguide.from_diffusers``' adapter, else ``model`` itself."""
    if given is not None:
        if not isinstance(given, torch.nn.Module):
            raise TypeError(f"{owner}: denoiser: expected a torch.nn.Module, got {type(given).__name__}")
        return given
    inner = getattr(model, "unet", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    if isinstance(model, torch.nn.Module):
        return model
    raise TypeError(f"{owner}: the model is a {type(model).__name__}, not a torch.nn.Module whose layers can be "
                    "hooked: pass denoiser= (the module inside your model function)")


def _rows_of(value, order: Sequence[str], batch: int):
    """The inputs of one call over the branches in ``order``: per-sample tensors concatenated
    (as :func:`~gradguide.guidance.cfg.batch_branch_inputs` stacks two), anything else as in cond."""
    u, c = value
    if isinstance(c, torch.Tensor) and per_sample(c, batch):
        return torch.cat([u if k == "uncond" else c for k in order])
    if isinstance(c, (list, tuple)):
        return type(c)(_rows_of((a, b), order, batch) for a, b in zip(u, c))
    if isinstance(c, dict):
        return {k: _rows_of((u[k], c[k]), order, batch) for k in c}
    return c


class BranchCaller:
    """Evaluates a term's branches for one step: the branches whose perturbation is row-selective
    (or none) in one call with their rows stacked in the order asked, where their inputs stack and
    batching is allowed; every other branch by a call of its own."""

    def __init__(self, term, model, cond: dict, uncond: dict, batch: int, stackable: bool):
        self.owner = type(term).__name__
        self.inputs = {"cond": cond, "uncond": uncond}
        self.batch = batch
        given = getattr(term, "denoiser", None)
        hooked = any(isinstance(b.perturbation, (LayerSkip, SmoothedEnergy)) for b in term.all_branches())
        # diffusers' hooks need the torch module; a Custom perturbation gets it where there is one
        if hooked:
            self.module = denoiser_of(model, given, self.owner)
        else:
            inner = getattr(model, "unet", None)
            self.module = given if given is not None else inner if isinstance(inner, torch.nn.Module) else model
        self.stackable = stackable   # cond and uncond stack (sample() checked them, and whether batching is on)
        self._hooks: dict = {}   # where each perturbation's hooks go, found on the first call

    def stacked(self, order: tuple) -> dict:
        # built at each call, not kept: a replayed CUDA graph must read the run's cond / uncond tensors
        # (into which a graph cache copies a later run's values), not a copy made at capture
        u, c = self.inputs["uncond"], self.inputs["cond"]
        return {k: _rows_of((u[k], c[k]), order, self.batch) for k in c}

    def together(self, branches: Sequence[Branch]) -> list:
        """The branches that share one call (rows stacked): unperturbed or row-selectively perturbed
        ones, where the inputs stack and there are at least two; the others get a call each."""
        together = [br for br in branches if br.perturbation is None or br.perturbation.row_selective] \
            if self.stackable else []
        return together if len(together) >= 2 else []

    def __call__(self, call, x: torch.Tensor, t: torch.Tensor, branches: Sequence[Branch]) -> Dict[str, torch.Tensor]:
        """``call(x, t, inputs, what, batch)`` calls the model and returns ``(output, learned variance
        channels or None)``; returns ``{branch name: (output, variance)}``."""
        b = self.batch
        together = self.together(branches)
        out = {}
        if together:
            n = len(together)
            with contextlib.ExitStack() as stack:
                for j, br in enumerate(together):
                    if br.perturbation is not None:
                        stack.enter_context(br.perturbation.applied(self.module, RowSpan(j * b, (j + 1) * b, n * b),
                                                                    self.owner, self._hooks))
                order = tuple(br.inputs for br in together)
                what = "model(cat[" + ", ".join(["x_t"] * n) + "], ..., **cat[" + \
                    ", ".join(br.name for br in together) + "])"
                # t: a view where it is one timestep expanded over the batch (a step's t), else a copy
                # x stacked n times in one pass (read once, written n times; a cat would read it n times)
                rows = x.unsqueeze(0).expand(n, *x.shape).clone(memory_format=torch.contiguous_format).flatten(0, 1)
                res = call(rows, t.expand(n, b).reshape(n * b), self.stacked(order), what, n * b)
            for j, br in enumerate(together):
                out[br.name] = tuple(None if r is None else r[j * b:(j + 1) * b] for r in res)
        for br in branches:
            if br.name in out:
                continue
            with contextlib.ExitStack() as stack:
                if br.perturbation is not None:
                    stack.enter_context(br.perturbation.applied(self.module, RowSpan(0, b, b), self.owner,
                                                                self._hooks))
                inputs = self.inputs[br.inputs]
                if isinstance(br.perturbation, Inputs):
                    inputs = {**inputs, **br.perturbation.extra}
                out[br.name] = call(x, t, inputs, f"model(x_t, t, **{br.inputs}) ({br.name})", b)
        return out
