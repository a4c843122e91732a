"""DPM-Solver++(2M), (3M) and their SDE variants (Lu et al. 2022; diffusers'
``DPMSolverMultistepScheduler``, k-diffusion's ``sample_dpmpp_2m`` / ``_2m_sde`` / ``_3m_sde``),
as scalar tables.

With ``α = √ᾱ``, ``σ = √(1−ᾱ)``, ``λ = log(α/σ)``, step ``s → t``, ``h = λ_t − λ_s``,
``r = h_{prev}/h`` and data predictions ``D`` (``x̂_0``), ``D_{−1}``, ``D_{−2}``, the step is the
exponential integrator of the data-prediction SDE with noise share ``η`` (``η = 0``: the
probability-flow ODE, ``dpmsolver++``; ``η = 1``: ``sde-dpmsolver++``), ``u = (1 + η) h``:

    x_t = (σ_t/σ_s) e^{−ηh} x_s + α_t ∫_0^h (1+η) e^{−(1+η)(h−τ)} x̂_0(λ_s + τ) dτ + s_noise σ_t √(1 − e^{−2ηh}) z

with ``x̂_0`` replaced by its Taylor polynomial in ``λ`` from the last predictions:
``x_t = (σ_t/σ_s) e^{−ηh} x_s + α_t (1 − e^{−u}) D + B D1 + C D2 + s_noise σ_t √(1 − e^{−2ηh}) z``
with ``D1 = (D − D_{−1})/r ≈ h D'`` (second order) or, third order, Lu et al.'s divided
differences ``D1 ≈ h D'``, ``D2 ≈ h² D''/2``:

- ``B = ½ α_t (1 − e^{−u})`` (``solver_type="midpoint"``) or ``α_t φ_2(u)``,
  ``φ_2(u) = (e^{−u} − 1)/u + 1`` (``"heun"``; the exact weight of the linear term);
- third order: ``B = α_t φ_2(u)``, ``C = −w α_t φ_3(u)``, ``φ_3(u) = φ_2(u)/u − ½`` (``= O(u)``).
  The exact weight of ``h² D''/2`` is ``−2 α_t φ_3(u)``: ``∫_0^h c e^{−c(h−τ)} τ²/2 dτ
  = −h² φ_3(u)`` with ``c = 1 + η``. ``d2_weight="published"`` (default; ``w = 1``) is the
  weight of Lu et al.'s code, diffusers' ODE branch, k-diffusion and ComfyUI: its local error
  keeps ``h³ D''/12``-type terms, so DPM-Solver++(3M) is a *second-order* method (the tests
  measure slope 2); ``"taylor"`` (``w = 2``) is the Taylor-consistent weight, third order.
  ``"diffusers"``: diffusers 0.42's SDE branch, ``C = −α_t (φ_3(2h) + 1)``, which tends to
  ``−α_t`` as ``h → 0``: a correction that does not vanish with the step, so that solver is
  only first order (kept only to reproduce diffusers exactly; see docs/diffusers.md).

First order (no ``D_{−1}`` term) on the first step, with ``solver_order=1``, and on the last
step when ``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps, or the last
step lands on clean data (σ_t = 0, where it returns ``D``); with ``solver_order=3``, second
order on the second step and, with ``lower_order_final`` and fewer than 15 steps, on the
second-to-last: diffusers' rules. The defaults are diffusers' (``dpmpp-3m-sde`` takes
k-diffusion's: ``solver_order=3``, ``solver_type="heun"``, ``lower_order_final=False``).
"""
from __future__ import annotations

import torch

from . import SamplerTables, common_tables

SOLVER_TYPES = ("midpoint", "heun")


SOLVER_TYPES = ("midpoint", "heun")
D2_WEIGHTS = ("published", "taylor", "diffusers")


def _phi2(u):
    return torch.expm1(-u) / u + 1


def tables(ts, sde: bool = False, solver_order: int = 2, solver_type: str = "midpoint",
           lower_order_final: bool = True, euler_at_final: bool = False, eta=None, s_noise: float = 1.0,
           d2_weight: str = "published", name: str = None) -> SamplerTables:
    name = name or ("dpmpp-2m-sde" if sde else "dpmpp-2m")
    if solver_order not in (1, 2, 3):
        raise ValueError(f"{name}: solver_order: expected 1, 2 or 3, got {solver_order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{name}: solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    if d2_weight not in D2_WEIGHTS:
        raise ValueError(f"{name}: d2_weight: expected one of {D2_WEIGHTS}, got {d2_weight!r}")
    if not sde and (eta is not None or s_noise != 1.0):
        raise ValueError(f"{name}: eta and s_noise are the SDE solver's (sampler='dpmpp-2m-sde' or 'dpmpp-3m-sde')")
    eta = 1.0 if eta is None else eta
    for key, value in (("eta", eta), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name}: {key}: expected a finite number >= 0, got {value!r}")
    if d2_weight == "diffusers" and sde and eta != 1.0:
        raise ValueError(f"{name}: d2_weight='diffusers' reproduces diffusers' sde-dpmsolver++ (eta = 1), "
                         f"got eta={eta}")
    if (ts.abar == 0).any():
        raise ValueError(f"{name}: needs ᾱ > 0 at every visited step (λ = −∞ at zero terminal SNR); clamp ᾱ_T "
                         "as diffusers does (2**-24) or use sampler='ddim'")
    eta = float(eta) if sde else 0.0
    a_s, s_s = ts.abar.sqrt(), (1 - ts.abar).sqrt()
    a_t, s_t = ts.abar_prev.sqrt(), (1 - ts.abar_prev).sqrt()
    exp_neg_h = (s_t / a_t) / (s_s / a_s)  # e^{−h}, exactly 0 when landing on clean data
    n = len(ts)
    final_zero = bool(ts.abar_prev[-1] == 1.0)
    # e^{−ηh} and e^{−u}, u = (1 + η) h; exact powers so that e^{−h} = 0 (σ_t = 0) stays 0
    exp_neg_eta_h = exp_neg_h ** eta
    em_all = exp_neg_h * exp_neg_eta_h
    c_x = s_t / s_s * exp_neg_eta_h
    c_0 = a_t * (1 - em_all)
    sigma = s_noise * s_t * (1 - exp_neg_eta_h ** 2).clamp_min(0).sqrt() if sde else torch.zeros_like(c_0)
    c_h = torch.zeros_like(c_0)    # on D_{−1}
    c_h2 = torch.zeros_like(c_0)   # on D_{−2} (third order)
    lam = torch.log(a_s / s_s)
    for i in range(1, n):
        last = i == n - 1
        if solver_order == 1 or (last and (euler_at_final or (lower_order_final and n < 15) or final_zero)):
            continue
        h = -torch.log(exp_neg_h[i])
        u = (1 + eta) * h
        r0 = (lam[i] - lam[i - 1]) / h
        second = solver_order == 2 or i == 1 or (i == n - 2 and lower_order_final and n < 15)
        if second:
            b = 0.5 * c_0[i] if solver_type == "midpoint" else a_t[i] * _phi2(u)
            c_0[i] = c_0[i] + b / r0     # b · D1 with D1 = (D − D_{−1})/r0
            c_h[i] = -b / r0
            continue
        # third order (Lu et al. 2022): D1 = D1_0 + r0/(r0+r1) (D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1),
        # D1_0 = (D − D_{−1})/r0, D1_1 = (D_{−1} − D_{−2})/r1
        r1 = (lam[i - 1] - lam[i - 2]) / h
        phi3 = _phi2(u) / u - 0.5
        b1 = a_t[i] * _phi2(u)
        if d2_weight == "diffusers" and sde:
            b2 = -a_t[i] * (phi3 + 1)     # diffusers 0.42's `(1 − e^{−2h} − 2h)/(2h)² − 0.5`
        else:
            b2 = -(2.0 if d2_weight == "taylor" else 1.0) * a_t[i] * phi3
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
