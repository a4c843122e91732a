"""SA-Solver as diffusers' ``SASolverScheduler`` runs it (``sa_solver_diffusers``): Xue et al.'s
stochastic Adams predictor–corrector (2023), the method of ComfyUI's ``sa_solver``
(:func:`gradguide.samplers.comfy_stages._sa_solver`, whose weights are reused) with diffusers' rules.

In σ-space (``λ = −log σ``, ``h = λ_{i+1} − λ_i``, ``c = 1 + τ²``), with ``m_k`` the converted model
output of evaluation ``k`` (``algorithm="data"``: the prediction D; ``"noise"``: ε = (x_σ − D)/σ):

- data prediction: ``x_σ' = e^{−τ² h} (σ'/σ) x_σ + Σ_j b_j m_j + σ' √(1 − e^{−2τ² h}) z``,
  ``b_j = c ∫ e^{c(λ − λ')} ℓ_j(λ) dλ`` over the step (ℓ_j the Lagrange basis on the nodes' λ);
  at two nodes diffusers adds a correction that makes them the paper's simplified weights
  (predictor ``b_old = −c h²/(2 (λ_i − λ_{i−1}))``, corrector ``b_new = c h/2``; each pair sums to
  ``1 − e^{−ch}``).
- noise prediction: ``x_σ' = x_σ − c Σ_j g_j m_j + τ σ' √(e^{2h} − 1) z``,
  ``g_j = ∫ e^{−λ} ℓ_j(λ) dλ`` (diffusers' formula, no correction at two nodes).

Step ``i`` (``n`` steps, ``K = max(p, c − 1)`` kept outputs): the corrector first redoes the last
predictor step from the same start with the same noise and τ, through ``m_i`` and the ``c_{i−1} − 1``
outputs before it, so the corrected sample is the predicted one plus the change of the weights;
then the predictor steps from it with ``p_i`` nodes. Orders: ``p_i = min(p, n − i, w + 1)``,
``c_i = min(c, n − i + 1, w + 2)`` with ``w = min(i, K)`` (without ``lower_order_final`` the
``n − i`` bounds go). ``τ_i = tau_func(t_i)`` at the step's model timestep (diffusers' default: 1 on
``200 ≤ t ≤ 800``, else 0); the corrector uses the τ of the step it redoes. A standard normal
draw at every step, also where τ = 0 (diffusers draws one each step). The last step is the
predictor's: nothing corrects it. diffusers ends at ᾱ_0 (σ > 0); on a gradguide schedule ending at
σ = 0 the last step is the first-order data-prediction step's limit there, ``x = D``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np

from ..schedules import Timesteps
from . import SamplerTables
from . import stages as _stages
from .comfy_stages import _sa_b, _sa_simple_b

ALGORITHMS = ("data", "noise")


def default_tau(t) -> float:
    """diffusers' default ``tau_func``: 1 on model timesteps 200..800, else 0."""
    return 1.0 if 200 <= t <= 800 else 0.0


def _noise_weights(nodes: List[float], lam_s: float, lam_t: float) -> List[float]:
    """``∫_{λ_s}^{λ_t} e^{−λ} ℓ_j(λ) dλ`` (32-point Gauss–Legendre, relative to e^{−λ_t} for range)."""
    gx, gw = np.polynomial.legendre.leggauss(32)
    lam = 0.5 * (lam_t - lam_s) * gx + 0.5 * (lam_t + lam_s)
    weight = 0.5 * (lam_t - lam_s) * gw * np.exp(-lam)
    out = []
    for j in range(len(nodes)):
        basis = np.ones_like(lam)
        for k in range(len(nodes)):
            if k != j:
                basis *= (lam - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float((weight * basis).sum()))
    return out


def _order(name: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
        raise ValueError(f"sampler {name!r}: {key}: expected an integer in [1, 4] (diffusers' SASolverScheduler "
                         f"has Lagrange weights up to four nodes), got {value!r}")
    return value


def tables(ts: Timesteps, predictor_order: int = 2, corrector_order: int = 2, algorithm: str = "data",
           lower_order_final: bool = True, tau_func: Optional[Callable] = None) -> SamplerTables:
    name = "sa_solver_diffusers"
    P, C = _order(name, "predictor_order", predictor_order), _order(name, "corrector_order", corrector_order)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"sampler {name!r}: algorithm: expected 'data' (diffusers' data_prediction) or 'noise' "
                         f"(noise_prediction), got {algorithm!r}")
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"sampler {name!r}: lower_order_final: expected a bool, got {lower_order_final!r}")
    if tau_func is not None and not callable(tau_func):
        raise TypeError(f"sampler {name!r}: tau_func: expected a callable timestep -> τ, got {type(tau_func).__name__}")
    tau_of = default_tau if tau_func is None else tau_func
    if (ts.abar == 0).any():
        raise ValueError(f"sampler {name!r}: needs ᾱ > 0 at every evaluation (σ = ∞ has no λ)")
    n = len(ts)
    abar = ts.abar.tolist() + [float(ts.abar_prev[-1])]
    sig = [math.sqrt((1 - a) / a) if a > 0 else math.inf for a in abar]
    if math.isinf(sig[-1]):
        raise ValueError(f"sampler {name!r}: cannot step onto ᾱ = 0")
    to_zero = sig[-1] == 0   # a gradguide schedule's last step (diffusers' SASolverScheduler ends at ᾱ_0)
    if to_zero and algorithm == "noise":
        raise ValueError(f"sampler {name!r}: algorithm='noise' has no step onto σ = 0 (its weights are integrals up "
                         "to λ = ∞ of a polynomial extrapolation); use algorithm='data' or end at σ > 0")
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    taus = []
    for t in ts.t:   # 0-d tensors, as diffusers' step passes its timestep to tau_func
        tau = tau_of(t)
        try:
            tau = float(tau)
        except (TypeError, ValueError):
            tau = math.nan
        if not math.isfinite(tau):
            raise ValueError(f"sampler {name!r}: tau_func({t.item()!r}) returned {tau_of(t)!r}: expected a finite "
                             "number")
        taus.append(tau)
    K = max(P, C - 1)
    hist = ("m1", "m2", "m3", "m4")[:K]      # m_{i−1}, m_{i−2}, ...

    def weights(count: int, s: int, t: int, newest: int, tau: float, corrector: bool) -> Dict[int, float]:
        """The weights of m_newest, m_newest−1, ... (``count`` nodes) over the interval from λ_s to λ_t."""
        idx = list(range(newest - count + 1, newest + 1))    # oldest first
        nodes = [lam[k] for k in idx]
        if algorithm == "noise":
            w = [-(1 + tau * tau) * g for g in _noise_weights(nodes, lam[s], lam[t])]
        elif count == 2:
            w = _sa_simple_b(nodes, lam[s], lam[t], tau, corrector)
        else:
            w = _sa_b(nodes, lam[s], lam[t], tau)
        return dict(zip(idx, w))

    def m_of(i: int) -> Dict[str, float]:
        """m_i over (x_σ, D) at evaluation i."""
        return {"0": 1.0} if algorithm == "data" else {"x": 1 / sig[i], "0": -1 / sig[i]}

    rows = []
    last_pred: Dict[int, float] = {}
    corr_order = 0
    for i in range(n):
        src = {i: m_of(i), **{i - 1 - j: {slot: 1.0} for j, slot in enumerate(hist)}}
        corrected = {"x": 1.0}
        if i > 0:   # the corrector's change to the predicted sample: Σ (b^corr − b^pred of the last step) m
            delta = weights(corr_order, i - 1, i, i, taus[i - 1], True)
            for k, w in last_pred.items():
                delta[k] = delta.get(k, 0.0) - w
            for k, w in delta.items():
                for key, v in src[k].items():
                    corrected[key] = corrected.get(key, 0.0) + w * v
        lon = min(i, K)
        p_i, c_i = (min(P, n - i), min(C, n - i + 1)) if lower_order_final else (P, C)
        p_i, corr_order = min(p_i, lon + 1), min(c_i, lon + 2)
        tau = taus[i]
        h = lam[i + 1] - lam[i]
        if sig[i + 1] == 0:
            # the first-order data-prediction step's limit at λ' = ∞: x = D (higher orders extrapolate the
            # Lagrange polynomial to λ = ∞ and diverge)
            p_i, decay, noise = 1, 0.0, 0.0
            pred = {i: 1.0}
        elif algorithm == "data":
            decay = math.exp(-tau * tau * h) * sig[i + 1] / sig[i]
            noise = sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h))
        else:
            decay, noise = 1.0, tau * sig[i + 1] * math.sqrt(math.expm1(2 * h))
        if sig[i + 1] > 0:
            pred = weights(p_i, i, i + 1, i, tau, False)
        out = {k: decay * v for k, v in corrected.items()}
        for k, w in pred.items():
            for key, v in src[k].items():
                out[key] = out.get(key, 0.0) + w * v
        keep = {slot: (m_of(i) if j == 0 else {hist[j - 1]: 1.0}) for j, slot in enumerate(hist)}
        rows.append(_stages.Stage(sig[i], i, out, keep=keep, noise=noise, noise_sigmas=(sig[i], sig[i + 1])))
        last_pred = pred
    out = _stages.tables(name, ts, rows, hist, sig[-1], sig[0])
    # diffusers draws at every step, also where τ = 0 (the same draws stay in step); none onto σ = 0
    out.draws_noise = [sig[i + 1] > 0 for i in range(n)]
    return out
