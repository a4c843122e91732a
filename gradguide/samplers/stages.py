"""Multi-evaluation σ-space steps as scalar tables, with named σ-space slots.

A sampler whose step calls the model several times and combines what it saw (Heun++'s three
derivatives, SEEDS-3's three predictions and its carried noise) is a list of evaluations
(:class:`Stage`). Each reads the σ-space sample it is called on (``"x"``), its prediction
(``"0"``) and named slots holding σ-space tensors from earlier evaluations, and writes

- the σ-space sample of the next evaluation: ``Σ out[k] · source_k + noise · z``, stored at the
  next evaluation's σ (the last at the final listed σ);
- each slot it names in ``keep`` (``{slot: {source: weight}}``); other slots are carried as they are.

A stage with ``vp=True`` is written on the variance-preserving sample instead (``"x"`` is the
sample the model is called on and the output is the next one, both ``x = x_σ/√(1+σ²)``): PNDM's
transfer is written there, and it stays finite at ``σ = ∞`` (ᾱ = 0). ``t`` is the model
timestep of a stage off the listed σ's when the method fixes it (PNDM's Runge–Kutta warm-up calls
the model at integer timesteps between the listed ones); otherwise ``sigma_to_t`` gives it.

:func:`tables` turns the stages into variance-preserving tables (``x = x_σ/√(1+σ²)``, see
:mod:`gradguide.samplers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables


@dataclass
class Stage:
    sigma: float                                  # where the model is called
    grid: Optional[int]                           # index into the listed σ's when it is one of them
    out: Dict[str, float]                         # σ-space weights of "x", "0" and slots in the output
    keep: Dict[str, Dict[str, float]] = field(default_factory=dict)
    noise: float = 0.0
    noise_sigmas: Tuple[float, float] = (0.0, 0.0)
    vp: bool = False                              # weights on the variance-preserving sample (above)
    t: Optional[float] = None                     # the model timestep of a stage off the grid, when fixed


def _a(s: float) -> float:
    return 1 / math.sqrt(1 + s * s)


def tables(name: str, ts: Timesteps, stages: List[Stage], slots: Sequence[str], last_sigma: float,
           first_sigma: float, initial_noise: float = 0.0, initial_noise_sigmas: tuple = ()) -> SamplerTables:
    """``last_sigma``: where the last stage's output lies; ``first_sigma``: the first stage's σ
    (x_T enters as ``σ_0 x_T``, moved there); ``initial_noise``: σ-space noise on the initial latent."""
    need = [s.sigma for s in stages if s.grid is None and s.t is None]
    if need and ts.sigma_to_t is None:
        raise ValueError(f"sampler {name!r} calls the model between the listed σ's (at σ = {need[0]:.6g}), which needs "
                         "the σ -> timestep map: pass sigmas= to gradguide.sample (or Timesteps with sigma_to_t)")
    between = iter(torch.as_tensor(ts.sigma_to_t(torch.tensor(need, dtype=torch.float64)), dtype=torch.float64)
                   .reshape(-1).tolist()) if need else iter(())
    t_eval = torch.tensor([float(ts.t[s.grid]) if s.grid is not None else float(s.t) if s.t is not None
                           else next(between) for s in stages], dtype=torch.float64)
    if ts.t.dtype == torch.int64 and torch.equal(t_eval, t_eval.round()):
        t_eval = t_eval.to(torch.int64)
    out_sigma = [s.sigma for s in stages[1:]] + [last_sigma]
    n = len(stages)
    keys = ["c_x", "c_0", "sigma"] + ["c_" + k for k in slots]
    keys += [f"u_{k}_{src}" for k in slots for src in ("x", "0") + tuple(slots)]
    cols = {k: [0.0] * n for k in keys}
    for j, (stage, so) in enumerate(zip(stages, out_sigma)):
        a_in, a_out = (1.0, 1.0) if stage.vp else (_a(stage.sigma), _a(so))
        # a source "x" is the σ-space sample x_vp/a_in; slots hold σ-space tensors already
        scale = {"x": 1 / a_in, "0": 1.0, **{k: 1.0 for k in slots}}
        for src, w in stage.out.items():
            cols["c_" + src][j] = a_out * w * scale[src]
        cols["sigma"][j] = a_out * stage.noise
        for slot in slots:
            update = stage.keep.get(slot, {slot: 1.0})
            for src, w in update.items():
                cols[f"u_{slot}_{src}"][j] = w * scale[src]
    abar = torch.tensor([1 / (1 + s.sigma ** 2) for s in stages], dtype=torch.float64)
    abar_out = torch.tensor([1 / (1 + s ** 2) for s in out_sigma], dtype=torch.float64)
    if last_sigma == 0:
        abar_out[-1] = 1.0
    abar0 = float(ts.abar[0])
    sig0 = math.sqrt((1 - abar0) / abar0) if abar0 > 0 else math.inf
    # x_T moved from the first listed σ to the first stage's (the same σ: no change, also at σ = ∞)
    moved = 1.0 if first_sigma == sig0 else _a(first_sigma) / _a(sig0)
    evals = Timesteps(t_eval, abar, abar_out, init_scale=ts.init_scale * moved,
                      final_scale=ts.final_scale, sigma_to_t=ts.sigma_to_t)
    t = common_tables(evals)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    out = SamplerTables(name, evals, t, slots=tuple(slots), draws_noise=[s.noise > 0 for s in stages],
                        noise_sigmas=[s.noise_sigmas for s in stages])
    if initial_noise:
        out.initial_noise = _a(first_sigma) * initial_noise
        out.initial_noise_sigmas = initial_noise_sigmas
    return out
