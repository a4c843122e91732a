"""CUDA-graph capture of a sampling step, and the eager stepper it replaces.

The steppers are handed the step function (:func:`gradguide.sampling.step`) by ``sample``, so
this module does not import :mod:`gradguide.sampling` (which imports it). A step reads every
per-step quantity from device tensors: the step index ``idx`` (a ``[1]`` int64 tensor) selects
a column of the sampler's scalar table and the model's timesteps, and the noise arrives as a
tensor drawn outside the step. So one captured step replays for every step of a run. What is left on the host is the step
*variant*: whether the step draws noise (not on the step that lands on clean data) and any
term's host-side choice (:meth:`GuidanceTerm.variant`, e.g. CFG-Zero*'s zero-init steps);
each variant is captured once.

**Static buffers.** A captured step reads ``x``, the carried state (DPM-Solver++'s previous
x̂_0, APG's running Δ), ``idx`` and the noise from static buffers; before each replay the
stepper copies the current values in (device-to-device copies, no host synchronisation) and
draws the noise into its buffer with the run's generator(s), so replay draws exactly the
numbers eager sampling draws.

**Re-capture rules.** A :class:`GraphCache` keeps captures across ``sample`` calls. A run
reuses a capture only if its *signature* is equal: model and callables by identity; shape,
dtype, device, sampler, step count, prediction, clipping, backend, projection, and every
guidance term's hyperparameters by value; tensors (term inputs such as G_loss's ``grad`` and
``target``, ``cond`` and ``uncond`` entries, both branches' stacked inputs) by shape/stride/dtype/device. Their *values*, the sampler's
scalar tables and timesteps are copied into the captured buffers, so a new schedule with the
same step count, or Algorithm 1's new per-round gradients, replay without re-capture. Any
other change captures anew: output is never stale. The model's parameters are read in place,
so in-place fine-tuning (Algorithm 2) is seen by the next replay.

On a CPU run ``graph=True`` samples eagerly with a one-line notice. ``GraphCache(emulate=True)``
runs the same bookkeeping on any device with "capture" recording the step and "replay"
re-running it on the static buffers: the test suite uses it to check the plumbing without CUDA.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import torch

from . import runkey

WARMUP_RUNS = 3  # side-stream runs before capture


class EagerStepper:
    """Runs each step directly (``step``: :func:`gradguide.sampling.step`)."""

    def __init__(self, run, step: Callable):
        self.run, self._step = run, step
        # the device step indices [1], sliced once per run; a run with its tables' per-step rows
        # (``run.step_rows``, set for eager sampling) reads those and never ``idx``
        self._ids = run.step_ids.split(1) if getattr(run, "step_rows", None) is None else None

    def __call__(self, x, i, state, noise, want_record):
        return self._step(self.run, x, i, None if self._ids is None else self._ids[i], state, noise, want_record)

    def finish(self, x):
        return x


def _run_tensors(run) -> Dict[str, torch.Tensor]:
    """The tensors a captured step reads whose values may change between runs."""
    tensors = {"table_rows": run.table_rows, "timesteps": run.timesteps_dev}
    terms = [run.branch] + run.score_terms + run.mean_terms + run.post_terms
    for j, term in enumerate(terms):
        if term is not None:
            tensors.update({f"term{j}.{k}": v for k, v in term.graph_tensors().items()})
    for name in ("cond", "uncond", "batched"):   # batched: both branches' inputs stacked for one call
        _flat_tensors(name, getattr(run, name), tensors)
    return tensors


def _flat_tensors(prefix: str, value, out: Dict[str, torch.Tensor]) -> None:
    """The tensors in a (nested) dict / list / tuple of model inputs, by path."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat_tensors(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _flat_tensors(f"{prefix}[{j}]", v, out)


class _Capture:
    """One captured step variant: static inputs, the captured outputs, and how to replay."""

    def __init__(self, run, step: Callable, i: int, x, state, noise, want_record: bool, emulate: bool):
        self.x = x.detach().clone()
        self.state = {k: v.detach().clone() for k, v in state.items()}
        self.idx = run.step_ids[i:i + 1].clone()
        self.noise = None if noise is None else noise.detach().clone()
        self.want_record = want_record

        def fn():
            return step(run, self.x, i, self.idx, self.state, self.noise, want_record)
        self.fn = fn
        self.emulate = emulate
        if emulate:
            self.graph = None
            self.outputs = None
            return
        # warm up on a side stream (lazy initialisation, cuBLAS workspaces, autograd), then capture
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self, x, idx, state, noise):
        self.x.copy_(x)
        self.idx.copy_(idx)
        for k, v in state.items():
            self.state[k].copy_(v)
        if noise is not None:
            self.noise.copy_(noise)
        if self.emulate:
            self.outputs = self.fn()
        else:
            self.graph.replay()
        return self.outputs


class GraphStepper:
    """Replays captured steps; captures a variant the first time it is needed."""

    def __init__(self, run, step: Callable, captures: Dict, emulate: bool):
        self.run, self.step = run, step
        self.captures = captures
        self.emulate = emulate
        self.captured = 0   # captures made by this stepper (for tests and telemetry)

    def _variant(self, i: int, want_record: bool):
        terms = [self.run.branch] + self.run.score_terms + self.run.mean_terms + self.run.post_terms
        return (self.run.tables.draws_noise[i], want_record) + tuple(t.variant(i) for t in terms if t is not None)

    def __call__(self, x, i, state, noise, want_record):
        key = self._variant(i, want_record)
        if key not in self.captures:
            self.captures[key] = _Capture(self.run, self.step, i, x, state, noise, want_record, self.emulate)
            self.captured += 1
        cap = self.captures[key]
        x_new, new_state, record = cap.replay(x, self.run.step_ids[i:i + 1], state, noise)
        if record is not None:  # the captured record lives in static memory: copy it out
            record = dataclasses.replace(
                record, index=i, timestep=self.run.timestep_list[i], x=x_new.clone(),
                x0=None if record.x0 is None else record.x0.clone(),
                telemetry={p: {k: v.clone() for k, v in d.items()} for p, d in record.telemetry.items()})
        return x_new, new_state, record

    def finish(self, x):
        return x.clone()  # the last output lives in a captured graph's memory


class GraphCache:
    """Captured sampling steps, reusable across ``gradguide.sample`` calls.

    Pass ``graph=GraphCache()`` to keep captures between calls (e.g. the rounds of
    :func:`gradguide.experiments.optimize.optimize`); ``graph=True`` uses a fresh cache for one call.
    ``emulate=True`` runs the same bookkeeping without CUDA (for tests).
    """

    def __init__(self, emulate: bool = False):
        self.emulate = emulate
        self._entries: Dict[tuple, tuple] = {}
        self.captures = 0
        self.reuses = 0

    def stepper(self, run, step: Callable) -> GraphStepper:
        """The stepper of ``run``, replaying ``step`` (:func:`gradguide.sampling.step`)."""
        sig = runkey.graph_key(run)
        entry = self._entries.get(sig)
        if entry is not None:
            captured_run, captures, _model = entry
            if captured_run.model is run.model:
                self._load(captured_run, run)
                self.reuses += 1
                return _Counting(GraphStepper(captured_run, step, captures, self.emulate), self)
        captures: Dict = {}
        self._entries[sig] = (run, captures, run.model)   # keeps the model alive: ids stay unique
        return _Counting(GraphStepper(run, step, captures, self.emulate), self)

    @staticmethod
    def _load(captured_run, run) -> None:
        """Copy the new run's values into the tensors the captured steps read."""
        old, new = _run_tensors(captured_run), _run_tensors(run)
        if old.keys() != new.keys():
            raise RuntimeError("graph cache: tensor layout changed under an equal signature (a bug; please report)")
        for key, value in new.items():
            old[key].copy_(value)
        captured_run.generator = run.generator


class _Counting:
    """Adds the stepper's captures to the cache's count."""

    def __init__(self, stepper: GraphStepper, cache: GraphCache):
        self.stepper, self.cache = stepper, cache

    def __call__(self, *args):
        before = self.stepper.captured
        out = self.stepper(*args)
        self.cache.captures += self.stepper.captured - before
        return out

    def finish(self, x):
        return self.stepper.finish(x)
