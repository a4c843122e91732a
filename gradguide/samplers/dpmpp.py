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
step lands on clean data (σ_t = 0); with ``solver_order=3`` (DPM-Solver++(3M), Lu et al. 2022
§3.3 as diffusers writes it), second order on the second step and, with ``lower_order_final``
and fewer than 15 steps, on the second-to-last: diffusers' rules. The defaults are diffusers'.
"""
from __future__ import annotations

import torch

from . import SamplerTables, common_tables

SOLVER_TYPES = ("midpoint", "heun")


def tables(ts, sde: bool = False, solver_order: int = 2, solver_type: str = "midpoint",
           lower_order_final: bool = True, euler_at_final: bool = False) -> SamplerTables:
    name = "dpmpp-2m-sde" if sde else "dpmpp-2m"
    if solver_order not in (1, 2, 3):
        raise ValueError(f"{name}: solver_order: expected 1, 2 or 3, got {solver_order!r}")
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
    c_h = torch.zeros_like(c_0)    # on D_{−1}
    c_h2 = torch.zeros_like(c_0)   # on D_{−2} (third order)
    lam = torch.log(a_s / s_s)
    for i in range(1, n):
        last = i == n - 1
        if solver_order == 1 or (last and (euler_at_final or (lower_order_final and n < 15) or final_zero)):
            continue
        h = -torch.log(exp_neg_h[i])
        r0 = (lam[i] - lam[i - 1]) / h
        em = exp_neg_h[i] ** 2 if sde else exp_neg_h[i]   # e^{−2h} (SDE) or e^{−h}
        second = solver_order == 2 or i == 1 or (i == n - 2 and lower_order_final and n < 15)
        if second:
            if solver_type == "midpoint":
                b = 0.5 * c_0[i]
            elif sde:
                b = a_t[i] * ((1 - em) / (-2 * h) + 1)
            else:
                b = a_t[i] * ((em - 1) / h + 1)
            c_0[i] = c_0[i] + b / r0     # b · D1 with D1 = (D − D_{−1})/r0
            c_h[i] = -b / r0
            continue
        # third order (Lu et al. 2022): D1 = D1_0 + r0/(r0+r1) (D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1),
        # D1_0 = (D − D_{−1})/r0, D1_1 = (D_{−1} − D_{−2})/r1
        r1 = (lam[i - 1] - lam[i - 2]) / h
        if sde:
            b1 = a_t[i] * ((1 - em) / (-2 * h) + 1)
            b2 = a_t[i] * ((1 - em - 2 * h) / (2 * h) ** 2 - 0.5)
        else:
            b1 = a_t[i] * ((em - 1) / h + 1)
            b2 = -a_t[i] * ((em - 1 + h) / h ** 2 - 0.5)
        d10 = {"0": 1 / r0, "h": -1 / r0, "h2": 0.0}
        d11 = {"0": 0.0, "h": 1 / r1, "h2": -1 / r1}
        diff = {k: d10[k] - d11[k] for k in d10}
        d1 = {k: d10[k] + r0 / (r0 + r1) * diff[k] for k in d10}
        d2 = {k: diff[k] / (r0 + r1) for k in d10}
        c_0[i] = c_0[i] + b1 * d1["0"] + b2 * d2["0"]
        c_h[i] = b1 * d1["h"] + b2 * d2["h"]
        c_h2[i] = b1 * d1["h2"] + b2 * d2["h2"]
    t = common_tables(ts)
    t.update(c_x=c_x, c_0=c_0, c_x0_prev=c_h, sigma=sigma, var_mean=sigma ** 2)
    if solver_order == 3:
        t["c_x0_prev2"] = c_h2
        return SamplerTables(name, ts, t, slots=("x0_prev", "x0_prev2"), moves={"x0_prev": "0", "x0_prev2": "x0_prev"},
                             draws_noise=(sigma > 0).tolist())
    return SamplerTables(name, ts, t, slots=("x0_prev",), moves={"x0_prev": "0"},
                         draws_noise=(sigma > 0).tolist())
