"""Flow-matching samplers (diffusers' ``FlowMatchEulerDiscreteScheduler``,
``FlowMatchHeunDiscreteScheduler``, ``FlowMatchLCMScheduler``), as scalar tables.

A flow model sees ``x_σ = (1 − σ) x_0 + σ ε`` and predicts the velocity ``u = ε − x_0``
(:mod:`gradguide.predictions`), so ``dx_σ/dσ = u = (x_σ − D)/σ`` with ``D = x̂_0``. The steps
are written in flow coordinates and stored, like every sampler, for the variance-preserving
state ``x = x_σ / R`` with ``R = √((1−σ)² + σ²)``: a flow step
``x_σ' = f_x x_σ + f_0 D + Σ f_k S_k`` has ``c_x = f_x R/R'``, ``c_0 = f_0/R'``, and a carried
sample stored at ``σ_j`` the coefficient ``f_k R_j/R'`` (``R'`` at the step's target σ).

- ``flow-euler``: ``x_σ' = x_σ + (σ' − σ) u = (σ'/σ) x_σ + (1 − σ'/σ) D`` (the same step as
  DDIM(0) on the flow's ᾱ grid); ``stochastic=True`` (diffusers' ``stochastic_sampling``):
  ``x_σ' = (1 − σ') D + σ' z``.
- ``flow-lcm``: ``x_σ' = (1 − σ') D + σ' z`` (``FlowMatchLCMScheduler``).
- ``flow-heun``: two evaluations per step (2n − 1 for n steps; the step to σ = 0 is Euler
  only): the Euler step to ``x̃`` at ``σ_{i+1}``, then
  ``x_{i+1} = x_i + (σ_{i+1} − σ_i)/2 · (u_1 + u_2)`` with ``u_1 = (x_i − D_1)/σ_i``,
  ``u_2 = (x̃ − D_2)/σ_{i+1}`` (Heun on ``dx_σ/dσ``; not k-diffusion's Heun, which integrates
  in ``σ/(1−σ)``). Slots: ``D_1`` and ``x_i``, as in :mod:`gradguide.samplers.ksigma`.
"""
from __future__ import annotations

import torch

from ..schedules import Timesteps, flow_sigma
from . import SamplerTables, common_tables


def _radius(sig: torch.Tensor) -> torch.Tensor:
    return ((1 - sig) ** 2 + sig ** 2).sqrt()


def tables(name: str, ts: Timesteps, **options) -> SamplerTables:
    stochastic = options.pop("stochastic", False) if name == "flow-euler" else name == "flow-lcm"
    if options:
        raise ValueError(f"sampler {name!r}: unknown options {sorted(options)}"
                         + (" (flow-euler takes stochastic)" if name == "flow-euler" else ""))
    if not isinstance(stochastic, bool):
        raise TypeError(f"sampler {name!r}: stochastic: expected True or False, got {stochastic!r}")
    if name == "flow-heun":
        return _heun(ts)
    sig_s, sig_t = flow_sigma(ts.abar), flow_sigma(ts.abar_prev)
    r_s, r_t = _radius(sig_s), _radius(sig_t)
    t = common_tables(ts)
    if stochastic:
        sigma = sig_t / r_t
        t.update(c_x=torch.zeros_like(sig_s), c_0=(1 - sig_t) / r_t, sigma=sigma, var_mean=sigma ** 2)
        return SamplerTables(name, ts, t, draws_noise=(sigma > 0).tolist())
    ratio = sig_t / sig_s
    zeros = torch.zeros_like(sig_s)
    t.update(c_x=ratio * r_s / r_t, c_0=(1 - ratio) / r_t, sigma=zeros, var_mean=zeros.clone())
    return SamplerTables(name, ts, t, draws_noise=[False] * len(ts))


def _heun(ts: Timesteps) -> SamplerTables:
    n = len(ts)
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]])            # ᾱ at σ_0 .. σ_n
    sig = flow_sigma(abar)
    r = _radius(sig)
    rows = []   # (t, ᾱ at the evaluation, ᾱ the output is at, coefficients)
    for i in range(n):
        dt = sig[i + 1] - sig[i]
        euler = {"c_x": sig[i + 1] / sig[i] * r[i] / r[i + 1], "c_0": (1 - sig[i + 1] / sig[i]) / r[i + 1]}
        rows.append((ts.t[i], abar[i], abar[i + 1], euler))
        if sig[i + 1] == 0:
            continue
        if i + 1 >= n:
            raise ValueError("sampler 'flow-heun': the last σ must be 0 (the second stage at the final σ has no "
                             "timestep; diffusers' FlowMatchHeunDiscreteScheduler ends with an Euler step to σ = 0)")
        k_i, k_n = dt / (2 * sig[i]), dt / (2 * sig[i + 1])
        rows.append((ts.t[i + 1], abar[i + 1], abar[i + 1],
                     {"c_x": k_n, "c_0": -k_n / r[i + 1], "c_x0_prev": -k_i / r[i + 1],
                      "c_x_carry": (1 + k_i) * r[i] / r[i + 1]}))
    evals = Timesteps(torch.stack([torch.as_tensor(row[0]) for row in rows]),
                      torch.stack([row[1] for row in rows]), torch.stack([row[2] for row in rows]),
                      init_scale=ts.init_scale, final_scale=ts.final_scale)
    t = common_tables(evals)
    for key in ("c_x", "c_0", "c_x0_prev", "c_x_carry"):
        t[key] = torch.stack([torch.as_tensor(row[3].get(key, 0.0), dtype=torch.float64) for row in rows])
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    t.update(sigma=zeros, var_mean=zeros.clone())
    return SamplerTables("flow-heun", evals, t, slots=("x0_prev", "x_carry"), moves={"x0_prev": "0", "x_carry": "x"},
                         draws_noise=[False] * len(rows))
