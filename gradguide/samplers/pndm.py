"""PNDM with its Runge–Kutta warm-up (``pndm``: diffusers' ``PNDMScheduler``, whose default is
``skip_prk_steps=False``) and diffusers' improved PNDM (``ipndm_diffusers``: ``IPNDMScheduler``), as
variance-preserving stages (:mod:`gradguide.samplers.stages`, ``vp=True``).

Both step with PNDM's transfer (Liu et al., ICLR 2022, eq. 9), which is DDIM's step with a given ε̃:
``φ(x; ᾱ → ᾱ_p; ε̃) = √(ᾱ_p/ᾱ) x − (ᾱ_p − ᾱ) ε̃ / (ᾱ √(1−ᾱ_p) + √(ᾱ (1−ᾱ) ᾱ_p))``
(:mod:`gradguide.samplers.plms` has its Adams–Bashforth body).

``pndm`` on the visited timesteps ``τ_0 > τ_1 > ...`` (n ≥ 4), with ``R = ⌊T/n⌋`` and
``H = ⌊R/2⌋`` (T the schedule's training steps, as diffusers computes them):

- three Runge–Kutta steps ``τ_m → τ_{m+1}`` (m = 0, 1, 2), four model calls each: ``e_1`` at
  ``τ_m`` on ``x``; ``e_2`` at ``M = τ_{m+1} + H`` on ``φ(x; τ_m → τ_m − H; e_1)``; ``e_3`` at ``M`` on
  ``φ(x; τ_m → M; e_2)``; ``e_4`` at ``τ_{m+1}`` on ``φ(x; τ_m → τ_{m+1}; e_3)``; the step is
  ``φ(x; τ_m → τ_{m+1}; (e_1 + 2e_2 + 2e_3 + e_4)/6)``. Where ``τ_m − τ_{m+1} ≠ 2H`` (an odd
  ``R``, or another spacing) the second call sees a sample at ``ᾱ(τ_m − H)`` but the timestep ``M``:
  diffusers' own rule, kept.
- from ``τ_3`` on, PLMS with the fourth-order weights at once: the history is the ``e_1`` of the
  three Runge–Kutta steps; each step moves to the ᾱ the schedule says (``abar_prev``).

``combine="v"``: the model's raw outputs are v's; PNDM combines them and converts the
combination with the step's start sample and ᾱ (``ε̃ = √ᾱ ṽ + √(1−ᾱ) x``), as diffusers does. The
midpoint's ᾱ is read from the training table of the schedule the timesteps come from (their
``sigma_to_t``'s schedule: :meth:`gradguide.Schedule.timesteps` and ``from_diffusers`` attach it).

``ipndm_diffusers`` (Zhang & Chen 2023's iPNDM as diffusers writes it, on its own time grid, see
:class:`gradguide.integrations.diffusers_ipndm.IPNDMSchedule`): with ``α_k = √ᾱ_k``,
``σ_k = √(1−ᾱ_k)``, the model's raw output ``o_k`` (a v) gives ``ε_k = σ_k x_k + α_k o_k``;
``ε̃`` is Adams–Bashforth's equal-step combination of the last ``min(k + 1, 4)`` of them and
``x_{k+1} = α_{k+1} (x_k − σ_k ε̃)/max(α_k, 10⁻⁸) + σ_{k+1} ε̃``. At ``ᾱ_0 = 0`` (its first step,
σ = ∞) this is ``x_1 = σ_1 x_0``: the model's first output is multiplied by ``α_0 = 0`` and the
floor 10⁻⁸ turns ``(x − ε_0)/α_0`` into ``0/10⁻⁸`` (the exact limit would be the model's x̂_0);
``ε_0 = x_0`` still enters the history. Every other step is ``φ`` with ``ε̃``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from ..schedules import Schedule, Timesteps
from . import SamplerTables
from . import stages as _stages
from .plms import WEIGHTS as AB   # Adams–Bashforth's equal-step weights, PLMS's

RK = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


def _sigma(abar: float) -> float:
    return math.sqrt((1 - abar) / abar) if abar > 0 else math.inf


def _add(into: Dict[str, float], terms: Dict[str, float], w: float = 1.0) -> Dict[str, float]:
    for k, v in terms.items():
        into[k] = into.get(k, 0.0) + w * v
    return into


def _raw(abar: float, combine: str) -> Dict[str, float]:
    """The model's raw output (ε or v) over the evaluated sample x and its x̂_0 (gradguide's D), at ᾱ
    clamped as the step's own conversion clamps it (gradguide.samplers.common_tables)."""
    a = math.sqrt(max(abar, 1e-16))
    s = math.sqrt(1 - max(abar, 1e-16))
    return {"x": 1 / s, "0": -a / s} if combine == "eps" else {"x": a / s, "0": -1 / s}


def _transfer(start: str, abar: float, abar_p: float, comb: Dict[str, float], combine: str) -> Dict[str, float]:
    """φ(start; ᾱ → ᾱ_p; ε̃) over the basis, ``comb`` the combined raw output (v: converted with the
    start sample and ᾱ)."""
    eps = dict(comb)
    if combine == "v":
        eps = {k: math.sqrt(abar) * v for k, v in eps.items()}
        _add(eps, {start: math.sqrt(1 - abar)})
    denom = abar * math.sqrt(1 - abar_p) + math.sqrt(abar * (1 - abar) * abar_p)
    out = {k: -(abar_p - abar) / denom * v for k, v in eps.items()}
    return _add(out, {start: math.sqrt(abar_p / abar)})


def _training_abar(ts: Timesteps) -> torch.Tensor:
    """The training table of the schedule the timesteps come from: the owner of their ``sigma_to_t``
    (the setup cache keys a run by that same table, gradguide.runkey)."""
    owner = getattr(ts.sigma_to_t, "__self__", None)
    if not isinstance(owner, Schedule):
        raise ValueError("sampler 'pndm': its Runge–Kutta warm-up calls the model at timesteps between the listed "
                         "ones, whose ᾱ comes from the schedule's training table: use timesteps from a gradguide "
                         "Schedule or from_diffusers (steps=N), not hand-made Timesteps")
    return owner.alphas_cumprod


def tables(ts: Timesteps, combine: str = "eps") -> SamplerTables:
    if combine not in ("eps", "v"):
        raise ValueError(f"sampler 'pndm': combine: expected 'eps' or 'v', got {combine!r}")
    n = len(ts)
    if n < 4:
        raise ValueError(f"sampler 'pndm': needs at least 4 steps (three Runge–Kutta steps, then PLMS from the fourth "
                         f"timestep; diffusers' PNDMScheduler cannot set fewer either), got {n}")
    if ts.t.dtype != torch.int64:
        raise ValueError("sampler 'pndm': its Runge–Kutta warm-up calls the model at integer training timesteps "
                         "between the listed ones: it needs integer timesteps (steps=N), not σ-space ones")
    if (ts.abar == 0).any() or (ts.abar_prev == 0).any():
        raise ValueError("sampler 'pndm': needs ᾱ > 0 at every visited step (its transfer divides by ᾱ); use "
                         "sampler='ddim' for zero terminal SNR")
    table = _training_abar(ts)
    T = int(table.numel())
    H = (T // n) // 2
    grid = [int(v) for v in ts.t.tolist()]

    def abar_at(t: int) -> float:
        if not 0 <= t < T:
            raise ValueError(f"sampler 'pndm': the Runge–Kutta warm-up needs timestep {t}, outside [0, {T - 1}]")
        return float(table[t])
    slots = ("xs", "acc", "e1", "e2", "e3")
    history = {"e1": None, "e2": {"e1": 1.0}, "e3": {"e2": 1.0}}   # e1 <- this output, e2 <- e1, e3 <- e2
    rows = []
    for m in range(3):
        d, c = grid[m], grid[m + 1]
        mid = c + H
        abar_d, abar_c = float(ts.abar[m]), float(ts.abar[m + 1])
        # (model timestep, grid index, ᾱ there, the sample the transfer starts from, its target ᾱ, RK weight)
        calls = [(d, m, abar_d, "x", abar_at(d - H)), (mid, None, abar_at(mid), "xs", abar_at(mid)),
                 (mid, None, abar_at(mid), "xs", abar_c), (c, m + 1, abar_c, "xs", abar_c)]
        for j, (t, grid_index, abar, start, target) in enumerate(calls):
            raw = _raw(abar, combine)
            keep = {}
            if j == 0:   # the step's start sample and its first output (kept for PLMS too)
                keep = {"xs": {"x": 1.0}, "acc": {k: RK[0] * v for k, v in raw.items()},
                        **{k: (dict(raw) if v is None else v) for k, v in history.items()}}
                comb, start = dict(raw), "x"
            elif j < 3:
                keep = {"acc": _add({"acc": 1.0}, raw, RK[j])}
                comb = dict(raw)
            else:
                comb = _add({"acc": 1.0}, raw, RK[3])
            out = _transfer(start, abar_d, target, comb, combine)
            rows.append(_stages.Stage(_sigma(abar), grid_index, out, keep=keep, vp=True,
                                      t=None if grid_index is not None else t))
    for i in range(3, n):
        abar, abar_p = float(ts.abar[i]), float(ts.abar_prev[i])
        raw = _raw(abar, combine)
        w = AB[4]
        comb = _add({"e1": w[1], "e2": w[2], "e3": w[3]}, raw, w[0])
        keep = {k: (dict(raw) if v is None else v) for k, v in history.items()}
        rows.append(_stages.Stage(_sigma(abar), i, _transfer("x", abar, abar_p, comb, combine), keep=keep, vp=True))
    return _stages.tables("pndm", ts, rows, slots, _sigma(float(ts.abar_prev[-1])), _sigma(float(ts.abar[0])))


def ipndm_tables(ts: Timesteps) -> SamplerTables:
    """diffusers' ``IPNDMScheduler`` step on ``ts`` (its own grid: ``IPNDMSchedule``); see the module."""
    n = len(ts)
    alpha = ts.abar.clamp_min(0).sqrt().tolist() + [math.sqrt(float(ts.abar_prev[-1]))]
    sigma = (1 - ts.abar).clamp_min(0).sqrt().tolist() + [math.sqrt(1 - float(ts.abar_prev[-1]))]
    slots = ("e1", "e2", "e3")
    rows = []
    for k in range(n):
        v = _raw(float(ts.abar[k]), "v")
        eps = {"x": sigma[k] + alpha[k] * v["x"], "0": alpha[k] * v["0"]}   # σ_k x + α_k o_k
        w = AB[min(k + 1, 4)]
        comb = _add({s: wj for s, wj in zip(slots, w[1:])}, eps, w[0])
        floor = max(alpha[k], 1e-8)
        # α' (x − σ ε̃)/max(α, 1e-8) + σ' ε̃
        out = {key: (sigma[k + 1] - alpha[k + 1] * sigma[k] / floor) * val for key, val in comb.items()}
        _add(out, {"x": alpha[k + 1] / floor})
        keep = {"e1": eps, "e2": {"e1": 1.0}, "e3": {"e2": 1.0}}
        rows.append(_stages.Stage(_sigma(float(ts.abar[k])), k, out, keep=keep, vp=True))
    last = _sigma(float(ts.abar_prev[-1]))
    return _stages.tables("ipndm_diffusers", ts, rows, slots, last, _sigma(float(ts.abar[0])))
