"""ComfyUI's own samplers (gradguide.samplers.comfy) against their loops as ComfyUI's
``comfy/k_diffusion/sampling.py`` runs them, written out here in σ-space numpy (k-diffusion 0.1.1
has none of them). The tables are run by the order tests' interpreter, which
``test_interpreter_is_gradguide_sample`` checks against gradguide.sample itself."""
import math

import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide.samplers import build
from test_convergence_order import GAUSS_MU, GAUSS_VAR, mixture_denoiser, run_moments, run_paths, timesteps

X0 = np.array([-17.0, -4.0, 3.0, 12.0])


def _grid(n=14):
    return np.append(gg.sigmas_karras(n, 0.05, 12.0, append_zero=False).numpy(), 0.0)


def _ab_loop(sig, x, weights_of):
    """x_σ' = x_σ + Σ_k w_k d_{i−k} (x_σ' = D onto σ = 0), the history newest first."""
    history = []
    for i in range(len(sig) - 1):
        d_den = mixture_denoiser(x, sig[i])
        d = (x - d_den) / sig[i]
        history.insert(0, d)
        if sig[i + 1] == 0:
            x = d_den
        else:
            w = weights_of(i)
            x = x + sum(wk * hk for wk, hk in zip(w, history))
    return x


def _ipndm_weights(sig, max_order):
    ab = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    return lambda i: [(sig[i + 1] - sig[i]) * w for w in ab[min(max_order, i + 1)]]


def _ipndm_v_weights(sig, max_order):
    def weights(i):
        order = min(max_order, i + 1)
        hn = sig[i + 1] - sig[i]
        if order == 1:
            return [hn]
        hn1 = sig[i] - sig[i - 1]
        if order == 2:
            return [hn * (2 + hn / hn1) / 2, -hn * (hn / hn1) / 2]
        hn2 = sig[i - 1] - sig[i - 2]
        temp = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
        if order == 3:
            return [hn * ((2 + hn / hn1) / 2 + temp), hn * (-(hn / hn1) / 2 - (1 + hn1 / hn2) * temp),
                    hn * temp * hn1 / hn2]
        hn3 = sig[i - 2] - sig[i - 3]
        temp2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))) \
            * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
        ratio = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
        return [hn * ((2 + hn / hn1) / 2 + temp + temp2),
                hn * (-(hn / hn1) / 2 - (1 + hn1 / hn2) * temp - (1 + hn1 / hn2 + ratio) * temp2),
                hn * (temp * hn1 / hn2 + (hn1 / hn2 + ratio * (1 + hn2 / hn3)) * temp2),
                hn * (-temp2 * ratio * hn1 / hn2)]
    return weights


def _deis_weights(sig, max_order, N=10000):
    """DEIS-tAB as ComfyUI computes it: EDM σ → VP time through a VP-SDE fitted to σ ∈ [0.002, 80],
    then Σ over N points of linspace(t_i, t_{i+1}) of ℓ_j(τ) dσ/dτ times (t_{i+1} − t_i)/N."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (np.log(smin ** 2 + 1) / eps_s - np.log(smax ** 2 + 1)) / (eps_s - 1)
    beta_min = np.log(smax ** 2 + 1) - 0.5 * beta_d
    t = (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log(np.asarray(sig) ** 2 + 1)) - beta_min) / beta_d

    def weights(i):
        order = min(max_order, i + 1)
        if order == 1:
            return [sig[i + 1] - sig[i]]
        taus = np.linspace(t[i], t[i + 1], N)
        alpha = np.exp(-0.5 * taus ** 2 * beta_d - taus * beta_min)
        integrand = -0.5 * (-(taus * beta_d + beta_min)) / np.sqrt(alpha * (1 - alpha))
        nodes = [t[i - k] for k in range(order)]
        out = []
        for j in range(order):
            poly = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly *= (taus - nodes[k]) / (nodes[j] - nodes[k])
            out.append(float(np.sum(integrand * poly) * (t[i + 1] - t[i]) / N))
        return out
    return weights


@pytest.mark.parametrize("name,max_order", [("ipndm", 4), ("ipndm", 2), ("ipndm_v", 4), ("ipndm_v", 3),
                                            ("deis", 3), ("deis", 2), ("deis", 4)])
def test_derivative_multistep_matches_comfyui_loop(name, max_order):
    sig = _grid()
    weights = {"ipndm": _ipndm_weights, "ipndm_v": _ipndm_v_weights, "deis": _deis_weights}[name](sig, max_order)
    ref = _ab_loop(sig, X0.copy(), weights)
    got = run_paths(build(name, timesteps(sig), max_order=max_order), mixture_denoiser, X0)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_deis_weights_are_the_dsigma_integral_of_the_interpolant():
    """DEIS-tAB's weights against the exact integral ∫ ℓ_j(τ) σ'(τ) dτ (Gauss–Legendre, 40 points):
    ComfyUI's 10⁴-point sum is within 1e-5 of it, and the weights of a step sum to its σ change."""
    from gradguide.samplers.comfy import _deis
    sig = _grid()
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (np.log(smin ** 2 + 1) / eps_s - np.log(smax ** 2 + 1)) / (eps_s - 1)
    beta_min = np.log(smax ** 2 + 1) - 0.5 * beta_d
    t = (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log(sig ** 2 + 1)) - beta_min) / beta_d
    sigma_of = lambda tau: np.sqrt(np.expm1(0.5 * beta_d * tau ** 2 + beta_min * tau))   # noqa: E731
    np.testing.assert_allclose(sigma_of(t), sig, rtol=1e-12, atol=1e-12)
    gx, gw = np.polynomial.legendre.leggauss(40)
    weights = _deis(list(sig), 3)
    for i in range(2, len(sig) - 2):
        tau = 0.5 * (t[i + 1] - t[i]) * gx + 0.5 * (t[i + 1] + t[i])
        e = np.exp(0.5 * beta_d * tau ** 2 + beta_min * tau)
        dsig = (beta_d * tau + beta_min) * e / (2 * np.sqrt(e - 1)) * 0.5 * (t[i + 1] - t[i]) * gw
        nodes = t[[i, i - 1, i - 2]]
        for j in range(3):
            others = [m for m in range(3) if m != j]
            basis = np.prod([(tau - nodes[m]) / (nodes[j] - nodes[m]) for m in others], axis=0)
            assert weights[i][j] == pytest.approx(float((dsig * basis).sum()), rel=1e-5, abs=1e-5 * abs(sig[i]))
        assert sum(weights[i]) == pytest.approx(sig[i + 1] - sig[i], rel=1e-5)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_gradient_estimation_matches_comfyui_loop(gamma):
    sig = _grid()
    x, old = X0.copy(), None
    for i in range(len(sig) - 1):
        den = mixture_denoiser(x, sig[i])
        d = (x - den) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old) * dt
        old = d
    got = run_paths(build("gradient_estimation", timesteps(sig), ge_gamma=gamma), mixture_denoiser, X0)
    np.testing.assert_allclose(got, x, rtol=1e-11, atol=1e-11)


def _ancestral(s, s_next, eta):
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    return math.sqrt(s_next ** 2 - up ** 2), up


@pytest.mark.parametrize("name,eta,s_noise", [("res_multistep", 0.0, 1.0), ("res_multistep_ancestral", 1.0, 1.0),
                                              ("res_multistep_ancestral", 0.5, 0.7)])
def test_res_multistep_matches_comfyui_loop(name, eta, s_noise):
    sig = _grid()
    rng = np.random.default_rng(0)
    noises = [rng.standard_normal(X0.shape) for _ in range(len(sig))]
    phi1 = lambda z: math.expm1(z) / z              # noqa: E731
    phi2 = lambda z: (phi1(z) - 1) / z              # noqa: E731
    lam = lambda s: -math.log(s)                    # noqa: E731
    x, old_den, old_down, used = X0.copy(), None, None, iter(noises)
    for i in range(len(sig) - 1):
        den = mixture_denoiser(x, sig[i])
        down, up = _ancestral(sig[i], sig[i + 1], eta)
        if down == 0 or old_den is None:
            x = x + (x - den) / sig[i] * (down - sig[i])
        else:
            h = lam(down) - lam(sig[i])
            c2 = (lam(sig[i - 1]) - lam(old_down)) / h
            b1, b2 = phi1(-h) - phi2(-h) / c2, phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * den + b2 * old_den)
        if sig[i + 1] > 0 and up > 0:
            x = x + next(used) * s_noise * up
        old_den, old_down = den, down
    options = {"s_noise": s_noise, **({"eta": eta} if name.endswith("ancestral") else {})}
    tables = build(name, timesteps(sig), **options)
    got = run_paths(tables, mixture_denoiser, X0, noises[:sum(tables.draws_noise)])
    np.testing.assert_allclose(got, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("options", [{}, {"max_stage": 2, "s_noise": 0.6}, {"max_stage": 1}])
def test_er_sde_matches_comfyui_loop(options):
    """ER-SDE-Solver-3 as ComfyUI runs it for a σ-space (VP ε) model: λ = σ, α = 1, 200-point left
    sums from σ_{i+1} for its two integrals."""
    sig = _grid()
    rng = np.random.default_rng(2)
    noises = [rng.standard_normal(X0.shape) for _ in range(len(sig))]
    scaler = lambda v: v * (np.exp(v ** 0.3) + 10.0)   # noqa: E731
    max_stage, s_noise = options.get("max_stage", 3), options.get("s_noise", 1.0)
    x, old, old_d, used = X0.copy(), None, None, iter(noises)
    k = np.arange(200.0)
    for i in range(len(sig) - 1):
        den = mixture_denoiser(x, sig[i])
        stage = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = den
        else:
            ls, lt = sig[i], sig[i + 1]
            r = scaler(lt) / scaler(ls)
            x = r * x + (1 - r) * den
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200
                pos = lt + k * step
                sc = scaler(pos)
                den_d = (den - old) / (ls - sig[i - 1])
                x = x + (dt + np.sum(1 / sc) * step * scaler(lt)) * den_d
                if stage >= 3:
                    s_u = np.sum((pos - ls) / sc) * step
                    den_u = (den_d - old_d) / ((ls - sig[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + s_u * scaler(lt)) * den_u
                old_d = den_d
            if s_noise > 0:
                x = x + next(used) * s_noise * math.sqrt(lt ** 2 - ls ** 2 * r ** 2)
        old = den
    tables = build("er_sde", timesteps(sig), **options)
    got = run_paths(tables, mixture_denoiser, X0, noises[:sum(tables.draws_noise)])
    np.testing.assert_allclose(got, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("options", [{}, {"solver_type": "phi_2", "eta": 0.6, "s_noise": 0.8}, {"r": 1.0, "eta": 0.0},
                                     {"r": 0.3}])
def test_seeds_2_matches_comfyui_loop(options):
    sig = _grid()
    rng = np.random.default_rng(3)
    noises = [rng.standard_normal(X0.shape) for _ in range(2 * len(sig))]
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    r, solver = options.get("r", 0.5), options.get("solver_type", "phi_1")
    phi1 = math.expm1
    phi2 = lambda z: (math.expm1(z) - z) / z   # noqa: E731  h φ₂(h) as ComfyUI's ei_h_phi_2
    x, used = X0.copy(), iter(noises)
    for i in range(len(sig) - 1):
        den = mixture_denoiser(x, sig[i])
        if sig[i + 1] == 0:
            x = den
            continue
        ls, lt = -math.log(sig[i]), -math.log(sig[i + 1])
        h = lt - ls
        h_eta = h * (eta + 1)
        s1 = math.exp(-(ls + r * h))
        x2 = s1 / sig[i] * math.exp(-r * h * eta) * x - phi1(-r * h_eta) * den
        noisy = eta > 0 and s_noise > 0
        if noisy:
            sde = math.sqrt(-math.expm1(-2 * r * h * eta)) * next(used)
            x2 = x2 + sde * s1 * s_noise
        den2 = mixture_denoiser(x2, s1)
        if solver == "phi_1":
            mix = den + (den2 - den) / (2 * r)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - phi1(-h_eta) * mix
        else:
            b2 = phi2(-h_eta) / r
            b1 = phi1(-h_eta) - b2
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - (b1 * den + b2 * den2)
        if noisy:
            seg = (r - 1) * h * eta
            sde = sde * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * next(used)
            x = x + sde * sig[i + 1] * s_noise
    tables = build("seeds_2", timesteps(sig), **options)
    got = run_paths(tables, mixture_denoiser, X0, noises[:sum(tables.draws_noise)])
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"eta": 0.0}, {"eta": 0.4, "s_noise": 0.8, "r_1": 0.25, "r_2": 0.6}])
def test_seeds_3_matches_comfyui_loop(options):
    sig = _grid()
    rng = np.random.default_rng(5)
    noises = [rng.standard_normal(X0.shape) for _ in range(3 * len(sig))]
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    r1, r2 = options.get("r_1", 1 / 3), options.get("r_2", 2 / 3)
    phi1 = math.expm1
    phi2 = lambda z: (math.expm1(z) - z) / z   # noqa: E731
    x, used = X0.copy(), iter(noises)
    noisy = eta > 0 and s_noise > 0
    for i in range(len(sig) - 1):
        den = mixture_denoiser(x, sig[i])
        if sig[i + 1] == 0:
            x = den
            continue
        ls, lt = -math.log(sig[i]), -math.log(sig[i + 1])
        h = lt - ls
        h_eta = h * (eta + 1)
        s1, s2 = math.exp(-(ls + r1 * h)), math.exp(-(ls + r2 * h))
        x2 = s1 / sig[i] * math.exp(-r1 * h * eta) * x - phi1(-r1 * h_eta) * den
        if noisy:
            sde = math.sqrt(-math.expm1(-2 * r1 * h * eta)) * next(used)
            x2 = x2 + sde * s1 * s_noise
        den2 = mixture_denoiser(x2, s1)
        a32 = r2 / r1 * phi2(-r2 * h_eta)
        a31 = phi1(-r2 * h_eta) - a32
        x3 = s2 / sig[i] * math.exp(-r2 * h * eta) * x - (a31 * den + a32 * den2)
        if noisy:
            seg = (r1 - r2) * h * eta
            sde = sde * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * next(used)
            x3 = x3 + sde * s2 * s_noise
        den3 = mixture_denoiser(x3, s2)
        b3 = phi2(-h_eta) / r2
        b1 = phi1(-h_eta) - b3
        x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - (b1 * den + b3 * den3)
        if noisy:
            seg = (r2 - 1) * h * eta
            sde = sde * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * next(used)
            x = x + sde * sig[i + 1] * s_noise
    tables = build("seeds_3", timesteps(sig), **options)
    got = run_paths(tables, mixture_denoiser, X0, noises[:sum(tables.draws_noise)])
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-10)


def _sa_b(nodes, lam_s, lam_t, tau):
    """SA-Solver's b weights as ComfyUI computes them: the integrals (1+τ²)∫ e^{(1+τ²)(λ−λ_t)} λ^p dλ
    by integration by parts, then the Lagrange weights by solving the transposed Vandermonde system."""
    k, h, order = 1 + tau * tau, lam_t - lam_s, len(nodes)
    prod = np.array([lam_t ** p - lam_s ** p * math.exp(-k * h) for p in range(order)])
    rec = np.zeros((order, order))
    for p in range(order):
        for q in range(p + 1):
            rec[p, q] = math.factorial(p) / math.factorial(q) * k ** (q - p) * (-1) ** (p - q)
    return np.linalg.solve(np.vander(np.array(nodes), order, increasing=True).T, rec @ prod)


@pytest.mark.parametrize("name,options", [("sa_solver", {"eta": 0.0}), ("sa_solver", {"sde_sigmas": (3.0, 0.2)}),
                                          ("sa_solver_pece", {"sde_sigmas": (3.0, 0.2), "s_noise": 0.7}),
                                          ("sa_solver", {"eta": 0.8, "sde_sigmas": (20.0, 0.0), "predictor_order": 2,
                                                         "corrector_order": 3}),
                                          ("sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 2,
                                                         "simple_order_2": True}),
                                          ("sa_solver_pece", {"eta": 0.0})])
def test_sa_solver_matches_comfyui_loop(name, options):
    sig = _grid()
    rng = np.random.default_rng(6)
    noises = [rng.standard_normal(X0.shape) for _ in range(len(sig))]
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    p, c = options.get("predictor_order", 3), options.get("corrector_order", 4)
    simple, pece = options.get("simple_order_2", False), name.endswith("pece")
    window = options.get("sde_sigmas")
    tau_of = lambda s: eta if eta > 0 and window[0] >= s >= window[1] else 0.0   # noqa: E731
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]

    def b(idx, s_i, t_i, tau, corrector):
        nodes = [lam[k] for k in idx]
        if simple and len(nodes) == 2:
            kk, h = 1 + tau * tau, lam[t_i] - lam[s_i]
            if corrector:
                b1 = 0.5 * kk * h
                return [-math.expm1(-h * kk) - b1, b1]
            b2 = 0.5 * kk * h * h / (nodes[0] - lam[s_i])
            return [b2, -math.expm1(-h * kk) - b2]
        return list(_sa_b(nodes, lam[s_i], lam[t_i], tau))
    n = len(sig) - 1
    x_pred = X0.copy()
    x, h, tau, noise, preds, used = None, 0.0, 0.0, 0.0, [], iter(noises)
    for i in range(n):
        den = mixture_denoiser(x_pred, sig[i])
        preds = (preds + [den])[-max(p, c):]
        p_used = min(p, len(preds))
        c_used = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(c, len(preds))
        p_used, c_used = min(p_used, n - 1 - i), min(c_used, n - i)
        if c_used == 0:
            x = x_pred
        else:
            w = b(list(range(i - c_used + 1, i + 1)), i - 1, i, tau, True)
            x = sig[i] / sig[i - 1] * math.exp(-tau * tau * h) * x + sum(wk * d for wk, d in zip(w, preds[-c_used:]))
            if tau > 0 and s_noise > 0:
                x = x + noise
            if pece:
                den = mixture_denoiser(x, sig[i])
                preds[-1] = den
        if sig[i + 1] == 0:
            x_pred = den
        else:
            tau = tau_of(sig[i + 1])
            w = b(list(range(i - p_used + 1, i + 1)), i, i + 1, tau, False)
            h = lam[i + 1] - lam[i]
            x_pred = sig[i + 1] / sig[i] * math.exp(-tau * tau * h) * x + sum(wk * d for wk, d in
                                                                                zip(w, preds[-p_used:]))
            if tau > 0 and s_noise > 0:
                noise = next(used) * sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * s_noise
                x_pred = x_pred + noise
    tables = build(name, timesteps(sig), **options)
    got = run_paths(tables, mixture_denoiser, X0, noises[:sum(tables.draws_noise)])
    np.testing.assert_allclose(got, x_pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options,end", [({}, 0.0), ({}, 0.05), ({"s_churn": 2.0, "s_tmin": 0.2, "s_tmax": 5.0}, 0.0),
                                         ({"s_churn": 1.0, "s_noise": 0.7}, 0.05)])
def test_heunpp2_matches_comfyui_loop(options, end):
    """Heun++ as ComfyUI runs it, with its churn noise from a list (ComfyUI draws it with randn_like)."""
    sig = _grid()
    if end:
        sig = sig[:-1]   # the last σ is not 0: Heun++ ends with an Euler step onto it
    n = len(sig) - 1
    rng = np.random.default_rng(4)
    noises = [rng.standard_normal(X0.shape) for _ in range(n)]
    s_churn, s_tmin = options.get("s_churn", 0.0), options.get("s_tmin", 0.0)
    s_tmax, s_noise = options.get("s_tmax", float("inf")), options.get("s_noise", 1.0)
    x, used = X0.copy(), []
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        hat = sig[i] * (gamma + 1)
        if gamma > 0:
            used.append(noises[i])
            x = x + noises[i] * s_noise * math.sqrt(hat ** 2 - sig[i] ** 2)
        den = mixture_denoiser(x, hat)
        d = (x - den) / hat
        dt = sig[i + 1] - hat
        if sig[i + 1] == sig[-1]:
            x = x + d * dt
        elif sig[i + 2] == sig[-1]:
            x2 = x + d * dt
            d2 = (x2 - mixture_denoiser(x2, sig[i + 1])) / sig[i + 1]
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + (d * (1 - w2) + d2 * w2) * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - mixture_denoiser(x2, sig[i + 1])) / sig[i + 1]
            x3 = x2 + d2 * (sig[i + 2] - sig[i + 1])
            d3 = (x3 - mixture_denoiser(x3, sig[i + 2])) / sig[i + 2]
            w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
            x = x + (d * (1 - w2 - w3) + d2 * w2 + d3 * w3) * dt
    tables = build("heunpp2", timesteps(sig), **options)
    assert tables.draws_noise.count(True) + int(bool(tables.initial_noise)) == len(used)
    got = run_paths(tables, mixture_denoiser, X0, used)
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("s_noise,s_noise_end", [(1.0, None), (0.8, 0.2), (0.0, 1.0)])
def test_lcm_matches_comfyui_loop(s_noise, s_noise_end):
    sig = _grid()
    rng = np.random.default_rng(1)
    noises = [rng.standard_normal(X0.shape) for _ in range(len(sig) - 2)]
    n = len(sig) - 1
    end = s_noise if s_noise_end is None else s_noise_end
    x = X0.copy()
    for i in range(n):
        x = mixture_denoiser(x, sig[i])
        if sig[i + 1] > 0:
            x = x + sig[i + 1] * noises[i] * (s_noise + (end - s_noise) * i / (n - 1))
    options = {"s_noise": s_noise} if s_noise_end is None else {"s_noise": s_noise, "s_noise_end": s_noise_end}
    got = run_paths(build("lcm_comfy", timesteps(sig), **options), mixture_denoiser, X0, noises)
    np.testing.assert_allclose(got, x, rtol=1e-11, atol=1e-11)


def test_lcm_is_not_a_convergent_solver():
    """LCM's step x_σ' = D + σ' z replaces the sample by the posterior mean: on N(μ, s²) data the
    variance loses s² σ_i²/(s² + σ_i²) per step, whatever the step count, so the weak error does
    not vanish as steps are added (order 0). The exact moments follow the recursion
    v' = (s²/(s² + σ²))² v + σ'²."""
    errors = []
    for n in (12, 24, 48, 96):
        sig = np.exp(np.linspace(np.log(10.0), np.log(0.1), n + 1))
        mean, var = run_moments(build("lcm_comfy", timesteps(sig)), sigma_start=10.0)
        v = GAUSS_VAR + sig[0] ** 2
        for i in range(n):
            v = (GAUSS_VAR / (GAUSS_VAR + sig[i] ** 2)) ** 2 * v + sig[i + 1] ** 2
        assert mean == pytest.approx(GAUSS_MU, rel=1e-12) and var == pytest.approx(v, rel=1e-12)
        errors.append(abs(var - (GAUSS_VAR + sig[-1] ** 2)))
    assert min(errors) > 0.5 * max(errors) > 0.05


def test_options_and_refusals():
    ts = timesteps(_grid())
    with pytest.raises(ValueError, match="max_order"):
        build("ipndm", ts, max_order=5)
    with pytest.raises(ValueError, match="unknown options"):
        build("ipndm_v", ts, s_noise=0.5)
    with pytest.raises(ValueError, match="deis_mode"):
        build("deis", ts, deis_mode="rhoab")
    with pytest.raises(ValueError, match="takes no eta"):
        build("res_multistep", ts, eta=1.0)
    with pytest.raises(ValueError, match="noise_clip_std"):
        build("lcm_comfy", ts, noise_clip_std=1.0)
    for name in ("res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"):
        with pytest.raises(ValueError, match="not available.*CFG\\+\\+|not available.*unconditional"):
            build(name, ts)
        with pytest.raises(ValueError, match="not available"):
            gg.Sampler(name)
        with pytest.raises(ValueError, match="not available"):
            gg.sample(lambda x, t: x, (1, 2), schedule=gg.Schedule.linear(100), sampler=name, steps=3)


def test_ipndm_v_weights_on_equal_steps():
    """On equal steps the two- and three-node ipndm_v weights are Adams–Bashforth's; the
    four-node ones are not AB4's: they satisfy the order conditions up to the third only."""
    sig = np.linspace(5.0, 1.0, 9)
    w = _ipndm_v_weights(sig, 4)
    h = sig[1] - sig[0]
    np.testing.assert_allclose(np.array(w(2)) / h, [23 / 12, -16 / 12, 5 / 12], rtol=1e-12)
    w4 = np.array(w(4)) / h
    nodes = -np.arange(4.0)   # the derivatives' positions in steps
    for q in range(4):
        residual = float(np.sum(w4 * nodes ** q) - 1 / (q + 1))
        assert (abs(residual) < 1e-12) == (q < 3), (q, residual)
    # and gradguide's tables hold those weights: c_d1 etc. are a(σ') w_k
    tables = build("ipndm_v", timesteps(np.append(sig, 0.0)))
    a_next = 1 / math.sqrt(1 + sig[5] ** 2)
    np.testing.assert_allclose([float(tables.tables[k][4]) / a_next for k in ("c_d1", "c_d2", "c_d3")],
                               w4[1:] * h, rtol=1e-12)


def test_comfy_samplers_run_through_sample_with_sigmas():
    """gradguide.sample with a ComfyUI σ list (comfy_sigmas) and each sampler: finite, one model
    call per σ step."""
    schedule = gg.Schedule.linear(1000)
    sigmas = gg.comfy_sigmas(schedule, "karras", 8)
    for name in ("ipndm", "ipndm_v", "deis", "gradient_estimation", "res_multistep", "res_multistep_ancestral", "lcm_comfy",
                 "er_sde", "seeds_2", "seeds_3", "heunpp2", "sa_solver"):
        calls = []
        options = {"sde_sigmas": (3.0, 0.5)} if name == "sa_solver" else {}
        x = gg.sample(lambda x, t: (calls.append(1), 0.1 * x)[1], (2, 3), schedule=schedule,
                      sampler=gg.Sampler(name, sigmas=sigmas, **options), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all() and len(calls) == {"seeds_2": 15, "seeds_3": 22, "heunpp2": 21}.get(name, 8), name


# -- ComfyUI's KSampler by names ------------------------------------------------------------------

# ComfyUI's sampler names (comfy/samplers.py: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"])
COMFY_NAMES = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
               "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
               "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
               "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
               "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
               "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
               "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
               "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SD = gg.Schedule.from_betas(np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)


@pytest.mark.parametrize("name", COMFY_NAMES)
def test_every_comfyui_sampler_name_is_mapped_or_refused(name):
    from gradguide.comfy_ksampler import COMFY_REFUSED
    if name in COMFY_REFUSED:
        with pytest.raises(ValueError, match=f"ComfyUI's '{name}' is not available"):
            gg.comfy_sampler(name, "normal", 6, schedule=SD)
        return
    sampler = gg.comfy_sampler(name, "normal", 6, schedule=SD)
    x = gg.sample(lambda x, t: 0.1 * x, (2, 3), schedule=gg.comfy_schedule(SD), sampler=sampler,
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_comfy_sampler_sigmas_follow_ksampler():
    """dpm_2: one step more, the last nonzero σ dropped; denoise d: the last steps + 1 σ's of
    int(steps / d) steps; dpm_fast: [σ_0, last nonzero σ] with nfe = steps; sa_solver: the noise
    window at percent 0.2 and 0.8."""
    s = gg.comfy_sigmas(SD, "karras", 11)
    assert torch.equal(gg.comfy_sampler("dpm_2", "karras", 10, schedule=SD).sigmas, torch.cat([s[:-2], s[-1:]]))
    assert torch.equal(gg.comfy_sampler("euler", "simple", 10, schedule=SD, denoise=0.6).sigmas,
                       gg.comfy_sigmas(SD, "simple", 16)[-11:])
    fast = gg.comfy_sampler("dpm_fast", "exponential", 9, schedule=SD)
    e = gg.comfy_sigmas(SD, "exponential", 9)
    assert fast.options["nfe"] == 9 and torch.equal(fast.sigmas, torch.stack([e[0], e[-2]]))
    sa = gg.comfy_sampler("sa_solver", "normal", 9, schedule=SD)
    assert sa.options["sde_sigmas"] == (gg.comfy_percent_to_sigma(SD, 0.2), gg.comfy_percent_to_sigma(SD, 0.8))
    heun_x0 = gg.comfy_sampler("exp_heun_2_x0", "normal", 9, schedule=SD)
    assert heun_x0.name == "seeds_2" and heun_x0.eta == 0.0
    assert dict(heun_x0.options) == {"r": 1.0, "solver_type": "phi_2"}
    with pytest.raises(ValueError, match="expected a ComfyUI sampler name"):
        gg.comfy_sampler("dpmpp-2m", "normal", 9, schedule=SD)
    with pytest.raises(ValueError, match="denoise"):
        gg.comfy_sampler("euler", "normal", 9, schedule=SD, denoise=0.0)


def test_comfy_ksampler_dpmpp_2m_matches_kdiffusion_driven_as_comfyui():
    """ComfyUI's KSampler("dpmpp_2m", "karras", 10): k-diffusion's sample_dpmpp_2m (ComfyUI's is the
    same function) started from √(1 + σ_0²)·noise, its model called at the nearest training step;
    against comfy_sampler + comfy_schedule + comfy_initial_noise."""
    from helpers import load_kdiffusion_sampling
    K = load_kdiffusion_sampling()
    ac = SD.alphas_cumprod
    log_table = SD.sigmas.log()

    def eps(x, t):   # an ε model (a fixed nonlinear function of x and ᾱ at the integer step)
        abar = ac[t.long()].view(-1, 1)
        return torch.tanh(x) * (1 - abar).sqrt() + 0.3 * x * abar

    def denoiser(x_sigma, sigma):   # ComfyUI's wrapper: c_in, nearest training step, x̂_0 = x − σ ε
        t = (sigma.log().to(torch.float32)[:, None] - log_table.to(torch.float32)[None, :]).abs().argmin(1)
        return x_sigma - sigma.view(-1, 1) * eps(x_sigma / (1 + sigma.view(-1, 1) ** 2).sqrt(), t)
    sampler = gg.comfy_sampler("dpmpp_2m", "karras", 10, schedule=SD)
    sig = sampler.sigmas
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = K.sample_dpmpp_2m(denoiser, noise * (1 + sig[0] ** 2).sqrt(), sig, disable=True)
    got = gg.sample(eps, (3, 4), schedule=gg.comfy_schedule(SD), sampler=sampler,
                    x_T=gg.comfy_initial_noise(noise, sig, SD))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
