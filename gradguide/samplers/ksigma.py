"""σ-space (Karras / k-diffusion) samplers as variance-preserving steps: Euler, Euler
ancestral, Heun (Karras et al. 2022, Alg. 1 without churn; diffusers' ``EulerDiscrete``,
``EulerAncestralDiscrete`` and ``HeunDiscrete`` schedulers; k-diffusion's ``sample_euler``,
``sample_euler_ancestral``, ``sample_heun``).

In σ-space ``x_σ = x_0 + σ ε`` with ``σ = √((1−ᾱ)/ᾱ)``; the model sees ``x_σ/√(1+σ²)``, which
is gradguide's variance-preserving ``x = √ᾱ x_σ``. With ``a = √ᾱ`` at the current point
(subscript s) and the target (subscript t), and ``D`` the denoised prediction:

- Euler: ``x_σ' = (σ_t/σ_s) x_σ + (1 − σ_t/σ_s) D``, i.e. ``c_x = a_t σ_t/(a_s σ_s)``,
  ``c_0 = a_t (1 − σ_t/σ_s)`` (DDIM(0) on σ's grid).
- Euler ancestral: the same to ``σ_down`` plus ``s_noise σ_up z``,
  ``σ_up = min(σ_t, η √(σ_t² (σ_s² − σ_t²)/σ_s²))``, ``σ_down = √(σ_t² − σ_up²)`` (options ``eta``,
  default 1, and ``s_noise``, default 1, as k-diffusion's ``sample_euler_ancestral``).
- LMS (linear multistep, k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``):
  ``x_σ' = x_σ + Σ_k c_k d_{−k}`` over the current and up to ``order − 1`` previous
  derivatives ``d = (x_σ − D)/σ``, ``c_k = ∫_{σ_i}^{σ_{i+1}} ℓ_k(τ) dτ`` with ``ℓ_k`` the
  Lagrange basis polynomial on the σ's of those steps (integrated exactly here; diffusers uses
  ``scipy.integrate.quad``, exact for these polynomials). The previous derivatives are slots.
- Heun: two evaluations per step (2n − 1 for n steps: the step to σ = 0 is Euler only).
  The first is the Euler step to ``x̃`` at ``σ_{i+1}`` (carrying ``x_i``); the second, at
  ``x̃``, finishes ``x_{i+1} = x_i + (σ_{i+1} − σ_i)/2 · (d_1 + d_2)``,
  ``d_1 = (x_i − D_1)/σ_i``, ``d_2 = (x̃ − D_2)/σ_{i+1}``. Guidance applies at each
  evaluation (as a diffusers pipeline applies CFG at each model call); ``D_1`` is the guided
  prediction of the first evaluation.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables


def _sigma(abar: torch.Tensor) -> torch.Tensor:
    return ((1 - abar) / abar).sqrt()


def _nonnegative(name: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"sampler {name!r}: {key}: expected a finite number >= 0, got {value!r}")
    return float(value)


def tables(name: str, ts: Timesteps, **options) -> SamplerTables:
    order = options.pop("order", 4) if name == "lms" else None
    eta = _nonnegative(name, "eta", options.pop("eta", 1.0)) if name == "euler_a" else None
    s_noise = _nonnegative(name, "s_noise", options.pop("s_noise", 1.0)) if name == "euler_a" else None
    if options:
        raise ValueError(f"sampler {name!r}: unknown options {sorted(options)}")
    if (ts.abar == 0).any():
        raise ValueError(f"sampler {name!r}: needs ᾱ > 0 at every visited step (σ = ∞ at zero terminal SNR); clamp "
                         "ᾱ_T as diffusers does (2**-24) or use sampler='ddim'")
    if name == "heun":
        return _heun(ts)
    if name == "lms":
        return _lms(ts, order)
    a_s, a_t = ts.abar.sqrt(), ts.abar_prev.sqrt()
    sig_s, sig_t = _sigma(ts.abar), _sigma(ts.abar_prev)
    if name == "euler":
        ratio, up = sig_t / sig_s, torch.zeros_like(sig_s)
    else:
        # k-diffusion's get_ancestral_step: σ_up = min(σ_t, η √(σ_t² (σ_s² − σ_t²)/σ_s²))
        up = torch.minimum(sig_t, eta * (sig_t ** 2 * (sig_s ** 2 - sig_t ** 2) / sig_s ** 2).clamp_min(0).sqrt())
        ratio = (sig_t ** 2 - up ** 2).clamp_min(0).sqrt() / sig_s
    t = common_tables(ts)
    sigma = a_t * up * (s_noise if name == "euler_a" else 1.0)
    t.update(c_x=a_t * ratio / a_s, c_0=a_t * (1 - ratio), sigma=sigma, var_mean=sigma ** 2)
    return SamplerTables(name, ts, t, draws_noise=(sigma > 0).tolist())


def _heun(ts: Timesteps) -> SamplerTables:
    n = len(ts)
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]])            # ᾱ at σ_0 .. σ_n
    a, sig = abar.sqrt(), _sigma(abar)
    rows = []   # (t, ᾱ at the evaluation, ᾱ the output is at, coefficients)
    for i in range(n):
        dt = sig[i + 1] - sig[i]
        euler = {"c_x": a[i + 1] * sig[i + 1] / (a[i] * sig[i]), "c_0": a[i + 1] * (1 - sig[i + 1] / sig[i])}
        if sig[i + 1] == 0:
            rows.append((ts.t[i], abar[i], abar[i + 1], euler))
            continue
        if i + 1 >= n:
            raise ValueError("sampler 'heun': the last σ must be 0 (the second stage at the final σ has no timestep; "
                             "diffusers and k-diffusion both end Heun with an Euler step to σ = 0)")
        rows.append((ts.t[i], abar[i], abar[i + 1], euler))
        rows.append((ts.t[i + 1], abar[i + 1], abar[i + 1],
                     {"c_x": dt / (2 * sig[i + 1]), "c_0": -a[i + 1] * dt / (2 * sig[i + 1]),
                      "c_x0_prev": -a[i + 1] * dt / (2 * sig[i]),
                      "c_x_carry": a[i + 1] * (1 + dt / (2 * sig[i])) / a[i]}))
    t_eval = torch.stack([torch.as_tensor(r[0]) for r in rows])
    evals = Timesteps(t_eval, torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]),
                      init_scale=ts.init_scale, final_scale=ts.final_scale)
    t = common_tables(evals)
    for key in ("c_x", "c_0", "c_x0_prev", "c_x_carry"):
        t[key] = torch.stack([torch.as_tensor(r[3].get(key, 0.0), dtype=torch.float64) for r in rows])
    t.update(sigma=torch.zeros(len(rows), dtype=torch.float64), var_mean=torch.zeros(len(rows), dtype=torch.float64))
    # slots: D_1 of the first evaluation, and x_i (carried over the Euler half-step; copied at every
    # evaluation, read only by second stages)
    return SamplerTables("heun", evals, t, slots=("x0_prev", "x_carry"), moves={"x0_prev": "0", "x_carry": "x"},
                         draws_noise=[False] * len(rows))


def _lms_coefficient(sig, i: int, order: int, k: int) -> float:
    """``∫_{σ_i}^{σ_{i+1}} Π_{j ≠ k} (τ − σ_{i−j})/(σ_{i−k} − σ_{i−j}) dτ`` (j, k < order), exactly.
    In ``u = τ − σ_i``: the polynomial in τ itself would be evaluated at σ's much larger than the
    step and lose the step's digits to cancellation (1e-5 relative at a few hundred steps)."""
    p = np.poly1d([1.0])
    for j in range(order):
        if j != k:
            p = p * np.poly1d([1.0, -(sig[i - j] - sig[i])]) / (sig[i - k] - sig[i - j])
    return float(p.integ()(sig[i + 1] - sig[i]))


def _lms(ts: Timesteps, order: int) -> SamplerTables:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"sampler 'lms': order: expected an integer in [1, 4], got {order!r}")
    n = len(ts)
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]])
    a, sig = abar.sqrt().tolist(), _sigma(abar).tolist()
    slots = ("d1", "d2", "d3")[:order - 1]
    cols = {k: [] for k in ["c_x", "c_0"] + ["c_" + s for s in slots] + ["u_d1_x", "u_d1_0"]}
    for i in range(n):
        o = min(i + 1, order)
        coef = [_lms_coefficient(sig, i, o, k) for k in range(o)] + [0.0] * (order - o)
        p_x, p_0 = 1 / (a[i] * sig[i]), -1 / sig[i]   # d = (x_σ − D)/σ with x_σ = x/a
        cols["c_x"].append(a[i + 1] * (1 / a[i] + coef[0] * p_x))
        cols["c_0"].append(a[i + 1] * coef[0] * p_0)
        for k, slot in enumerate(slots, start=1):
            cols["c_" + slot].append(a[i + 1] * coef[k])
        cols["u_d1_x"].append(p_x)
        cols["u_d1_0"].append(p_0)
    t = common_tables(ts)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items() if k.startswith("c_") or slots})
    zeros = torch.zeros(n, dtype=torch.float64)
    t.update(sigma=zeros, var_mean=zeros.clone())
    moves = {"d2": "d1", "d3": "d2"}
    return SamplerTables("lms", ts, t, slots=slots, moves={k: v for k, v in moves.items() if k in slots},
                         draws_noise=[False] * n)
