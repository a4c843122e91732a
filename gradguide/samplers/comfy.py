"""ComfyUI's own σ-space samplers (``comfy/k_diffusion/sampling.py``, not in k-diffusion) as
scalar tables: ``ipndm``, ``ipndm_v``, ``deis``, ``gradient_estimation``, ``res_multistep``,
``res_multistep_ancestral``, ``lcm_comfy``, ``er_sde``; the multi-evaluation ones (``seeds_2``,
``seeds_3``, ``heunpp2``, ``sa_solver``) are in :mod:`gradguide.samplers.comfy_stages`, dispatched
from :func:`tables` here. docs/samplers.md ("ComfyUI") gives each one's source and measured order.

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
- ``lcm_comfy`` (ComfyUI's ``lcm``; Luo et al. 2023, multistep consistency sampling):
  ``x_σ' = D + s_noise σ_{i+1} z``. ComfyUI applies an LCM model's boundary scalings in its model
  wrapper, so its sampler is this plain step; gradguide's ``lcm`` (diffusers' ``LCMScheduler``) applies
  them in the step.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables
from .comfy_stages import _heunpp2, _sa_solver, _seeds_2, _seeds_3
from .kdiff import ancestral_step

SAMPLERS = ("ipndm", "ipndm_v", "deis", "gradient_estimation", "res_multistep", "res_multistep_ancestral", "lcm_comfy",
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
    if name == "lcm_comfy":
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
    name = "lcm_comfy"
    clip = _number(name, "noise_clip_std", options.get("noise_clip_std", 0.0))
    if clip:
        raise ValueError("sampler 'lcm_comfy': noise_clip_std > 0 clamps each draw by its own standard deviation (a "
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
