"""Convergence order of every sampler, measured on closed-form problems (float64).

A parity test against one peer cannot see a coefficient that both sides share; the order of the
global error can. Each test runs a sampler's scalar tables (:mod:`gradguide.samplers`) over a
step-count sweep on a smooth family of σ grids, measures the error at the end against an exact
answer, fits the slope of ``log error`` against ``log n`` and asserts the theoretical order.

- **Deterministic samplers** (the probability-flow ODE ``dx_σ/dσ = (x_σ − D(x_σ, σ))/σ``): a
  1-D two-component Gaussian mixture (its denoiser ``D`` is exact and nonlinear), started at
  ``σ_max = 10`` from four points; the reference is the ODE solved by scipy's DOP853 at
  ``rtol = 1e-13``; the error is the largest difference at ``σ_min = 0.1``.
- **Stochastic samplers** (ancestral, DDPM, DDIM(η > 0), the SDE solvers): data ``N(μ, s²)``,
  for which ``D`` is affine in ``x``; every step is then affine in the state (the sample and the
  sampler's slots) plus ``σ z``, so the mean and covariance of the state propagate *exactly*
  (no seeds, no Monte Carlo noise). Started from the exact marginal ``N(μ, s² + σ_max²)``, the
  weak error is ``|mean − μ| + |var − (s² + σ_min²)|`` at the end. (The mean is exact for any
  consistent step here, ``x_σ ≡ μ`` being a fixed point; the error is the variance's.) An
  ancestral or churned step (an ODE step plus fresh noise that makes up the variance) is exact on
  Gaussian data when its ODE step is, so its weak order is the ODE step's; the multistep SDE
  solvers measure 2.

Grids: ``exp``: uniform in ``λ = −log σ`` (k-diffusion's exponential σ's); ``graded``: the
same with ``λ`` at ``(k/n)²`` of the way, so the first steps are ``O(h²)`` long: a multistep
method's lower-order warm-up steps then contribute below its order (a first-order first step of
length ``h`` alone leaves an ``O(h²)`` global error, which would hide orders 3 and 4).

The tables are run by a small interpreter (:func:`run_paths`, :func:`run_moments`) that
follows :class:`~gradguide.samplers.SamplerTables`' definition;
:func:`test_interpreter_is_gradguide_sample` checks it against :func:`gradguide.sample` itself.
"""
import math

import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide.samplers import build
from gradguide.schedules import Timesteps

SIGMA_MAX, SIGMA_MIN = 10.0, 0.1
NS = (24, 48, 96, 192)
# a mixture with overlapping components: D is nonlinear but smooth down to σ_min
W, MU, VAR = np.array([0.4, 0.6]), np.array([-1.0, 0.7]), np.array([0.2, 0.3])
X_START = np.array([-2.0, -0.3, 0.4, 1.7]) * SIGMA_MAX
GAUSS_MU, GAUSS_VAR = 0.5, 0.25


def sigma_grid(n, kind, smax=SIGMA_MAX, smin=SIGMA_MIN):
    u = np.linspace(0.0, 1.0, n + 1)
    if kind == "lin":
        return np.linspace(smax, smin, n + 1)
    if kind == "graded":
        u = u ** 2
    return np.exp(np.log(smax) + u * (np.log(smin) - np.log(smax)))


def timesteps(sig) -> Timesteps:
    """σ-space timesteps whose model timestep *is* σ (the closed-form models read σ from t)."""
    sig = torch.as_tensor(np.asarray(sig, dtype=np.float64))
    abar = 1 / (1 + sig ** 2)
    return Timesteps(sig[:-1].clone(), abar[:-1], abar[1:], sigma_to_t=lambda s: s)


def mixture_denoiser(x, sigma):
    x = np.asarray(x, dtype=np.float64)[..., None]
    var = VAR + sigma * sigma
    logp = np.log(W) - 0.5 * (x - MU) ** 2 / var - 0.5 * np.log(var)
    resp = np.exp(logp - logp.max(-1, keepdims=True))
    resp /= resp.sum(-1, keepdims=True)
    return (resp * (VAR * x + sigma * sigma * MU) / var).sum(-1)


def _coef(tables, i):
    return lambda key: float(tables.tables[key][i]) if key in tables.tables else 0.0


def run_paths(tables, denoise, x_sigma, noises=None):
    """The sampler on σ-space starting points ``x_sigma``; returns ``x_σ`` at the last σ. The step
    is ``x' = c_x x + c_0 D + Σ c_slot S_slot + sigma z`` on the variance-preserving ``x = √ᾱ x_σ``
    with the slots moved or updated from ``(x, D, old slots)`` read before any is written."""
    ts = tables.timesteps
    a = ts.abar.sqrt().numpy()
    sig = ((1 - ts.abar) / ts.abar).sqrt().numpy()
    noises = iter(noises or ())
    x = np.asarray(x_sigma, dtype=np.float64) * a[0]   # at the first evaluation's σ (after any churn noise)
    if tables.initial_noise:
        x = x + tables.initial_noise * next(noises)
    state = {s: np.zeros_like(x) for s in tables.slots}
    for i in range(len(ts)):
        c = _coef(tables, i)
        d = denoise(x / a[i], sig[i])
        out = c("c_x") * x + c("c_0") * d + sum(c("c_" + s) * state[s] for s in tables.slots)
        if tables.draws_noise[i]:
            out = out + c("sigma") * next(noises)
        src = {"x": x, "0": d, **state}
        state = {s: (src[tables.moves[s]].copy() if s in tables.moves else
                     sum(c(f"u_{s}_{k}") * v for k, v in src.items())) for s in tables.slots}
        x = out
    return x / math.sqrt(float(ts.abar_prev[-1]))


def _brownian_correlation(first, second):
    """Correlation of the normalised increments of one Brownian path over two σ intervals."""
    (a0, a1), (b0, b1) = sorted(first), sorted(second)
    overlap = max(0.0, min(a1, b1) - max(a0, b0))
    return overlap / math.sqrt((a1 - a0) * (b1 - b0)) if a1 > a0 and b1 > b0 else 0.0


def run_moments(tables, mu=GAUSS_MU, var=GAUSS_VAR, sigma_start=None, brownian=False):
    """Exact mean and variance of ``x_σ`` at the last σ for data ``N(mu, var)``, from the exact
    marginal at the first σ: the state ``(x, slots)`` is affine in the previous state and ``z``.
    ``brownian``: each step's ``z`` is the normalised increment of one Brownian path over its
    ``noise_sigmas`` (a Brownian-tree noise sampler), correlated with the previous draw; the
    previous draw is then part of the state. Otherwise draws are independent (the generator)."""
    ts = tables.timesteps
    a = ts.abar.sqrt().numpy()
    sig = ((1 - ts.abar) / ts.abar).sqrt().numpy()
    names = ("x",) + tuple(tables.slots) + ("z",)
    m = len(names)
    e = {k: np.eye(m)[j] for j, k in enumerate(names)}
    mean, cov = np.zeros(m), np.zeros((m, m))
    # the exact marginal at the first listed σ, in the first evaluation's variance-preserving scale
    mean[0] = a[0] * mu
    cov[0, 0] = a[0] ** 2 * (var + (sig[0] if sigma_start is None else sigma_start) ** 2) + tables.initial_noise ** 2
    last = None
    for i in range(len(ts)):
        c = _coef(tables, i)
        # D = E[x_0 | x] = p x + q for Gaussian data (x the variance-preserving sample)
        p, q = var / (var + sig[i] ** 2) / a[i], sig[i] ** 2 / (var + sig[i] ** 2) * mu
        rows = {"x": (e["x"], 0.0), "0": (p * e["x"], q), **{s: (e[s], 0.0) for s in tables.slots}}

        def affine(weights):
            return (sum(w * rows[k][0] for k, w in weights.items()), sum(w * rows[k][1] for k, w in weights.items()))
        M, b, g = np.zeros((m, m)), np.zeros(m), np.zeros(m)
        M[0], b[0] = affine({"x": c("c_x"), "0": c("c_0"), **{s: c("c_" + s) for s in tables.slots}})
        if tables.draws_noise[i]:   # z = ρ z_previous + √(1 − ρ²) ξ
            rho = _brownian_correlation(last, tables.noise_sigmas[i]) if brownian and last else 0.0
            M[0] += c("sigma") * rho * e["z"]
            g[0] = c("sigma") * math.sqrt(1 - rho * rho)
            M[-1], g[-1] = rho * e["z"], math.sqrt(1 - rho * rho)
            last = tables.noise_sigmas[i]
        else:
            M[-1] = e["z"]
        for s in tables.slots:
            j = names.index(s)
            if s in tables.moves:
                M[j], b[j] = rows[tables.moves[s]]
            else:
                M[j], b[j] = affine({k: c(f"u_{s}_{k}") for k in ("x", "0") + tuple(tables.slots)})
        mean, cov = M @ mean + b, M @ cov @ M.T + np.outer(g, g)
    end = float(ts.abar_prev[-1])
    return mean[0] / math.sqrt(end), cov[0, 0] / end


_REFERENCE = {}


def ode_reference(smax=SIGMA_MAX, smin=SIGMA_MIN):
    if (smax, smin) not in _REFERENCE:
        from scipy.integrate import solve_ivp
        x0 = X_START * smax / SIGMA_MAX
        sol = solve_ivp(lambda s, x: (x - mixture_denoiser(x, s)) / s, [smax, smin], x0, method="DOP853",
                        rtol=1e-13, atol=1e-13)
        assert sol.success
        _REFERENCE[(smax, smin)] = (x0, sol.y[:, -1])
    return _REFERENCE[(smax, smin)]


def slope(ns, errors):
    """Least-squares slope of −log(error) against log(n): the observed order."""
    return float(-np.polyfit(np.log(ns), np.log(errors), 1)[0])


def ode_errors(name, options, kind, smax=SIGMA_MAX, smin=SIGMA_MIN, ns=NS):
    x0, ref = ode_reference(smax, smin)
    errors = []
    for n in ns:
        sig = sigma_grid(n, kind, smax, smin)
        target = ref
        if name == "heun":   # Heun ends with an Euler step to σ = 0, i.e. x = D(x, σ_min), on both sides
            sig, target = np.append(sig, 0.0), mixture_denoiser(ref, smin)
        out = run_paths(build(name, timesteps(sig), **options), mixture_denoiser, x0)
        errors.append(float(np.abs(out - target).max()))
    return errors


def weak_errors(name, options, kind="exp", ns=NS, brownian=False):
    errors = []
    if brownian:   # tables as for a Brownian-tree noise_sampler (the correlation is then run_moments')
        options = {**options, "noise_sampler": lambda sigma, sigma_next: None}
    for n in ns:
        mean, var = run_moments(build(name, timesteps(sigma_grid(n, kind)), **options), sigma_start=SIGMA_MAX,
                                brownian=brownian)
        errors.append(abs(mean - GAUSS_MU) + abs(var - (GAUSS_VAR + SIGMA_MIN ** 2)))
    return errors


# (id, sampler, options, grid, expected order, why)
ODE_CASES = [
    ("ddim", "ddim", {}, "exp", 1,
     "DDIM(η=0) is the first-order exponential integrator: x̂_0 frozen over the step, local error O(h²)"),
    ("euler", "euler", {}, "exp", 1, "Euler in σ (the same step as DDIM(0) on σ's grid)"),
    ("heun", "heun", {}, "exp", 2, "Heun's trapezoidal corrector: local error O(h³); the final Euler step to σ = 0 "
     "is x = D on both sides"),
    ("dpmpp-1", "dpmpp-2m", {"solver_order": 1}, "exp", 1, "DPM-Solver++(1) is DDIM(0)"),
    ("dpmpp-2m-midpoint", "dpmpp-2m", {"lower_order_final": False}, "exp", 2,
     "the linear Taylor term from one previous prediction: local error O(h³)"),
    ("dpmpp-2m-heun", "dpmpp-2m", {"solver_type": "heun", "lower_order_final": False}, "exp", 2,
     "as midpoint, with the exact weight φ₂ of the linear term"),
    ("dpmpp-2m-sde-eta0", "dpmpp-2m-sde", {"eta": 0.0, "lower_order_final": False}, "exp", 2,
     "the SDE solver at η = 0 is the ODE solver"),
    ("dpmpp-3m-published", "dpmpp-2m", {"solver_order": 3, "lower_order_final": False}, "graded", 2,
     "Lu et al.'s (and diffusers', k-diffusion's) D2 weight −φ₃ is half the Taylor weight −2φ₃ of h²D''/2: "
     "local error ≈ h³ D''/12, so DPM-Solver++(3M) as published is second order"),
    ("dpmpp-3m-taylor", "dpmpp-2m", {"solver_order": 3, "lower_order_final": False, "d2_weight": "taylor"},
     "graded", 3, "the Taylor-consistent D2 weight −2φ₃: local error O(h⁴)"),
    ("lms-2", "lms", {"order": 2}, "exp", 2, "two-step Adams–Bashforth in σ with exact variable-step weights"),
    ("lms-3", "lms", {"order": 3}, "graded", 3, "three-step Adams–Bashforth (graded: the warm-up steps are short)"),
    ("lms-4", "lms", {}, "graded", 4, "four-step Adams–Bashforth (graded: the warm-up steps are short)"),
    ("plms", "plms", {}, "exp", 2,
     "PNDM's fixed Adams–Bashforth weights (55, −59, 37, −9)/24 are those of equal steps; on steps of unequal "
     "length in σ (here equal in log σ) the combination is consistent to second order only"),
]
ODE_CASES += [
    ("dpm_2", "dpm_2", {}, "exp", 2, "the derivative at the log-midpoint of the step (an explicit midpoint rule)"),
    ("dpm_2_ancestral-eta0", "dpm_2_ancestral", {"eta": 0.0}, "exp", 2, "at η = 0 it is dpm_2"),
    ("dpmpp_2s_ancestral-eta0", "dpmpp_2s_ancestral", {"eta": 0.0}, "exp", 2,
     "DPM-Solver++(2S): data-prediction exponential integrator with the prediction at the λ-midpoint"),
    ("dpmpp_sde-eta0", "dpmpp_sde", {"eta": 0.0}, "exp", 2, "at η = 0, DPM-Solver++(2S) with r = 1/2"),
    ("dpmpp_sde-eta0-r0.3", "dpmpp_sde", {"eta": 0.0, "r": 0.3}, "exp", 2,
     "(1 − 1/(2r)) D_1 + 1/(2r) D_2 is the linear Taylor term for any r"),
]
ODE_CASES += [   # ComfyUI's own samplers (gradguide.samplers.comfy; docs/samplers.md, "ComfyUI")
    ("ipndm", "ipndm", {}, "exp", 2,
     "Adams–Bashforth's equal-step weights on steps whose ratio is 1 + O(h): the second-order condition is off by "
     "O(h), the first-order one exact (local error O(h³)); the Euler first step alone also leaves O(h²)"),
    ("ipndm_v-2", "ipndm_v", {"max_order": 2}, "exp", 2, "exact variable-step two-node Adams–Bashforth"),
    ("ipndm_v", "ipndm_v", {}, "exp", 3,
     "the three- and four-node weights satisfy the order conditions up to third order on equal steps (the four-node "
     "one not the fourth), off by O(h) on steps of ratio 1 + O(h): a third-order body; the Euler first step's "
     "O(h²) is below it over this sweep"),
    ("deis-2", "deis", {"max_order": 2}, "exp", 2,
     "DEIS-tAB: the exact integral of the derivative's Lagrange interpolant in VP time against dσ, two nodes"),
    ("deis", "deis", {}, "graded", 3, "DEIS-tAB with three nodes (graded: the warm-up steps are short)"),
    ("deis-logrho-2", "deis", {"deis_mode": "logrho", "max_order": 2, "lower_order_final": False}, "exp", 2,
     "diffusers' DEIS: the derivative's interpolant in log σ through two steps, integrated exactly over σ"),
    ("deis-logrho-3", "deis", {"deis_mode": "logrho", "max_order": 3, "lower_order_final": False}, "graded", 3,
     "three nodes (graded: the warm-up steps are short)"),
    ("gradient_estimation", "gradient_estimation", {}, "exp", 1,
     "γ = 2 weighs the derivative's change by (γ−1) dt (σ_i − σ_{i−1}) ≈ 2 · dt²/2: the second-order term is doubled"),
    ("gradient_estimation-1.5", "gradient_estimation", {"ge_gamma": 1.5}, "exp", 2,
     "γ = 3/2 gives dt²/2 on steps of ratio 1 + O(h): second order"),
    ("res_multistep", "res_multistep", {}, "exp", 2,
     "exponential integrator with D linear through the last two predictions, integrated exactly (φ₁, φ₂)"),
    ("res_multistep_ancestral-eta0", "res_multistep_ancestral", {"eta": 0.0}, "exp", 2, "at η = 0 it is res_multistep"),
    ("heunpp2", "heunpp2", {}, "exp", 1,
     "the weights sum to 1 (consistent) but weigh the derivative's change, d_2 − d_1 ≈ dt d' and d_3 − d_1 ≈ 2 dt d', "
     "by w_2 + 2 w_3 ≈ σ_i/σ_0 instead of the Taylor ½: the local error keeps an O(h²) term"),
    ("seeds_2-eta0", "seeds_2", {"eta": 0.0}, "exp", 2,
     "at η = 0, the data-prediction exponential integrator with (1 − 1/(2r)) D_1 + D_2/(2r): DPM-Solver++(2S)"),
    ("seeds_2-eta0-phi2", "seeds_2", {"eta": 0.0, "solver_type": "phi_2"}, "exp", 2,
     "the φ₂ weights make D linear through the two stages, integrated exactly"),
    ("seeds_3-eta0", "seeds_3", {"eta": 0.0}, "exp", 3,
     "at η = 0, the third-order singlestep exponential integrator (stages at r = 1/3, 2/3; the last combines D_1 "
     "and D_3 with φ₂/r_2)"),
    ("sa_solver-eta0", "sa_solver", {"eta": 0.0}, "graded", 4,
     "Adams predictor (3 nodes, local O(h⁴)) and corrector (4 nodes with the new prediction, local O(h⁵)) in λ with "
     "the linear part exact: the PEC pair is of order min(p + 1, c) = 4"),
    ("sa_solver-eta0-p2c3", "sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 3}, "graded", 3,
     "min(p + 1, c) = 3"),
    ("sa_solver-eta0-p1c1", "sa_solver", {"eta": 0.0, "predictor_order": 1, "corrector_order": 1}, "exp", 1,
     "one node each: D frozen over the step"),
    ("sa_solver-eta0-simple2", "sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 2,
                                             "simple_order_2": True}, "exp", 2, "the paper's simplified order-2 weights"),
    ("sa_solver_pece-eta0", "sa_solver_pece", {"eta": 0.0}, "graded", 4, "PECE: the same pair, re-evaluated"),
    ("seeds_2-eta0-r1-phi2", "seeds_2", {"eta": 0.0, "r": 1.0, "solver_type": "phi_2"}, "exp", 2,
     "r = 1 (ComfyUI's exp_heun_2_x0): exponential Heun"),
]
ODE_CASES += [   # diffusers' noise-prediction multistep and singlestep DPM-Solvers (gradguide.samplers.dpmsolver)
    ("dpm-1", "dpm-2m", {"solver_order": 1}, "exp", 1, "DPM-Solver-1 on ε is DDIM(0)"),
    ("dpm-2m-midpoint", "dpm-2m", {"lower_order_final": False}, "exp", 2,
     "ε linear through the last two predictions, its linear term weighted ½σ_t(e^h − 1): local error O(h³)"),
    ("dpm-2m-heun", "dpm-2m", {"solver_type": "heun", "lower_order_final": False}, "exp", 2,
     "the exact weight σ_t((e^h − 1)/h − 1) of the linear term"),
    ("dpm-3m", "dpm-2m", {"solver_order": 3, "lower_order_final": False}, "exp", 2,
     "Lu et al.'s D2 ≈ h²ε''/2 weighted σ_t((e^h − 1 − h)/h² − ½) ≈ σ_t h/6, half the Taylor weight σ_t h/3 (as "
     "DPM-Solver++(3M)'s): local error ≈ σ_t h³ ε''/12, second order"),
]
for algo, name in (("dpmsolver++", "dpmpp-single"), ("dpmsolver", "dpm-single")):
    ODE_CASES += [
        (f"{name}-1", name, {"solver_order": 1}, "exp", 1, "every interval one first-order (DDIM) step"),
        (f"{name}-2-midpoint", name, {"solver_order": 2}, "exp", 2,
         f"{algo}: a first-order step to the interval's middle evaluation (local O(h²), read with weight O(h)), then "
         "the whole interval with the prediction linear through the two: local error O(h³)"),
        (f"{name}-2-heun", name, {"solver_order": 2, "solver_type": "heun"}, "exp", 2, "as midpoint, φ₂ weight"),
        (f"{name}-3-midpoint", name, {"solver_order": 3}, "exp", 3,
         "Lu et al.'s DPM-Solver-3: D1_1 = (m_2 − m_s)/r_2 with the φ₂-type weight is exact to h³ when r_2 = 2/3, "
         "which an exp grid gives (λ-uniform: r = 1/3, 2/3); the second-order inner step's O(h³) is read with "
         "weight O(h)"),
        (f"{name}-3-heun", name, {"solver_order": 3, "solver_type": "heun"}, "exp", 3,
         "the quadratic through the three predictions, integrated exactly; the first inner step's O(h²) error reaches "
         "the output with weight ∝ (r_2/2 − 1/3)·h, zero at r_2 = 2/3"),
    ]
for p in (1, 2, 3):
    for bh in ("bh1", "bh2"):
        ODE_CASES.append((f"unipc-{p}-{bh}", "unipc", {"solver_order": p, "solver_type": bh, "lower_order_final": False},
                          "graded", p + 1, "UniP of order p with the UniC corrector, which raises the order by one "
                          "(Zhao et al. 2023, Thm 3.1); the last step is the uncorrected predictor, once"))


@pytest.mark.parametrize("case", ODE_CASES, ids=[c[0] for c in ODE_CASES])
def test_ode_sampler_order(case):
    _, name, options, kind, order, _why = case
    errors = ode_errors(name, options, kind)
    observed = slope(NS[1:], errors[1:])
    assert abs(observed - order) <= 0.25, f"observed order {observed:.2f}, expected {order} (errors {errors})"


def test_plms_is_fourth_order_on_equal_sigma_steps():
    """On equal σ steps PNDM's weights are Adams–Bashforth's: order 4 in the body. Its warm-up (a
    trapezoidal first step, then the two- and three-step weights once each) has local errors O(h³),
    O(h³), O(h⁴), so the limit is at least 3; over this sweep the body dominates."""
    errors = ode_errors("plms", {}, "lin", smax=3.0, smin=0.5)
    observed = slope(NS[1:], errors[1:])
    assert 3.0 - 0.25 <= observed <= 4.0 + 0.25, f"observed order {observed:.2f} (errors {errors})"


# (id, sampler, options, expected weak order, why)
SDE_CASES = [
    ("ddpm", "ddpm", {}, 1, "ancestral sampling: each step draws from a Gaussian whose mean freezes x̂_0"),
    ("ddpm-fixed-large", "ddpm", {"variance": "fixed-large"}, 1, "β instead of β̃: equal to first order in the step"),
    ("ddim-eta1", "ddim", {"eta": 1.0}, 1, "DDIM(η) freezes x̂_0 over the step"),
    ("ddim-eta0.5", "ddim", {"eta": 0.5}, 1, "as η = 1"),
    ("euler_a", "euler_a", {}, 1, "Euler to σ_down, then fresh noise to σ_next"),
    ("euler_a-eta0.5", "euler_a", {"eta": 0.5}, 1, "as η = 1"),
    ("dpmpp-2m-sde-midpoint", "dpmpp-2m-sde", {"lower_order_final": False}, 2,
     "the second-order multistep drift with the exactly integrated linear part and noise"),
    ("dpmpp-2m-sde-heun", "dpmpp-2m-sde", {"solver_type": "heun", "lower_order_final": False}, 2, "as midpoint"),
    ("dpmpp-2m-sde-eta0.5", "dpmpp-2m-sde", {"eta": 0.5, "lower_order_final": False}, 2, "as η = 1"),
    ("dpmpp-3m-sde", "dpmpp-3m-sde", {}, 2, "the published D2 weight (second order, like its ODE limit)"),
    ("dpmpp-3m-sde-eta0.5", "dpmpp-3m-sde", {"eta": 0.5}, 2, "as η = 1"),
    ("dpmpp-3m-sde-taylor", "dpmpp-3m-sde", {"d2_weight": "taylor"}, 2,
     "the Taylor D2 weight: third order on the ODE, but the variance's recursion stays second order"),
    ("dpmpp-3m-sde-diffusers", "dpmpp-2m-sde", {"solver_order": 3, "lower_order_final": False,
                                                "d2_weight": "diffusers"}, 1,
     "diffusers 0.42's D2 weight tends to −α_t, not 0: an O(1) error in an O(h) correction, first order"),
    ("dpm-2m-sde-1", "dpm-2m-sde", {"solver_order": 1}, 1, "sde-dpmsolver's first-order step freezes ε over the step"),
    ("dpm-2m-sde-midpoint", "dpm-2m-sde", {"lower_order_final": False}, 2,
     "the noise-prediction SDE step with its linear part and noise exact, ε linear through two predictions"),
    ("dpm-2m-sde-heun", "dpm-2m-sde", {"solver_type": "heun", "lower_order_final": False}, 2, "as midpoint"),
    ("dpmpp-single-sde-1", "dpmpp-single-sde", {"solver_order": 1}, 1, "sde-dpmsolver++(1) (DDIM(η=1)-like)"),
    ("dpmpp-single-sde-2", "dpmpp-single-sde", {"solver_order": 2}, 1,
     "each evaluation draws its own independent noise: the interval's output noise is independent of the noise "
     "in its middle evaluation, whose prediction enters with weight O(h), so the covariance of the two misses an "
     "O(h²) term per interval: weak first order (diffusers' singlestep draws)"),
    ("dpmpp-single-sde-2-heun", "dpmpp-single-sde", {"solver_order": 2, "solver_type": "heun"}, 1, "as midpoint"),
    ("dpmpp-single-sde-3", "dpmpp-single-sde", {"solver_order": 3}, 1, "as second order"),
]


SDE_CASES += [
    # an ancestral or churned step is an ODE step (to σ_down, or from σ̂ up from σ) plus fresh noise that
    # makes up the variance exactly; on Gaussian data the marginal after an exact ODE step plus that noise
    # is exact, so the weak order is the ODE step's
    ("dpm_2_ancestral", "dpm_2_ancestral", {}, 2, "dpm_2 to σ_down (second order) plus exact fresh noise"),
    ("dpm_2_ancestral-eta0.6", "dpm_2_ancestral", {"eta": 0.6, "s_noise": 1.0}, 2, "as η = 1"),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}, 2, "DPM-Solver++(2S) to σ_down plus exact fresh noise"),
    ("euler-churn", "euler", {"s_churn": 1.0}, 1, "noise up to σ̂ = (1+γ)σ, then Euler (first order)"),
    ("euler-churn-window", "euler", {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0}, 1, "as without the window"),
    ("heun-churn", "heun", {"s_churn": 1.0}, 2, "noise up to σ̂, then Heun (second order)"),
    ("heun-churn-strong", "heun", {"s_churn": 10.0}, 2, "γ capped at √2 − 1; as above"),
    ("dpm_2-churn", "dpm_2", {"s_churn": 1.0}, 2, "noise up to σ̂, then dpm_2"),
    ("dpmpp_sde", "dpmpp_sde", {}, 2, "two stochastic stages whose noises are one Brownian path's increments"),
    ("dpmpp_sde-eta0.5", "dpmpp_sde", {"eta": 0.5}, 2, "as η = 1"),
]

SDE_CASES += [
    ("res_multistep_ancestral", "res_multistep_ancestral", {}, 2,
     "measured on Gaussian data; its history's node distance is the previous step's deterministic part "
     "(twice the λ step at η = 1), as ComfyUI's"),
    ("res_multistep_ancestral-eta0.5", "res_multistep_ancestral", {"eta": 0.5}, 2, "as η = 1"),
    ("seeds_2", "seeds_2", {}, 2, "SEEDS-2: both stages integrate the linear part and the noise exactly; the data "
     "term is the second-order DPM-Solver++(2S) combination"),
    ("seeds_2-phi2", "seeds_2", {"solver_type": "phi_2"}, 2, "as φ₁"),
    ("seeds_2-eta0.5", "seeds_2", {"eta": 0.5}, 2, "as η = 1"),
    ("seeds_3", "seeds_3", {}, 2, "measured 1.85 (local slopes rising to 1.9): the variance's recursion is second "
     "order, as the multistep SDE solvers'; its η = 0 limit is third order"),
    ("seeds_3-eta0.5", "seeds_3", {"eta": 0.5}, 2, "as η = 1"),
    ("sa_solver", "sa_solver", {"sde_sigmas": (100.0, 0.0)}, 2,
     "τ = 1 everywhere: the stochastic Adams steps integrate the linear part and the noise exactly; the variance's "
     "recursion is second order, as the multistep SDE solvers'"),
    ("sa_solver_pece", "sa_solver_pece", {"sde_sigmas": (100.0, 0.0)}, 2, "as sa_solver"),
    ("er_sde-exact", "er_sde", {"integration_points": None}, 2,
     "ER-SDE-Solver-3 with exact integrals: the variance recursion is second order (as the multistep SDE solvers')"),
    ("er_sde-2-exact", "er_sde", {"max_stage": 2, "integration_points": None}, 2, "as three stages"),
    ("er_sde-1", "er_sde", {"max_stage": 1}, 1, "the first stage alone freezes D over the step"),
    ("heunpp2-churn", "heunpp2", {"s_churn": 1.0}, 1, "noise up to σ̂, then the first-order Heun++ step"),
]

@pytest.mark.parametrize("case", SDE_CASES, ids=[c[0] for c in SDE_CASES])
def test_sde_sampler_weak_order(case):
    _, name, options, order, _why = case
    errors = weak_errors(name, options)
    observed = slope(NS[1:], errors[1:])
    assert abs(observed - order) <= 0.25, f"observed weak order {observed:.2f}, expected {order} (errors {errors})"


def test_dpmpp_3m_sde_weak_error_falls_at_least_as_fast_as_2m_sde():
    """The corrected third-order SDE solver converges at least as fast as the second-order one,
    and is at least as accurate from 48 steps on; diffusers' weight does neither."""
    two = weak_errors("dpmpp-2m-sde", {"solver_type": "heun", "lower_order_final": False})
    three = weak_errors("dpmpp-3m-sde", {})
    bad = weak_errors("dpmpp-2m-sde", {"solver_order": 3, "lower_order_final": False, "d2_weight": "diffusers"})
    assert slope(NS[1:], three[1:]) >= slope(NS[1:], two[1:]) - 0.1
    assert all(t <= w for t, w in zip(three[1:], two[1:])), (three, two)
    assert slope(NS[1:], bad[1:]) < 1.2 and bad[-1] > 50 * three[-1]


def test_diffusers_singlestep_sde_third_order_heun_does_not_converge():
    """diffusers 0.42's singlestep sde-dpmsolver++ third-order "heun" weight on D2 tends to −α_t
    (not 0) and its D2 = 2 (D1_1 − D1_0)/(r_2 − r_1) carries the O(√h) noise of the two inner
    evaluations: an O(√h) noise per interval that does not average out, so the weak error does not
    fall with the step (docs/diffusers.md); the midpoint third order (D1_1 alone) converges."""
    bad = weak_errors("dpmpp-single-sde", {"solver_order": 3, "solver_type": "heun"})
    good = weak_errors("dpmpp-single-sde", {"solver_order": 3})
    assert bad[-1] > 1.0 and bad[-1] >= bad[0], bad
    assert slope(NS[1:], good[1:]) > 0.75 and good[-1] < 0.05, good


@pytest.mark.parametrize("name,options", [("dpm-2m", {"lower_order_final": False}),
                                          ("dpm-2m", {"solver_order": 3, "lower_order_final": False}),
                                          ("dpm-single", {"solver_order": 3}), ("dpm-single", {"solver_order": 2})])
def test_noise_prediction_dpm_solver_onto_sigma_zero_returns_x0(name, options):
    """Onto σ = 0 the noise-prediction weight σ_t(e^h − 1) is 0 · ∞ (diffusers refuses that
    grid); gradguide takes the limit h → ∞, x = x̂_0 of the last evaluation: the same path to
    σ_min, then D there (the singlestep order lists of 11 and 12 steps onto σ = 0 agree on the first 11)."""
    sig = sigma_grid(12, "exp")
    x0, _ = ode_reference()
    to_min = run_paths(build(name, timesteps(sig[:-1]), **options), mixture_denoiser, x0)
    to_zero = build(name, timesteps(np.append(sig[:-1], 0.0)), **options)
    np.testing.assert_allclose(run_paths(to_zero, mixture_denoiser, x0),
                               mixture_denoiser(to_min, sig[-2]), rtol=1e-10, atol=1e-10)


def test_er_sde_comfyui_quadrature_adds_a_first_order_error():
    """ComfyUI sums ER-SDE's integrals with 200 points: an O(dt²/200) error in the O(dt²) weights of
    the divided differences, so a first-order error on top of the exact-integral solver's; here
    its size falls as 1/n while the exact one's falls as 1/n²."""
    comfy = weak_errors("er_sde", {})
    exact = weak_errors("er_sde", {"integration_points": None})
    gap = [abs(c - e) for c, e in zip(comfy, exact)]
    assert abs(slope(NS[1:], gap[1:]) - 1) <= 0.25, gap
    assert abs(slope(NS[1:], exact[1:]) - 2) <= 0.25


def _sigma_model(x, t):
    """ε of N(GAUSS_MU, GAUSS_VAR) data at σ = t (the timesteps here carry σ as t)."""
    s = t.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    a = 1 / (1 + s * s).sqrt()
    x_sigma = x / a
    d = (GAUSS_VAR * x_sigma + s * s * GAUSS_MU) / (GAUSS_VAR + s * s)
    return (x_sigma - d) / s


INTERPRETED = sorted({(c[1], tuple(sorted(c[2].items()))) for c in ODE_CASES + SDE_CASES})


INTERPRETED += [("dpm_fast", (("nfe", 8),)), ("dpm_fast", (("eta", 1.0), ("nfe", 7)))]


@pytest.mark.parametrize("sampler,options", INTERPRETED, ids=[f"{s}{dict(o)}" for s, o in INTERPRETED])
def test_interpreter_is_gradguide_sample(sampler, options):
    """The interpreter above is how gradguide.sample applies a sampler's tables (same noise)."""
    options = dict(options)
    sig = sigma_grid(9, "exp") if sampler != "dpm_fast" else np.array([SIGMA_MAX, SIGMA_MIN])
    if sampler == "heun":
        sig = np.append(sig, 0.0)
    tables = build(sampler, timesteps(sig), **options)
    ts = timesteps(sig)
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    schedule = gg.Schedule.linear(1000)
    visited = Timesteps(ts.t, ts.abar, ts.abar_prev, init_scale=float(sig[0] * ts.abar[0].sqrt()),
                        final_scale=float(1 / ts.abar_prev[-1].sqrt()), sigma_to_t=ts.sigma_to_t)
    got = gg.sample(_sigma_model, (5, 1), schedule=schedule, sampler=gg.Sampler(sampler, timesteps=visited, **options),
                    x_T=z, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    count = int(bool(tables.initial_noise)) + sum(tables.draws_noise)
    noises = [torch.randn(5, 1, generator=gen, dtype=torch.float64).numpy() for _ in range(count)]

    def denoise(x, s):
        return (GAUSS_VAR * x + s * s * GAUSS_MU) / (GAUSS_VAR + s * s)
    ref = run_paths(tables, denoise, z.numpy() * sig[0], noises)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_dpmpp_sde_needs_brownian_noise():
    """dpmpp_sde's two noises per step must be one Brownian path's increments (correlated, nested
    intervals): with a Brownian-tree noise_sampler, and with gradguide's own draws (the tables
    correlate them), it is weak order 2; fed independent draws it falls to order 1."""
    brownian = weak_errors("dpmpp_sde", {}, brownian=True)
    independent = weak_errors("dpmpp_sde", {"noise_sampler": lambda sigma, sigma_next: None})
    built_in = weak_errors("dpmpp_sde", {})
    assert abs(slope(NS[1:], brownian[1:]) - 2) <= 0.25
    assert abs(slope(NS[1:], independent[1:]) - 1) <= 0.25
    np.testing.assert_allclose(built_in, brownian, rtol=1e-8)


@pytest.mark.parametrize("nfes,order,eta", [((26, 50, 98, 194), 3, 0.0), ((24, 48, 96, 192), 2, 0.0),
                                            ((98, 194, 386, 770), 3, 1.0)],
                         ids=["nfe=3k+2", "nfe=3k", "nfe=3k+2-eta1"])
def test_dpm_fast_order(nfes, order, eta):
    """DPM-Solver-fast: singlestep DPM-Solver-3 steps (local error O(h⁴)), the last ones of lower
    order. With nfe = 3k + 2 the last step is second order (local O(h³)): global order 3. With
    nfe = 3k the last step is first order (local O(h²), not contracted afterwards): global order 2.
    With η > 0 each step is that ODE step to σ_down plus exact fresh noise: weak order 3 on
    Gaussian data."""
    x0, ref = ode_reference()
    errors = []
    for nfe in nfes:
        tables = build("dpm_fast", timesteps([SIGMA_MAX, SIGMA_MIN]), nfe=nfe, eta=eta)
        if eta:
            mean, var = run_moments(tables, sigma_start=SIGMA_MAX)
            errors.append(abs(mean - GAUSS_MU) + abs(var - (GAUSS_VAR + SIGMA_MIN ** 2)))
        else:
            errors.append(float(np.abs(run_paths(tables, mixture_denoiser, x0) - ref).max()))
    observed = slope(nfes[1:], errors[1:])
    assert abs(observed - order) <= 0.3, f"observed order {observed:.2f}, expected {order} (errors {errors})"


class _SigmaIsT(gg.Schedule):
    """A schedule whose model timestep is σ itself (the closed-form models here read σ from t)."""

    def sigma_to_t(self, sigma):
        return torch.as_tensor(np.asarray(sigma, dtype=np.float64))


def _mixture_eps(x, t):
    s = t.to(torch.float64).view(-1, 1)
    x_sigma = x * (1 + s * s).sqrt()
    d = torch.as_tensor(np.stack([mixture_denoiser(x_sigma[j].numpy(), float(s[j])) for j in range(len(s))]))
    return (x_sigma - d) / s


@pytest.mark.parametrize("order,rtols", [(3, (1e-2, 1e-3, 1e-4, 1e-5)), (2, (1e-2, 1e-3, 1e-4))])
def test_dpm_adaptive_error_falls_with_the_order_of_its_solution(order, rtols):
    """DPM-Solver-23 / -12 with error-per-step control: steps of size h ~ tol^(1/order) (the
    embedded estimate is O(h^order)), the propagated solution's global error O(h^order), so
    error ~ nfe^(−order) or faster (local extrapolation) as the tolerance shrinks."""
    from gradguide.adaptive import sample_dpm_adaptive
    x0, ref = ode_reference()
    schedule = _SigmaIsT(gg.Schedule.linear(1000).alphas_cumprod)
    nfes, errors = [], []
    for rtol in rtols:
        x, info = sample_dpm_adaptive(_mixture_eps, (4, 1), schedule=schedule, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                      x_T=torch.as_tensor(x0 / SIGMA_MAX)[:, None], order=order, rtol=rtol,
                                      atol=rtol / 10, return_info=True)
        nfes.append(info["nfe"])
        errors.append(float(np.abs(x[:, 0].numpy() - ref).max()))
    assert all(b < a for a, b in zip(errors, errors[1:])) and all(b > a for a, b in zip(nfes, nfes[1:]))
    observed = slope(nfes[1:], errors[1:])
    assert order - 0.3 <= observed <= order + 1.3, f"observed {observed:.2f} (nfe {nfes}, errors {errors})"


def _edm_gaussian(sigma_data, prediction):
    """The exact EDM network F of N(GAUSS_MU, GAUSS_VAR) data, called on c_in x_σ at t = σ (a _SigmaIsT
    schedule): ``D = c_skip x_σ + c_out F`` is the Gaussian denoiser (gradguide.predictions)."""
    sign = -1.0 if prediction == "edm-v" else 1.0

    def model(x_in, t):
        s = t.to(torch.float64).view(-1, *([1] * (x_in.dim() - 1)))
        norm = (s * s + sigma_data ** 2).sqrt()
        x_sigma = x_in * norm
        d = (GAUSS_VAR * x_sigma + s * s * GAUSS_MU) / (GAUSS_VAR + s * s)
        return (d - sigma_data ** 2 / norm ** 2 * x_sigma) / (sign * s * sigma_data / norm)
    return model


# (id, sampler, options, σ grid, expected order): diffusers' EDMEuler is Euler, EDMDPMSolverMultistep DPM-Solver++
EDM_CASES = [
    ("euler", "euler", {}, "karras", 1),
    ("dpmpp-2m", "dpmpp-2m", {}, "karras", 2),
    ("dpmpp-2m-heun", "dpmpp-2m", {"solver_type": "heun"}, "karras", 2),
    ("dpmpp-3m", "dpmpp-2m", {"solver_order": 3}, "graded", 2),   # the published D2 weight (see ODE_CASES)
]


@pytest.mark.parametrize("case", EDM_CASES, ids=[c[0] for c in EDM_CASES])
def test_edm_prediction_keeps_the_sampler_order(case):
    """gradguide.sample with an EDM network (prediction "edm", σ_d = 0.5, and "edm-v", σ_d = 1.3) on σ's
    from 80 to 0.002, against the closed-form probability-flow ODE of Gaussian data (x_σ − μ scales
    as √(s² + σ²)): the preconditioning is exact, so the sampler keeps its order and both
    parametrisations of the same denoiser give the same samples."""
    _, sampler, options, grid, order = case
    smax, smin, ns = 80.0, 0.002, (16, 32, 64, 128)
    schedule = _SigmaIsT(gg.Schedule.linear(1000).alphas_cumprod)
    z = torch.tensor([[-2.0], [-0.3], [0.4], [1.7]], dtype=torch.float64)
    errors = {}
    for prediction, sigma_data in (("edm", 0.5), ("edm-v", 1.3)):
        errors[prediction] = []
        for n in ns:
            sig = gg.sigmas_karras(n + 1, smin, smax, append_zero=False) if grid == "karras" \
                else torch.as_tensor(sigma_grid(n, grid, smax, smin))
            out = gg.sample(_edm_gaussian(sigma_data, prediction), z.shape, schedule=schedule, x_T=z.clone(),
                            sampler=gg.Sampler(sampler, prediction=prediction, sigma_data=sigma_data, sigmas=sig,
                                               **options))
            exact = GAUSS_MU + (float(sig[0]) * z - GAUSS_MU) * math.sqrt(
                (GAUSS_VAR + float(sig[-1]) ** 2) / (GAUSS_VAR + float(sig[0]) ** 2))
            errors[prediction].append(float((out - exact).abs().max()))
        observed = slope(ns[1:], errors[prediction][1:])
        assert abs(observed - order) <= 0.25, f"{prediction}: observed order {observed:.2f} (errors {errors[prediction]})"
    np.testing.assert_allclose(errors["edm"], errors["edm-v"], rtol=1e-6)
