"""One dry run (see :mod:`gradguide.bench.dryrun`): guided steps of a prepared run on fake
tensors, counted per phase, with the least traffic the step could take (:func:`minimum_bytes`)."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Callable, List, Optional

import torch

import gradguide as gg
from gradguide import sampling
from gradguide.debug import forbid_host_sync

from .fake import PHASES, Counter, FakeWorld, Tracker, _backends_on_fake_devices, _cuda_attention, _nbytes, \
    fake_cuda_status, pick_backend

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
    callable (decoder, DPS operator), x̂_0 written once from its operands. Where the step forms
    the model's input instead of passing x itself (a flow model's ``x_σ = x · scale``; both CFG
    branches' rows stacked for one batched call, a perturbed guider's branches sharing one
    call), that input written once from x read once: the model reads a tensor the step has to write."""
    s = _nbytes(x)
    total = log["reduce_k"] * s + sum((k + 1) * s for k in log["combine_k"])
    total += s * log["noise"]
    copies = 2 if run.branch is not None and run.batched is not None and run.branch_caller is None else 1
    if run.branch_caller is not None:   # a perturbed guider's branches sharing this step's call
        copies = max(1, len(run.branch_caller.together(run.branch.step_branches(log["step"]))))
    if copies > 1 or run.prediction == "flow":
        total += s + copies * s
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
        # a pass over Σ-scaled operands also reads the variance channels they are scaled by
        log_scale = [stage.scaling[0]] if stage.scaling else []
        operands = own(stage.operands + log_scale)
        if stage.n_gram:
            gram_scaled = stage.scaling and stage.scaling[1] & ((1 << stage.n_gram) - 1)
            log["reduce_k"] = max(log["reduce_k"], len(own(stage.operands[:stage.n_gram]
                                                           + (log_scale if gram_scaled else []))))
        if stage.output in intermediates:
            sources.update({name: operands for name in stage.output.split(",")})
        elif stage.output != "decoder_input":   # a decoded term's x̂_0: counted with the term
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
    real_scaled = linear.Operands.scaled
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
    def scaled(self, name, u, log_scale, slope, offset):   # Σ ⊙ u: formed from u and Σ's channels as they are read
        result = real_scaled(self, name, u, log_scale, slope, offset)
        self._dryrun_materialized = getattr(self, "_dryrun_materialized", ()) + (name,)
        log["materialized"] += 1
        return result
    linear.Operands._reduced, linear.Operands.combine, linear.Operands.materialize = reduced, combine, materialize
    linear.Operands.materialize_clip_shift, linear.Operands.scaled = materialize_clip_shift, scaled
    try:
        yield
    finally:
        linear.Operands._reduced, linear.Operands.combine, linear.Operands.materialize = \
            real_reduced, real_combine, real_mat
        linear.Operands.materialize_clip_shift, linear.Operands.scaled = real_mat_shift, real_scaled
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
        run.step_rows = sampling._StepRows(run)   # an eager step reads its rows of the tables, as sample()'s
        persistent = [x] + list(state.values()) + _term_tensors(run) + [run.step_rows.columns]
        for i in steps_measured:
            counter.reset()
            counter.live.clear()
            counter.live_bytes = 0
            inputs_bytes = counter.track_existing(persistent)
            log = {"reduce_k": 0, "combine_k": [], "noise": 0, "tracked_k": 0, "materialized": 0, "step": i}
            tracker.stack[:] = ["guidance"]
            with _structure_log(log), forbid_host_sync():
                noise = None
                if run.tables.draws_noise[i]:
                    noise = torch.randn(tuple(shape), device=world.device, dtype=run.dtype)
                    log["noise"] = 1
                x_new, state_new, _ = sampling.step(run, x, i, run.step_ids[i:i + 1], state, noise, False)
                if run.plan is not None:
                    _plan_structure(log, run.plan.variants[run.plan.keys[i]])
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
        if graph:   # a captured step indexes the tables with the step's device index
            run.step_rows = None
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
