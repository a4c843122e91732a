"""Convergence order of diffusers' PNDM (with its Runge–Kutta warm-up), iPNDM and SA-Solver
variants (``pndm``, ``ipndm_diffusers``, ``sa_solver_diffusers``), measured as in
test_convergence_order.py (whose problems, grids and table interpreters this file uses): the
global error over a step-count sweep, its fitted slope against the theoretical order.

PNDM calls the model at integer timesteps between the listed ones (the Runge–Kutta midpoints), so
its grids are schedules: ``σ(t)`` linear or log-linear in ``t`` on a fine training table, the
visited timesteps every ``R = 2`` of them (the midpoint ``τ_{m+1} + R/2`` is then exact in ``t``).
"""
import math

import numpy as np
import pytest
import torch
from test_convergence_order import (GAUSS_MU, GAUSS_VAR, NS, SIGMA_MAX, _coef, _sigma_model, mixture_denoiser,
                                    ode_errors, ode_reference, run_moments, run_paths, sigma_grid, slope, timesteps,
                                    weak_errors)

import gradguide as gg
from gradguide.integrations.diffusers_ipndm import IPNDMSchedule
from gradguide.samplers import build
from gradguide.schedules import Schedule, Timesteps

TOL = 0.25
ZERO_TAU, ONE_TAU = (lambda t: 0.0), (lambda t: 1.0)


def pndm_timesteps(n, kind, smax, smin, stride=2):
    """n visited timesteps every ``stride`` training steps of a schedule with σ(t) linear
    (``lin``) or log-linear (``exp``) in t from ``smin`` at t = 0 to ``smax`` at t = T − 1 = n·stride;
    the last step lands on t = 0."""
    T = n * stride + 1
    u = np.arange(T) / (T - 1)
    sig = smin + u * (smax - smin) if kind == "lin" else np.exp(np.log(smin) + u * (np.log(smax) - np.log(smin)))
    schedule = Schedule(1 / (1 + sig ** 2))
    t = torch.arange(T - 1, 0, -stride)
    ac = schedule.alphas_cumprod
    return Timesteps(t, ac[t], ac[t - stride], sigma_to_t=schedule.sigma_to_t), schedule


def pndm_errors(kind, smax, smin, combine="eps", name="pndm"):
    x0, ref = ode_reference(smax, smin)
    errors = []
    for n in NS:
        ts, _ = pndm_timesteps(n, kind, smax, smin)
        if name == "plms":   # the same σ's as plain timesteps (PLMS calls the model only on them)
            abar = torch.cat([ts.abar, ts.abar_prev[-1:]])
            sig = ((1 - abar) / abar).sqrt()
            ts = timesteps(sig.numpy())
        out = run_paths(build(name, ts, combine=combine), mixture_denoiser, x0)
        errors.append(float(np.abs(out - ref).max()))
    return errors


def test_pndm_is_fourth_order_on_equal_sigma_steps():
    """On a schedule linear in σ the timestep midpoint is the σ midpoint: the warm-up is classical RK4
    (three steps, local O(h⁵)) and the body Adams–Bashforth-4 on equal steps: order 4."""
    errors = pndm_errors("lin", 3.0, 0.5)
    assert abs(slope(NS[1:], errors[1:]) - 4) <= TOL, errors


def test_pndm_is_second_order_on_unequal_sigma_steps():
    """Equal steps in log σ: the fixed weights (55, −59, 37, −9)/24 are consistent to second order
    only (as plms), and the timestep midpoint is not the σ midpoint (RK4's c = ½ off by O(h))."""
    errors = pndm_errors("exp", SIGMA_MAX, 0.1)
    assert abs(slope(NS[1:], errors[1:]) - 2) <= TOL, errors


@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_pndm_on_v_outputs_is_first_order(name):
    """diffusers' PNDMScheduler combines a v-model's raw outputs and converts the combination with the
    step's start sample and ᾱ (ε̃ = √ᾱ ṽ + √(1−ᾱ) x), which it reproduces: a combination of v's
    from other noise levels read at this one is off by O(h) in ε̃, so the method is first order on
    v outputs (on the same equal-σ steps where it is fourth order on ε). docs/diffusers.md."""
    eps = pndm_errors("lin", 3.0, 0.5, "eps", name)
    v = pndm_errors("lin", 3.0, 0.5, "v", name)
    assert slope(NS[1:], eps[1:]) > 2.75, eps
    assert abs(slope(NS[1:], v[1:]) - 1) <= TOL, v


def test_ipndm_is_second_order():
    """The equal-step Adams–Bashforth weights on ε with DDIM's transfer on steps equal in log σ
    (as ComfyUI's ipndm), its first steps at lower order: second order."""
    errors = ode_errors("ipndm_diffusers", {}, "exp")
    assert abs(slope(NS[1:], errors[1:]) - 2) <= TOL, errors


def _ipndm_own_grid_errors(mu, ns=NS):
    """diffusers' IPNDM on its own grid, from ᾱ = 0 (x = z) to clean data, on N(mu, var) data: the
    probability-flow ODE ends at mu + √var z."""
    z = np.array([-2.0, -0.7, 0.3, 1.5])
    errors = []
    for n in ns:
        tables = build("ipndm_diffusers", IPNDMSchedule().timesteps(n))
        ts = tables.timesteps
        x = z.copy()
        state = {s: np.zeros_like(x) for s in tables.slots}
        for i in range(len(ts)):
            c, ab = _coef(tables, i), float(ts.abar[i])
            d = (math.sqrt(ab) * GAUSS_VAR * x + (1 - ab) * mu) / (ab * GAUSS_VAR + 1 - ab)   # E[x_0 | x] at ᾱ
            out = c("c_x") * x + c("c_0") * d + sum(c("c_" + s) * state[s] for s in tables.slots)
            src = {"x": x, "0": d, **state}
            state = {s: sum(c(f"u_{s}_{k}") * v for k, v in src.items()) for s in tables.slots}
            x = out
        errors.append(float(np.abs(x - (mu + math.sqrt(GAUSS_VAR) * z)).max()))
    return errors


def test_ipndm_first_step_drops_the_model_and_is_first_order_on_its_own_grid():
    """At ᾱ_0 = 0 diffusers' step is x_1 = σ_1 x_0 whatever the model says (α_0 = 0 and its floor
    max(α, 1e-8) turn (x − ε̃)/α into 0, where the exact limit is x̂_0 = E[x_0]): the ODE then starts
    off by E[x_0] at σ_1, an O(1/n) error in the end. First order for data with a mean; with
    E[x_0] = 0 nothing is dropped and the error is far smaller and falls faster."""
    tables = build("ipndm_diffusers", IPNDMSchedule().timesteps(10))
    sigma_1 = math.sqrt(1 - float(tables.timesteps.abar[1]))
    assert float(tables.tables["c_0"][0]) == 0.0
    assert abs(float(tables.tables["c_x"][0]) - sigma_1) < 1e-12
    with_mean = _ipndm_own_grid_errors(0.5)
    centred = _ipndm_own_grid_errors(0.0)
    assert abs(slope(NS[1:], with_mean[1:]) - 1) <= TOL, with_mean
    assert slope(NS[1:], centred[1:]) > 1.5 and centred[-1] < with_mean[-1] / 50, centred


# (id, options, grid, order, why) with τ = 0: the probability-flow ODE
SA_ODE_CASES = [
    ("p2c2", {}, "exp", 2, "diffusers' default: two-node predictor and corrector (the simplified weights)"),
    ("p3c4", {"predictor_order": 3, "corrector_order": 4, "lower_order_final": False}, "graded", 4,
     "PEC pair of order min(p + 1, c) = 4; the last step the uncorrected predictor (local O(h⁴)), once"),
    ("p3c4-lower-final", {"predictor_order": 3, "corrector_order": 4}, "graded", 2,
     "lower_order_final (diffusers' default) makes the last predictor first order, also with 15 or more steps: "
     "its O(h²) local error is the global one"),
    ("p2c3", {"predictor_order": 2, "corrector_order": 3, "lower_order_final": False}, "graded", 3,
     "min(p + 1, c) = 3"),
    ("noise-p2c2", {"algorithm": "noise", "lower_order_final": False}, "exp", 2,
     "noise prediction: ε's Lagrange interpolant integrated against e^{−λ}"),
    ("noise-p3c4", {"algorithm": "noise", "predictor_order": 3, "corrector_order": 4, "lower_order_final": False},
     "graded", 4, "as p3c4"),
]


@pytest.mark.parametrize("case", SA_ODE_CASES, ids=[c[0] for c in SA_ODE_CASES])
def test_sa_solver_ode_order(case):
    _, options, kind, order, _why = case
    x0, ref = ode_reference()
    errors = []
    for n in NS:
        tables = build("sa_solver_diffusers", timesteps(sigma_grid(n, kind)), tau_func=ZERO_TAU, **options)
        # diffusers draws at every step: zero-weight draws here (τ = 0)
        out = run_paths(tables, mixture_denoiser, x0, noises=[np.zeros_like(x0)] * len(tables.timesteps))
        errors.append(float(np.abs(out - ref).max()))
    assert abs(slope(NS[1:], errors[1:]) - order) <= TOL, errors


# (id, options, weak order, why) with τ = 1 at every step: the SDE, exact moments on Gaussian data
SA_SDE_CASES = [
    ("p2c2", {}, 2, "the stochastic Adams pair with the linear part and the noise integrated exactly"),
    ("p3c4", {"predictor_order": 3, "corrector_order": 4, "lower_order_final": False}, 2,
     "higher orders: the variance's recursion stays second order (as ComfyUI's sa_solver)"),
    ("noise-p2c2", {"algorithm": "noise", "lower_order_final": False}, 2, "diffusers' noise-prediction SDE step"),
]


@pytest.mark.parametrize("case", SA_SDE_CASES, ids=[c[0] for c in SA_SDE_CASES])
def test_sa_solver_weak_order(case):
    _, options, order, _why = case
    errors = weak_errors("sa_solver_diffusers", {**options, "tau_func": ONE_TAU})
    assert abs(slope(NS[1:], errors[1:]) - order) <= TOL, errors


def test_sa_solver_moments_over_many_seeds_are_the_exact_ones():
    """gradguide.sample itself, on 40,000 seeds' worth of noise: the sample mean and variance agree
    with the exact moment propagation the weak-order test measures (within 4 standard errors), and
    with the data's, so the corrector's reuse of the predictor's noise is what the tables say."""
    sig = sigma_grid(24, "exp")
    options = {"tau_func": ONE_TAU}
    tables = build("sa_solver_diffusers", timesteps(sig), **options)
    mean, var = run_moments(tables)
    ts = timesteps(sig)
    visited = Timesteps(ts.t, ts.abar, ts.abar_prev, init_scale=float(sig[0] * ts.abar[0].sqrt()),
                        final_scale=float(1 / ts.abar_prev[-1].sqrt()), sigma_to_t=ts.sigma_to_t)
    count = 40_000
    z = torch.randn(count, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # x_σ0 from the exact marginal N(μ, var + σ0²)
    x_T = (GAUSS_MU + math.sqrt(GAUSS_VAR + sig[0] ** 2) * z) / sig[0]
    out = gg.sample(_sigma_model, (count, 1), schedule=gg.Schedule.linear(1000),
                    sampler=gg.Sampler("sa_solver_diffusers", timesteps=visited, **options), x_T=x_T,
                    generator=torch.Generator().manual_seed(1))
    got_mean, got_var = float(out.mean()), float(out.var())
    assert abs(got_mean - mean) < 4 * math.sqrt(var / count)
    assert abs(got_var - var) < 4 * var * math.sqrt(2 / count)
    assert abs(var - (GAUSS_VAR + sig[-1] ** 2)) < 0.02   # 24 steps: near the data's own (weak error 7.5e-3)


def test_interpreter_is_gradguide_sample_for_pndm():
    """PNDM's tables (midpoint evaluations included) as gradguide.sample applies them."""
    ts, schedule = pndm_timesteps(6, "exp", SIGMA_MAX, 0.1)
    tables = build("pndm", ts)
    ac = schedule.alphas_cumprod

    def model(x, t):   # ε of N(μ, var) data at the training timestep t
        abar = ac[t.long()].view(-1, *([1] * (x.dim() - 1)))
        s = ((1 - abar) / abar).sqrt()
        x_sigma = x / abar.sqrt()
        return (x_sigma - (GAUSS_VAR * x_sigma + s * s * GAUSS_MU) / (GAUSS_VAR + s * s)) / s
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = gg.sample(model, (5, 1), schedule=schedule, sampler=gg.Sampler("pndm", timesteps=ts), x_T=z)
    ref = run_paths(tables, lambda x, s: (GAUSS_VAR * x + s * s * GAUSS_MU) / (GAUSS_VAR + s * s),
                    z.numpy() / math.sqrt(float(ts.abar[0]))) * math.sqrt(float(ts.abar_prev[-1]))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    assert len(tables.timesteps) == 4 * 3 + 3   # three Runge–Kutta steps of four calls, then PLMS


@pytest.mark.parametrize("name,options,match", [
    ("sa_solver_diffusers", {"predictor_order": 5}, "predictor_order"),
    ("sa_solver_diffusers", {"corrector_order": 0}, "corrector_order"),
    ("sa_solver_diffusers", {"algorithm": "sde"}, "algorithm"),
    ("sa_solver_diffusers", {"lower_order_final": 1}, "lower_order_final"),
    ("sa_solver_diffusers", {"tau_func": lambda t: "high"}, "tau_func"),
    ("sa_solver_diffusers", {"tau_func": lambda t: math.inf}, "tau_func"),
    ("sa_solver_diffusers", {"algorithm": "noise", "to_zero": True}, "σ = 0"),
    ("pndm", {"combine": "x0"}, "combine"),
    ("pndm", {"hand_made": True}, "training table"),
    ("pndm", {"steps": 3}, "at least 4 steps"),
    ("ipndm_diffusers", {"max_order": 2}, "no options"),
])
def test_options_are_checked_by_name(name, options, match):
    options = dict(options)
    steps, hand_made, to_zero = options.pop("steps", 8), options.pop("hand_made", False), options.pop("to_zero", False)
    schedule = gg.Schedule.linear(1000)
    ts = schedule.timesteps(steps)
    if hand_made:
        ts = Timesteps(ts.t, ts.abar, ts.abar_prev)
    if not to_zero and name == "sa_solver_diffusers":   # diffusers' kind of end: σ > 0
        ts = Timesteps(ts.t, ts.abar, torch.cat([ts.abar[1:], ts.abar[-1:] * 0 + 0.999]))
    with pytest.raises((TypeError, ValueError), match=match):
        build(name, ts, **options)
    if name == "sa_solver_diffusers" and "tau_func" in options:
        with pytest.raises(TypeError, match="tau_func"):
            build(name, ts, tau_func=1.0)


@pytest.mark.parametrize("name", ["pndm", "ipndm_diffusers", "sa_solver_diffusers"])
def test_every_guidance_term_against_the_float64_oracle(name):
    """The fuzz oracle (gradguide.bench.fuzz, the sample target) case by case: every guidance term
    it draws, with PixelAsParam A and C, float32 and float64 runs against the float64 truth, on a
    plain Schedule; each run correct."""
    from gradguide.bench import fuzz
    cases = [(g, None) for g in ("none", "cfg", "classifier", "apg", "cfg-zero*", "rescale")]
    cases += [("cfg", "C"), ("classifier", "A")]   # (policy B is DDPM's)
    outcomes = []
    for k, ((guidance, projection), dtype) in enumerate((c, d) for c in cases for d in ("float32", "float64")):
        spec = dict(target="sample", backend="reference", seed=k, dtype=dtype, b=2, model=("toy", "mixture")[k % 2],
                    T=(50, 1000)[k % 2], sampler=name, steps=(4, 6)[k % 2], eta=0.0, guidance=guidance,
                    scale=2.0 if guidance != "rescale" else 3.0, projection=projection, granularity="sample",
                    clip=("none", "true", "range")[k % 3], mutation="none")
        outcome, detail = fuzz.run_case(spec)
        outcomes.append(outcome)
        assert outcome == "correct", f"{outcome}: {detail}\nspec = {spec!r}"
    assert len(outcomes) == 2 * len(cases)


def test_stage_samplers_run_where_no_slot_update_reads_x0():
    """A stage sampler whose slot updates never read x̂_0 on the steps it takes (iPNDM's one step
    from ᾱ = 0, Heun++'s single step) runs: x̂_0 is not materialised there."""
    model = lambda x, t: 0.3 * torch.tanh(x)   # noqa: E731
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = gg.sample(model, (2, 3), schedule=IPNDMSchedule(), steps=1, x_T=x_T)
    assert torch.equal(out, torch.zeros_like(out))   # x_1 = σ_1 x_0 with σ_1 = 0: clean data at once
    out = gg.sample(model, (2, 3), schedule=gg.Schedule.linear(100), sampler="heunpp2", steps=1, x_T=x_T)
    assert torch.isfinite(out).all()
