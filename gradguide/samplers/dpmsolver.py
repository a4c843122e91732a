"""DPM-Solver on the noise prediction (Lu et al. 2022; diffusers' ``algorithm_type="dpmsolver"`` /
``"sde-dpmsolver"``) and diffusers' singlestep DPM-Solver(++), as scalar tables.

Notation: ``α = √ᾱ``, ``σ = √(1−ᾱ)``, ``λ = log(α/σ)``, a step ``s → t``, ``h = λ_t − λ_s``.

**Multistep, noise prediction** (``dpm-2m``, ``dpm-2m-sde``): with ``ε`` the prediction of this
evaluation and ``ε_{−1}``, ``ε_{−2}`` the earlier ones (carried as slots, each written from its
``x`` and guided ``x̂_0``: ``ε = (x − α x̂_0)/σ``),

    x_t = (α_t/α_s) x_s − k σ_t (e^h − 1) ε − B D1 − C D2 [+ σ_t √(e^{2h} − 1) z]

``k = 1`` (ODE) or ``2`` (``sde-dpmsolver``: the reverse SDE integrated with the linear part
exact, its noise exact). ``D1 = (ε − ε_{−1})/r₀ ≈ h ε'`` with ``B = k·½σ_t(e^h − 1)``
(``"midpoint"``) or ``k·σ_t((e^h − 1)/h − 1)`` (``"heun"``: the exact weight of ``h ε'``,
``α_t ∫_0^h e^{−(λ_s+τ)} τ dτ``). Third order (ODE only; diffusers has no third-order
``sde-dpmsolver``): Lu et al.'s divided differences, ``B = σ_t((e^h − 1)/h − 1)``,
``C = σ_t((e^h − 1 − h)/h² − ½) ≈ σ_t h/6`` on ``D2 ≈ h² ε''/2``, whose Taylor weight is twice that
(``σ_t (e^h − 1 − h − h²/2)·2/h² ≈ σ_t h/3``): DPM-Solver-3M on ε is second order, as the
data-prediction 3M is (:mod:`gradguide.samplers.dpmpp`; measured). The lower-order
steps are diffusers' (first step; second step of a third-order solver; ``lower_order_final``
below 15 steps; ``euler_at_final``). diffusers refuses a last σ of 0 for these solvers
(``σ_t(e^h − 1)`` is ``0 · ∞`` there); gradguide's own schedules end there, and the step onto it
is the limit ``h → ∞``, ``x̂_0``.

**Singlestep** (``dpm-single``, ``dpmpp-single``, ``dpmpp-single-sde``; diffusers'
``DPMSolverSinglestepScheduler``): the evaluations are grouped into intervals by diffusers'
order list (:func:`order_list`): an order-``o`` interval starts with a first-order step from its
start ``x_s``; the ``k``-th evaluation in it (``k = 2, 3``) steps from ``x_s`` again, to the next
listed σ, with the predictions ``m`` of all its evaluations so far (so an interval's intermediate
samples are the points where the model is evaluated, and its last output the interval's
result). With ``r_j = (λ_j − λ_s)/h`` of the earlier evaluations:

- second order: ``D0 = m_s``, ``D1 = (m_1 − m_s)/r_1``;
- third order: ``D1_0 = (m_1 − m_s)/r_1``, ``D1_1 = (m_2 − m_s)/r_2``; ``"midpoint"`` uses
  ``D1_1`` alone (Lu et al.'s DPM-Solver-3, third order when ``r_2 = 2/3``), ``"heun"``
  ``D1 = (r_2 D1_0 − r_1 D1_1)/(r_2 − r_1) ≈ h m'`` and ``D2 = 2 (D1_1 − D1_0)/(r_2 − r_1) ≈ h² m''``;

with the weights of the multistep updates on the whole interval (data prediction: ``m = x̂_0``,
``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) D0 + ...``; noise prediction as above; SDE:
``e^{−h}`` on ``x_s``, ``α_t (1 − e^{−2h})`` on ``D0``, noise ``σ_t √(1 − e^{−2h}) z``). On a
grid locally uniform in λ (``r → 1/2``, ``1/3, 2/3``) the ODE intervals are of order 2 and 3.
diffusers' third-order SDE ``"heun"`` weight on ``D2``, ``α_t((1 − e^{−2h} − 2h)/(2h)² − ½)``,
tends to ``−α_t`` rather than 0 (as in its multistep SDE, docs/diffusers.md): reproduced as is,
a first-order solver.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables
from . import stages as _stages

SOLVER_TYPES = ("midpoint", "heun")
SINGLESTEP = {"dpm-single": "dpmsolver", "dpmpp-single": "dpmsolver++", "dpmpp-single-sde": "sde-dpmsolver++"}


def _check(name: str, solver_order, solver_type, lower_order_final, orders=(1, 2, 3)) -> None:
    if isinstance(solver_order, bool) or solver_order not in orders:
        raise ValueError(f"sampler {name!r}: solver_order: expected one of {orders}, got {solver_order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"sampler {name!r}: solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"sampler {name!r}: lower_order_final: expected True or False, got {lower_order_final!r}")


def _check_grid(name: str, ts: Timesteps) -> None:
    if (ts.abar == 0).any():
        raise ValueError(f"sampler {name!r}: needs ᾱ > 0 at every visited step (λ = −∞ at zero terminal SNR); clamp "
                         "ᾱ_T as diffusers does (2**-24)")


def multistep_eps_tables(ts: Timesteps, sde: bool = False, solver_order: int = 2, solver_type: str = "midpoint",
                         lower_order_final: bool = True, euler_at_final: bool = False) -> SamplerTables:
    """``dpm-2m`` / ``dpm-2m-sde`` (module doc)."""
    name = "dpm-2m-sde" if sde else "dpm-2m"
    _check(name, solver_order, solver_type, lower_order_final, (1, 2) if sde else (1, 2, 3))
    if not isinstance(euler_at_final, bool):
        raise ValueError(f"sampler {name!r}: euler_at_final: expected True or False, got {euler_at_final!r}")
    _check_grid(name, ts)
    n = len(ts)
    final_zero = bool(ts.abar_prev[-1] == 1.0)
    a_s, s_s = ts.abar.sqrt(), (1 - ts.abar).sqrt()
    a_t, s_t = ts.abar_prev.sqrt(), (1 - ts.abar_prev).sqrt()
    lam = torch.log(a_s / s_s)
    h = torch.log(a_t / s_t) - lam
    em1 = torch.expm1(h)                      # e^h − 1
    k = 2.0 if sde else 1.0
    w_eps = -k * s_t * em1                    # on this evaluation's ε
    c_x = a_t / a_s
    on = {"eps": w_eps.clone(), "eps_prev": torch.zeros(n, dtype=torch.float64),
          "eps_prev2": torch.zeros(n, dtype=torch.float64)}
    for i in range(1, n):
        if solver_order == 1 or (i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)):
            continue
        r0 = (lam[i] - lam[i - 1]) / h[i]
        second = solver_order == 2 or i == 1 or (i == n - 2 and lower_order_final and n < 15)
        if second:
            b = k * (0.5 * s_t[i] * em1[i] if solver_type == "midpoint" else s_t[i] * (em1[i] / h[i] - 1))
            on["eps"][i] -= b / r0        # − B (ε − ε_{−1})/r0
            on["eps_prev"][i] += b / r0
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h[i]
        b = s_t[i] * (em1[i] / h[i] - 1)
        c = s_t[i] * ((em1[i] - h[i]) / h[i] ** 2 - 0.5)
        d10 = (1 / r0, -1 / r0, 0.0)          # over (ε, ε_{−1}, ε_{−2})
        d11 = (0.0, 1 / r1, -1 / r1)
        diff = [p - q for p, q in zip(d10, d11)]
        d1 = [p + r0 / (r0 + r1) * d for p, d in zip(d10, diff)]
        d2 = [d / (r0 + r1) for d in diff]
        for key, j in (("eps", 0), ("eps_prev", 1), ("eps_prev2", 2)):
            on[key][i] -= b * d1[j] + c * d2[j]
    # ε = (x − α_s x̂_0)/σ_s of this evaluation, in x and x̂_0
    c_x, c_0 = c_x + on["eps"] / s_s, -on["eps"] * a_s / s_s
    sigma = s_t * torch.expm1(2 * h).clamp_min(0).sqrt() if sde else torch.zeros(n, dtype=torch.float64)
    if final_zero:   # onto σ = 0 (gradguide's own schedules; diffusers refuses it): the limit h → ∞, x̂_0
        c_x[-1], c_0[-1], sigma[-1] = 0.0, 1.0, 0.0
    t = common_tables(ts)
    t.update(c_x=c_x, c_0=c_0, c_eps_prev=on["eps_prev"])
    t.update(u_eps_prev_x=1 / s_s, u_eps_prev_0=-a_s / s_s)
    t.update(sigma=sigma, var_mean=sigma ** 2)
    slots, moves = ("eps_prev",), {}
    if solver_order == 3:
        t["c_eps_prev2"] = on["eps_prev2"]
        slots, moves = ("eps_prev", "eps_prev2"), {"eps_prev2": "eps_prev"}
    return SamplerTables(name, ts, t, slots=slots, moves=moves, draws_noise=(sigma > 0).tolist())


def order_list(steps: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> List[int]:
    """The order of each evaluation of diffusers' ``DPMSolverSinglestepScheduler``
    (``get_order_list`` after ``set_timesteps``, which first switches ``lower_order_final`` on
    when the steps do not divide into whole intervals or the last σ is 0)."""
    if not lower_order_final and (steps % solver_order != 0 or final_zero):
        lower_order_final = True
    if solver_order == 1:
        orders = [1] * steps
    elif not lower_order_final:
        orders = list(range(1, solver_order + 1)) * (steps // solver_order)
    elif solver_order == 2:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        rem = steps % 3
        orders = ([1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1] if rem == 0 else
                  [1, 2, 3] * (steps // 3) + ([1] if rem == 1 else [1, 2]))
    if final_zero:
        orders[-1] = 1
    return orders


def _interval_weights(algorithm: str, solver_type: str, sig: List[float], sig_t: float):
    """diffusers' singlestep update from the interval's start (σ-space ``sig[0]``) over its
    evaluations ``sig`` to ``sig_t``: the variance-preserving weights ``(on x_s, [on m_0, m_1, ...],
    noise std)``. ``σ`` here is the σ-space σ (``α = 1/√(1+σ²)``, VP σ = σ α, ``e^{−h} = σ_t/σ_s``)."""
    a = [1 / math.sqrt(1 + s * s) for s in sig]
    a_t = 1 / math.sqrt(1 + sig_t * sig_t)
    s_t = sig_t * a_t
    emh = sig_t / sig[0]                                       # e^{−h}, 0 onto σ = 0
    order = len(sig)
    noise = 0.0
    if order == 1:
        if algorithm == "dpmsolver++":
            return emh * a_t / a[0], [-a_t * (emh - 1)], noise
        if algorithm == "dpmsolver":   # onto σ = 0 the limit h → ∞: α_t x̂_0 = α_t (x_σ − σ_s ε)
            return a_t / a[0], [-a_t * sig[0] if sig_t == 0 else -s_t * (1 / emh - 1)], noise
        return emh * emh * a_t / a[0], [a_t * (1 - emh * emh)], s_t * math.sqrt(max(1 - emh * emh, 0.0))
    h = math.log(sig[0] / sig_t)
    r = [math.log(sig[0] / s) / h for s in sig]              # r[0] = 0
    em1 = math.expm1(h)
    if algorithm == "dpmsolver++":
        x_w, w0 = emh * a_t / a[0], -a_t * (emh - 1)
        w1 = 0.5 * w0 if solver_type == "midpoint" else a_t * ((emh - 1) / h + 1)
        w2 = -a_t * ((emh - 1 + h) / h ** 2 - 0.5)
    elif algorithm == "dpmsolver":
        x_w, w0 = a_t / a[0], -s_t * em1
        w1 = -0.5 * s_t * em1 if solver_type == "midpoint" else -s_t * (em1 / h - 1)
        w2 = -s_t * ((em1 - h) / h ** 2 - 0.5)
    else:   # sde-dpmsolver++
        e2 = emh * emh
        x_w, w0 = e2 * a_t / a[0], a_t * (1 - e2)
        w1 = 0.5 * w0 if solver_type == "midpoint" else a_t * ((1 - e2) / (-2 * h) + 1)
        w2 = a_t * ((1 - e2 - 2 * h) / (2 * h) ** 2 - 0.5)
        noise = s_t * math.sqrt(max(1 - e2, 0.0))
    if order == 2:   # D0 = m_s, D1 = (m_1 − m_s)/r_1
        return x_w, [w0 - w1 / r[1], w1 / r[1]], noise
    r1, r2 = r[1], r[2]
    d10 = (-1 / r1, 1 / r1, 0.0)                               # over (m_s, m_1, m_2)
    d11 = (-1 / r2, 0.0, 1 / r2)
    if solver_type == "midpoint":   # Lu et al.'s DPM-Solver-3: D1_1 alone (w1 here is the φ₂-type weight)
        w1 = {"dpmsolver++": a_t * ((emh - 1) / h + 1), "dpmsolver": -s_t * (em1 / h - 1),
              "sde-dpmsolver++": a_t * ((1 - emh * emh) / (-2 * h) + 1)}[algorithm]
        return x_w, [w0 + w1 * d11[0], w1 * d11[1], w1 * d11[2]], noise
    d1 = [(r2 * p - r1 * q) / (r2 - r1) for p, q in zip(d10, d11)]
    d2 = [2 * (q - p) / (r2 - r1) for p, q in zip(d10, d11)]
    return x_w, [w0 * (j == 0) + w1 * d1[j] + w2 * d2[j] for j in range(3)], noise


def singlestep_tables(name: str, ts: Timesteps, solver_order: int = 2, solver_type: str = "midpoint",
                      lower_order_final: bool = False) -> SamplerTables:
    """``dpm-single`` / ``dpmpp-single`` / ``dpmpp-single-sde`` (module doc), built as
    multi-evaluation stages (:mod:`gradguide.samplers.stages`): slot ``xs`` holds the interval's
    start (σ-space), ``m0`` / ``m1`` the predictions of its first two evaluations (``x̂_0``, or
    ``ε = (x_σ − x̂_0)/σ`` for the noise-prediction solver)."""
    algorithm = SINGLESTEP[name]
    _check(name, solver_order, solver_type, lower_order_final)
    _check_grid(name, ts)
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]])
    sig = ((1 - abar) / abar).sqrt().tolist()
    n = len(ts)
    orders = order_list(n, solver_order, lower_order_final, sig[-1] == 0.0)
    stages = []
    for i, o in enumerate(orders):
        start = i - o + 1
        if start < 0 or orders[start:i + 1] != list(range(1, o + 1)):
            raise ValueError(f"sampler {name!r}: order list {orders} is not made of whole intervals")
        x_w, m_w, noise = _interval_weights(algorithm, solver_type, sig[start:i + 1], sig[i + 1])
        a_out = 1 / math.sqrt(1 + sig[i + 1] ** 2)
        a_start = 1 / math.sqrt(1 + sig[start] ** 2)
        # the current prediction in terms of the stage's sources (σ-space x, guided x̂_0)
        cur = {"0": 1.0} if algorithm != "dpmsolver" else {"x": 1 / sig[i], "0": -1 / sig[i]}
        out = {}

        def add(src, w):
            out[src] = out.get(src, 0.0) + w
        # VP weights -> σ-space: x_σ,t = (x_w α_s x_σ,s + Σ w_m m)/α_t
        add("x" if o == 1 else "xs", x_w * a_start / a_out)
        for j, w in enumerate(m_w):
            if j == o - 1:
                for src, c in cur.items():
                    add(src, w / a_out * c)
            else:
                add(f"m{j}", w / a_out)
        keep = {}
        if o == 1:
            keep = {"xs": {"x": 1.0}, "m0": dict(cur)}
        elif o == 2:
            keep = {"m1": dict(cur)}
        stages.append(_stages.Stage(sig[i], i, out, keep=keep, noise=noise / a_out, noise_sigmas=(sig[i], sig[i + 1])))
    return _stages.tables(name, ts, stages, ("xs", "m0", "m1"), sig[-1], sig[0])
