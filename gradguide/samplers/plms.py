"""PLMS, the pseudo linear multistep method of PNDM (Liu et al., ICLR 2022), as diffusers'
``PNDMScheduler(skip_prk_steps=True)`` runs it (Stable Diffusion 1.x's default scheduler).

Each step applies PNDM's transfer ``φ``
``x_prev = √(ᾱ_p/ᾱ) x − (ᾱ_p − ᾱ) ε̃ / (ᾱ √(1−ᾱ_p) + √(ᾱ (1−ᾱ) ᾱ_p))`` with ``ε̃`` a
linear-multistep combination of the current and previous ε's: ``ε``,
``(3ε − ε_{−1})/2``, ``(23ε − 16ε_{−1} + 5ε_{−2})/12``,
``(55ε − 59ε_{−1} + 37ε_{−2} − 9ε_{−3})/24``. The first step is taken twice (n + 1
model evaluations for n steps): an Euler-like step gives ``x̃``; the model at ``x̃`` gives
``ε'`` and the step is redone from the first sample with ``(ε + ε')/2``; ``ε'`` is not kept.

Everything is linear in ``(x, x̂_0, ε_{−1}, ε_{−2}, ε_{−3}, x_first)``: the slots carry the
previous outputs and the first sample. ``combine="eps"`` (default) combines ε's;
``combine="v"`` combines the v-predictions and converts the combination with the current
sample, as diffusers does for v-prediction models.
"""
from __future__ import annotations

import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables

SLOTS = ("e1", "e2", "e3", "first")
WEIGHTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def tables(ts: Timesteps, combine: str = "eps") -> SamplerTables:
    if combine not in ("eps", "v"):
        raise ValueError(f"plms: combine: expected 'eps' or 'v', got {combine!r}")
    if (ts.abar == 0).any():
        raise ValueError("plms: needs ᾱ > 0 at every visited step (ε-space steps); use sampler='ddim' for zero "
                         "terminal SNR")
    n = len(ts)
    # evaluations: (index of the model timestep, index of the step it takes (from/to), counter)
    evals = [(0, 0, 0)] + ([(1, 0, 1)] if n > 1 else []) + [(k, k, k + 1) for k in range(1, n)]
    rows = []
    stored = 0   # how many ε's are kept before this evaluation
    for m_idx, s_idx, counter in evals:
        abar_m = float(ts.abar[m_idx])                  # where the model is called
        abar_s, abar_p = float(ts.abar[s_idx]), float(ts.abar_prev[s_idx])   # the step taken
        a_m, s_m = abar_m ** 0.5, (1 - abar_m) ** 0.5
        # the current raw output (ε or v) as p_x x + p_0 x̂_0 at the evaluated sample
        p_x, p_0 = (1 / s_m, -a_m / s_m) if combine == "eps" else (a_m / s_m, -1 / s_m)
        if counter == 1:                                # (ε' + ε_{−1})/2, from the first sample
            w, sample = {"cur": 0.5, "e1": 0.5}, "first"
        else:
            order = min(stored + 1, 4)
            w = dict(zip(["cur", "e1", "e2", "e3"], WEIGHTS[order]))
            sample = "x"
        r = {k: 0.0 for k in ("x", "0") + SLOTS}
        # ε̃ as coefficients over the basis
        eps = {k: 0.0 for k in r}
        eps["x"] += w.get("cur", 0.0) * p_x
        eps["0"] += w.get("cur", 0.0) * p_0
        for k in ("e1", "e2", "e3"):
            eps[k] += w.get(k, 0.0)
        if combine == "v":                              # ε̃ = √ᾱ ṽ + √(1−ᾱ) x_sample, at the step's ᾱ
            eps = {k: abar_s ** 0.5 * v for k, v in eps.items()}
            eps[sample] += (1 - abar_s) ** 0.5
        sample_coeff = (abar_p / abar_s) ** 0.5
        denom = abar_s * (1 - abar_p) ** 0.5 + (abar_s * (1 - abar_s) * abar_p) ** 0.5
        out = {k: -(abar_p - abar_s) / denom * v for k, v in eps.items()}
        out[sample] += sample_coeff
        # slot updates: keep the new ε (not on the repeated evaluation), remember the first sample
        upd = {}
        if counter == 1:
            upd.update({"e1": {"e1": 1.0}, "e2": {"e2": 1.0}, "e3": {"e3": 1.0}})
        else:
            upd.update({"e1": {"x": p_x, "0": p_0}, "e2": {"e1": 1.0}, "e3": {"e2": 1.0}})
            stored += 1
        upd["first"] = {"x": 1.0} if counter == 0 else {"first": 1.0}
        rows.append((ts.t[m_idx], abar_m, abar_p, out, upd))
    t_eval = torch.stack([torch.as_tensor(r[0]) for r in rows])
    evts = Timesteps(t_eval, torch.tensor([r[1] for r in rows], dtype=torch.float64),
                     torch.tensor([r[2] for r in rows], dtype=torch.float64),
                     init_scale=ts.init_scale, final_scale=ts.final_scale)
    t = common_tables(evts)
    col = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    t["c_x"], t["c_0"] = col([r[3]["x"] for r in rows]), col([r[3]["0"] for r in rows])
    for slot in SLOTS:
        t["c_" + slot] = col([r[3][slot] for r in rows])
        for src in ("x", "0") + SLOTS:
            t[f"u_{slot}_{src}"] = col([r[4][slot].get(src, 0.0) for r in rows])
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    t.update(sigma=zeros, var_mean=zeros.clone())
    return SamplerTables("plms", evts, t, slots=SLOTS, draws_noise=[False] * len(rows))
