"""PLMS, the pseudo linear multistep method of PNDM (Liu et al., ICLR 2022), as diffusers'
``PNDMScheduler(skip_prk_steps=True)`` runs it (Stable Diffusion 1.x's default scheduler).

Each step applies PNDM's transfer ``φ``
``x_prev = √(ᾱ_p/ᾱ) x − (ᾱ_p − ᾱ) ε̃ / (ᾱ √(1−ᾱ_p) + √(ᾱ (1−ᾱ) ᾱ_p))`` with ``ε̃`` a
linear-multistep combination of the current and previous ε's: ``ε``,
``(3ε − ε_{−1})/2``, ``(23ε − 16ε_{−1} + 5ε_{−2})/12``,
``(55ε − 59ε_{−1} + 37ε_{−2} − 9ε_{−3})/24``. The first step is taken twice (n + 1
model evaluations for n steps): an Euler-like step gives ``x̃``; the model at ``x̃`` gives
``ε'`` and the step is redone from the first sample with ``(ε + ε')/2``; ``ε'`` is not kept.

Everything is linear in ``(x, x̂_0, previous outputs, x_first)``: slots ``e1..e4`` carry the
last four outputs (shifted at every evaluation, so only ``e1`` is computed; the repeated
evaluation's output is kept but never weighted) and ``first`` the first sample. ``combine="eps"`` (default) combines ε's;
``combine="v"`` combines the v-predictions and converts the combination with the current
sample, as diffusers does for v-prediction models.
"""
from __future__ import annotations

import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables

SLOTS = ("e1", "e2", "e3", "e4", "first")
WEIGHTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _kept(counter: int):
    """Slots holding the outputs PNDM keeps before evaluation ``counter`` (≥ 2), most recent first:
    evaluations counter−1, ..., 2 and 0 (evaluation 1's output is never kept); slot e_j holds the
    output of evaluation counter − j."""
    return [f"e{j}" for j in range(1, counter - 1)] + [f"e{counter}"]


def tables(ts: Timesteps, combine: str = "eps") -> SamplerTables:
    if combine not in ("eps", "v"):
        raise ValueError(f"plms: combine: expected 'eps' or 'v', got {combine!r}")
    if (ts.abar == 0).any():
        raise ValueError("plms: needs ᾱ > 0 at every visited step (ε-space steps); use sampler='ddim' for zero "
                         "terminal SNR")
    n = len(ts)
    # evaluations: (index of the model timestep, index of the step taken (from/to), counter)
    evals = [(0, 0, 0)] + ([(1, 0, 1)] if n > 1 else []) + [(k, k, k + 1) for k in range(1, n)]
    basis = ("x", "0") + SLOTS
    rows = []
    for m_idx, s_idx, counter in evals:
        abar_m = float(ts.abar[m_idx])                                        # where the model is called
        abar_s, abar_p = float(ts.abar[s_idx]), float(ts.abar_prev[s_idx])   # the step taken
        a_m, s_m = abar_m ** 0.5, (1 - abar_m) ** 0.5
        # the current raw output (ε or v) as p_x x + p_0 x̂_0 at the evaluated sample
        p_x, p_0 = (1 / s_m, -a_m / s_m) if combine == "eps" else (a_m / s_m, -1 / s_m)
        if counter == 1:                     # (output' + output_0)/2, from the first sample
            weights, previous, sample = [0.5, 0.5], ["e1"], "first"
        else:
            previous = _kept(counter)[:3] if counter >= 2 else []
            weights, sample = WEIGHTS[len(previous) + 1], "x"
        comb = {k: 0.0 for k in basis}       # the combined output over the basis
        comb["x"], comb["0"] = weights[0] * p_x, weights[0] * p_0
        for slot, w in zip(previous, weights[1:]):
            comb[slot] += w
        if combine == "v":                   # ε̃ = √ᾱ ṽ + √(1−ᾱ) x_sample at the step's ᾱ (diffusers)
            comb = {k: abar_s ** 0.5 * v for k, v in comb.items()}
            comb[sample] += (1 - abar_s) ** 0.5
        denom = abar_s * (1 - abar_p) ** 0.5 + (abar_s * (1 - abar_s) * abar_p) ** 0.5
        out = {k: -(abar_p - abar_s) / denom * v for k, v in comb.items()}
        out[sample] += (abar_p / abar_s) ** 0.5
        rows.append((ts.t[m_idx], abar_m, abar_p, out, p_x, p_0))
    evts = Timesteps(torch.stack([torch.as_tensor(r[0]) for r in rows]),
                     torch.tensor([r[1] for r in rows], dtype=torch.float64),
                     torch.tensor([r[2] for r in rows], dtype=torch.float64),
                     init_scale=ts.init_scale, final_scale=ts.final_scale)
    t = common_tables(evts)
    col = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    for k in basis:
        t["c_" + k] = col([r[3][k] for r in rows])
    t["u_e1_x"], t["u_e1_0"] = col([r[4] for r in rows]), col([r[5] for r in rows])   # e1 ← this output
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    t.update(sigma=zeros, var_mean=zeros.clone())
    # e2..e4 shift, `first` copies x (read only by the repeated evaluation, before it is overwritten)
    moves = {"e2": "e1", "e3": "e2", "e4": "e3", "first": "x"}
    return SamplerTables("plms", evts, t, slots=SLOTS, moves=moves, draws_noise=[False] * len(rows))
