"""``gradguide.sample``: the guided sampling loop.

One step, for every sampler and guidance combination (docs/architecture.md):

1. **operands** — ``x_t``, the model output(s), guidance gradients, noise, carried state;
2. **reduce** — the per-sample Gram matrix and sums, computed lazily by
   :class:`~gradguide.linear.Operands` the first time a rule asks for an inner product;
3. **coefficients** — guidance terms, the sampler's scalars and the projection policy turn
   them into one :class:`~gradguide.linear.LinComb` for ``x_{t−1}``;
4. **combine** — one pass writes ``x_{t−1}``.

Nothing in a step reads a tensor value on the host: per-step scalars come from a device
table indexed by a device step index, and which steps draw noise is known from the host-side
tables. ``Diagnostics(check_sync=True)`` enforces this (see :mod:`gradguide.debug`).
"""
from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from . import linear, ops, predictions, runkey, stepplan
from .config import Diagnostics, Execution, Sampler
from .debug import forbid_host_sync
from .graphs import EagerStepper, GraphCache
from .guidance.base import GuidanceTerm, LogVariance, StepContext, named_scales, scale_overflow_hint
from .guidance.cfg import BranchInputsError, batch_branch_inputs, per_sample, split_branches
from .guidance.perturb import BranchCaller
from .linear import LinComb, Operands
from .projection import PixelAsParam, step_telemetry
from .samplers import REFUSED, SAMPLERS, SamplerTables, build
from .schedules import Schedule, Timesteps


@dataclass
class StepRecord:
    """What a callback receives after each step (tensors stay on the device; no sync)."""
    index: int                 # step number, 0 = noisiest
    timestep: int              # training timestep of this step
    x: torch.Tensor            # x_{t−1}
    x0: torch.Tensor           # the guided prediction x̂_0 used by the step
    telemetry: Dict[str, Dict[str, torch.Tensor]]  # per pair: cos [B], conflict [B], conflict_share [], phi [B]
    backend: str               # the ops backend that ran


@dataclass
class _Run:
    """Everything fixed for a sampling run, validated once before the first step."""
    model: Callable
    shape: tuple
    device: torch.device          # resolved (x_T's, execution.device, else CPU)
    dtype: torch.dtype            # resolved (x_T's, execution.dtype, else float32)
    tables: SamplerTables
    table_rows: torch.Tensor
    table_index: Dict[str, int]
    timesteps_dev: torch.Tensor
    sampler: Sampler              # resolved: every field set, clip False or (low, high), the visited timesteps
    execution: Execution
    diagnostics: Diagnostics
    branch: Optional[GuidanceTerm]
    score_terms: List[GuidanceTerm]
    mean_terms: List[GuidanceTerm]
    post_terms: List[GuidanceTerm]
    projection: Optional[PixelAsParam]
    cond: dict
    backend: str                  # resolved ("auto" -> the one that runs)
    generator: object
    groups: int = 1
    needs_model_grad: bool = False
    needs_input_grad: bool = False
    step_ids: torch.Tensor = field(default=None)
    timestep_list: List[int] = field(default_factory=list)
    needs_x0: bool = False       # a sampler slot stores the guided x̂_0
    uncond: dict = field(default_factory=dict)     # the unconditional branch's model inputs
    batched: Optional[dict] = None                 # both branches' inputs stacked for one 2B call
    branch_caller: object = None                   # guidance.perturb.BranchCaller: a guider naming its branches per step
    plan: object = None                  # stepplan.StepPlan when the step is a built-in program
    fused_reason: Optional[str] = None   # why not, otherwise
    scales: list = field(default_factory=list)   # [(argument name, value)]: named by the finiteness errors
    step_rows: Optional["_StepRows"] = None        # eager sampling: the tables' per-step rows (see _StepRows)

    # what the step reads, by name (the step, the fused plan and the graph signature)
    @property
    def prediction(self) -> str:
        return self.sampler.prediction

    @property
    def clip(self) -> Optional[tuple]:
        return self.sampler.clip or None

    @property
    def clip_eps(self) -> str:
        return self.sampler.clip_eps

    @property
    def variance_channels(self) -> bool:
        return self.sampler.variance in predictions.LEARNED_VARIANCES

    @property
    def telemetry(self) -> bool:
        return self.diagnostics.telemetry

    @property
    def check_finite(self):
        return self.diagnostics.check_finite


def sample(model: Callable, shape: Sequence[int], *, schedule: Schedule, sampler: Union[str, Sampler, None] = None,
           steps=None, guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
           projection: Optional[PixelAsParam] = None, cond: Optional[dict] = None,
           x_T: Optional[torch.Tensor] = None, generator=None, execution: Optional[Execution] = None,
           diagnostics: Optional[Diagnostics] = None) -> torch.Tensor:
    """Draw samples from a diffusion model with guidance.

    ``model(x_t, t, **cond)`` returns the model's prediction (ε, x̂_0, v, a flow-matching
    velocity called on ``x_σ`` at the σ timesteps of a :class:`~gradguide.FlowSchedule`, docs/flow.md,
    or an EDM network's output called on ``c_in x_σ``, gradguide.predictions:
    the sampler configuration's ``prediction``; with ``variance="learned-range"`` twice the
    channels, ADM style); ``t`` is an int64 ``[B]`` tensor of original training timesteps (0-based), or
    float64 where a σ-space schedule falls between them (``sigmas``, diffusers' Euler/Heun/LMS
    timesteps). ``shape``: the batch shape ``(B, ...)``.

    ``schedule``: a :class:`~gradguide.Schedule`; it may carry the sampler configuration it was
    learnt with (``schedule.sampler_config``: :func:`gradguide.from_diffusers` puts there what
    the diffusers scheduler fixes, so a model wrapped in a function of your own keeps it).

    ``sampler``: a sampler name (``"ddpm"``, ``"ddim"``, ``"dpmpp-2m"``, ``"dpmpp-2m-sde"``,
    ``"dpmpp-3m-sde"``, ``"euler"``, ``"euler_a"``, ``"heun"``, ``"dpm_2"``, ``"dpm_2_ancestral"``,
    ``"dpmpp_2s_ancestral"``, ``"dpmpp_sde"``, ``"dpm_fast"``, ``"lms"``, ``"plms"``, ``"unipc"``, the
    few-step ``"lcm"``, ``"tcd"``, the flow-matching ``"flow-euler"``, ``"flow-heun"``, ``"flow-lcm"``,
    or ComfyUI's ``"ipndm"``, ``"deis"``, ``"res_multistep"``, ``"er_sde"``, ``"seeds_2"``, ``"sa_solver"``, ...; docs/samplers.md) or a
    :class:`~gradguide.Sampler` holding the sampler's whole configuration (η, prediction type,
    variance, x̂_0 clipping and the ε a clipped step re-noises with, spacing, explicit
    timesteps or σ's, the sampler's own options). Fields left unset come from
    ``schedule.sampler_config``, then from the defaults (DDPM, ε-prediction, fixed-small
    variance, no clipping, ADM spacing; see :class:`~gradguide.Sampler`).

    ``steps``: ``None`` (all T), a count, an ADM section string, or explicit timesteps.
    ``Sampler(sigmas=...)`` samples k-diffusion style instead: a decreasing σ list ending where
    sampling ends, usually 0 (e.g. :func:`gradguide.sigmas_karras`); the model is called at
    fractional timesteps ``schedule.sigma_to_t(σ)``, ``x_T`` is scaled to ``σ_0 · x_T`` and the
    σ-space sample is returned, as k-diffusion's samplers do.

    ``guidance``: one term or several (:mod:`gradguide.guidance`); ``projection``: a
    :class:`~gradguide.PixelAsParam`. ``cond``: inputs passed to the model and guidance terms.
    ``x_T``: the initial noise (its device and dtype are the run's; default: drawn with
    ``generator``; a list of B generators draws each sample's noise from its own).

    ``execution``: a :class:`~gradguide.Execution` (backend, CUDA graphs, fused step, device,
    dtype, branch batching: how it runs, not what it computes). ``diagnostics``: a
    :class:`~gradguide.Diagnostics` (host-sync and finiteness checks, telemetry, progress bar,
    a per-step ``callback(record)`` receiving a :class:`StepRecord`; a tensor it returns replaces
    ``x_(t-1)``, as diffusers' ``callback_on_step_end`` does with returned latents). By default non-finite
    samples raise a ValueError (one check after the loop). float16/bfloat16 runs combine in
    float32 and round once per step; a value beyond the dtype's range (65504 for float16)
    becomes inf, which that check reports.

    The sampler's tables and the fused plan depend only on the configuration: repeated calls with
    the same one take them from a small cache (see ``_PLAN_CACHE``), with the same results.
    Returns the samples ``x_0``, shaped ``shape``.
    """
    run = prepare_run(model, shape, schedule=schedule, sampler=sampler, steps=steps, guidance=guidance,
                      projection=projection, cond=cond, x_T=x_T, generator=generator, execution=execution,
                      diagnostics=diagnostics)
    callback, check_sync = run.diagnostics.callback, run.diagnostics.check_sync
    stepper = _stepper(run, run.execution.graph)
    x = x_T.to(run.dtype) if x_T is not None else _noise(run.shape, run.generator, run.device, run.dtype)
    init_scale, final_scale = run.tables.timesteps.init_scale, run.tables.timesteps.final_scale
    if init_scale != 1.0:   # σ-space samplers start from σ_max · z (as the variance-preserving x)
        x = x * init_scale
    if run.tables.initial_noise:   # k-diffusion's churn before the first evaluation
        x = x + run.tables.initial_noise * _step_noise(run, run.tables.initial_noise_sigmas)
    state = initial_state(run, x)
    n = len(run.tables.timesteps)
    bar = _progress(n, run.diagnostics.progress)
    # what every step reads from the host, looked up once (the loop's own cost is paid per step)
    draws_noise, noise_sigmas = run.tables.draws_noise, run.tables.noise_sigmas
    want_record, check_step = callback is not None, run.check_finite == "step"
    for i in range(n):
        # noise is drawn before the step (outside any captured graph) from the run's generator(s)
        noise = _step_noise(run, noise_sigmas[i]) if draws_noise[i] else None
        if check_sync:
            with forbid_host_sync():
                x, state, record = stepper(x, i, state, noise, want_record)
        else:
            x, state, record = stepper(x, i, state, noise, want_record)
        if check_step and not bool(torch.isfinite(x).all()):
            raise ValueError(f"check_finite: x_(t-1) is not finite after step {i} (t = {run.timestep_list[i]}): "
                             f"the guided update overflowed{_range_hint(run.dtype)} or a guidance term "
                             f"returned NaN/inf{scale_overflow_hint(run.scales, run.dtype)}")
        if callback is not None:
            replaced = callback(record)
            if replaced is not None:   # a tensor returned by the callback is the x_(t-1) the next step starts from
                if not isinstance(replaced, torch.Tensor) or tuple(replaced.shape) != tuple(x.shape):
                    raise TypeError(f"callback: returned {type(replaced).__name__}; expected None or a tensor of "
                                    f"shape {tuple(x.shape)} (the x_(t-1) to continue from)")
                x = replaced.to(device=x.device, dtype=x.dtype)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = stepper.finish(x)
    if final_scale != 1.0:   # σ-space samplers return x_σ at the last σ
        result = result * final_scale
    if run.check_finite == "end" and not bool(torch.isfinite(result).all()):
        # x_T is checked here, not before the first step: a finite one (the rule) then costs no
        # host synchronisation and no ops per call; a non-finite one is still named
        if x_T is not None and not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T: contains NaN or inf values")
        raise ValueError(f"check_finite: the samples contain NaN or inf (from a finite x_T): a model output, a "
                         f"guidance gradient or the update went non-finite{_range_hint(run.dtype)}; pass "
                         "diagnostics=Diagnostics(check_finite='step') to find the first step, check_finite=False to "
                         f"get them anyway{scale_overflow_hint(run.scales, run.dtype)}")
    return result


def prepare_run(model: Callable, shape: Sequence[int], *, schedule: Schedule, sampler: Union[str, Sampler, None] = None,
                steps=None, guidance=(), projection: Optional[PixelAsParam] = None, cond: Optional[dict] = None,
                x_T: Optional[torch.Tensor] = None, generator=None, execution: Optional[Execution] = None,
                diagnostics: Optional[Diagnostics] = None, meta: bool = False) -> _Run:
    """The validated and planned run that :func:`sample` steps through; the seam of the harness
    (dry run, launch counts, step benchmarks), which then calls :func:`initial_state` and
    :func:`step` itself. Takes :func:`sample`'s arguments (``diagnostics.callback`` and
    ``progress`` are sample's loop's own). ``meta=True`` accepts ``Execution(device="meta")``
    (the dry run's host-side preparation: tables are built on the host and every device tensor
    is made fake afterwards; ``sample`` refuses it)."""
    if isinstance(sampler, str) and sampler in REFUSED:
        raise ValueError(f"sampler: {sampler!r} is not available: {REFUSED[sampler]}")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS} or a gradguide.Sampler, got {sampler!r}")
    if isinstance(sampler, str) or sampler is None:
        sampler = Sampler(sampler)
    elif not isinstance(sampler, Sampler):
        raise TypeError(f"sampler: expected a sampler name or a gradguide.Sampler, got {type(sampler).__name__}")
    execution = _config_object("execution", execution, Execution)
    diagnostics = _config_object("diagnostics", diagnostics, Diagnostics)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a gradguide.Schedule, got {type(schedule).__name__}")
    learnt = getattr(schedule, "sampler_config", None)
    if learnt is not None and not isinstance(learnt, Sampler):
        raise TypeError(f"schedule.sampler_config: expected a gradguide.Sampler or None, got {type(learnt).__name__}")
    run = _prepare(model, shape, schedule=schedule, steps=steps, sampler=sampler.resolve(learnt, steps is not None),
                   guidance=guidance, projection=projection, cond=cond, x_T=x_T, generator=generator,
                   execution=execution, diagnostics=diagnostics, allow_meta=meta)
    if run.check_finite == "step" and execution.graph is not False:
        raise ValueError("diagnostics.check_finite: 'step' reads every model output on the host; it cannot run with "
                         "graph capture (execution.graph; use 'end')")
    _finish_prepare(run, execution.fused)
    return run


_DEFAULTS = {Execution: Execution(), Diagnostics: Diagnostics()}   # frozen: one shared default each


def _config_object(name: str, value, cls):
    if value is None:
        return _DEFAULTS[cls]
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected a gradguide.{cls.__name__} or None, got {type(value).__name__}")
    return value


def _range_hint(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return (f" (dtype={dtype} holds magnitudes up to {torch.finfo(dtype).max:.6g}; the ops combine in float32 "
                "but x_(t-1) is stored in the run's dtype: run in float32, via x_T's dtype or execution.dtype)")
    return ""


def _stepper(run: "_Run", graph):
    """The eager step, or CUDA-graph replay of it (``execution.graph``: True or a :class:`GraphCache`)."""
    if graph is False or graph is None:
        return _eager(run)
    if graph is True:
        if run.device.type != "cuda":
            warnings.warn(f"execution.graph=True: CUDA graphs need a CUDA device; sampling eagerly on {run.device.type}",
                          stacklevel=3)
            return _eager(run)
        graph = GraphCache()
    if run.device.type != "cuda" and not graph.emulate:
        warnings.warn(f"execution.graph: CUDA graphs need a CUDA device; sampling eagerly on {run.device.type}", stacklevel=3)
        return _eager(run)
    return graph.stepper(run, step)


def _eager(run: "_Run") -> EagerStepper:
    run.step_rows = _StepRows(run)
    return EagerStepper(run, step)


class _StepRows:
    """The per-step rows of a run's device tables, for eager sampling. A step reads its scalars and
    timesteps through the device step index ``idx`` (an ``index_select`` each, and a ``cat`` of the
    timesteps for a batched 2B model call), so that a captured step replays for any step. An eager
    step need not: it takes row ``i`` of these tables, a view (no device op), holding the same
    values. Built once per call, only by the eager stepper: a captured step and the harness calling
    :func:`step` itself keep indexing with ``idx``."""
    __slots__ = ("columns", "t", "t_batched")

    def __init__(self, run: "_Run"):
        n, b = run.timesteps_dev.shape[0], run.shape[0]
        self.columns = run.table_rows.t().contiguous()          # [n, R]: row i is step i's column
        column = run.timesteps_dev.unsqueeze(1)
        self.t = column.expand(n, b)        # row i: [B], a stride-0 view as the indexed t
        # row i: [2B] contiguous, as cat([t, t]) (each step its own row: the model may keep or change it)
        self.t_batched = column.expand(n, 2 * b).contiguous() if run.batched is not None else None


# -- one step -------------------------------------------------------------------------------

def step(run: _Run, x: torch.Tensor, i: int, idx: torch.Tensor, state: Dict[str, torch.Tensor],
         noise: Optional[torch.Tensor], want_record: bool):
    """One guided step. ``i`` is the host step number (it selects only host-side variants, see
    :meth:`GuidanceTerm.variant`); ``idx`` is the same number as a device tensor ``[1]``, from
    which every per-step scalar is read, so a captured step can be replayed for any step (an eager
    run reads its tables' row ``i`` instead, :class:`_StepRows`, and may pass ``idx=None``)."""
    grad = run.needs_input_grad
    previous = torch.is_grad_enabled()
    if previous != grad:   # torch.set_grad_enabled(grad) as a context, without building one every step
        torch._C._set_grad_enabled(grad)
    try:
        if run.plan is not None and not want_record:
            return _fused_step(run, x, i, idx, state, noise)
        return _step_body(run, x, i, idx, state, noise, want_record)
    finally:
        if previous != grad:
            torch._C._set_grad_enabled(previous)


def _finish_prepare(run: _Run, fused: bool = True) -> None:
    """The sampler's tables on the device and the built-in fused step's plan (which appends its
    per-step weights to ``run.table_rows``): from :data:`_PLAN_CACHE` when an earlier call had
    the same configuration, else built (:func:`_build_tables_and_plan`) and remembered."""
    key = runkey.setup_key(run, fused)
    with _PLAN_CACHE_LOCK:   # sample() may be called from several threads (serving)
        entry = _PLAN_CACHE.get(key) if key is not None else None
        if entry is not None:
            _PLAN_CACHE.move_to_end(key)
    if entry is None:
        entry = _build_tables_and_plan(run, fused)
        if key is not None:
            with _PLAN_CACHE_LOCK:
                _PLAN_CACHE[key] = entry
                while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
                    _PLAN_CACHE.popitem(last=False)   # least recently used
    # The device tensors a step reads are the run's own (one copy each: a reused CUDA graph copies
    # a later run's values into them); the host tables and step indices are shared with the cache,
    # read-only (no part of a run writes them), so a cached call issues no per-table copies.
    tables, rows, index, plan, run.fused_reason, run.needs_x0, timestep_list, step_ids = entry
    run.tables, run.table_rows, run.table_index = tables, rows.clone(), dict(index)
    run.timesteps_dev = tables.timesteps.t.to(run.device, copy=True)
    run.timestep_list = list(timestep_list)
    run.step_ids = step_ids
    run.plan = stepplan.copy_plan(plan)


def _build_tables_and_plan(run: _Run, fused: bool) -> tuple:
    """What :func:`_finish_prepare` caches: ``(tables, table_rows, table_index, plan,
    fused_reason, needs_x0, timestep_list)``, computed from host-side configuration only."""
    cfg = run.sampler
    run.tables = build(cfg.name, cfg.timesteps, eta=cfg.eta, variance=cfg.variance, prediction=cfg.prediction,
                       **cfg.options)
    run.table_rows, run.table_index = run.tables.stacked(run.device, ops.reference.coefficient_dtype(run.dtype))
    run.plan = stepplan.build(run, step_algebra) if fused else None
    if not fused:
        run.fused_reason = "fused=False"
    return (run.tables, run.table_rows, run.table_index, run.plan, run.fused_reason, run.tables.needs_x0(),
            tuple(run.tables.timesteps.t.tolist()), torch.arange(len(run.tables.timesteps), device=run.device))


# -- the setup cache ----------------------------------------------------------------------------
# Why: a caller sampling repeatedly with one configuration (benchmarks, serving) would otherwise
# rebuild the same sampler tables and re-derive the same fused plan symbolically on every call
# (~60 % of sample()'s per-call setup). What the key covers: everything those two
# read, as immutable values: the timesteps' values (not the schedule object, which a caller may
# change), the sampler, eta, variance and the schedule's sampler options, device and dtype,
# prediction, clip and clip_eps, telemetry, fused, the projection's parameters, and each
# guidance term's type and parameters (:func:`gradguide.runkey.term_key`), read at every call, so changing
# `cfg.scale` between calls gives a new entry. Runs the key cannot describe (a LookAhead, whose
# plan holds its per-call target tensor; non-plain parameter values; meta/timesteps off the CPU)
# are built afresh. Per-call tensors (cond, x_T, generator, model) never enter an entry.
PLAN_CACHE_SIZE = 16
_PLAN_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()


def clear_plan_cache() -> None:
    """Forget every cached setup (tests; the cache never needs it for correctness)."""
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE.clear()


def _fused_step(run: _Run, x: torch.Tensor, i: int, idx: torch.Tensor, state: Dict[str, torch.Tensor],
                noise: Optional[torch.Tensor]):
    """The step as ``run.plan``'s stages (:mod:`gradguide.stepplan`): the model call(s), the
    operands the terms compute, then at most reduce + one fused combine per stage. The plan is
    :func:`step_algebra` traced, so this equals :func:`_step_body` (tests/core/test_fused_step.py)."""
    variant = run.plan.variants[run.plan.keys[i]]
    column, t, t_batched = _step_rows(run, i, idx)   # per-step scalars and weights, timesteps
    x_input = x.detach().requires_grad_(True) if run.needs_input_grad else x
    model_input = x_input if run.needs_model_grad else _detached(x)
    # a VJP through each CFG branch on its own (its weight changes per step): the branches get
    # separate leaves, so one backward pass gives Jᵀg of each
    leaves = {"model_cond": x_input}
    both = any(c.position < 0 and c.method == "model_uncond" for c in variant.computed.values())
    if both:
        leaves["model_uncond"] = x.detach().requires_grad_(True)
    scale = _flow_scale(run, column)
    # kernels address rows as contiguous memory: a non-contiguous batched output is made contiguous
    # once, before it is split (one copy, not one per branch)
    out_c, out_u, further, var_c, var_u, whole = _model_outputs(run, model_input, t, i, scale,
                                                                leaves.get("model_uncond"), t_batched=t_batched,
                                                                contiguous=run.backend != "reference")
    outputs = {"model_cond": out_c, "model_uncond": out_u}
    tensors = {"x": _detached(x), "model_cond": _detached(out_c)}
    if out_u is not None:
        tensors["model_uncond"] = _detached(out_u)
    tensors.update({f"model_{name}": _detached(out) for name, out in further.items()})   # perturbed branches
    if noise is not None:
        tensors["noise"] = noise
    if var_c is not None:   # a learned variance's channels: the halves of the output are read in place
        tensors["variance_channels"] = _detached(var_c)
    if var_u is not None:
        tensors["variance_uncond"] = _detached(var_u)
    contiguous = run.backend != "reference"   # kernels address rows as (row-strided) contiguous memory
    if contiguous:
        tensors = {name: t if ops.rows_in_place(t) else t.contiguous() for name, t in tensors.items()}
    terms = [run.branch] + run.score_terms + run.mean_terms + run.post_terms
    stacked = {} if both and whole is not None else None
    ctx = None

    def vjps(names, cotangent):
        """Each branch's Jᵀ(cotangent) for the computed operands ``names``, in one backward pass."""
        branches = [variant.computed[n].method for n in names]
        if stacked is not None and len(names) == 2:   # the batched output's cotangent, uncond rows first
            cot = stacked.get(id(cotangent))
            cot = torch.cat([cotangent, cotangent]) if cot is None else cot.view(whole.shape)
            grads = torch.autograd.grad(whole, [leaves[b] for b in branches], grad_outputs=cot, retain_graph=True)
        else:
            grads = torch.autograd.grad([outputs[b] for b in branches], [leaves[b] for b in branches],
                                        grad_outputs=[cotangent] * len(names), retain_graph=True)
        tensors.update({n: g.contiguous() if contiguous else g for n, g in zip(names, grads)})

    def compute(name):   # classifier gradients, G_loss's reward gradient and model VJPs, decoder pullbacks
        nonlocal ctx
        spec = variant.computed[name]
        for read in spec.reads:
            if read not in tensors:
                compute(read)
        if spec.position < 0:
            vjps([n for n, c in variant.computed.items() if c.position < 0 and c.reads == spec.reads],
                 tensors[spec.reads[0]])
            return
        if ctx is None:
            ctx = StepContext(ops=Operands(x, backend=run.backend), index=i, t=t, scalars={}, cond=run.cond, x=None,
                              x_input=x_input, state=state, sampler=run.tables.name, prediction=run.prediction,
                              input_scale=scale, model_output=out_c, stacked_cotangents=stacked)
        value = spec.method(terms[spec.position], ctx, *[tensors[r] for r in spec.reads])
        tensors[name] = value.contiguous() if contiguous else value

    stepplan.run_stages(run, variant, column, tensors, compute)
    return tensors["x_next"], dict(state), None


def _step_body(run: _Run, x: torch.Tensor, i: int, idx: torch.Tensor, state: Dict[str, torch.Tensor],
               noise: Optional[torch.Tensor], want_record: bool):
    column, t, _ = _step_rows(run, i, idx)
    scalars = {name: column[j] for name, j in run.table_index.items()}
    ops_ = Operands(x, groups=run.groups, backend=run.backend)
    x_input = x.detach().requires_grad_(True) if run.needs_input_grad else x
    model_input = x_input if run.needs_model_grad else x.detach()
    scale = _flow_scale(run, column)
    ctx = StepContext(ops=ops_, index=i, t=t, scalars=scalars, cond=run.cond, x=None, x_input=x_input,
                      state=state, sampler=run.tables.name, prediction=run.prediction, input_scale=scale)
    out_c, out_u, further, var_c, var_u, _ = _model_outputs(run, model_input, t, i, scale)
    tracked = {"x": x_input, "model_cond": out_c, "model_uncond": out_u}
    tracked.update({f"model_{name}": out for name, out in further.items()})
    x_next, x0_guided, telemetry = step_algebra(
        run, ctx, {"x": x.detach(), "model_cond": out_c.detach(), "model_uncond": None if out_u is None else out_u.detach(),
                   "noise": noise, "further": {name: out.detach() for name, out in further.items()},
                   "variance": _detached_or_none(var_c), "variance_uncond": _detached_or_none(var_u)},
        track=lambda x0: _tracked_x0(ops_, tracked, x0), want_telemetry=want_record or run.telemetry)
    x_new = ops_.finish(x_next)
    new_state = dict(ctx.new_state)
    x0_tensor = None
    if run.needs_x0 or want_record:
        x0_tensor = ops_.combine(x0_guided)
    new_state.update(_new_slots(run, scalars, x.detach(), x0_tensor, state))
    for key, value in state.items():
        new_state.setdefault(key, value)
    record = None
    if want_record:
        record = StepRecord(index=i, timestep=run.timestep_list[i], x=x_new, x0=x0_tensor,
                            telemetry=telemetry, backend=run.backend)
    return x_new, new_state, record


def _step_rows(run: _Run, i: int, idx: torch.Tensor):
    """``(column, t, t for a batched 2B call or None)`` of step ``i``: rows of the eager run's tables
    (:class:`_StepRows`), else indexed on the device with ``idx``."""
    rows = run.step_rows
    if rows is not None:
        return rows.columns[i], rows.t[i], None if rows.t_batched is None else rows.t_batched[i]
    return (run.table_rows.index_select(1, idx).squeeze(1),
            run.timesteps_dev.index_select(0, idx).expand(run.shape[0]), None)


def _detached(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``, skipped (a dispatch each) for a tensor outside autograd."""
    return t.detach() if t.requires_grad else t


def step_algebra(run: _Run, ctx: StepContext, inputs: Dict[str, Optional[torch.Tensor]], track=None,
                 want_telemetry: bool = False):
    """The guided step as LinComb algebra over its operands: ``(x_next, x̂_0 guided, telemetry)``.

    ``inputs``: the tensors of ``x``, the branches' outputs, the noise and a learned variance's
    channels of each branch (``None`` where absent).
    The general step evaluates this on its operands; the fused step's plan is this same function
    traced on symbolic operands (:mod:`gradguide.stepplan`), so the two cannot disagree."""
    ops_ = ctx.ops
    X = ctx.x = ops_.add("x", inputs["x"])
    scalars = ctx.scalars

    # model branches -> ε forms
    for name, out in inputs.get("further", {}).items():
        ctx.branch_eps[name] = _eps_form(run, ctx, ops_.add(f"model_{name}", out), X)
    eps_c = _eps_form(run, ctx, ops_.add("model_cond", inputs["model_cond"]), X)
    ctx.log_variance = _log_variance(run, ctx, inputs.get("variance"), "variance_channels")
    renoise = None
    telemetry = {}
    split = None   # policies A/B over a branch guider's differences: (x̂_0c, [(direction, Δ)])
    if run.branch is not None:
        eps_u = None
        if inputs["model_uncond"] is not None or ops_.tracing:   # a guider naming its branches leaves it
            eps_u = _eps_form(run, ctx, ops_.add("model_uncond", inputs["model_uncond"]), X)   # out where CFG is off
        if run.projection is not None and hasattr(run.branch, "differences"):   # each difference a direction
            x0_c, diffs = run.branch.directions(ctx, eps_c, eps_u)
            if run.projection.policy == "C":
                x0_pre, telemetry = run.projection.combine_directions(ops_, x0_c, diffs, telemetry=want_telemetry)
            else:
                x0_pre, split = _sum(x0_c, [d for _, d in diffs]), (x0_c, diffs)
        elif run.projection is not None and run.projection.policy == "C":
            if run.projection.sigma_from_uncond and inputs.get("variance_uncond") is not None:   # the authors' σ
                ctx.log_variance = _log_variance(run, ctx, inputs["variance_uncond"], "variance_uncond")
            x0_pre, telemetry = run.projection.combine_cfg(ops_, ctx.x0_of_eps(eps_c), ctx.x0_of_eps(eps_u),
                                                           run.branch.scale, clip=run.clip, telemetry=want_telemetry)
        else:
            eps_pre, renoise = run.branch.branches(ctx, eps_c, eps_u)
            x0_pre = ctx.x0_of_eps(eps_pre)
    else:
        x0_pre = ctx.x0_of_eps(eps_c)
    ctx.tracked_x0 = None if track is None else track(x0_pre)

    # score-level guidance: ε̃ = ε̂ − √(1−ᾱ) Σ G  <=>  x̂_0 += (1−ᾱ)/√ᾱ Σ G
    score_shifts = [term.score(ctx, x0_pre) * (ctx.h / ctx.a) for term in run.score_terms]
    x0_guided = _sum(x0_pre, score_shifts)
    if run.clip is not None and run.clip_eps == "model" and renoise is None:
        renoise = ctx.eps_of_x0(x0_guided)  # re-noise with the unclipped ε (diffusers' DDIM default)
    if run.clip is not None:
        if score_shifts:
            # the clipped guidance shift clip(p + s) − clip(p) (p = x̂_0, s = the shifts) is an
            # operand of its own, formed from s itself where neither side clips: as a difference
            # of the two clipped x̂_0 (norm ~1 each, the shift ~1e-3) it would keep only the
            # precision of p, relative to s ~1e3 times worse (docs/architecture.md#precision)
            x0_pre, shift = ops_.materialize_clip_shift(("x0_clipped", "clip_shift"), x0_pre, _sum(None, score_shifts),
                                                        run.clip)
            x0_guided, score_shifts = x0_pre + shift, [shift]
        else:
            x0_pre = x0_guided = ops_.materialize("x0_clipped", x0_pre, clamp=run.clip)

    # the sampler step as directions: base (untouched), denoising, guidance, diversity
    c_0 = scalars["c_0"]
    base = X * scalars["c_x"]
    carried = _carried(run, ops_, ctx.state, scalars)
    if carried is not None:   # multistep history, Heun's / UniPC's carried sample, ... (the sampler's slots)
        base = base + carried
    den = x0_pre * c_0
    if renoise is not None:  # CFG++: re-noise with ε_u instead of the ε consistent with x̂_0
        a_e = scalars["c_x"] * ctx.s
        den = den + (renoise - ctx.eps_of_x0(x0_guided)) * a_e
    guides = [shift * c_0 for shift in score_shifts]
    guides += [term.mean(ctx) for term in run.mean_terms]
    guides += [term.post(ctx, x0_pre) for term in run.post_terms]
    div = _diversity(ctx, inputs["noise"])
    branch_guides = []
    if split is not None:   # the conditional prediction denoises; each branch difference guides (docs/pixelasparam.md)
        den, branch_guides = split[0] * c_0, [(name, d * c_0) for name, d in split[1]]

    if run.projection is not None and run.projection.policy != "C":
        x_next = base + run.projection.project_directions(ops_, den, [g for _, g in branch_guides] + guides, div)
    else:
        x_next = _sum(base + den, guides) + div
    if want_telemetry:
        telemetry.update(step_telemetry(ops_, den, _sum(None, guides) if guides else None,
                                        div if inputs["noise"] is not None else None, branch=branch_guides))
    return x_next, x0_guided, telemetry


def _flow_scale(run: _Run, column: torch.Tensor) -> Optional[torch.Tensor]:
    """The model's input scale at this step (0-d, on the device): a flow model's ``x_σ = x/(√ᾱ + √(1−ᾱ))``,
    an EDM model's ``c_in x_σ`` (gradguide.predictions); None where the model sees x itself."""
    name = predictions.INPUT_SCALE.get(run.prediction)
    if name is None:
        return None
    return column[run.table_index[name]]   # a 0-d float64 factor keeps x's dtype under type promotion


def _carried(run: _Run, ops_: Operands, state: Dict[str, torch.Tensor], scalars) -> Optional[LinComb]:
    """The carried state's share of the step output, as an operand: one slot is added as it
    is; several are first summed with this step's coefficients (one operand: the native
    kernels take at most 8)."""
    slots = run.tables.slots
    if not slots:
        return None
    if len(slots) == 1:
        return ops_.add(slots[0], state[slots[0]]) * scalars["c_" + slots[0]]
    return ops_.add("history", _combine_state(run, scalars, [("c_" + s, state[s]) for s in slots]))


def _combine_state(run: _Run, scalars, pairs) -> torch.Tensor:
    """``Σ scalars[name] · tensor`` in one combine pass (state bookkeeping outside the operands)."""
    b = run.shape[0]
    coef = torch.stack([scalars[name] for name, _ in pairs]).view(1, 1, -1).expand(b, 1, -1)
    tensors = [t for _, t in pairs]
    return ops.combine(coef.to(ops.reference.accumulation_dtype(tensors[0].dtype)), tensors, backend=run.backend)


def _new_slots(run: _Run, scalars, x: torch.Tensor, x0: Optional[torch.Tensor], state) -> Dict[str, torch.Tensor]:
    """Each slot after the step, from the old slots, x and the guided x̂_0 (all read before any is written)."""
    # x̂_0 is materialised only when some slot update reads it (tables.needs_x0): otherwise its weights are zero
    sources = {"x": x, "0": x0} if x0 is not None else {"x": x}
    sources.update({slot: state[slot] for slot in run.tables.slots})
    new = {}
    for slot in run.tables.slots:
        src = run.tables.moves.get(slot)
        if src == "0":
            new[slot] = x0   # a fresh output of this step
        elif src is not None:
            # a copy, not the input itself: a captured step's inputs are static buffers that the next
            # replay overwrites (CUDA graphs), so a state tensor must never alias them
            new[slot] = sources[src].clone()
        else:
            new[slot] = _combine_state(run, scalars, [(f"u_{slot}_{k}", v) for k, v in sources.items()])
    return new


def _sum(first: Optional[LinComb], rest: List[LinComb]) -> LinComb:
    total = first
    for r in rest:
        total = r if total is None else total + r
    return total


def _model_outputs(run: _Run, x_in: torch.Tensor, t: torch.Tensor, i: int, scale: Optional[torch.Tensor] = None,
                   uncond_leaf: Optional[torch.Tensor] = None, t_batched: Optional[torch.Tensor] = None,
                   contiguous: bool = False):
    """``(out_cond, out_uncond or None, {further branch: output}, variance channels of cond, of
    uncond, the batched output or None)``: the branches step ``i``'s guider asks for (perturbed
    models among them, evaluated by ``run.branch_caller``), else :func:`_model_branches`' two."""
    if run.branch_caller is None:
        out_c, out_u, log_var, log_var_u, whole = _model_branches(run, x_in, t, scale, uncond_leaf, t_batched,
                                                                  contiguous)
        return out_c, out_u, {}, log_var, log_var_u, whole
    outs = run.branch_caller(functools.partial(_call_model, run), _model_input(x_in, scale, 1), t,
                             run.branch.step_branches(i))
    (out_c, log_var), (out_u, log_var_u) = outs.pop("cond"), outs.pop("uncond", (None, None))
    return out_c, out_u, {name: out for name, (out, _) in outs.items()}, log_var, log_var_u, None


def _model_input(x: torch.Tensor, scale: Optional[torch.Tensor], copies: int) -> torch.Tensor:
    """The model's input: ``x`` (a flow model's ``x_σ = x · scale``), stacked ``copies`` times
    for a batched branch call. Scale and copies are one elementwise pass (x read once, the input
    written once) rather than a multiply and then a ``cat`` that reads its result twice; the
    values are those of ``cat([x * scale] * copies)``."""
    if copies == 1:
        return x if scale is None else x * scale
    rows = x.unsqueeze(0).expand(copies, *x.shape)
    rows = rows.clone(memory_format=torch.contiguous_format) if scale is None else rows * scale
    return rows.flatten(0, 1)


def _model_branches(run: _Run, x_in: torch.Tensor, t: torch.Tensor, scale: Optional[torch.Tensor] = None,
                    uncond_leaf: Optional[torch.Tensor] = None, t_batched: Optional[torch.Tensor] = None,
                    contiguous: bool = False):
    """``(out_cond, out_uncond or None, learned variance channels of each branch or None, the
    batched output or None)``: one call of batch 2B when ``run.batched`` holds both branches'
    stacked inputs (unconditional rows first, as diffusers pipelines), else one call per branch.
    Under G_loss the batched call is also one backward pass through the model. ``scale``: a flow
    model's input scale (None: the model takes ``x_in`` itself), applied as the input is formed
    (:func:`_model_input`). ``uncond_leaf``: the unconditional branch's input as an autograd leaf
    of its own (a VJP through each branch separately), else ``x_in`` is both branches'. ``t_batched``:
    ``cat([t, t])`` where the caller has it; ``contiguous``: the batched output is made contiguous
    before it is split."""
    if run.branch is None:
        out_c, log_var = _call_model(run, _model_input(x_in, scale, 1), t, run.cond, "model(x_t, t, **cond)")
        return out_c, None, log_var, None, None
    if run.batched is not None:
        x2 = (_model_input(x_in, scale, 2) if uncond_leaf is None
              else _model_input(torch.cat([uncond_leaf, x_in]), scale, 1))
        out, var = _call_model(run, x2, torch.cat([t, t]) if t_batched is None else t_batched, run.batched,
                               "model(cat[x_t, x_t], cat[t, t], **cat[uncond, cond])", batch=2 * run.shape[0])
        if contiguous:
            out = out.contiguous()
        out_c, out_u = split_branches(out, run.shape[0])
        var_c, var_u = (None, None) if var is None else split_branches(var, run.shape[0])
        return out_c, out_u, var_c, var_u, out
    x_model = _model_input(x_in, scale, 1)
    out_c, log_var = _call_model(run, x_model, t, run.cond, "model(x_t, t, **cond)")
    x_model_u = x_model if uncond_leaf is None else _model_input(uncond_leaf, scale, 1)
    out_u, log_var_u = _call_model(run, x_model_u, t, run.uncond, "model(x_t, t, **uncond)")
    return out_c, out_u, log_var, log_var_u, None


def _call_model(run: _Run, x_in: torch.Tensor, t: torch.Tensor, inputs: dict, what: str, batch: int = 0):
    out = run.model(x_in, t, **inputs)
    _check_model_output(run, out, t, what)
    learned = run.tables.learned_variance or run.variance_channels
    b = batch or run.shape[0]
    expected = (b, run.shape[1] * 2) + tuple(run.shape[2:]) if learned else (b,) + tuple(run.shape[1:])
    if tuple(out.shape) != expected:
        raise ValueError(f"model: {what} returned shape {tuple(out.shape)}, expected {expected}"
                         + (" (learned-range variance: twice the channels)" if learned else ""))
    var_channels = None
    if learned:
        out, var_channels = out.split(run.shape[1], dim=1)
    # .to() of a tensor already in the run's dtype is itself, but costs a dispatch (~2 µs) every step
    return (out if out.dtype == run.dtype else out.to(run.dtype)), var_channels


def _check_model_output(run: _Run, out, t: torch.Tensor, what: str) -> None:
    """A model output must be a real floating tensor on the run's device (never cast from int,
    bool or complex); under ``check_finite="step"`` it must also be finite."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: {what} returned {type(out).__name__}, expected a tensor")
    if out.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"model: {what} returned dtype {out.dtype}, expected a real floating dtype")
    if out.device != run.device:
        raise ValueError(f"model: {what} returned a tensor on {out.device}, but the samples are on {run.device}")
    if run.check_finite == "step" and not bool(torch.isfinite(out).all()):
        raise ValueError(f"model: {what} returned NaN or inf at t = {int(t[0])} (check_finite='step')"
                         f"{scale_overflow_hint(run.scales, run.dtype)}")


def _log_variance(run: _Run, ctx: StepContext, channels, name: str) -> Optional[LogVariance]:
    """The learned variance of a branch with variance ``channels`` (a tensor; ``True`` in a
    traced step): ADM's learned range is a line in them (:func:`predictions.learned_range_line`, per
    step in the sampler's tables);
    diffusers' ``"learned"`` gives Σ itself, so log Σ is the operand ``log v``."""
    if channels is None or not run.tables.learned_variance:
        return None
    if run.sampler.variance == "learned":
        if ctx.ops.tracing:
            raise stepplan.NotFusable("variance 'learned': log Σ = log v is not a line in the model's output")
        return LogVariance(ctx.ops.add(name, torch.log(channels.to(run.dtype))), 1.0, 0.0)
    return LogVariance(ctx.ops.add(name, None if ctx.ops.tracing else channels.to(run.dtype)),
                       ctx.scalars["log_var_slope"], ctx.scalars["log_var_offset"])


def _detached_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else _detached(t)


def _eps_form(run: _Run, ctx: StepContext, out: LinComb, X: LinComb) -> LinComb:
    return predictions.eps_from(run.prediction, out, X, ctx.a, ctx.s, ctx.pre)


def _tracked_x0(ops_: Operands, tracked: Dict[str, torch.Tensor], x0: LinComb):
    """x̂_0 with its autograd graph: the same combination, over the grad-tracked operands.
    The coefficients are constants here (see :mod:`gradguide.guidance.gradient`)."""
    cache = {}
    coef = x0.coef.detach()

    def compute():
        if "x0" not in cache:
            tensors = []
            for name, tensor in zip(ops_.names, ops_.tensors):
                if name in ops_.recipes:   # a materialised (e.g. clipped) operand: recompute it with autograd
                    tensor = linear.replay(ops_.recipes[name], tensors, ops_.batch, ops_.groups)
                tensors.append(tracked.get(name, tensor))
            k = len(tensors)
            c = torch.nn.functional.pad(coef, (0, k - coef.shape[-1])).expand(ops_.batch, ops_.groups, -1)
            cache["x0"] = ops.reference.combine(c, tensors)
        return cache["x0"]
    return compute


def _diversity(ctx: StepContext, z: Optional[torch.Tensor]) -> LinComb:
    if z is None:
        return ctx.ops.zero()
    noise = ctx.ops.add("noise", z)
    if ctx.log_variance is not None:   # √Σ ⊙ z
        noise = ctx.variance_scaled("noise_scaled", noise, 0.5)
    return noise * ctx.scalars["sigma"]


def _noise(shape, generator, device, dtype) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _step_noise(run: _Run, sigmas: tuple) -> torch.Tensor:
    """A step's standard normal draws: from the sampler's ``noise_sampler(σ, σ_next)`` where one was
    given (k-diffusion's interface, e.g. a Brownian tree), else from the run's generator(s)."""
    sampler = run.tables.noise_sampler
    if sampler is None:
        return _noise(run.shape, run.generator, run.device, run.dtype)
    sigma, sigma_next = (torch.tensor(v, dtype=torch.float64) for v in sigmas)
    z = sampler(sigma, sigma_next)
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != run.shape:
        raise ValueError(f"noise_sampler: expected a tensor of shape {run.shape} for σ = {float(sigma):.6g}, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    return z.to(device=run.device, dtype=run.dtype)


def initial_state(run: _Run, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The carried state before the first step (sampler slots, guidance terms' state)."""
    state = {name: torch.zeros_like(x) for name in run.tables.slots}
    for term in [run.branch] + run.score_terms + run.mean_terms + run.post_terms:
        if term is not None:
            state.update(term.initial_state(x))
    return state


def _progress(n: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=n, desc="sampling", unit="step", disable=None)  # None: off when stderr is not a terminal


# -- validation -----------------------------------------------------------------------------

def _prepare(model, shape, *, schedule: Schedule, steps, sampler: Sampler, guidance, projection, cond, x_T,
             generator, execution: Execution, diagnostics: Diagnostics, allow_meta: bool = False) -> _Run:
    """The run before its tables and plan; ``sampler`` is resolved (every field set)."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x_t, t, **cond), got {type(model).__name__}")
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape: expected a batch shape (B, ...) of positive integers with at least 2 "
                         f"dimensions, got {shape!r}")
    shape = tuple(shape)
    name, prediction, variance = sampler.name, sampler.prediction, sampler.variance

    # device and dtype
    device, dtype = execution.device, execution.dtype
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T: expected a tensor, got {type(x_T).__name__}")
        if x_T.device.type == "meta":
            raise ValueError("x_T: a meta tensor holds no values; sampling needs a cpu or cuda tensor")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T: shape {tuple(x_T.shape)} does not match shape={shape}")
        if not x_T.is_floating_point():
            raise TypeError(f"x_T: expected a floating dtype, got {x_T.dtype}")
        if device is not None and _check_device(device, allow_meta) != x_T.device:
            raise ValueError(f"x_T: on {x_T.device}, but execution.device={device}")
        if dtype is not None and dtype != x_T.dtype:
            raise TypeError(f"x_T: dtype {x_T.dtype} differs from execution.dtype={dtype}")
        if diagnostics.check_finite == "step" and not torch.isfinite(x_T).all():
            raise ValueError("x_T: contains NaN or inf values")
        device, dtype = x_T.device, x_T.dtype
    device = _check_device(device, allow_meta)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or torch.float32
    _check_generator(generator, shape, device)

    # cond
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond: expected a dict of keyword inputs for the model, got {type(cond).__name__}")
    cond = dict(cond or {})

    # timesteps (the sampler's tables are built from them in _finish_prepare)
    timesteps = _timesteps(schedule, steps, sampler)
    if variance in predictions.LEARNED_VARIANCES and name != "ddpm":
        raise ValueError(f"sampler.variance: {variance!r} is DDPM's; sampler {name!r} ignores model variances "
                         "(split the model output yourself or use the 'ddpm' sampler)")
    if timesteps.abar[0] == 0 and prediction == "eps":
        raise ValueError("sampler.prediction: 'eps' cannot start at ᾱ = 0 (zero terminal SNR): x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ "
                         "is undefined there; zero-terminal-SNR schedules need a v- or x0-prediction model "
                         "(Lin et al. 2024)")
    _check_flow(schedule, prediction)

    # guidance terms
    if guidance is not None and not isinstance(guidance, (GuidanceTerm, list, tuple)):
        raise TypeError(f"guidance: expected a guidance term (gradguide.CFG, Classifier, ...) or a list of them, "
                        f"got {type(guidance).__name__}")
    terms = [guidance] if isinstance(guidance, GuidanceTerm) else list(guidance or ())
    for j, term in enumerate(terms):
        if not isinstance(term, GuidanceTerm):
            raise TypeError(f"guidance[{j}]: expected a guidance term (gradguide.CFG, Classifier, ...), "
                            f"got {type(term).__name__}")
    terms = [term.bind(shape, device, dtype, name).for_steps(len(timesteps)) for term in terms]
    branch_terms = [t for t in terms if t.place == "branches"]
    if len(branch_terms) > 1:
        raise ValueError("guidance: at most one of CFG, APG, Rescale, CFGZeroStar, CFGPlusPlus per run, got "
                         + ", ".join(type(t).__name__ for t in branch_terms))
    for term in terms:
        if term.needs_cond and not cond:
            raise ValueError(f"guidance: {type(term).__name__} needs a conditional model: pass cond= with the "
                             "conditioning inputs (and uncond= on the term for the unconditional branch)")
    branch = branch_terms[0] if branch_terms else None
    uncond = {}
    if branch is not None:
        uncond = branch.uncond_inputs(cond)
        if not isinstance(uncond, dict):
            raise TypeError(f"{type(branch).__name__}: uncond: expected a dict (or a callable returning one), "
                            f"got {type(uncond).__name__}")
    _check_inputs("cond", cond, shape[0], device)
    if branch is not None:
        _check_inputs(f"{type(branch).__name__}: uncond", uncond, shape[0], device, cond)
    score_terms = [t for t in terms if t.place == "score"]
    mean_terms = [t for t in terms if t.place == "mean"]
    post_terms = [t for t in terms if t.place == "post"]

    if projection is not None:
        if not isinstance(projection, PixelAsParam):
            raise TypeError(f"projection: expected a gradguide.PixelAsParam, got {type(projection).__name__}")
        differences = hasattr(branch, "differences")   # a branch guider: each branch difference is a direction
        if projection.policy == "C":
            if branch is None or not (type(branch).__name__ == "CFG" or differences):
                raise ValueError("projection: policy C projects the two branches of classifier-free guidance (or a "
                                 "perturbed-branch guider's differences: PAG, SLG, SEG, AutoGuidance, LTX2); add "
                                 "gradguide.CFG(...) to guidance=")
        elif not (score_terms or mean_terms or post_terms or differences):
            raise ValueError(f"projection: policy {projection.policy} projects guidance directions against "
                             "the denoising direction; add a term that adds one (Classifier, NaiveGradient, "
                             "LookAhead, DPS, or a perturbed-branch guider: PAG, SLG, ...)")
        if differences:
            projection.check_branch_guider(branch, sampler.clip, variance == "learned-range")
    clip = _clip(sampler.clip)

    resolved = ops.resolve_backend(execution.backend, device)
    # the sampler tables and the fused plan are built (or taken from _PLAN_CACHE) by _finish_prepare
    run = _Run(model=model, shape=shape, device=device, dtype=dtype, tables=None, table_rows=None,
               table_index=None, timesteps_dev=None,
               sampler=sampler._validated(clip=clip or False, timesteps=timesteps, sigmas=None),
               execution=execution, diagnostics=diagnostics, branch=branch, score_terms=score_terms,
               mean_terms=mean_terms, post_terms=post_terms, projection=projection, cond=cond, backend=resolved,
               generator=generator, groups=projection.groups(shape) if projection is not None else 1)
    run.scales = named_scales(guidance, terms)
    run.needs_model_grad = any(t.needs_model_grad for t in terms)
    run.needs_input_grad = run.needs_model_grad or any(t.needs_input_grad for t in terms)
    if branch is not None:
        run.uncond, run.batched = _branch_inputs(branch, cond, uncond, shape[0], execution.batch_branches)
        if hasattr(branch, "step_branches"):   # a guider naming its model branches per step (guidance/pag.py)
            run.branch_caller = BranchCaller(branch, model, cond, run.uncond, shape[0], run.batched is not None)
            run.batched = None   # it stacks the branches each step asks for itself
    return run


def _check_flow(schedule: Schedule, prediction: str) -> None:
    """A flow model needs σ timesteps and a σ schedule needs a flow model (docs/flow.md)."""
    from .flow_schedules import FlowSchedule
    flow_schedule = isinstance(schedule, FlowSchedule)
    if prediction == "flow" and not flow_schedule:
        raise ValueError("sampler.prediction: 'flow' needs a gradguide.FlowSchedule (σ timesteps and the model's timestep "
                         f"convention), got {type(schedule).__name__}")
    if flow_schedule and prediction != "flow":
        raise ValueError(f"sampler.prediction: {prediction!r}: a FlowSchedule drives flow-matching (velocity) models; use "
                         "prediction='flow' (or leave it unset)")


def _timesteps(schedule: Schedule, steps, sampler: Sampler) -> Timesteps:
    """The visited timesteps: ``sampler.timesteps``, else from ``sampler.sigmas``, else the
    schedule's for ``steps`` with ``sampler.spacing``."""
    if sampler.sigmas is not None:
        if steps is not None:
            raise ValueError("sampler.sigmas: pass either sigmas or steps, not both")
        try:
            return schedule.timesteps_from_sigmas(sampler.sigmas)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"sampler.{exc}") from None
    if sampler.timesteps is not None:
        return sampler.timesteps
    return schedule.timesteps(steps, sampler.spacing)


def _clip(clip):
    """``None`` (off), ``(low, high)`` floats or a :class:`~gradguide.DynamicThreshold` from a sampler's ``clip``."""
    if isinstance(clip, predictions.DynamicThreshold):
        return clip
    if clip is True:
        return (-1.0, 1.0)
    if clip is False or clip is None:
        return None
    # 0-d tensor bounds are read once here, before the loop
    clip = tuple(float(c) if isinstance(c, torch.Tensor) and c.numel() == 1 and c.is_floating_point()
                 and c.device.type != "meta" else c for c in clip)
    clip = ops.check_clamp(clip, "sampler.clip")   # the ops' clamp rule: numbers, no NaN
    if clip is not None and (None in clip or not clip[0] < clip[1]):
        raise ValueError(f"sampler.clip: expected None, True, False or (low, high) with low < high, got {clip!r}")
    return tuple(clip)


def _check_device(device, allow_meta: bool = False) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"execution.device: {device!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"execution.device: {str(device)!r} requested, but CUDA is not available "
                         f"(torch {torch.__version__}{' is a CPU-only build' if torch.version.cuda is None else ''})")
    if device.type == "meta" and not allow_meta:
        raise ValueError("execution.device: meta tensors hold no values; sampling needs 'cpu' or 'cuda'")
    return device


def _check_inputs(name: str, inputs: dict, batch: int, device: torch.device, cond: Optional[dict] = None) -> None:
    """Model inputs (``cond``, CFG's ``uncond``): tensors on the samples' device, with one row per
    sample (a leading dimension of B); a 0-d tensor is a shared scalar. A wrong batch size is
    refused rather than guessed to be a shared input: bind inputs that have no batch dimension
    into the model (a closure or ``functools.partial``). The unconditional inputs (``cond``
    given) must match the conditional ones key by key, so both branches see the same batch."""
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.device != device:
            raise ValueError(f"{name}[{key!r}]: on {value.device}, but the samples are on {device}")
        if value.dim() >= 1 and not per_sample(value, batch):
            raise ValueError(f"{name}[{key!r}]: leading (batch) dimension {value.shape[0]}, but the batch has "
                             f"B = {batch} samples; give one row per sample (bind an input with no batch "
                             "dimension into the model, e.g. with functools.partial)")
        other = None if cond is None else cond.get(key)
        if isinstance(other, torch.Tensor) and other.shape != value.shape:
            raise ValueError(f"{name}[{key!r}]: shape {tuple(value.shape)}, but cond[{key!r}] is {tuple(other.shape)}: "
                             "the two branches must get the same shapes")


def _branch_inputs(branch: GuidanceTerm, cond: dict, uncond: dict, b: int, batch_branches):
    """The unconditional branch's inputs (computed once per run) and, where the two branches
    are evaluated in one call, their stacked inputs (see :mod:`gradguide.guidance.cfg`)."""
    if batch_branches is False:
        return uncond, None
    try:
        return uncond, batch_branch_inputs(uncond, cond, b)
    except BranchInputsError as exc:
        if batch_branches is True:
            raise ValueError(f"execution.batch_branches=True: {type(branch).__name__}'s two branches cannot share one "
                             f"model call: {exc} (or pass Execution(batch_branches=False))") from None
        return uncond, None


def _check_generator(generator, shape, device) -> None:
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(generator) != shape[0]:
        raise ValueError(f"generator: a list needs one generator per sample ({shape[0]}), got {len(generator)}")
    for g in gens:
        if g is None and not isinstance(generator, (list, tuple)):
            continue
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator (or a list of them), got {type(g).__name__}")
        if g.device.type != device.type:
            raise ValueError(f"generator: on {g.device}, but the samples are on {device}")
