"""ComfyUI's own σ-space samplers (``comfy/k_diffusion/sampling.py``, not in k-diffusion) as
scalar tables: ``ipndm``, ``ipndm_v``, ``deis``, ``gradient_estimation``, ``res_multistep``,
``res_multistep_ancestral``, ``lcm``. docs/samplers.md ("ComfyUI") gives each one's source and
its measured order.

In σ-space ``x_σ = x_0 + σ ε``, ``d = (x_σ − D)/σ``; the variance-preserving state is
``x = a x_σ`` with ``a = 1/√(1+σ²)`` (:mod:`gradguide.samplers.ksigma`).

- **Derivative multistep** (``ipndm``, ``ipndm_v``, ``deis``, ``gradient_estimation``): step
  ``i`` is ``x_σ' = x_σ + Σ_k w_{i,k} d_{i−k}`` over the current and up to three previous
  derivatives (slots ``d1``, ``d2``, ``d3``, as :func:`gradguide.samplers.ksigma` LMS), with the
  step onto σ = 0 an Euler step (``x_σ' = D``). The weights (order ``k = min(max_order, i+1)``):

  - ``ipndm``: Adams–Bashforth's equal-step weights times ``σ_{i+1} − σ_i`` (1; 3/2, −1/2;
    23/12, −16/12, 5/12; 55/24, −59/24, 37/24, −9/24), whatever the step lengths (Zhang & Chen
    2023, improved PNDM).
  - ``ipndm_v``: the variable-step weights of the same paper's code (diff-solvers' ``ipndm_v``)
    from the step lengths ``h_n = σ_{i+1} − σ_i``, ``h_{n−1}``, ...: exact variable-step
    Adams–Bashforth for 2 nodes; the 3- and 4-node formulas reduce to Adams–Bashforth only on
    equal steps (the 4-node one not even then: it is third order on equal steps).
  - ``deis``: DEIS-tAB (Zhang & Chen 2023, eq. 14) in the VP time ``t`` of a VP-SDE fitted to EDM's
    σ ∈ [0.002, 80] (``β_d``, ``β_min`` from ``σ(ε_s = 10⁻³) = 0.002``, ``σ(1) = 80``):
    ``w_{i,j} = ∫_{t_i}^{t_{i+1}} ℓ_j(τ) σ'(τ) dτ`` with ``ℓ_j`` the Lagrange basis on the
    nodes' ``t``, summed as ComfyUI sums it (10⁴ points of ``linspace(t_i, t_{i+1})`` times
    ``(t_{i+1} − t_i)/10⁴``: ~1e-6 relative from the exact integral).
  - ``gradient_estimation`` (Permenter & Yuan 2024): ``x_σ' = x_σ + dt (γ d_i − (γ−1) d_{i−1})``,
    ``dt = σ_{i+1} − σ_i``, Euler at the first step; ``γ = ge_gamma`` (2).

- ``res_multistep`` (Zhang et al. 2023, RES, second-order multistep): in ``λ = −log σ`` with
  ``h = λ_{i+1} − λ_i``, ``x_σ' = e^{−h} x_σ + h (b_1 D_i + b_2 D_{i−1})``, ``b_2 = φ_2(−h)/c_2``,
  ``b_1 = φ_1(−h) − b_2``, ``c_2 = −h_{i−1}/h`` (the previous step's length), φ₁(z) = (e^z−1)/z,
  φ₂(z) = (φ₁(z) − 1)/z; Euler at the first step and onto σ = 0. ``res_multistep_ancestral``
  steps to ``σ_down`` (k-diffusion's ancestral split, ``eta`` = 1) and adds ``s_noise σ_up z``;
  its ``h_{i−1}`` is the previous step's deterministic part ``λ(σ_down,i−1) − λ_{i−1}``, as ComfyUI's.
- ``lcm`` (Luo et al. 2023, multistep consistency sampling): ``x_σ' = D + s_noise σ_{i+1} z``.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables
from . import stages as _stages
from .kdiff import _Row, _tables, ancestral_step

SAMPLERS = ("ipndm", "ipndm_v", "deis", "gradient_estimation", "res_multistep", "res_multistep_ancestral", "lcm",
            "er_sde", "seeds_2", "seeds_3", "heunpp2", "sa_solver", "sa_solver_pece")
_AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _sigmas(name: str, ts: Timesteps) -> List[float]:
    if (ts.abar == 0).any():
        raise ValueError(f"sampler {name!r}: needs ᾱ > 0 at every visited step (σ = ∞ at zero terminal SNR)")
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]])
    return ((1 - abar) / abar).sqrt().tolist()


def _options(name: str, options, allowed):
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r}: unknown options {unknown} (it takes {', '.join(allowed) or 'none'})")


def _number(name: str, key: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"sampler {name!r}: {key}: expected a finite number >= {low:g}, got {value!r}")
    return float(value)


def _max_order(name: str, value, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ValueError(f"sampler {name!r}: max_order: expected an integer in [1, {top}], got {value!r}")
    return value


def tables(name: str, ts: Timesteps, **options) -> SamplerTables:
    sig = _sigmas(name, ts)
    if name in ("ipndm", "ipndm_v", "deis"):
        top = 3 if name == "deis" else 4
        allowed = ("max_order", "deis_mode", "lower_order_final") if name == "deis" else ("max_order",)
        _options(name, options, allowed)
        mode = options.get("deis_mode", "tab")
        if name == "deis" and mode not in ("tab", "logrho"):
            raise ValueError(f"sampler 'deis': deis_mode: expected 'tab' (ComfyUI's) or 'logrho' (diffusers' "
                             f"DEISMultistepScheduler), got {mode!r}")
        order = _max_order(name, options.get("max_order", top), 3 if mode == "logrho" else 4)
        if name == "deis" and mode == "logrho":
            final = options.get("lower_order_final", True)
            if not isinstance(final, bool):
                raise ValueError(f"sampler 'deis': lower_order_final: expected a bool, got {final!r}")
            return _derivative_multistep(name, ts, sig, _deis_logrho(sig, order, final))
        if "lower_order_final" in options:
            raise ValueError("sampler 'deis': lower_order_final applies to deis_mode='logrho' only")
        weights = {"ipndm": _ipndm, "ipndm_v": _ipndm_v, "deis": _deis}[name](sig, order)
        return _derivative_multistep(name, ts, sig, weights)
    if name == "gradient_estimation":
        _options(name, options, ("ge_gamma",))
        gamma = _number(name, "ge_gamma", options.get("ge_gamma", 2.0))
        weights = []
        for i in range(len(sig) - 1):
            dt = sig[i + 1] - sig[i]
            weights.append([dt] if i == 0 or sig[i + 1] == 0 else [gamma * dt, -(gamma - 1) * dt])
        return _derivative_multistep(name, ts, sig, weights)
    if name in ("res_multistep", "res_multistep_ancestral"):
        allowed = ("eta", "s_noise") if name.endswith("ancestral") else ("s_noise",)
        _options(name, options, allowed)
        eta = _number(name, "eta", options.get("eta", 1.0)) if name.endswith("ancestral") else 0.0
        return _res_multistep(name, ts, sig, eta, _number(name, "s_noise", options.get("s_noise", 1.0)))
    if name == "lcm":
        _options(name, options, ("s_noise", "s_noise_end", "noise_clip_std"))
        return _lcm(ts, sig, options)
    if name == "seeds_2":
        _options(name, options, ("eta", "s_noise", "r", "solver_type"))
        r = options.get("r", 0.5)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"sampler 'seeds_2': r: expected a number in (0, 1], got {r!r}")
        solver = options.get("solver_type", "phi_1")
        if solver not in ("phi_1", "phi_2"):
            raise ValueError(f"sampler 'seeds_2': solver_type: expected 'phi_1' or 'phi_2', got {solver!r}")
        return _seeds_2(ts, sig, _number(name, "eta", options.get("eta", 1.0)),
                        _number(name, "s_noise", options.get("s_noise", 1.0)), float(r), solver)
    if name == "seeds_3":
        _options(name, options, ("eta", "s_noise", "r_1", "r_2"))
        r1, r2 = options.get("r_1", 1 / 3), options.get("r_2", 2 / 3)
        for key, v in (("r_1", r1), ("r_2", r2)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"sampler 'seeds_3': {key}: expected a number in (0, 1), got {v!r}")
        if not r1 < r2:
            raise ValueError(f"sampler 'seeds_3': expected r_1 < r_2, got r_1={r1!r}, r_2={r2!r}")
        return _seeds_3(ts, sig, _number(name, "eta", options.get("eta", 1.0)),
                        _number(name, "s_noise", options.get("s_noise", 1.0)), float(r1), float(r2))
    if name in ("sa_solver", "sa_solver_pece"):
        _options(name, options, ("eta", "s_noise", "sde_sigmas", "predictor_order", "corrector_order",
                                 "simple_order_2"))
        return _sa_solver(name, ts, sig, options)
    if name == "heunpp2":
        _options(name, options, ("s_churn", "s_tmin", "s_tmax", "s_noise"))
        return _heunpp2(ts, sig, options)
    if name == "er_sde":
        _options(name, options, ("s_noise", "max_stage", "integration_points"))
        stage = options.get("max_stage", 3)
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"sampler 'er_sde': max_stage: expected 1, 2 or 3, got {stage!r}")
        points = options.get("integration_points", 200)
        if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points < 1):
            raise ValueError(f"sampler 'er_sde': integration_points: expected a positive integer (ComfyUI: 200) or "
                             f"None (exact integrals), got {points!r}")
        return _er_sde(ts, sig, _number(name, "s_noise", options.get("s_noise", 1.0)), stage, points)
    raise ValueError(f"sampler: unknown ComfyUI sampler {name!r}")


# -- derivative multistep ---------------------------------------------------------------

def _ipndm(sig, max_order):
    out = []
    for i in range(len(sig) - 1):
        dt = sig[i + 1] - sig[i]
        out.append([dt] if sig[i + 1] == 0 else [w * dt for w in _AB[min(max_order, i + 1)]])
    return out


def _ipndm_v(sig, max_order):
    out = []
    for i in range(len(sig) - 1):
        k = min(max_order, i + 1)
        h = sig[i + 1] - sig[i]
        if sig[i + 1] == 0 or k == 1:
            out.append([h])
            continue
        h1 = sig[i] - sig[i - 1]
        r = h / h1
        w = [1 + r / 2, -r / 2]   # exact variable-step Adams–Bashforth on two nodes
        if k >= 3:
            h2 = sig[i - 1] - sig[i - 2]
            t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
            w = [w[0] + t1, w[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
        if k == 4:
            h3 = sig[i - 2] - sig[i - 3]
            g = h1 * (h1 + h2) / (h2 * (h2 + h3))
            t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
                * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
            w = [w[0] + t2, w[1] - (1 + h1 / h2 + g) * t2, w[2] + (h1 / h2 + g * (1 + h2 / h3)) * t2,
                 -t2 * g * h1 / h2]
        out.append([h * v for v in w])
    return out


# the VP-SDE DEIS maps EDM's σ's through: σ(t) = √(exp(β_d t²/2 + β_min t) − 1), fitted so that
# σ(ε_s) = 0.002 and σ(1) = 80
_EDM_MIN, _EDM_MAX, _EPS_S = 0.002, 80.0, 1e-3
_BETA_D = 2 * (math.log(_EDM_MIN ** 2 + 1) / _EPS_S - math.log(_EDM_MAX ** 2 + 1)) / (_EPS_S - 1)
_BETA_MIN = math.log(_EDM_MAX ** 2 + 1) - 0.5 * _BETA_D


def _deis_t(sigma: float) -> float:
    return (math.sqrt(_BETA_MIN ** 2 + 2 * _BETA_D * math.log(sigma * sigma + 1)) - _BETA_MIN) / _BETA_D


def _deis_dsigma(t: np.ndarray) -> np.ndarray:
    """dσ/dt of σ(t) = √(e^{β_d t²/2 + β_min t} − 1)."""
    e = np.exp(0.5 * _BETA_D * t * t + _BETA_MIN * t)
    return (_BETA_D * t + _BETA_MIN) * e / (2 * np.sqrt(e - 1))


def _deis(sig, max_order, points: int = 10000):
    t = [_deis_t(s) for s in sig]
    out = []
    for i in range(len(sig) - 1):
        k = min(max_order, i + 1)
        if sig[i + 1] == 0 or k == 1:
            out.append([sig[i + 1] - sig[i]])
            continue
        # ComfyUI's quadrature, kept so that the weights are its weights: the sum over `points` points
        # of linspace(t_i, t_{i+1}) times (t_{i+1} − t_i)/points (off the exact integral by ~1e-6 relative)
        tau = np.linspace(t[i], t[i + 1], points)
        base = _deis_dsigma(tau) * (t[i + 1] - t[i]) / points
        nodes = [t[i - j] for j in range(k)]
        w = []
        for j in range(k):
            basis = np.ones_like(tau)
            for m in range(k):
                if m != j:
                    basis *= (tau - nodes[m]) / (nodes[j] - nodes[m])
            w.append(float((base * basis).sum()))
        out.append(w)
    return out


def _deis_logrho(sig, solver_order: int, lower_order_final: bool):
    """diffusers' ``DEISMultistepScheduler`` (``algorithm_type="deis"``, ``solver_type="logrho"``):
    ε = d interpolated by a polynomial in ``log ρ`` (ρ = σ here) through the last ``k`` steps,
    integrated over ``ρ``: ``w_j = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(log ρ) dρ`` (24-point Gauss–Legendre; diffusers
    writes the antiderivatives out). ``k`` grows 1, 2, ... to ``solver_order``; with
    ``lower_order_final`` and fewer than 15 steps the last step is first order and the one before
    at most second (diffusers' rule). A step onto σ = 0 is Euler."""
    n = len(sig) - 1
    gx, gw = np.polynomial.legendre.leggauss(24)
    out = []
    for i in range(n):
        k = min(solver_order, i + 1)
        if lower_order_final and n < 15:
            k = 1 if i == n - 1 else min(k, 2) if i == n - 2 else k
        if k == 1 or sig[i + 1] == 0:
            out.append([sig[i + 1] - sig[i]])
            continue
        a, b = sig[i], sig[i + 1]
        rho = 0.5 * (b - a) * gx + 0.5 * (a + b)
        w_rho = 0.5 * (b - a) * gw
        u, nodes = np.log(rho), [math.log(sig[i - j]) for j in range(k)]
        w = []
        for j in range(k):
            basis = np.ones_like(u)
            for m in range(k):
                if m != j:
                    basis *= (u - nodes[m]) / (nodes[j] - nodes[m])
            w.append(float((w_rho * basis).sum()))
        out.append(w)
    return out


def _derivative_multistep(name: str, ts: Timesteps, sig, weights) -> SamplerTables:
    n = len(ts)
    depth = max(len(w) for w in weights)
    slots = ("d1", "d2", "d3")[:depth - 1]
    a = [1 / math.sqrt(1 + s * s) for s in sig]
    cols = {k: [0.0] * n for k in ["c_x", "c_0", "u_d1_x", "u_d1_0"] + ["c_" + s for s in slots]}
    for i, w in enumerate(weights):
        w0 = w[0]
        p_x, p_0 = 1 / (a[i] * sig[i]), -1 / sig[i]      # d = (x_σ − D)/σ with x_σ = x/a
        cols["c_x"][i] = a[i + 1] * (1 / a[i] + w0 * p_x)
        cols["c_0"][i] = a[i + 1] * w0 * p_0
        for k, slot in enumerate(slots, start=1):
            cols["c_" + slot][i] = a[i + 1] * w[k] if k < len(w) else 0.0
        cols["u_d1_x"][i], cols["u_d1_0"][i] = p_x, p_0
    t = common_tables(ts)
    keep = [k for k in cols if k.startswith("c_") or slots]
    t.update({k: torch.tensor(cols[k], dtype=torch.float64) for k in keep})
    zeros = torch.zeros(n, dtype=torch.float64)
    t.update(sigma=zeros, var_mean=zeros.clone())
    moves = {k: v for k, v in {"d2": "d1", "d3": "d2"}.items() if k in slots}
    return SamplerTables(name, ts, t, slots=slots, moves=moves, draws_noise=[False] * n)


# -- exponential multistep ----------------------------------------------------------------

def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1) / z


def _res_multistep(name: str, ts: Timesteps, sig, eta: float, s_noise: float) -> SamplerTables:
    n = len(ts)
    a = [1 / math.sqrt(1 + s * s) for s in sig]
    cols = {k: [0.0] * n for k in ("c_x", "c_0", "c_x0_prev", "sigma")}
    old_down = None
    for i in range(n):
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        if down == 0 or old_down is None:   # Euler to σ_down
            wx, w0, wp = down / sig[i], 1 - down / sig[i], 0.0
        else:
            h = math.log(sig[i] / down)                    # λ(σ_down) − λ_i
            c2 = math.log(old_down / sig[i - 1]) / h       # (λ_{i−1} − λ(σ_down,i−1))/h < 0
            b2 = _phi2(-h) / c2
            b1 = _phi1(-h) - b2
            wx, w0, wp = math.exp(-h), h * b1, h * b2
        cols["c_x"][i] = a[i + 1] * wx / a[i]
        cols["c_0"][i] = a[i + 1] * w0
        cols["c_x0_prev"][i] = a[i + 1] * wp
        if sig[i + 1] > 0:
            cols["sigma"][i] = a[i + 1] * s_noise * up
        old_down = down
    t = common_tables(ts)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    return SamplerTables(name, ts, t, slots=("x0_prev",), moves={"x0_prev": "0"},
                         draws_noise=[v > 0 for v in cols["sigma"]])


def _lcm(ts: Timesteps, sig, options) -> SamplerTables:
    name = "lcm"
    clip = _number(name, "noise_clip_std", options.get("noise_clip_std", 0.0))
    if clip:
        raise ValueError("sampler 'lcm': noise_clip_std > 0 clamps each draw by its own standard deviation (a "
                         "data-dependent, non-affine noise), which a table step cannot express; use 0")
    start = _number(name, "s_noise", options.get("s_noise", 1.0))
    end = options.get("s_noise_end")
    end = start if end is None else _number(name, "s_noise_end", end)
    n = len(ts)
    cols = {k: [0.0] * n for k in ("c_x", "c_0", "sigma")}
    for i in range(n):
        a_next = 1 / math.sqrt(1 + sig[i + 1] ** 2)
        cols["c_0"][i] = a_next
        if sig[i + 1] > 0:   # s_noise moves linearly from s_noise to s_noise_end over the steps
            scale = start + (end - start) * (i / (n - 1) if n > 1 else 0.0)
            cols["sigma"][i] = a_next * sig[i + 1] * scale
    t = common_tables(ts)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    # ComfyUI draws at every step onto σ > 0, also where the ramp's s_noise is 0: the same draws stay in step
    return SamplerTables(name, ts, t, draws_noise=[s > 0 for s in sig[1:]])


def _er_noise_scaler(x):
    """ER-SDE-Solver's default noise scale function (ComfyUI's): x (e^{x^0.3} + 10)."""
    return x * (np.exp(x ** 0.3) + 10.0)


def _er_integrals(s_from: float, s_to: float, points):
    """∫_{σ_to}^{σ_from} dλ/n(λ) and ∫ (λ − σ_from)/n(λ) dλ: ComfyUI's left sums over ``points``
    points from σ_to, or (``points=None``) 64-point Gauss–Legendre."""
    if points is None:
        gx, gw = np.polynomial.legendre.leggauss(64)
        lam = 0.5 * (s_from - s_to) * gx + 0.5 * (s_from + s_to)
        w = 0.5 * (s_from - s_to) * gw
    else:
        step = (s_from - s_to) / points
        lam = s_to + np.arange(points, dtype=np.float64) * step
        w = np.full(points, step)
    scaled = _er_noise_scaler(lam)
    return float((w / scaled).sum()), float((w * (lam - s_from) / scaled).sum())


def _er_sde(ts: Timesteps, sig, s_noise: float, max_stage: int, points) -> SamplerTables:
    """ER-SDE-Solver-3 (Cui et al. 2023, VP data prediction, Alg. 1–3 with λ = σ for σ-space
    models): x_σ' = r x_σ + (1 − r) D + A D' + B D'' with r = n(σ')/n(σ), the divided differences
    D' = (D_i − D_{i−1})/(σ_i − σ_{i−1}), D'' = (D' − D'_{i−1})/((σ_i − σ_{i−2})/2),
    A = (σ' − σ) + n(σ') ∫ dλ/n, B = (σ' − σ)²/2 + n(σ') ∫ (λ − σ)/n dλ, plus
    s_noise √(σ'² − σ² r²) z; onto σ = 0, x_σ' = D."""
    n = len(ts)
    a = [1 / math.sqrt(1 + s * s) for s in sig]
    cols = {k: [0.0] * n for k in ("c_x", "c_0", "c_x0_prev", "c_x0_prev2", "sigma")}
    for i in range(n):
        s, st = sig[i], sig[i + 1]
        if st == 0:
            cols["c_0"][i] = a[i + 1]
            continue
        r = float(_er_noise_scaler(np.float64(st)) / _er_noise_scaler(np.float64(s)))
        w = {"x": r, "0": 1 - r, "p1": 0.0, "p2": 0.0}
        stage = min(max_stage, i + 1)
        if stage >= 2:
            dt = st - s
            int1, int2 = _er_integrals(s, st, points)
            big_a = dt + int1 * float(_er_noise_scaler(np.float64(st)))
            d1 = s - sig[i - 1]
            w["0"] += big_a / d1
            w["p1"] -= big_a / d1
            if stage >= 3:
                big_b = dt * dt / 2 + int2 * float(_er_noise_scaler(np.float64(st)))
                d2, half = sig[i - 1] - sig[i - 2], (s - sig[i - 2]) / 2
                w["0"] += big_b / (half * d1)
                w["p1"] -= big_b / half * (1 / d1 + 1 / d2)
                w["p2"] += big_b / (half * d2)
        cols["c_x"][i] = a[i + 1] * w["x"] / a[i]
        cols["c_0"][i] = a[i + 1] * w["0"]
        cols["c_x0_prev"][i] = a[i + 1] * w["p1"]
        cols["c_x0_prev2"][i] = a[i + 1] * w["p2"]
        cols["sigma"][i] = a[i + 1] * s_noise * math.sqrt(max(st * st - s * s * r * r, 0.0))
    t = common_tables(ts)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    return SamplerTables("er_sde", ts, t, slots=("x0_prev", "x0_prev2"), moves={"x0_prev": "0", "x0_prev2": "x0_prev"},
                         draws_noise=[v > 0 for v in cols["sigma"]])


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
