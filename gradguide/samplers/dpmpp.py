"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, Alg. 2; diffusers'
``DPMSolverMultistepScheduler``), as scalar tables.

With ``α = √ᾱ``, ``σ = √(1−ᾱ)``, ``λ = log(α/σ)``, step ``s → t``, ``h = λ_t − λ_s`` and
``r = h_{prev}/h``, data prediction ``D`` (``x̂_0``) and ``D_{−1}`` the previous one:

- ``dpmsolver++``: ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) D + B (D − D_{−1})/r`` with
  ``B = ½ α_t (1 − e^{−h})`` (``solver_type="midpoint"``) or ``α_t ((e^{−h} − 1)/h + 1)`` (``"heun"``);
- ``sde-dpmsolver++`` (``sde=True``): ``x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) D
  + B (D − D_{−1})/r + σ_t √(1 − e^{−2h}) z`` with ``B = ½ α_t (1 − e^{−2h})`` or
  ``α_t ((1 − e^{−2h})/(−2h) + 1)``.

First order (no ``D_{−1}`` term) on the first step, with ``solver_order=1``, and on the last
step when ``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps, or the last
step lands on clean data (σ_t = 0): diffusers' rules. The defaults are diffusers' defaults.
"""
from __future__ import annotations

import torch

from . import SamplerTables, common_tables

SOLVER_TYPES = ("midpoint", "heun")


def tables(ts, sde: bool = False, solver_order: int = 2, solver_type: str = "midpoint",
           lower_order_final: bool = True, euler_at_final: bool = False) -> SamplerTables:
    name = "dpmpp-2m-sde" if sde else "dpmpp-2m"
    if solver_order not in (1, 2):
        raise ValueError(f"{name}: solver_order: expected 1 or 2, got {solver_order!r} (order 3 is not implemented)")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{name}: solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    if (ts.abar == 0).any():
        raise ValueError(f"{name}: needs ᾱ > 0 at every visited step (λ = −∞ at zero terminal SNR); clamp ᾱ_T "
                         "as diffusers does (2**-24) or use sampler='ddim'")
    a_s, s_s = ts.abar.sqrt(), (1 - ts.abar).sqrt()
    a_t, s_t = ts.abar_prev.sqrt(), (1 - ts.abar_prev).sqrt()
    exp_neg_h = (s_t / a_t) / (s_s / a_s)  # e^{−h}, exactly 0 when landing on clean data
    n = len(ts)
    final_zero = bool(ts.abar_prev[-1] == 1.0)
    if sde:
        c_x = s_t / s_s * exp_neg_h
        c_0 = a_t * (1 - exp_neg_h ** 2)
        sigma = s_t * (1 - exp_neg_h ** 2).sqrt()
    else:
        c_x = s_t / s_s
        c_0 = a_t * (1 - exp_neg_h)
        sigma = torch.zeros_like(c_0)
    c_h = torch.zeros_like(c_0)   # on D_{−1}
    for i in range(1, n):
        last = i == n - 1
        if solver_order == 1 or (last and (euler_at_final or (lower_order_final and n < 15) or final_zero)):
            continue
        h = -torch.log(exp_neg_h[i])
        r = (torch.log(a_s[i] / s_s[i]) - torch.log(a_s[i - 1] / s_s[i - 1])) / h
        if solver_type == "midpoint":
            b = 0.5 * c_0[i]
        elif sde:
            b = a_t[i] * ((1 - exp_neg_h[i] ** 2) / (-2 * h) + 1)
        else:
            b = a_t[i] * ((exp_neg_h[i] - 1) / h + 1)
        c_0[i] = c_0[i] + b / r
        c_h[i] = -b / r
    t = common_tables(ts)
    t.update(c_x=c_x, c_0=c_0, c_x0_prev=c_h, sigma=sigma, var_mean=sigma ** 2)
    return SamplerTables(name, ts, t, slots=("x0_prev",), moves={"x0_prev": "0"},
                         draws_noise=[bool(s > 0) for s in sigma])
