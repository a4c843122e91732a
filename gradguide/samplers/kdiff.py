"""k-diffusion's two-stage and churned σ-space samplers as scalar tables: ``dpm_2``,
``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``, and ``euler`` / ``heun`` with Karras
et al.'s churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``; k-diffusion's ``sample_*``).

Every one is written in σ-space (``x_σ = x_0 + σ ε``, ``d = (x_σ − D)/σ``) as a list of model
evaluations (:class:`_Row`): each evaluation reads the sample it is called on, its prediction
``D``, and the previous evaluation's sample and prediction (slots ``x_carry``, ``x0_prev``), and
writes the sample the next evaluation is called on, plus ``z`` times a noise weight. The tables
are those rows in gradguide's variance-preserving form (``x = x_σ/√(1+σ²)``, see
:mod:`gradguide.samplers`): a row's output is stored at the σ of the next evaluation.

- churn (Karras et al. 2022, Alg. 2): at step ``i``, ``γ_i = min(s_churn/n, √2 − 1)`` where
  ``s_tmin ≤ σ_i ≤ s_tmax`` (else 0), ``σ̂_i = σ_i (1 + γ_i)``, and the sample gets
  ``s_noise √(σ̂_i² − σ_i²) z`` before the model is called at ``σ̂_i``. That noise is added by
  the previous evaluation's row (for step 0, to the initial latent: ``initial_noise``).
- ``dpm_2``: the step from ``σ̂_i`` to ``σ_{i+1}`` with the derivative at the log-midpoint
  ``σ_m = √(σ̂_i σ_{i+1})`` (an Euler half step gets there); Euler onto σ = 0.
- ``dpm_2_ancestral``: ``dpm_2`` to ``σ_down`` plus ``s_noise σ_up z`` (``eta``, k-diffusion's
  ``get_ancestral_step``).
- ``dpmpp_2s_ancestral``: DPM-Solver++(2S) (data prediction, midpoint ``r = ½`` in λ) to
  ``σ_down``, plus ``s_noise σ_up z`` whenever ``σ_{i+1} > 0``.
- ``dpmpp_sde``: DPM-Solver++ stochastic, two stages at ``λ_i`` and ``λ_i + r h``, each an
  ancestral data-prediction step; the second combines ``(1 − 1/(2r)) D_1 + 1/(2r) D_2``. Its
  two noises are the normalised increments over ``[σ_s, σ_i]`` and ``[σ_{i+1}, σ_i]`` of one
  Brownian path: correlated, ``ρ = √((σ_i − σ_s)/(σ_i − σ_{i+1}))``. With a Brownian-tree
  ``noise_sampler`` (k-diffusion's default,
  :class:`gradguide.samplers.noise.BrownianTreeNoiseSampler`) the draws are that already; with
  the run's generator the second stage builds ``ρ z_1 + √(1 − ρ²) ξ`` itself (``z_1`` is a
  combination of its input, the carried sample and ``D_1``). Independent draws (k-diffusion with
  a plain noise sampler) would make the solver first order in the weak sense; the
  convergence-order tests measure 2 with the correlation, 1 without.

The model is called between the listed σ's, at ``timesteps.sigma_to_t(σ)`` (σ-space timesteps
from ``sigmas=`` carry it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..schedules import Timesteps
from . import SamplerTables, common_tables

SAMPLERS = ("dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")   # and euler/heun with churn, dpm_fast
SLOTS = ("x0_prev", "x_carry")


@dataclass
class _Row:
    sigma: float                       # where the model is called
    grid: Optional[int]                # index into the listed σ's when it is one of them (its t is reused)
    coef: Dict[str, float]             # σ-space weights of "x", "0", "x0_prev", "x_carry"
    noise: float = 0.0                 # σ-space weight of z in the output
    noise_sigmas: Tuple[float, float] = (0.0, 0.0)


def _number(name: str, key: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"sampler {name!r}: {key}: expected a finite number >= {low:g}, got {value!r}")
    return float(value)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> Tuple[float, float]:
    """k-diffusion's ``get_ancestral_step``: ``(σ_down, σ_up)`` with ``σ_down² + σ_up² = σ_to²``."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(max(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2, 0.0)))
    return math.sqrt(max(sigma_to ** 2 - up ** 2, 0.0)), up


def _euler(sig_from: float, sig_to: float) -> Dict[str, float]:
    """x + (σ_to − σ_from)(x − D)/σ_from."""
    return {"x": sig_to / sig_from, "0": 1 - sig_to / sig_from}


def tables(name: str, ts: Timesteps, nested_noise: bool = False, **options) -> SamplerTables:
    """``nested_noise`` (``dpmpp_sde``; set by :func:`gradguide.samplers.build` when no
    ``noise_sampler`` is given): draw the second stage's noise correlated with the first as one
    Brownian path's increments are, from the run's independent draws."""
    if (ts.abar == 0).any():
        raise ValueError(f"sampler {name!r}: needs ᾱ > 0 at every visited step (σ = ∞ at zero terminal SNR)")
    sig = torch.cat([ts.abar, ts.abar_prev[-1:]])
    sig = ((1 - sig) / sig).sqrt().tolist()   # σ_0 .. σ_n
    n = len(ts)
    churned = name in ("euler", "heun", "dpm_2")
    allowed = {"euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"), "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
               "dpm_2": ("s_churn", "s_tmin", "s_tmax", "s_noise"), "dpm_2_ancestral": ("eta", "s_noise"),
               "dpmpp_2s_ancestral": ("eta", "s_noise"), "dpmpp_sde": ("eta", "s_noise", "r")}[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r}: unknown options {unknown} (it takes {', '.join(allowed)})")
    s_noise = _number(name, "s_noise", options.get("s_noise", 1.0))
    gamma = [0.0] * n
    if churned:
        s_churn = _number(name, "s_churn", options.get("s_churn", 0.0))
        s_tmin = _number(name, "s_tmin", options.get("s_tmin", 0.0))
        s_tmax = options.get("s_tmax", float("inf"))
        if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or math.isnan(s_tmax) or s_tmax < 0:
            raise ValueError(f"sampler {name!r}: s_tmax: expected a number >= 0 (inf allowed), got {s_tmax!r}")
        gamma = [min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0 for i in range(n)]
    sig_hat = [sig[i] * (gamma[i] + 1) for i in range(n)]
    churn = [s_noise * math.sqrt(max(sig_hat[i] ** 2 - sig[i] ** 2, 0.0)) if gamma[i] > 0 else 0.0 for i in range(n)]
    eta = _number(name, "eta", options.get("eta", 1.0))
    r = options.get("r", 0.5)
    if name == "dpmpp_sde" and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
        raise ValueError(f"sampler 'dpmpp_sde': r: expected a number in (0, 1], got {r!r}")

    rows: List[_Row] = []
    for i in range(n):
        s, s_next, sh = sig[i], sig[i + 1], sig_hat[i]
        first = _Row(sh, i if gamma[i] == 0 else None, {})
        if name in ("euler", "heun", "dpm_2"):
            if s_next == 0 or name == "euler":
                first.coef = _euler(sh, s_next)
                rows.append(first)
            elif name == "heun":   # Euler to x̃ at σ_{i+1}, then the trapezoid from the carried x̂_i
                dt = s_next - sh
                first.coef = _euler(sh, s_next)
                grid = i + 1 if i + 1 < n else None   # σ_n is not a listed step's σ
                rows += [first, _Row(s_next, grid, {"x_carry": 1 + dt / (2 * sh), "x0_prev": -dt / (2 * sh),
                                                    "x": dt / (2 * s_next), "0": -dt / (2 * s_next)})]
            else:                  # dpm_2: derivative at the log-midpoint
                sm = math.exp(math.log(sh) + 0.5 * (math.log(s_next) - math.log(sh)))
                dt = s_next - sh
                first.coef = _euler(sh, sm)
                rows += [first, _Row(sm, None, {"x_carry": 1.0, "x": dt / sm, "0": -dt / sm})]
            if i + 1 < n and churn[i + 1]:   # the next step's churn, before its model call
                rows[-1].noise, rows[-1].noise_sigmas = churn[i + 1], (sig[i + 1], sig_hat[i + 1])
            continue
        if name in ("dpm_2_ancestral", "dpmpp_2s_ancestral"):
            down, up = ancestral_step(s, s_next, eta)
            if down == 0:
                first.coef = _euler(s, down)
                rows.append(first)
                if name == "dpmpp_2s_ancestral" and s_next > 0:
                    first.noise, first.noise_sigmas = s_noise * up, (s, s_next)
                continue
            if name == "dpm_2_ancestral":
                sm = math.exp(math.log(s) + 0.5 * (math.log(down) - math.log(s)))
                dt = down - s
                first.coef = _euler(s, sm)
                second = _Row(sm, None, {"x_carry": 1.0, "x": dt / sm, "0": -dt / sm})
            else:   # DPM-Solver++(2S): exponential-integrator steps to λ-midpoint σ_s = √(σ_i σ_down), then σ_down
                sm = math.sqrt(s * down)
                first.coef = {"x": sm / s, "0": 1 - sm / s}
                second = _Row(sm, None, {"x_carry": down / s, "0": 1 - down / s})
            if s_next > 0:
                second.noise, second.noise_sigmas = s_noise * up, (s, s_next)
            rows += [first, second]
            continue
        # dpmpp_sde
        if s_next == 0:
            first.coef = _euler(s, 0.0)
            rows.append(first)
            continue
        h = math.log(s / s_next)
        sm = s * math.exp(-r * h)              # σ at λ_i + r h
        fac = 1 / (2 * r)
        down1, up1 = ancestral_step(s, sm, eta)
        first.coef = {"x": down1 / s, "0": 1 - down1 / s}
        first.noise, first.noise_sigmas = s_noise * up1, (s, sm)
        down2, up2 = ancestral_step(s, s_next, eta)
        second = _Row(sm, None, {"x_carry": down2 / s, "x0_prev": (1 - down2 / s) * (1 - fac),
                                 "0": (1 - down2 / s) * fac}, s_noise * up2, (s, s_next))
        if nested_noise and first.noise > 0 and second.noise > 0:
            # z_2 = ρ z_1 + √(1 − ρ²) ξ with ρ² = (σ_i − σ_s)/(σ_i − σ_{i+1}): the increments of one Brownian
            # path over [σ_s, σ_i] ⊂ [σ_{i+1}, σ_i]. z_1 is read back from this stage's input:
            # z_1 = (x_2 − w_x x_i − w_0 D_1)/n_1, all three at hand (x, x_carry, x0_prev)
            rho = math.sqrt((s - sm) / (s - s_next))
            k = second.noise * rho / first.noise
            second.coef["x"] = k
            second.coef["x_carry"] -= k * first.coef["x"]
            second.coef["x0_prev"] -= k * first.coef["0"]
            second.noise *= math.sqrt(1 - rho * rho)
        rows += [first, second]
    return _tables(name, ts, rows, sig, sig_hat[0], churn[0])


def _tables(name: str, ts: Timesteps, rows: List[_Row], sig: List[float], first_sigma: float,
            initial_noise: float) -> SamplerTables:
    """The rows in variance-preserving form. Row ``j``'s output is stored at the σ of row ``j+1``
    (the last at the final σ); ``x_carry`` holds the previous row's input, at its σ."""
    a = lambda s: 1 / math.sqrt(1 + s * s)   # noqa: E731   √ᾱ at σ
    need = [r.sigma for r in rows if r.grid is None]
    if need and ts.sigma_to_t is None:
        raise ValueError(f"sampler {name!r} calls the model between the listed σ's (at σ = {need[0]:.6g}), which needs "
                         "the σ -> timestep map: pass sigmas= to gradguide.sample (or Timesteps with sigma_to_t)")
    between = iter(torch.as_tensor(ts.sigma_to_t(torch.tensor(need, dtype=torch.float64)), dtype=torch.float64)
                   .reshape(-1).tolist()) if need else iter(())
    t_list = [float(ts.t[r.grid]) if r.grid is not None else next(between) for r in rows]
    t_eval = torch.tensor(t_list, dtype=torch.float64)
    if ts.t.dtype == torch.int64 and torch.equal(t_eval, t_eval.round()):
        t_eval = t_eval.to(torch.int64)
    out_sigma = [r.sigma for r in rows[1:]] + [sig[-1]]
    cols = {k: [] for k in ("c_x", "c_0", "c_x0_prev", "c_x_carry", "sigma")}
    for j, (row, so) in enumerate(zip(rows, out_sigma)):
        a_out, a_in = a(so), a(row.sigma)
        a_prev = a(rows[j - 1].sigma) if j > 0 else a_in
        cols["c_x"].append(a_out * row.coef.get("x", 0.0) / a_in)
        cols["c_0"].append(a_out * row.coef.get("0", 0.0))
        cols["c_x0_prev"].append(a_out * row.coef.get("x0_prev", 0.0))
        cols["c_x_carry"].append(a_out * row.coef.get("x_carry", 0.0) / a_prev)
        cols["sigma"].append(a_out * row.noise)
    abar = torch.tensor([1 / (1 + r.sigma ** 2) for r in rows], dtype=torch.float64)
    abar_out = torch.tensor([1 / (1 + s ** 2) for s in out_sigma], dtype=torch.float64)
    if sig[-1] == 0:
        abar_out[-1] = 1.0
    # x_T enters as the σ-space σ_0 x_T (init_scale at σ_0), moved to the first evaluation's σ
    init_scale = ts.init_scale * a(first_sigma) / a(sig[0])
    evals = Timesteps(t_eval, abar, abar_out, init_scale=init_scale, final_scale=ts.final_scale,
                      sigma_to_t=ts.sigma_to_t)
    t = common_tables(evals)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    tables = SamplerTables(name, evals, t, slots=SLOTS, moves={"x0_prev": "0", "x_carry": "x"},
                           draws_noise=[r.noise > 0 for r in rows], noise_sigmas=[r.noise_sigmas for r in rows])
    if initial_noise:
        tables.initial_noise = a(first_sigma) * initial_noise
        tables.initial_noise_sigmas = (sig[0], first_sigma)
    return tables


def dpm_fast_tables(ts: Timesteps, nfe=None, eta: float = 0.0, s_noise: float = 1.0, orders=None) -> SamplerTables:
    """k-diffusion's ``sample_dpm_fast(model, x, sigma_min, sigma_max, n)``: DPM-Solver-fast (Lu et
    al. 2022, the noise-prediction singlestep solvers of orders 3, 2, 1) with ``nfe = n`` model
    evaluations on steps uniform in ``t = −log σ`` from σ_max to σ_min, the listed σ's being
    exactly ``[σ_max, σ_min]``. ``orders`` (instead of ``nfe``): the orders of the steps, e.g.
    ``(3,)`` for one DPM-Solver-3 step (what :func:`gradguide.adaptive.sample_dpm_adaptive`
    attempts). Per step of order k (``r_1 = 1/3, r_2 = 2/3`` for k = 3,
    ``r_1 = 1/2`` for k = 2), with ``ε_j`` the model's ε at the j-th stage point ``s_j = t + r_j h``:

    - order 1: ``x' = x − σ' (e^h − 1) ε_0``;
    - order 2: ``u_1 = x − σ(s_1)(e^{r_1 h} − 1) ε_0``, ``x' = x − σ'(e^h − 1) ε_0 − σ'/(2 r_1) (e^h − 1)(ε_1 − ε_0)``;
    - order 3: ``u_1`` as above,
      ``u_2 = x − σ(s_2)(e^{r_2 h} − 1) ε_0 − σ(s_2) (r_2/r_1) ((e^{r_2 h} − 1)/(r_2 h) − 1)(ε_1 − ε_0)``,
      ``x' = x − σ'(e^h − 1) ε_0 − σ'/r_2 ((e^h − 1)/h − 1)(ε_2 − ε_0)``.

    With ``eta > 0`` each step goes to ``σ_down`` (k-diffusion's ancestral split, capped at σ_min)
    and adds ``s_noise √(σ'² − σ_down²) z``. The step's start ``x`` and ``ε_0`` are slots
    (``start``, ``e0``) in σ-space."""
    name = "dpm_fast"
    if len(ts) != 1 or float(ts.abar_prev[0]) == 1.0:
        raise ValueError("sampler 'dpm_fast': pass sigmas=[sigma_max, sigma_min] (both > 0; the solver makes its own "
                         "steps between them, as k-diffusion's sample_dpm_fast(model, x, sigma_min, sigma_max, n)) and "
                         "the option nfe=n")
    if orders is not None:
        if nfe is not None or not isinstance(orders, (list, tuple)) or not orders or \
                any(isinstance(k, bool) or k not in (1, 2, 3) for k in orders):
            raise ValueError(f"sampler 'dpm_fast': orders: expected a non-empty sequence of 1, 2 or 3 (and no nfe), "
                             f"got {orders!r}")
    elif isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"sampler 'dpm_fast': nfe: expected a positive integer (model evaluations), got {nfe!r}")
    eta = _number(name, "eta", eta)
    s_noise = _number(name, "s_noise", s_noise)
    if ts.sigma_to_t is None:
        raise ValueError("sampler 'dpm_fast' calls the model between the listed σ's: pass sigmas= to gradguide.sample")
    s_max = math.sqrt((1 - float(ts.abar[0])) / float(ts.abar[0]))
    s_min = math.sqrt((1 - float(ts.abar_prev[0])) / float(ts.abar_prev[0]))
    t_start, t_end = -math.log(s_max), -math.log(s_min)
    if orders is None:
        m = nfe // 3 + 1
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    grid = torch.linspace(t_start, t_end, len(orders) + 1, dtype=torch.float64).tolist()
    sig = lambda t: math.exp(-t)   # noqa: E731
    # rows: (σ of the evaluation, σ the output is stored at, σ-space weights, noise weight, noise σ's, starts a step)
    rows = []
    for i, order in enumerate(orders):
        t, t_next = grid[i], grid[i + 1]
        if eta:
            down, up = ancestral_step(sig(t), sig(t_next), eta)
            t_to = min(t_end, -math.log(down)) if down > 0 else t_end
            noise = s_noise * math.sqrt(max(sig(t_next) ** 2 - sig(t_to) ** 2, 0.0))
        else:
            t_to, noise = t_next, 0.0
        h = t_to - t
        s_to = sig(t_to)
        # weights over start (σ-space x of the step), e0 (ε_0), cur (this stage's ε), x and D read at the evaluation
        if order == 1:
            stages = [(t, {"start": 1.0, "e0": -s_to * math.expm1(h)})]
        elif order == 2:
            r1 = 0.5
            s1 = t + r1 * h
            stages = [(t, {"start": 1.0, "e0": -sig(s1) * math.expm1(r1 * h)}),
                      (s1, {"start": 1.0, "e0": -s_to * math.expm1(h) + s_to / (2 * r1) * math.expm1(h),
                            "cur": -s_to / (2 * r1) * math.expm1(h)})]
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            c2 = sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
            c3 = s_to / r2 * (math.expm1(h) / h - 1)
            stages = [(t, {"start": 1.0, "e0": -sig(s1) * math.expm1(r1 * h)}),
                      (s1, {"start": 1.0, "e0": -sig(s2) * math.expm1(r2 * h) + c2, "cur": -c2}),
                      (s2, {"start": 1.0, "e0": -s_to * math.expm1(h) + c3, "cur": -c3})]
        for k, (t_eval, w) in enumerate(stages):
            last = k == len(stages) - 1
            rows.append((sig(t_eval), w, noise if last else 0.0, (sig(t), sig(t_next)), k == 0))
    a = lambda s: 1 / math.sqrt(1 + s * s)   # noqa: E731
    out_sigma = [r[0] for r in rows[1:]] + [s_min]
    n = len(rows)
    cols = {k: [0.0] * n for k in ("c_x", "c_0", "c_start", "c_e0", "sigma", "u_start_x", "u_start_start",
                                   "u_e0_x", "u_e0_0", "u_e0_e0")}
    for j, ((s_eval, w, noise, _, starts), s_out) in enumerate(zip(rows, out_sigma)):
        a_in, a_out = a(s_eval), a(s_out)
        # ε here = (x/a_in − D)/s_eval; at a step's first stage start = x/a_in and e0 = ε, so read x, D directly
        e_x, e_0 = 1 / (a_in * s_eval), -1 / s_eval
        if starts:
            cols["c_x"][j] = a_out * (w["start"] / a_in + w["e0"] * e_x)
            cols["c_0"][j] = a_out * w["e0"] * e_0
            cols["u_start_x"][j], cols["u_e0_x"][j], cols["u_e0_0"][j] = 1 / a_in, e_x, e_0
        else:
            cols["c_start"][j], cols["c_e0"][j] = a_out * w["start"], a_out * w["e0"]
            cols["c_x"][j], cols["c_0"][j] = a_out * w.get("cur", 0.0) * e_x, a_out * w.get("cur", 0.0) * e_0
            cols["u_start_start"][j], cols["u_e0_e0"][j] = 1.0, 1.0
        cols["sigma"][j] = a_out * noise
    t_eval = torch.as_tensor(ts.sigma_to_t(torch.tensor([r[0] for r in rows], dtype=torch.float64)),
                             dtype=torch.float64).reshape(-1)
    abar = torch.tensor([1 / (1 + r[0] ** 2) for r in rows], dtype=torch.float64)
    abar_out = torch.tensor([1 / (1 + s ** 2) for s in out_sigma], dtype=torch.float64)
    evals = Timesteps(t_eval, abar, abar_out, init_scale=ts.init_scale * a(rows[0][0]) / a(s_max),
                      final_scale=ts.final_scale, sigma_to_t=ts.sigma_to_t)
    t = common_tables(evals)
    t.update({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    t["var_mean"] = t["sigma"] ** 2
    return SamplerTables(name, evals, t, slots=("start", "e0"), draws_noise=[r[2] > 0 for r in rows],
                         noise_sigmas=[r[3] for r in rows])
