"""One description of a run's configuration, for both caches that reuse work across calls.

- The setup cache (``sampling._finish_prepare``) keeps the sampler tables and the fused plan,
  which are *built from* the configuration's values: :func:`setup_key` keys tensors (timesteps)
  and parameters by value.
- The graph cache (:class:`gradguide.graphs.GraphCache`) keeps captured steps, which *read*
  tensors whose values a later run copies in: :func:`graph_key` keys tensors by layout, and adds
  what a capture holds fixed (the model, the shapes, the plan's stages, the model inputs' layout).

Both come from :func:`run_key`, so a setting cannot be part of one key and missing from the other.
"""
from __future__ import annotations

from typing import Optional

import torch

from .guidance.base import _signature_of
from .predictions import DynamicThreshold
from .schedules import Schedule


class Unkeyable(Exception):
    """A value the setup cache cannot describe immutably (the run is then built afresh)."""


def plain(value):
    """A key for an immutable plain value (a number, string, None or a tuple of them). The type
    is part of it (``True``, ``1`` and ``1.0`` are equal keys otherwise), and floats go by their
    repr (``-0.0`` and ``0.0`` too)."""
    if isinstance(value, float):
        return float, repr(value)
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device)):
        return type(value), value
    if isinstance(value, (tuple, list)):
        return tuple(plain(v) for v in value)
    if isinstance(value, DynamicThreshold):
        return type(value), plain(value.ratio), plain(value.max_value)
    raise Unkeyable


def term_key(term, by: str) -> tuple:
    """A guidance term's part of the key. ``by="values"``: its type and every parameter the
    traced plan can read, by value (callables and ``runtime_attributes`` are read only while a
    step runs, through the run's own term; a tensor may be held by the plan, e.g. a per-sample
    target: Unkeyable). ``by="layout"``: its graph signature (numbers by value, tensors by
    layout, callables by identity: a captured step calls the captured term's functions)."""
    if by == "layout":
        return type(term), term.graph_signature()
    skip = type(term).runtime_attributes
    return (type(term),) + tuple((name, plain(value)) for name, value in sorted(vars(term).items())
                                 if name not in skip and not callable(value))


def _timing(ts, by: str) -> tuple:
    if by == "layout":   # (sigma_to_t is read while the tables are built: their values, not the capture)
        return len(ts.t), ts.t.dtype
    if any(v.device.type != "cpu" for v in (ts.t, ts.abar, ts.abar_prev)):
        raise Unkeyable
    table = ts.alphas_cumprod   # the ᾱ table a TCD step reads between the timesteps
    if table is not None and table.device.type != "cpu":
        raise Unkeyable
    return (ts.t.dtype, ts.t.detach().numpy().tobytes(), ts.abar.dtype, ts.abar.detach().numpy().tobytes(),
            ts.abar_prev.detach().numpy().tobytes(), plain(ts.init_scale), plain(ts.final_scale),
            _sigma_to_t(ts.sigma_to_t), None if table is None else table.detach().numpy().tobytes())


def _sigma_to_t(fn) -> Optional[tuple]:
    """``Timesteps.sigma_to_t`` (samplers that call the model between the listed σ's read it): a
    schedule's own method by its training table, a function carrying a ``runkey`` name by that
    name; any other callable is Unkeyable."""
    if fn is None:
        return None
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, Schedule) and getattr(fn, "__func__", None) is Schedule.sigma_to_t:
        return "sigma_to_t", owner.alphas_cumprod.numpy().tobytes()
    named = getattr(fn, "runkey", None)   # a function of σ alone that names itself (EDM's c_noise = log(σ)/4)
    if isinstance(named, str):
        return "sigma_to_t", named
    raise Unkeyable


PROJECTION_FIELDS = ("policy", "delta", "delta2", "pcgrad", "convention", "granularity")


def run_key(run, by: str) -> tuple:
    """The configuration shared by both keys: sampler (name, timesteps, η, variance, options),
    device and dtype, prediction, variance channels, telemetry, clipping, the projection and
    every guidance term (:func:`term_key`). Raises Unkeyable (``by="values"`` only)."""
    cfg = run.sampler
    proj = run.projection
    terms = [run.branch] + run.score_terms + run.mean_terms + run.post_terms
    return (cfg.name, _timing(cfg.timesteps, by), plain(cfg.eta), cfg.variance,
            tuple(sorted((k, plain(v) if by == "values" else _signature_of(v)) for k, v in cfg.options.items())),
            run.device, run.dtype, run.prediction, run.variance_channels, run.telemetry, plain(run.clip), run.clip_eps,
            None if proj is None else (type(proj),) + tuple(plain(getattr(proj, n)) for n in PROJECTION_FIELDS),
            tuple(None if t is None else (t.place, term_key(t, by)) for t in terms))


def setup_key(run, fused: bool) -> Optional[tuple]:
    """The setup cache's key of ``run`` (``None``: not cached)."""
    if run.device.type == "meta":
        return None
    try:
        return run_key(run, "values") + (fused,)
    except Unkeyable:
        return None


def graph_key(run) -> tuple:
    """The graph cache's key: everything but tensor values that a captured step depends on."""
    return run_key(run, "layout") + (
        ("model", id(run.model)), tuple(run.shape), run.backend, run.groups, tuple(run.table_rows.shape),
        tuple(sorted(run.table_index.items())), run.timesteps_dev.dtype, _plan_layout(run.plan),
        _signature_of(run.cond), _signature_of(run.uncond), _signature_of(run.batched))


def _plan_layout(plan) -> Optional[tuple]:
    """The fused plan's stages as a capture replays them (operands, table rows, scalars' kinds)."""
    if plan is None:
        return None
    return tuple(plan.keys), tuple(
        (key, tuple((s.policy, tuple(s.operands), s.n_gram, tuple(s.vector_rows),
                     tuple(s.scalars),
                     s.clamp, s.output, s.per_group, s.scaling) for s in variant.stages))
        for key, variant in plan.variants.items())
