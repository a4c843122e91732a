"""Flow matching against closed forms (docs/flow.md).

The Gaussian-mixture flow model's velocity ``E[ε − x_0 | x_σ]`` is exact, and for one
component the probability-flow ODE is an affine map, so sampler errors are measured against
the exact solution: each sampler's order is the slope of log error over log step count. CFG
between two equal-variance Gaussians is exactly the velocity of the tilted Gaussian
``N(μ_u + w(μ_c − μ_u), v)``; the exact noisy classifier at scale 1 gives the conditional
velocity exactly; G_loss on a linear-subspace model stays in the subspace while naive G does
not; one PixelAsParam step is checked by hand in flow coordinates.
"""
import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide import predictions
from gradguide.experiments.analytic import FlowGaussianMixture, FlowSubspaceGaussian, GaussianMixture

F64 = torch.float64
GAUSS = FlowGaussianMixture([1.0], [[0.7, -0.4, 0.2]], [0.3 ** 2])
X_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)


def _radius(sig):
    return ((1 - sig) ** 2 + sig ** 2) ** 0.5


def test_flow_velocity_agrees_with_the_variance_preserving_mixture():
    """Two independent derivations: the flow mixture's velocity, and the VP mixture's exact ε at
    x = x_σ/R converted with predictions.output_from_eps('flow', ...)."""
    sched = gg.FlowSchedule()   # its ᾱ_t is the flow ᾱ at σ = (t+1)/T
    w, m, v = [0.3, 0.7], [[1.0, -0.5], [-1.2, 0.4]], [0.2, 0.5]
    flow, vp = FlowGaussianMixture(w, m, v), GaussianMixture(sched, w, m, v)
    x_sigma = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for t in (0, 99, 499, 900, 998):
        sigma = float(sched.train_sigmas.flip(0)[t])   # (t + 1)/T, rounded to float32 as diffusers does
        abar = sched.alphas_cumprod[t]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x = x_sigma / _radius(sigma)
        eps = vp(x, torch.full((64,), t))
        u_vp = predictions.output_from_eps("flow", eps, x, a, s)
        u = flow(x_sigma, torch.full((64,), sigma * 1000, dtype=F64))
        assert torch.allclose(u, u_vp, atol=1e-10, rtol=1e-9), t
        # and the conversions invert each other
        assert torch.allclose(predictions.eps_from("flow", u, x, a, s), eps, atol=1e-10)
        assert torch.allclose(predictions.x0_from("flow", u, x, a, s), x_sigma - sigma * u, atol=1e-10)


def test_one_component_ode_map_solves_the_flow_ode():
    """The affine map the order tests use is the ODE's solution: a fine RK4 agrees with it."""
    x = X_T.clone()
    grid = np.linspace(1.0, 0.0, 4001)
    u = lambda x, s: GAUSS.velocity(x, torch.full((x.shape[0], 1), s, dtype=F64))
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h = s1 - s0
        k1 = u(x, s0); k2 = u(x + h / 2 * k1, s0 + h / 2); k3 = u(x + h / 2 * k2, s0 + h / 2); k4 = u(x + h * k3, s1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert torch.allclose(x, GAUSS.ode_map(X_T, 1.0, 0.0), atol=1e-9)


def _err_to_zero(sampler, n):
    """Error of n steps on the default σ grid (σ from 1 to 0)."""
    sched = gg.FlowSchedule()
    out = gg.sample(GAUSS, X_T.shape, schedule=sched, sampler=sampler, steps=n, x_T=X_T.clone())
    return (out - GAUSS.ode_map(X_T, 1.0, 0.0)).abs().max().item()


def _err_lambda_grid(sampler, n, options):
    """Error of n steps on a grid uniform in λ = log((1−σ)/σ) from −3 to 3 (exponential
    integrators' own variable; σ_0 < 1), compared at the last σ, where sampling ends."""
    sig = 1 / (1 + np.exp(np.linspace(-3.0, 3.0, n + 1)))
    sched = gg.FlowSchedule()
    ts = sched.make_timesteps(sig, torch.as_tensor(sig[:-1] * 1000))
    out = gg.sample(GAUSS, X_T.shape, schedule=sched, sampler=gg.Sampler(sampler, timesteps=ts, **options),
                    x_T=X_T.clone())
    return (out - GAUSS.ode_map(X_T, sig[0], sig[-1])).abs().max().item()


# (sampler, options, grid, step counts, order): UniPC's corrector raises each predictor's order by
# one; its default lower_order_final makes the last step first order (so 2, not 3); a multistep
# solver's first-order warm-up step bounds DPM-Solver++(3M) at 2, so it is not listed
ORDERS = [
    ("flow-euler", {}, "zero", [16, 32, 64, 128], 1),
    ("flow-heun", {}, "zero", [16, 32, 64, 128], 2),
    ("flow-euler", {}, "lambda", [64, 128, 256], 1),
    ("dpmpp-2m", {}, "lambda", [64, 128, 256], 2),
    ("unipc", {"solver_order": 1}, "lambda", [64, 128, 256], 2),
    ("unipc", {"solver_order": 2}, "lambda", [128, 256, 512], 2),
    ("unipc", {"solver_order": 2, "lower_order_final": False}, "lambda", [64, 128, 256], 3),
]


@pytest.mark.parametrize("sampler,options,grid,ns,order", ORDERS,
                         ids=[f"{s}-{'-'.join(f'{k}={v}' for k, v in o.items())}-{g}" for s, o, g, _, _ in ORDERS])
def test_flow_samplers_converge_at_their_order(sampler, options, grid, ns, order):
    errs = [(_err_to_zero(sampler, n) if grid == "zero" else _err_lambda_grid(sampler, n, options)) for n in ns]
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(-slope - order) < 0.25, (errs, slope)
    assert errs[-1] < errs[0]


# -- CFG between equal-variance Gaussians: the exact tilted target -------------------------------

MU_U, MU_C, VAR = [0.5, -1.0], [-0.8, 0.9], 0.25
PAIR = FlowGaussianMixture([0.5, 0.5], [MU_U, MU_C], [VAR, VAR])


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun", "ddim"])
def test_cfg_on_equal_variance_gaussians_is_the_tilted_gaussian(sampler):
    w = 2.5
    mu_w = [u + w * (c - u) for u, c in zip(MU_U, MU_C)]
    tilted = FlowGaussianMixture([1.0], [mu_w], [VAR])
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sched = gg.FlowSchedule(shift=3.0)
    b = x_T.shape[0]
    guided = gg.sample(PAIR, x_T.shape, schedule=sched, sampler=sampler, steps=12, x_T=x_T.clone(),
                       cond={"y": torch.ones(b, dtype=torch.int64)},
                       guidance=gg.CFG(w, uncond={"y": torch.zeros(b, dtype=torch.int64)}))
    direct = gg.sample(tilted, x_T.shape, schedule=sched, sampler=sampler, steps=12, x_T=x_T.clone())
    assert torch.allclose(guided, direct, atol=1e-10)   # the guided velocity is the tilted one, exactly
    fine = gg.sample(PAIR, x_T.shape, schedule=sched, sampler="flow-heun", steps=400, x_T=x_T.clone(),
                     cond={"y": torch.ones(b, dtype=torch.int64)},
                     guidance=gg.CFG(w, uncond={"y": torch.zeros(b, dtype=torch.int64)}))
    exact = tilted.ode_map(x_T, 1.0, 0.0)              # = μ_w + √v x_T
    assert torch.allclose(exact, torch.tensor(mu_w, dtype=F64) + VAR ** 0.5 * x_T, atol=1e-12)
    # the schedule's last step is Euler from σ_min = shift/(T + shift − 1) ≈ 0.003 to 0: O(σ_min²) error
    assert torch.allclose(fine, exact, atol=1e-3)
    assert not torch.allclose(direct, exact, atol=1e-3)   # 12 steps are not converged: the first check is exact


def test_classifier_at_scale_one_gives_the_conditional_velocity():
    """Classifier guidance with the exact noisy classifier (which sees x_σ, like the model) turns
    the unconditional velocity into the conditional one exactly, step for step."""
    gm = FlowGaussianMixture([0.3, 0.7], [[1.0, -0.5], [-1.2, 0.4]], [0.2, 0.5])
    y = torch.zeros(32, dtype=torch.int64)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    sched = gg.FlowSchedule(shift=2.0)
    ts = sched.flow_timesteps(sigmas=np.linspace(0.98, 0.05, 10))   # the classifier's ∇ is 0 at σ = 1
    uncond = lambda x, t, **_: gm(x, t)
    guided = gg.sample(uncond, x_T.shape, schedule=sched, sampler=gg.Sampler("flow-heun", timesteps=ts),
                       x_T=x_T.clone(), cond={"y": y}, guidance=gg.Classifier(gm.log_prob_class, 1.0))
    conditional = gg.sample(lambda x, t, **_: gm(x, t, y), x_T.shape, schedule=sched,
                            sampler=gg.Sampler("flow-heun", timesteps=ts), x_T=x_T.clone())
    assert torch.allclose(guided, conditional, atol=1e-9)
    plain = gg.sample(uncond, x_T.shape, schedule=sched, sampler=gg.Sampler("flow-heun", timesteps=ts),
                      x_T=x_T.clone())
    assert (plain - conditional).abs().max() > 0.1   # and it is guidance


# -- G_loss on a linear subspace under flow matching -----------------------------------------------

@pytest.fixture(scope="module")
def subspace_runs():
    sub = FlowSubspaceGaussian.random(D=64, d=16, seed=0)
    A = sub.basis
    gen = torch.Generator().manual_seed(5)
    par = A @ torch.randn(16, generator=gen)
    perp = torch.randn(64, generator=gen)
    perp = perp - A @ (A.T @ perp)
    theta = par / par.norm() + 9 * perp / perp.norm()     # ‖θ⊥‖/‖θ∥‖ = 9
    theta = theta / theta.norm()
    out = {}
    for sampler in ("flow-euler", "flow-heun"):
        for name, terms in [("none", []), ("G", [gg.NaiveGradient(theta, 3.0)]), ("G_loss", [gg.LookAhead(theta, 3.0)])]:
            x = gg.sample(sub, (64, 64), schedule=gg.FlowSchedule(shift=3.0), sampler=sampler, steps=30,
                          guidance=terms, generator=torch.Generator().manual_seed(1))
            out[sampler, name] = (gg.off_support_ratio(x, A), x @ theta)
    return out


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun"])
def test_lookahead_stays_on_the_subspace_under_flow_matching(subspace_runs, sampler):
    r_off, reward = subspace_runs[sampler, "G_loss"]
    r_none, reward_none = subspace_runs[sampler, "none"]
    assert r_off.max() < 1e-4                         # r_off ≈ 0 (float32 round-off)
    assert reward.mean() > reward_none.mean() + 1.0   # θᵀx moves toward the target 3
    assert (reward - 3).abs().mean() < (reward_none - 3).abs().mean()


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun"])
def test_naive_gradient_leaves_the_subspace_under_flow_matching(subspace_runs, sampler):
    r_G, _ = subspace_runs[sampler, "G"]
    r_loss, _ = subspace_runs[sampler, "G_loss"]
    assert r_G.mean() > 1e-3
    assert r_G.mean() > 100 * r_loss.mean()


# -- PixelAsParam and CFG-Zero* steps by hand, in flow coordinates -------------------------------------

def test_pixelasparam_policy_a_is_the_flow_step_with_projected_directions():
    """One flow-Euler step σ → σ' with the exact classifier and policy A, written in x_σ:
    ``x_σ' = (σ'/σ) x_σ + PC(den | cls) + PC(cls | den)``, ``den = (1 − σ'/σ) x̂_0``,
    ``cls = (1 − σ'/σ) σ²/(1 − σ) s ∇_{x_σ} log p(y | x_σ)`` (Tweedie's shift in flow coordinates)."""
    gm = FlowGaussianMixture([0.3, 0.7], [[1.0, -0.5], [-1.2, 0.4]], [0.2, 0.5])
    scale, s0, s1 = 3.0, 0.7, 0.4
    sched = gg.FlowSchedule()
    ts = sched.flow_timesteps(sigmas=[s0, s1])
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.zeros(64, dtype=torch.int64)
    records = []
    gg.sample(lambda x, t, **_: gm(x, t), x_T.shape, schedule=sched, sampler=gg.Sampler("flow-euler", timesteps=ts),
              x_T=x_T.clone(), cond={"y": y}, guidance=gg.Classifier(gm.log_prob_class, scale),
              projection=gg.PixelAsParam("A"), diagnostics=gg.Diagnostics(callback=records.append))
    x_sigma = x_T.clone()   # sampling starts from x_σ0 = x_T
    t0 = torch.full((64,), s0 * 1000, dtype=F64)
    x0 = x_sigma - s0 * gm(x_sigma, t0)
    xg = x_sigma.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob_class(xg, t0, y).sum(), xg)
    k = 1 - s1 / s0
    den, cls = k * x0, k * s0 ** 2 / (1 - s0) * scale * grad

    def pc(a, b):
        f = ((a * b).sum(1, keepdim=True)).clamp(max=0) / (b * b).sum(1, keepdim=True)
        return a - f * b
    expected = s1 / s0 * x_sigma + pc(den, cls) + pc(cls, den)
    got = records[0].x * _radius(s1)   # the state gradguide carries is x_σ/R
    conflicts = ((den * cls).sum(1) < 0).sum()
    assert conflicts > 0   # some samples' directions do conflict: the projection acts
    assert torch.allclose(got, expected, atol=1e-10)


def test_cfg_zero_star_acts_on_the_velocity_and_zero_init_keeps_x_sigma():
    w = 4.0
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    b = x_T.shape[0]
    cond, uncond = {"y": torch.ones(b, dtype=torch.int64)}, {"y": torch.zeros(b, dtype=torch.int64)}
    sched = gg.FlowSchedule()
    ts = sched.flow_timesteps(sigmas=[0.8, 0.5])
    records = []
    gg.sample(PAIR, x_T.shape, schedule=sched, sampler=gg.Sampler("flow-euler", timesteps=ts), x_T=x_T.clone(),
              cond=cond, guidance=gg.CFGZeroStar(w, zero_init_steps=1, uncond=uncond),
              diagnostics=gg.Diagnostics(callback=records.append))
    r = _radius(torch.tensor([0.8, 0.5, 0.0], dtype=F64))
    assert torch.allclose(records[0].x * r[1], x_T, atol=1e-12)   # zero velocity: x_σ unchanged
    # second step, by hand: û = s* u_u + w (u_c − s* u_u), s* = <u_c, u_u>/‖u_u‖² on the velocity
    x = x_T
    t = torch.full((b,), 500.0, dtype=F64)
    u_c, u_u = PAIR(x, t, cond["y"]), PAIR(x, t, uncond["y"])
    s_star = (u_c * u_u).sum(1, keepdim=True) / (u_u * u_u).sum(1, keepdim=True)
    u_hat = s_star * u_u + w * (u_c - s_star * u_u)
    assert torch.allclose(records[1].x * r[2], x + (0.0 - 0.5) * u_hat, atol=1e-10)
