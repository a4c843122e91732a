"""ComfyUI's multi-evaluation and predictor–corrector samplers as scalar tables: ``seeds_2``,
``seeds_3``, ``heunpp2``, ``sa_solver`` (``_pece``). The dispatch, option checks and the
single-evaluation ones are in :mod:`gradguide.samplers.comfy`; docs/samplers.md ("ComfyUI") gives
each one's source and measured order."""
from __future__ import annotations

import math

import numpy as np

from ..schedules import Timesteps
from . import SamplerTables
from . import stages as _stages
from .kdiff import _Row, _tables


def _number(name: str, key: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"sampler {name!r}: {key}: expected a finite number >= {low:g}, got {value!r}")
    return float(value)


def _seeds_2(ts: Timesteps, sig, eta: float, s_noise: float, r: float, solver: str) -> SamplerTables:
    """SEEDS-2 (Gonzalez et al. 2023, VP data prediction; ComfyUI's ``sample_seeds_2``), in
    ``λ = −log σ``, ``h = λ_{i+1} − λ_i``, ``h_η = (1 + η) h``, stage point ``σ_s = σ_i e^{−r h}``:

    - stage 1: ``u = (σ_s/σ_i) e^{−r h η} x_σ + (1 − e^{−r h_η}) D_1 + s_noise σ_s √(1 − e^{−2 r h η}) z_1``;
    - stage 2: ``x_σ' = (σ'/σ_i) e^{−h η} x_σ + (1 − e^{−h_η}) ((1 − 1/(2r)) D_1 + D_2/(2r))``
      (``solver_type="phi_2"``: ``− (b_1 D_1 + b_2 D_2)``, ``b_2 = (e^{−h_η} − 1 + h_η)/(−h_η r)``,
      ``b_1 = e^{−h_η} − 1 − b_2``), plus ``s_noise σ' (e^{(r−1) h η} n_1 + √(1 − e^{2 (r−1) h η}) z_2)``
      with ``n_1 = √(1 − e^{−2 r h η}) z_1`` the first stage's noise, carried (read back from ``u``).

    The two noises are the increments of one Brownian path over ``[σ_s, σ_i]`` and ``[σ', σ_s]``
    (disjoint: independent draws, as ComfyUI's default noise)."""
    n = len(ts)
    rows = []
    for i in range(n):
        s, st = sig[i], sig[i + 1]
        if st == 0:
            rows.append(_Row(s, i, {"x": 0.0, "0": 1.0}))
            continue
        h = math.log(s / st)
        h_eta = h * (eta + 1)
        sm = s * math.exp(-r * h)
        noisy = eta > 0 and s_noise > 0
        w_x, w_0 = sm / s * math.exp(-r * h * eta), -math.expm1(-r * h_eta)
        n1 = math.sqrt(-math.expm1(-2 * r * h * eta)) if noisy else 0.0
        first = _Row(s, i, {"x": w_x, "0": w_0}, sm * s_noise * n1, (s, sm))
        lin = st / s * math.exp(-h * eta)
        if solver == "phi_1":
            fac = 1 / (2 * r)
            d1, d2 = -math.expm1(-h_eta) * (1 - fac), -math.expm1(-h_eta) * fac
        else:
            b2 = (math.expm1(-h_eta) + h_eta) / (-h_eta) / r
            b1 = math.expm1(-h_eta) - b2
            d1, d2 = -b1, -b2
        second = _Row(sm, None, {"x_carry": lin, "x0_prev": d1, "0": d2})
        if noisy and first.noise > 0:
            seg = (r - 1) * h * eta
            # σ' s_noise e^{seg} n_1 = k (u − w_x x_σ − w_0 D_1), k = e^{seg} σ'/σ_s
            k = math.exp(seg) * st / sm
            second.coef["x"] = k
            second.coef["x_carry"] -= k * w_x
            second.coef["x0_prev"] -= k * w_0
            second.noise = st * s_noise * math.sqrt(-math.expm1(2 * seg))
            second.noise_sigmas = (sm, st)
        rows += [first, second]
    return _tables("seeds_2", ts, rows, sig, sig[0], 0.0)


def _heunpp2(ts: Timesteps, sig, options) -> SamplerTables:
    """Heun++ (ComfyUI's ``heunpp2``, from sd-webui-samplers-scheduler): from ``x_i`` at ``σ̂_i``
    (Karras churn as ``heun``), Euler steps to ``σ_{i+1}`` and ``σ_{i+2}`` give ``d_2``, ``d_3``; then
    ``x_{i+1} = x_i + dt (w_1 d_1 + w_2 d_2 + w_3 d_3)``, ``dt = σ_{i+1} − σ̂_i``,
    ``w_2 = σ_{i+1}/(3σ_0)``, ``w_3 = σ_{i+2}/(3σ_0)``, ``w_1 = 1 − w_2 − w_3`` (σ_0 the first listed
    σ). Two evaluations (``w_2 = σ_{i+1}/(2σ_0)``) when ``σ_{i+2}`` is the last σ, Euler onto it.
    The weights sum to 1 but weigh the change of ``d`` by ``≈ σ_i/σ_0`` instead of ½: first order."""
    name = "heunpp2"
    n = len(sig) - 1
    s_noise = _number(name, "s_noise", options.get("s_noise", 1.0))
    s_churn = _number(name, "s_churn", options.get("s_churn", 0.0))
    s_tmin = _number(name, "s_tmin", options.get("s_tmin", 0.0))
    s_tmax = options.get("s_tmax", float("inf"))
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or math.isnan(s_tmax) or s_tmax < 0:
        raise ValueError(f"sampler 'heunpp2': s_tmax: expected a number >= 0 (inf allowed), got {s_tmax!r}")
    gamma = [min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0 for i in range(n)]
    hat = [sig[i] * (1 + gamma[i]) for i in range(n)]
    churn = [s_noise * math.sqrt(max(hat[i] ** 2 - sig[i] ** 2, 0.0)) if gamma[i] > 0 else 0.0 for i in range(n)]
    end, first = sig[-1], sig[0]
    rows = []
    for i in range(n):
        sh, s1 = hat[i], sig[i + 1]
        dt = s1 - sh
        e1 = _stages.Stage(sh, i if gamma[i] == 0 else None, {})
        d1 = {"x": 1 / sh, "0": -1 / sh}
        if s1 == end:
            e1.out = {"x": 1 + dt / sh, "0": -dt / sh}
            rows.append(e1)
        else:
            e1.out = {"x": 1 + dt / sh, "0": -dt / sh}
            e1.keep = {"xs": {"x": 1.0}, "d1": d1}
            s2 = sig[i + 2]
            if s2 == end:
                w2 = s1 / (2 * first)
                rows += [e1, _stages.Stage(s1, i + 1, {"xs": 1.0, "d1": dt * (1 - w2), "x": dt * w2 / s1,
                                                       "0": -dt * w2 / s1})]
            else:
                dt2 = s2 - s1
                w2, w3 = s1 / (3 * first), s2 / (3 * first)
                e2 = _stages.Stage(s1, i + 1, {"x": 1 + dt2 / s1, "0": -dt2 / s1},
                                   keep={"d2": {"x": 1 / s1, "0": -1 / s1}})
                e3 = _stages.Stage(s2, i + 2, {"xs": 1.0, "d1": dt * (1 - w2 - w3), "d2": dt * w2, "x": dt * w3 / s2,
                                               "0": -dt * w3 / s2})
                rows += [e1, e2, e3]
        if i + 1 < n and churn[i + 1]:   # the next step's churn, before its first model call
            rows[-1].noise, rows[-1].noise_sigmas = churn[i + 1], (sig[i + 1], hat[i + 1])
    return _stages.tables(name, ts, rows, ("xs", "d1", "d2"), end, hat[0], churn[0], (sig[0], hat[0]))


def _seeds_3(ts: Timesteps, sig, eta: float, s_noise: float, r1: float, r2: float) -> SamplerTables:
    """SEEDS-3 (Gonzalez et al. 2023; ComfyUI's ``sample_seeds_3``): three exponential-integrator
    stages at ``λ_i + r_1 h``, ``λ_i + r_2 h``, ``λ_{i+1}`` (``h_η = (1+η) h``, ``hφ₂(z) = (e^z − 1 − z)/z``):

    - ``u_1 = (σ_1/σ_i) e^{−r_1 hη} x_σ + (1 − e^{−r_1 h_η}) D_1 + s_noise σ_1 n_1``;
    - ``u_2 = (σ_2/σ_i) e^{−r_2 hη} x_σ − (a_1 D_1 + a_2 D_2) + s_noise σ_2 n_2``,
      ``a_2 = (r_2/r_1) hφ₂(−r_2 h_η)``, ``a_1 = e^{−r_2 h_η} − 1 − a_2``;
    - ``x_σ' = (σ'/σ_i) e^{−hη} x_σ − (b_1 D_1 + b_3 D_3) + s_noise σ' n_3``,
      ``b_3 = hφ₂(−h_η)/r_2``, ``b_1 = e^{−h_η} − 1 − b_3``;

    with the noise carried from stage to stage, ``n_{k+1} = e^{(r_k − r_{k+1}) hη} n_k + √(1 − e^{2(r_k − r_{k+1}) hη}) z``
    (``n_1 = √(1 − e^{−2 r_1 hη}) z``): read back from the stage's input, the start ``x_σ`` and the
    earlier predictions (slots ``xs``, ``D1``, ``D2``)."""
    n = len(ts)
    phi1 = math.expm1

    def phi2(z):
        return (math.expm1(z) - z) / z
    rows = []
    noisy = eta > 0 and s_noise > 0
    for i in range(n):
        s, st = sig[i], sig[i + 1]
        if st == 0:
            rows.append(_stages.Stage(s, i, {"0": 1.0}))
            continue
        h = math.log(s / st)
        h_eta = h * (eta + 1)
        s1, s2 = s * math.exp(-r1 * h), s * math.exp(-r2 * h)
        w1 = (s1 / s * math.exp(-r1 * h * eta), -phi1(-r1 * h_eta))            # on xs, D1
        a2 = r2 / r1 * phi2(-r2 * h_eta)
        a1 = phi1(-r2 * h_eta) - a2
        w2 = (s2 / s * math.exp(-r2 * h * eta), -a1, -a2)                      # on xs, D1, D2
        b3 = phi2(-h_eta) / r2
        b1 = phi1(-h_eta) - b3
        w3 = (st / s * math.exp(-h * eta), -b1, -b3)                           # on xs, D1, D3
        e1 = _stages.Stage(s, i, {"x": w1[0], "0": w1[1]}, keep={"xs": {"x": 1.0}, "D1": {"0": 1.0}})
        e2 = _stages.Stage(s1, None, {"xs": w2[0], "D1": w2[1], "0": w2[2]}, keep={"D2": {"0": 1.0}})
        e3 = _stages.Stage(s2, None, {"xs": w3[0], "D1": w3[1], "0": w3[2]})
        if noisy:
            e1.noise = s_noise * s1 * math.sqrt(-math.expm1(-2 * r1 * h * eta))
            e1.noise_sigmas = (s, s1)
            # s_noise σ_2 e^{seg} n_1 = k (u_1 − w1·(xs, D1)), k = e^{seg} σ_2/σ_1
            seg = (r1 - r2) * h * eta
            k = math.exp(seg) * s2 / s1
            e2.out["x"] = k
            e2.out["xs"] -= k * w1[0]
            e2.out["D1"] -= k * w1[1]
            e2.noise, e2.noise_sigmas = s_noise * s2 * math.sqrt(-math.expm1(2 * seg)), (s1, s2)
            seg = (r2 - 1) * h * eta
            k = math.exp(seg) * st / s2
            e3.out["x"] = k
            e3.out["xs"] -= k * w2[0]
            e3.out["D1"] -= k * w2[1]
            e3.out["D2"] = -k * w2[2]
            e3.noise, e3.noise_sigmas = s_noise * st * math.sqrt(-math.expm1(2 * seg)), (s2, st)
        rows += [e1, e2, e3]
    return _stages.tables("seeds_3", ts, rows, ("xs", "D1", "D2"), sig[-1], sig[0])


def _sa_b(nodes, lam_s: float, lam_t: float, tau: float):
    """SA-Solver's weights (Xue et al. 2023, eqs. 15/18, data prediction, α = 1): ``b_j =
    ∫_{λ_s}^{λ_t} (1+τ²) e^{(1+τ²)(λ − λ_t)} ℓ_j(λ) dλ`` with ``ℓ_j`` the Lagrange basis on
    ``nodes`` (oldest first); 32-point Gauss–Legendre (the integrand is smooth)."""
    gx, gw = np.polynomial.legendre.leggauss(32)
    k = 1 + tau * tau
    lam = 0.5 * (lam_t - lam_s) * gx + 0.5 * (lam_t + lam_s)
    weight = 0.5 * (lam_t - lam_s) * gw * k * np.exp(k * (lam - lam_t))
    out = []
    for j in range(len(nodes)):
        basis = np.ones_like(lam)
        for m in range(len(nodes)):
            if m != j:
                basis *= (lam - nodes[m]) / (nodes[j] - nodes[m])
        out.append(float((weight * basis).sum()))
    return out


def _sa_simple_b(nodes, lam_s: float, lam_t: float, tau: float, corrector: bool):
    """The simplified two-node weights (the paper's Appendix D), oldest first."""
    k = 1 + tau * tau
    h = lam_t - lam_s
    if corrector:
        b_new = 0.5 * k * h
        return [-math.expm1(-h * k) - b_new, b_new]
    b_old = 0.5 * k * h * h / (nodes[0] - lam_s)
    return [b_old, -math.expm1(-h * k) - b_old]


def _sa_solver(name: str, ts: Timesteps, sig, options) -> SamplerTables:
    """SA-Solver (Xue et al. 2023; ComfyUI's ``sample_sa_solver``, ``sample_sa_solver_pece``): a
    stochastic Adams predictor (``predictor_order`` nodes) and corrector (``corrector_order``
    nodes, the newest prediction included) in ``λ = −log σ``; where ``τ = eta`` (σ in
    ``sde_sigmas = (start, end)``, else τ = 0) each predictor step is
    ``x' = (σ'/σ) e^{−τ² h} x + Σ b_j D_j + s_noise σ' √(1 − e^{−2τ² h}) z`` and the corrector
    redoes it from the same start with the same noise. The corrected sample is the predicted one
    plus ``Σ (b^corr − b^pred) D``, so one table step per evaluation carries no sample, only the
    last predictions. ``sa_solver_pece`` evaluates the model again at the corrected sample."""
    pece = name == "sa_solver_pece"
    p = options.get("predictor_order", 3)
    c = options.get("corrector_order", 4)
    for key, v in (("predictor_order", p), ("corrector_order", c)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 6:
            raise ValueError(f"sampler {name!r}: {key}: expected an integer in [1, 6], got {v!r}")
    simple = options.get("simple_order_2", False)
    if not isinstance(simple, bool):
        raise ValueError(f"sampler {name!r}: simple_order_2: expected a bool, got {simple!r}")
    eta = _number(name, "eta", options.get("eta", 1.0))
    s_noise = _number(name, "s_noise", options.get("s_noise", 1.0))
    window = options.get("sde_sigmas")
    if eta > 0:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)):
            raise ValueError(f"sampler {name!r}: sde_sigmas=(start_sigma, end_sigma) is required with eta > 0: the σ "
                             "interval with noise (ComfyUI: the model's percent_to_sigma(0.2), (0.8), i.e. "
                             "gradguide.comfy_percent_to_sigma(schedule, 0.2), (..., 0.8)); or eta=0 for the ODE")
    tau_of = (lambda s: eta if window[0] >= s >= window[1] else 0.0) if eta > 0 else (lambda s: 0.0)  # noqa: E731
    n = len(sig) - 1
    if any(s == 0 for s in sig[:-1]):
        raise ValueError(f"sampler {name!r}: only the last σ may be 0")
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    # predictions kept: the corrector's c, and the p the last predictor used (their change is taken back)
    depth = max(p + 1, c)
    hist = ("p1", "p2", "p3", "p4", "p5", "p6")[:depth - 1]    # D_{i−1}, D_{i−2}, ...
    to_end = sig[-1] == 0

    def b_coeffs(nodes_idx, s_idx, t_idx, tau, corrector):
        nodes = [lam[k] for k in nodes_idx]
        if simple and len(nodes) == 2:
            return _sa_simple_b(nodes, lam[s_idx], lam[t_idx], tau, corrector)
        return _sa_b(nodes, lam[s_idx], lam[t_idx], tau)

    stages = []
    tau_prev, last_pred = 0.0, {}
    for i in range(n):
        have = min(i + 1, max(p, c))
        p_used = min(p, have)
        c_used = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(c, have)
        if to_end:
            p_used = min(p_used, n - 1 - i)
            c_used = min(c_used, n - i)
        # the corrector's change to the sample it is called on: Σ (b^corr − b^pred of the last step) D
        delta = {}
        if c_used:
            bc = b_coeffs(list(range(i - c_used + 1, i + 1)), i - 1, i, tau_prev, True)
            for k, w in zip(range(i - c_used + 1, i + 1), bc):
                delta[k] = delta.get(k, 0.0) + w
            for k, w in last_pred.items():
                delta[k] = delta.get(k, 0.0) - w
        src = lambda k: "0" if k == i else hist[i - 1 - k]   # noqa: E731  the source holding D_k

        corr = {"x": 1.0}
        for k, w in delta.items():
            corr[src(k)] = corr.get(src(k), 0.0) + w
        if pece and c_used:
            # evaluation A: the predicted sample; its output is the corrected sample (same σ)
            stages.append(_stages.Stage(sig[i], i, corr))
            corr = {"x": 1.0}      # evaluation B sees the corrected sample; D_i is now its prediction
        if sig[i + 1] == 0:
            out, tau, noise = {"0": 1.0}, 0.0, 0.0
            pred = {}
        else:
            tau = tau_of(sig[i + 1])
            h = lam[i + 1] - lam[i]
            decay = sig[i + 1] / sig[i] * math.exp(-tau * tau * h)
            bp = b_coeffs(list(range(i - p_used + 1, i + 1)), i, i + 1, tau, False) if p_used else []
            pred = dict(zip(range(i - p_used + 1, i + 1), bp))
            out = {k: decay * w for k, w in corr.items()}
            for k, w in pred.items():
                out[src(k)] = out.get(src(k), 0.0) + w
            noise = s_noise * sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) if tau > 0 else 0.0
        keep = {}
        for j, slot in enumerate(hist):     # shift the history: p1 <- D_i, p2 <- p1, ...
            keep[slot] = {"0": 1.0} if j == 0 else {hist[j - 1]: 1.0}
        stages.append(_stages.Stage(sig[i], i, out, keep=keep, noise=noise, noise_sigmas=(sig[i], sig[i + 1])))
        last_pred, tau_prev = pred, tau
    return _stages.tables(name, ts, stages, hist, sig[-1], sig[0])
