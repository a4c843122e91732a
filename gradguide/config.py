"""The three configuration objects of :func:`gradguide.sample`.

- :class:`Sampler`: *what* is sampled: the sampler and everything that fixes its steps
  (prediction type, variance, x̂_0 clipping, timestep spacing or explicit timesteps / σ's, η
  and the sampler's own options). A schedule carries the configuration it was learnt with
  (``schedule.sampler_config``, e.g. from :func:`gradguide.from_diffusers`); fields a call
  leaves at ``None`` are filled from it, then from gradguide's defaults (:meth:`Sampler.resolve`).
- :class:`Execution`: *how* it runs (ops backend, CUDA graphs, the fused step, device, dtype,
  how a two-branch guidance term calls the model). Changes speed, never the result beyond
  rounding.
- :class:`Diagnostics`: what the run checks and reports (host-sync and finiteness checks,
  telemetry, a progress bar, a per-step callback).

All three are frozen: a configuration can be shared between calls and threads. Invalid values
raise when the object is built, naming the field (``sampler.eta: ...``).
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch

from . import ops, predictions
from .graphs import GraphCache
from .samplers import REFUSED, SAMPLERS
from .schedules import SPACINGS, Timesteps

CLIP_EPS = ("clipped", "model")
CHECK_FINITE = ("end", "step", True, False)

# gradguide's own defaults, for a field that neither the call nor the schedule sets
# (eta None: the sampler's own η, 0 for DDIM, 1 for the ancestral and SDE samplers)
SAMPLER_DEFAULTS = {"name": "ddpm", "eta": None, "prediction": "eps", "variance": "fixed-small", "clip": None,
                    "clip_eps": "clipped", "spacing": "adm"}


@dataclass(frozen=True, init=False, eq=False)
class Sampler:
    """A sampler's whole configuration.

    ``name``: one of :data:`gradguide.samplers.SAMPLERS` (docs/samplers.md).
    ``eta``: the sampler's η: DDIM's, TCD's γ, and the ancestral and SDE samplers' (default: the
    sampler's own, 0 for DDIM, 0.3 for TCD and 1 for the others; a sampler without one refuses it).
    ``prediction``: what the model outputs, ``"eps"`` (default), ``"x0"``, ``"v"``, ``"flow"``
    (a flow-matching velocity; a FlowSchedule sets it) or ``"edm"`` / ``"edm-v"`` (an EDM
    preconditioned network, with the option ``sigma_data``, default 0.5; gradguide.predictions). ``variance``: DDPM's
    ``"fixed-small"`` (default), ``"fixed-large"`` or
    ``"learned-range"`` (the model outputs twice the channels, ADM style) or ``"learned"`` (the
    extra channels are Σ itself, diffusers' DDPM ``variance_type="learned"``). ``clip``: ``True``
    for [−1, 1], ``(low, high)``, or ``False``: clips x̂_0 (default off);
    ``gradguide.DynamicThreshold(ratio, max_value)``: Imagen's dynamic thresholding (a per-sample
    quantile of ``|x̂_0|``, diffusers' ``thresholding=True``; runs on the general step). ``clip_eps``: the ε a
    clipped step re-noises with, ``"clipped"`` (default; GLIDE/ADM, diffusers'
    ``use_clipped_model_output=True``) or ``"model"`` (diffusers' DDIM default). ``spacing``:
    ``"adm"`` (default; a diffusers schedule's own spacing), ``"leading"``, ``"trailing"``,
    ``"linspace"``. ``timesteps``: explicit :class:`~gradguide.Timesteps` (override ``steps``
    and ``spacing``); ``sigmas``: k-diffusion-style σ's instead (see :func:`gradguide.sample`).
    Further keywords (or ``options=``) are the sampler's own settings: DPM-Solver's and UniPC's
    ``solver_order``, ``solver_type``, ``lower_order_final``, DDPM's ``final_noise``, ... (an
    unknown one raises when the tables are built).

    ``None`` means "not set here": :meth:`resolve` fills it from the schedule's configuration,
    then from the defaults above.
    """
    name: Optional[str] = None
    eta: Optional[float] = None
    prediction: Optional[str] = None
    variance: Optional[str] = None
    clip: object = None
    clip_eps: Optional[str] = None
    spacing: Optional[str] = None
    timesteps: Optional[Timesteps] = None
    sigmas: object = None
    options: Mapping = dataclasses.field(default_factory=dict)

    def __init__(self, name: Optional[str] = None, *, eta: Optional[float] = None, prediction: Optional[str] = None,
                 variance: Optional[str] = None, clip=None, clip_eps: Optional[str] = None,
                 spacing: Optional[str] = None, timesteps: Optional[Timesteps] = None, sigmas=None,
                 options: Optional[Mapping] = None, **more):
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"sampler.options: expected a mapping of option names to values, got "
                            f"{type(options).__name__}")
        values = dict(name=name, eta=eta, prediction=prediction, variance=variance, clip=clip, clip_eps=clip_eps,
                      spacing=spacing, timesteps=timesteps, sigmas=sigmas,
                      options=types.MappingProxyType({**(options or {}), **more}))
        _check_sampler(values)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        set_ = [repr(self.name)] if self.name is not None else []
        set_ += [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in ("name", "options") and getattr(self, f.name) is not None]
        set_ += [f"{k}={v!r}" for k, v in self.options.items()]
        return f"Sampler({', '.join(set_)})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sampler):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = None   # holds tensors and a mapping

    def __reduce__(self):
        # the read-only options view cannot be pickled or deep-copied itself: rebuild it from a dict
        values = {name: getattr(self, name) for name in _SAMPLER_FIELDS}
        values["options"] = dict(self.options)
        return _rebuild_sampler, (values,)

    def resolve(self, learnt: Optional["Sampler"] = None, steps_given: bool = False) -> "Sampler":
        """Every field set: this configuration's, else ``learnt``'s (a schedule's
        ``sampler_config``), else gradguide's defaults. What is particular to one sampler (η,
        its options, DDPM's variance) is taken from ``learnt`` only when it names the same
        sampler (or none); ``learnt``'s ``timesteps``/``sigmas`` only when the call chooses no
        steps (``steps_given``, ``timesteps``, ``sigmas``)."""
        learnt = learnt if learnt is not None else _UNSET
        name = self.name or learnt.name or SAMPLER_DEFAULTS["name"]
        same = learnt.name in (None, name)
        out = {}
        for key in ("prediction", "clip", "clip_eps", "spacing"):
            value = getattr(self, key)
            value = getattr(learnt, key) if value is None else value
            out[key] = SAMPLER_DEFAULTS[key] if value is None else value
        out["eta"] = _first(self.eta, learnt.eta if same else None, SAMPLER_DEFAULTS["eta"])
        # a DDPM variance setting only travels to the DDPM sampler
        out["variance"] = _first(self.variance, learnt.variance if same and name == "ddpm" else None,
                                 SAMPLER_DEFAULTS["variance"])
        chosen = steps_given or self.timesteps is not None or self.sigmas is not None
        out["timesteps"] = self.timesteps if chosen else learnt.timesteps
        out["sigmas"] = self.sigmas if chosen else learnt.sigmas
        options = dict(learnt.options) if same and learnt.options else {}
        # an EDM model's data scale belongs to the model: it travels while the prediction is EDM's, whatever the
        # sampler, and is dropped with another prediction
        options.pop("sigma_data", None)
        if out["prediction"] in predictions.EDM and learnt.options and "sigma_data" in learnt.options:
            options["sigma_data"] = learnt.options["sigma_data"]
        options.update(self.options)
        # every value comes from a validated Sampler or the defaults: no second validation (per-call setup)
        return self._validated(name=name, options=types.MappingProxyType(options), **out)

    def _validated(self, **values) -> "Sampler":
        """This configuration with ``values`` replaced, which the caller has validated."""
        out = object.__new__(Sampler)
        for name in _SAMPLER_FIELDS:
            object.__setattr__(out, name, values[name] if name in values else getattr(self, name))
        return out


def _first(*values):
    """The first value that is set (``None`` if none is: e.g. η, whose default is the sampler's own)."""
    return next((v for v in values if v is not None), None)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, Timesteps) or isinstance(b, Timesteps):
        return isinstance(a, Timesteps) and isinstance(b, Timesteps) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Timesteps))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _number(a) and _number(b):   # (-1, 1) and (-1.0, 1.0) are the same range
        return a == b
    return type(a) is type(b) and a == b


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sampler(v: dict) -> None:
    if v["name"] in REFUSED:
        raise ValueError(f"sampler.name: {v['name']!r} is not available: {REFUSED[v['name']]}")
    if v["name"] is not None and v["name"] not in SAMPLERS:
        raise ValueError(f"sampler.name: expected one of {SAMPLERS}, got {v['name']!r}")
    eta = v["eta"]
    if eta is not None and (not _number(eta) or not math.isfinite(eta) or eta < 0):
        raise ValueError(f"sampler.eta: expected a finite number >= 0, got {eta!r}")
    if v["prediction"] is not None and v["prediction"] not in predictions.PREDICTIONS:
        raise ValueError(f"sampler.prediction: expected one of {predictions.PREDICTIONS}, got {v['prediction']!r}")
    if v["variance"] is not None and v["variance"] not in predictions.VARIANCES:
        raise ValueError(f"sampler.variance: expected one of {predictions.VARIANCES}, got {v['variance']!r}")
    clip = v["clip"]
    if not (clip is None or isinstance(clip, (bool, predictions.DynamicThreshold))
            or (isinstance(clip, (tuple, list)) and len(clip) == 2)):
        raise ValueError(f"sampler.clip: expected None, True, False, (low, high) or gradguide.DynamicThreshold(ratio, "
                         f"max_value), got {clip!r}")
    if isinstance(clip, list):
        v["clip"] = tuple(clip)
    if v["clip_eps"] is not None and v["clip_eps"] not in CLIP_EPS:
        raise ValueError(f"sampler.clip_eps: expected 'clipped' or 'model', got {v['clip_eps']!r}")
    if v["spacing"] is not None and v["spacing"] not in SPACINGS:
        raise ValueError(f"sampler.spacing: expected one of {SPACINGS}, got {v['spacing']!r}")
    if v["timesteps"] is not None and not isinstance(v["timesteps"], Timesteps):
        raise TypeError(f"sampler.timesteps: expected a gradguide.Timesteps, got {type(v['timesteps']).__name__}")
    if v["sigmas"] is not None:
        if isinstance(v["sigmas"], (str, bytes)) or not hasattr(v["sigmas"], "__len__"):
            raise TypeError(f"sampler.sigmas: expected a sequence or 1-D tensor of σ values, got "
                            f"{type(v['sigmas']).__name__}")
        if v["timesteps"] is not None:
            raise ValueError("sampler.sigmas: pass either sigmas or timesteps, not both")
    for key in v["options"]:
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"sampler.options: option names must be identifiers, got {key!r}")


_UNSET = Sampler()   # nothing learnt
_SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(Sampler))


def _rebuild_sampler(values: dict) -> Sampler:
    return _UNSET._validated(**dict(values, options=types.MappingProxyType(values["options"])))


@dataclass(frozen=True)
class Execution:
    """How a run executes; none of it changes the samples beyond rounding.

    ``backend``: the ops backend, ``"auto"`` (default), ``"reference"``, ``"triton"``,
    ``"native"``. ``graph``: ``True`` captures the step as a CUDA graph and replays it (CUDA
    only; on CPU a one-line notice, then eager); a :class:`~gradguide.graphs.GraphCache` keeps
    captures across calls. ``fused``: ``True`` (default) runs a step that matches a built-in
    program (:mod:`gradguide.stepplan`) as reduce + one fused combine; ``False`` always takes
    the general path (its reference). ``device`` (default: ``x_T``'s, else CPU) and ``dtype``
    (default: ``x_T``'s, else float32). ``batch_branches``: how a two-branch term (CFG, APG,
    Rescale, CFG-Zero*, CFG++) calls the model: ``"auto"`` (default) one call of batch 2B when
    the two branches' inputs stack, two calls otherwise; ``True`` requires the one call;
    ``False`` always calls twice. The perturbed-branch guiders (PAG, SLG, SEG, AutoGuidance, LTX2)
    likewise: one call for every branch a step uses whose perturbation is row-selective, or one
    call per branch.
    """
    backend: str = "auto"
    graph: Union[bool, GraphCache] = False
    fused: bool = True
    device: object = None
    dtype: Optional[torch.dtype] = None
    batch_branches: Union[str, bool] = "auto"

    def __post_init__(self):
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"execution.backend: expected one of {ops.BACKENDS}, got {self.backend!r}")
        if not (isinstance(self.graph, bool) or isinstance(self.graph, GraphCache)):
            raise TypeError(f"execution.graph: expected True, False or a gradguide.graphs.GraphCache, got "
                            f"{type(self.graph).__name__}")
        if not isinstance(self.fused, bool):
            raise TypeError(f"execution.fused: expected True or False, got {self.fused!r}")
        if self.device is not None and (isinstance(self.device, bool)
                                        or not isinstance(self.device, (str, torch.device, int))):
            raise TypeError(f"execution.device: expected a torch.device or a string such as 'cpu' or 'cuda', "
                            f"got {type(self.device).__name__}")
        if self.dtype is not None and self.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"execution.dtype: expected one of {ops.FLOAT_DTYPES}, got {self.dtype!r}")
        if not any(self.batch_branches is v or (isinstance(self.batch_branches, str) and self.batch_branches == v)
                   for v in ("auto", True, False)):
            raise ValueError(f"execution.batch_branches: expected 'auto', True or False, got {self.batch_branches!r}")


@dataclass(frozen=True)
class Diagnostics:
    """What a run checks and reports.

    ``check_sync``: raise if any step synchronises with the host. ``check_finite``: ``"end"``
    (default) one check of the returned samples (one host sync after the loop; non-finite
    samples raise a ValueError); ``"step"`` (or ``True``) every model output and every
    ``x_(t-1)``, naming the first step that went non-finite (one host sync per model call; not
    with graph capture or ``check_sync``); ``False`` none. ``telemetry``: fill in the
    PixelAsParam conflict telemetry of :class:`~gradguide.StepRecord` even without a projection.
    ``progress``: a progress bar over the steps. ``callback(record)``: called after every step
    with a :class:`~gradguide.StepRecord`.
    """
    check_sync: bool = False
    check_finite: Union[str, bool] = "end"
    telemetry: bool = False
    progress: bool = False
    callback: Optional[Callable] = None

    def __post_init__(self):
        for key in ("check_sync", "telemetry", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"diagnostics.{key}: expected True or False, got {getattr(self, key)!r}")
        value = self.check_finite
        if not any(value is v or (isinstance(value, str) and value == v) for v in CHECK_FINITE):
            raise ValueError(f"diagnostics.check_finite: expected 'end', 'step', True or False, got {value!r}")
        if value is True:
            object.__setattr__(self, "check_finite", "step")
        if self.check_finite == "step" and self.check_sync:
            raise ValueError("diagnostics.check_finite: 'step' reads every model output on the host; it cannot run "
                             "with check_sync=True (use 'end')")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"diagnostics.callback: expected a callable(record) or None, got "
                            f"{type(self.callback).__name__}")
