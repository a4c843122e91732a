"""Every formula of docs/mathematics.md (samplers, guidance terms, PixelAsParam) on small hand-worked cases, in float64.

Each test builds one sampling step with known model outputs, gradients and noise, runs
``gradguide.sample`` on it, and compares with the formula computed independently here.
"""
import dataclasses
import math

import pytest
import torch

import gradguide as gg
from gradguide import predictions
from gradguide.samplers import build

from helpers import FixedModel, SCHEDULE, coeffs, linear_log_prob, one_step, pc_ref, per_sample_dot

D = torch.float64
SHAPE = (5, 3, 4)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def run(model, ts, x, seed=7, sampler=None, **kw):
    """``sample`` on the timesteps ``ts``; ``sampler``: a name or a ``gg.Sampler``."""
    config = sampler if isinstance(sampler, gg.Sampler) else gg.Sampler(sampler)
    return gg.sample(model, x.shape, schedule=SCHEDULE, sampler=dataclasses.replace(config, timesteps=ts), x_T=x,
                     generator=torch.Generator().manual_seed(seed), **kw)


def noise(seed=7, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# -- §1 predictions ------------------------------------------------------------------------

def test_prediction_conversions_round_trip():
    x, eps, a, s = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2), 0.6, 0.8
    x0 = (x - s * eps) / a
    v = a * eps - s * x0
    for kind, out in [("eps", eps), ("x0", x0), ("v", v)]:
        assert torch.allclose(predictions.eps_from(kind, out, x, a, s), eps, atol=1e-12)
        assert torch.allclose(predictions.x0_from(kind, out, x, a, s), x0, atol=1e-12)
    # docs/mathematics.md#parametrisations: x0 = √ᾱ x_t − √(1−ᾱ) v and ε = √(1−ᾱ) x_t + √ᾱ v
    assert torch.allclose(a * x - s * v, x0, atol=1e-12)
    assert torch.allclose(s * x + a * v, eps, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_sampling_is_invariant_to_the_parametrisation(kind):
    ts = one_step(600, 500)
    c = coeffs(ts)
    x, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    x0 = (x - c["s"] * eps) / c["a"]
    out = {"eps": eps, "x0": x0, "v": c["a"] * eps - c["s"] * x0}[kind]
    got = run(lambda x_, t: out, ts, x, sampler=gg.Sampler("ddim", prediction=kind))
    want = run(lambda x_, t: eps, ts, x, sampler="ddim")
    assert torch.allclose(got, want, atol=1e-10)


# -- §2 samplers ---------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed-small", "fixed-large"])
def test_ddpm_step(variance):
    ts = one_step(700, 650)
    c = coeffs(ts)
    x, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    got = run(lambda x_, t: eps, ts, x, sampler=gg.Sampler(variance=variance))
    x0 = (x - c["s"] * eps) / c["a"]
    var = c["beta_tilde"] if variance == "fixed-small" else c["beta"]
    want = c["c1"] * x0 + c["c2"] * x + math.sqrt(var) * noise()
    assert torch.allclose(got, want, atol=1e-10)


def test_ddpm_last_step_has_no_noise_and_returns_x0():
    ts = one_step(0)
    c = coeffs(ts)
    x, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    got = run(lambda x_, t: eps, ts, x, sampler=gg.Sampler(variance="fixed-large"))
    assert torch.allclose(got, (x - c["s"] * eps) / c["a"], atol=1e-10)


def test_ddpm_learned_range_variance():
    sched = SCHEDULE
    ts = sched.timesteps(10)
    tables = build("ddpm", ts, variance="learned-range").tables
    i = 3
    abar, abar_prev = ts.abar[i].item(), ts.abar_prev[i].item()
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    # log Σ = slope · v + offset: slope = (log β − log β̃)/2, offset = (log β + log β̃)/2
    assert tables["log_var_slope"][i].item() == pytest.approx((math.log(beta) - math.log(beta_tilde)) / 2)
    assert tables["log_var_offset"][i].item() == pytest.approx((math.log(beta) + math.log(beta_tilde)) / 2)
    # ADM clips log β̃ at the last step (β̃ = 0 there) to the value one step earlier
    beta_last = 1 - (ts.abar[-1] / ts.abar_prev[-1]).item()
    assert tables["log_var_slope"][-1].item() + tables["log_var_offset"][-1].item() == pytest.approx(math.log(beta_last))
    assert tables["log_var_offset"][-1].item() - tables["log_var_slope"][-1].item() == pytest.approx(
        tables["log_var_offset"][-2].item() - tables["log_var_slope"][-2].item())
    # the model's extra channels v give log Σ = f log β + (1 − f) log β̃, f = (v+1)/2
    one = one_step(int(ts.t[i]), int(ts.t[i + 1]))
    x, eps = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    v = rand(2, 3, 4, seed=3).tanh()
    got = gg.sample(lambda x_, t: torch.cat([eps, v], 1), x.shape, schedule=sched,
                    sampler=gg.Sampler(variance="learned-range", timesteps=one), x_T=x,
                    generator=torch.Generator().manual_seed(7))
    c = coeffs(one)
    f = (v + 1) / 2
    log_var = f * math.log(c["beta"]) + (1 - f) * math.log(c["beta_tilde"])
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=D)
    want = c["c1"] * (x - c["s"] * eps) / c["a"] + c["c2"] * x + torch.exp(0.5 * log_var) * z
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step(eta):
    ts = one_step(500, 420)
    c = coeffs(ts)
    x, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    got = run(lambda x_, t: eps, ts, x, sampler=gg.Sampler("ddim", eta=eta))
    ap, a = c["abar_prev"], c["abar"]
    sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    x0 = (x - c["s"] * eps) / c["a"]
    want = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma ** 2) * eps
    if eta > 0:
        want = want + sigma * noise()
    assert torch.allclose(got, want, atol=1e-10)


def test_ddim_eta_one_is_ddpm_fixed_small():
    ts = one_step(500, 420)
    x, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    assert torch.allclose(run(lambda x_, t: eps, ts, x, sampler=gg.Sampler("ddim", eta=1.0)),
                          run(lambda x_, t: eps, ts, x, sampler="ddpm"), atol=1e-10)


def test_dpmpp_2m_matches_the_solver_formulas():
    """Three steps of DPM-Solver++(2M) against Lu et al.'s update written out here."""
    ts = SCHEDULE.timesteps([900, 600, 300])
    x = rand(*SHAPE, seed=1)
    model = lambda x_, t: 0.3 * x_ + 0.01 * t.view(-1, 1, 1).to(x_.dtype)   # a smooth ε-model
    got = gg.sample(model, SHAPE, schedule=SCHEDULE, sampler=gg.Sampler("dpmpp-2m", timesteps=ts), x_T=x)
    alpha = lambda ab: math.sqrt(ab)
    sig = lambda ab: math.sqrt(1 - ab)
    lam = lambda ab: math.log(alpha(ab) / sig(ab)) if ab < 1 else math.inf
    abars = ts.abar.tolist() + [1.0]
    xs, prev_d, prev_h = x.clone(), None, None
    for i, t in enumerate(ts.t.tolist()):
        s_ab, t_ab = abars[i], abars[i + 1]
        eps = model(xs, torch.full((SHAPE[0],), t))
        d = (xs - sig(s_ab) * eps) / alpha(s_ab)
        h = lam(t_ab) - lam(s_ab)
        exp_neg_h = 0.0 if math.isinf(h) else math.exp(-h)
        if prev_d is None or math.isinf(h):
            dd = d
        else:
            r = prev_h / h
            dd = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev_d
        xs = sig(t_ab) / sig(s_ab) * xs + alpha(t_ab) * (1 - exp_neg_h) * dd
        prev_d, prev_h = d, h
    assert torch.allclose(got, xs, atol=1e-10)


def test_respacing_betas():
    """ADM respacing: β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}} drives the DDPM posterior."""
    ts = SCHEDULE.timesteps(25)
    tab = build("ddpm", ts).tables
    for i in [0, 7, 24]:
        beta = 1 - ts.abar[i] / ts.abar_prev[i]
        c1 = beta * ts.abar_prev[i].sqrt() / (1 - ts.abar[i])
        assert tab["c_0"][i].item() == pytest.approx(c1.item(), rel=1e-12)
    assert ts.abar_prev[-1].item() == 1.0 and ts.t[-1].item() == 0 and ts.t[0].item() == 999


# -- §3 guidance ---------------------------------------------------------------------------

def ddim0(x, eps, c):
    """DDIM η = 0 step with guided ε (x̂_0 re-derived from ε)."""
    x0 = (x - c["s"] * eps) / c["a"]
    return math.sqrt(c["abar_prev"]) * x0 + math.sqrt(1 - c["abar_prev"]) * eps


@pytest.fixture
def case():
    ts = one_step(500, 400)
    c = coeffs(ts)
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    return ts, c, rand(*SHAPE, seed=1), rand(*SHAPE, seed=2), rand(*SHAPE, seed=3), y


def test_cfg(case):
    ts, c, x, ec, eu, y = case
    got = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.CFG(3.5), cond={"y": y})
    assert torch.allclose(got, ddim0(x, eu + 3.5 * (ec - eu), c), atol=1e-10)


def test_classifier_score_form(case):
    ts, c, x, ec, _, y = case
    g = rand(*SHAPE, seed=4)
    got = run(FixedModel(ec), ts, x, sampler="ddim", guidance=gg.Classifier(linear_log_prob(g), 2.0))
    assert torch.allclose(got, ddim0(x, ec - 2.0 * c["s"] * g, c), atol=1e-10)


def test_classifier_mean_form(case):
    ts, c, x, ec, _, y = case
    g = rand(*SHAPE, seed=4)
    got = run(FixedModel(ec), ts, x, guidance=gg.Classifier(linear_log_prob(g), 2.0))
    x0 = (x - c["s"] * ec) / c["a"]
    want = c["c1"] * x0 + c["c2"] * x + 2.0 * c["beta_tilde"] * g + math.sqrt(c["beta_tilde"]) * noise()
    assert torch.allclose(got, want, atol=1e-10)


def test_naive_gradient_G(case):
    ts, c, x, ec, _, _ = case
    g, target = rand(*SHAPE, seed=4), torch.linspace(-1, 2, SHAPE[0], dtype=D)
    got = run(FixedModel(ec), ts, x, sampler="ddim", guidance=gg.NaiveGradient(g, target, sigma=0.3))
    x0 = (x - c["s"] * ec) / c["a"]
    beta = c["a"] / (0.3 ** 2 + (1 - c["abar"]) * per_sample_dot(g, g))
    G = (beta * (target - per_sample_dot(g, x0))).view(-1, 1, 1) * g
    assert torch.allclose(got, ddim0(x, ec - c["s"] * G, c), atol=1e-10)


def subspace_step():
    """The exact subspace model, one DDIM step from t = 120 to 100, and its projector P = AAᵀ."""
    from gradguide.experiments.analytic import SubspaceGaussian
    sched = gg.Schedule.cosine(200)
    sub = SubspaceGaussian.random(sched, D=12, d=3, seed=1, dtype=D)
    ts = one_step(120, 100, sched)
    return sched, sub, ts, coeffs(ts), sub.basis @ sub.basis.T, rand(4, 12, seed=1)


def test_lookahead_G_loss_on_the_subspace_model():
    sched, sub, ts, c, P, x = subspace_step()
    g = rand(12, seed=2)
    target = torch.tensor([3.0, -1.0, 0.0, 2.0], dtype=D)
    got = gg.sample(sub, x.shape, schedule=sched, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x,
                    guidance=gg.LookAhead(g, target, sigma=0.1))
    x0 = c["a"] * x @ P                       # x̂_0 = α P x_t
    grad = (c["a"] * P @ g).expand_as(x)      # ∇(gᵀx̂_0) = α P g
    beta = (c["a"] ** 2 / 2) / (c["a"] ** 2 * 0.01 + (1 - c["abar"]) * per_sample_dot(grad, grad))
    G = (2 * beta * (target - x0 @ g)).view(-1, 1) * grad
    eps = sub(x, torch.full((4,), 120))
    assert torch.allclose(got, ddim0(x, eps - c["s"] * G, c), atol=1e-10)
    # constant β and a multiplier, as the authors' code offers
    got = gg.sample(sub, x.shape, schedule=sched, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x,
                    guidance=gg.LookAhead(g, target, beta=5.0, multiplier=0.5))
    G = (2 * 2.5 * (target - x0 @ g)).view(-1, 1) * grad
    assert torch.allclose(got, ddim0(x, eps - c["s"] * G, c), atol=1e-10)


def test_dps():
    sched, sub, ts, c, P, x = subspace_step()
    meas = rand(4, 12, seed=5)
    got = gg.sample(sub, x.shape, schedule=sched, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x,
                    guidance=gg.DPS(lambda x0: x0, meas, zeta=0.7))
    x0 = c["a"] * x @ P
    r = meas - x0
    grad = -(c["a"] * r @ P) / r.norm(dim=1, keepdim=True)   # ∇_x ‖y − αPx‖
    eps = sub(x, torch.full((4,), 120))
    assert torch.allclose(got, ddim0(x, eps, c) - 0.7 * grad, atol=1e-10)


def test_apg(case):
    ts, c, x, ec, eu, y = case
    w, eta, r = 4.0, 0.3, 2.5
    got = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.APG(w, eta=eta, norm_threshold=r),
              cond={"y": y})
    dc, du = (x - c["s"] * ec) / c["a"], (x - c["s"] * eu) / c["a"]
    delta = dc - du
    norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    delta = delta * torch.clamp(r / norm, max=1.0)
    unit = dc / dc.flatten(1).norm(dim=1).view(-1, 1, 1)
    par = per_sample_dot(delta, unit).view(-1, 1, 1) * unit
    out = dc + (w - 1) * (delta - par + eta * par)
    eps = (x - c["a"] * out) / c["s"]
    assert torch.allclose(got, ddim0(x, eps, c), atol=1e-10)


def test_apg_momentum_carries_between_steps():
    ts = SCHEDULE.timesteps([800, 500])
    x, y = rand(*SHAPE, seed=1), torch.zeros(SHAPE[0], dtype=torch.long)
    model = lambda x_, t, y=None: 0.5 * x_ if y is None else 0.5 * x_ + 0.2
    got = gg.sample(model, SHAPE, schedule=SCHEDULE, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x, cond={"y": y},
                    guidance=gg.APG(3.0, momentum=-0.5, norm_threshold=0.0))
    xs, run_avg = x.clone(), torch.zeros_like(x)
    for i, t in enumerate(ts.t.tolist()):
        a, s = ts.abar[i].sqrt().item(), (1 - ts.abar[i]).sqrt().item()
        dc, du = (xs - s * model(xs, None, y)) / a, (xs - s * model(xs, None)) / a
        delta = dc - du + (-0.5) * run_avg
        run_avg = delta
        unit = dc / dc.flatten(1).norm(dim=1).view(-1, 1, 1)
        par = per_sample_dot(delta, unit).view(-1, 1, 1) * unit
        out = dc + 2.0 * (delta - par)
        eps = (xs - a * out) / s
        ap = ts.abar_prev[i].item()
        xs = math.sqrt(ap) * out + math.sqrt(1 - ap) * eps
    assert torch.allclose(got, xs, atol=1e-10)


def test_rescale(case):
    ts, c, x, ec, eu, y = case
    got = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.Rescale(5.0, phi=0.7), cond={"y": y})
    cfg = eu + 5.0 * (ec - eu)
    std = lambda v: v.flatten(1).std(dim=1).view(-1, 1, 1)   # unbiased, as diffusers
    eps = 0.7 * cfg * std(ec) / std(cfg) + 0.3 * cfg
    assert torch.allclose(got, ddim0(x, eps, c), atol=1e-10)


def test_cfg_zero_star(case):
    ts, c, x, ec, eu, y = case
    got = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.CFGZeroStar(3.0), cond={"y": y})
    s_star = (per_sample_dot(ec, eu) / per_sample_dot(eu, eu)).view(-1, 1, 1)
    assert torch.allclose(got, ddim0(x, s_star * eu + 3.0 * (ec - s_star * eu), c), atol=1e-10)
    zero = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.CFGZeroStar(3.0, zero_init_steps=1),
               cond={"y": y})
    assert torch.allclose(zero, ddim0(x, torch.zeros_like(x), c), atol=1e-10)


def test_cfg_plus_plus(case):
    ts, c, x, ec, eu, y = case
    got = run(FixedModel(ec, eu), ts, x, sampler="ddim", guidance=gg.CFGPlusPlus(0.4), cond={"y": y})
    eps_l = eu + 0.4 * (ec - eu)
    x0 = (x - c["s"] * eps_l) / c["a"]
    want = math.sqrt(c["abar_prev"]) * x0 + math.sqrt(1 - c["abar_prev"]) * eu
    assert torch.allclose(got, want, atol=1e-10)


def test_clipping_clips_x0_and_rederives_eps(case):
    ts, c, x, ec, _, _ = case
    got = run(FixedModel(4 * ec), ts, x, sampler=gg.Sampler("ddim", clip=True))
    x0 = ((x - c["s"] * 4 * ec) / c["a"]).clamp(-1, 1)
    eps = (x - c["a"] * x0) / c["s"]
    assert torch.allclose(got, math.sqrt(c["abar_prev"]) * x0 + math.sqrt(1 - c["abar_prev"]) * eps, atol=1e-10)


# -- §4 PixelAsParam -----------------------------------------------------------------------

def pxp_case():
    """A DDPM step where the classifier direction conflicts with denoising in some samples,
    is zero in one sample (a zero-norm partner), and the noise is zero in none."""
    ts = one_step(300, 250)
    c = coeffs(ts)
    x, ec = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    x0 = (x - c["s"] * ec) / c["a"]
    g = rand(*SHAPE, seed=3)
    g[0] = -3.0 * x0[0] / c["beta_tilde"]   # strongly opposed to denoising
    g[1] = 0.0                              # zero-norm partner
    return ts, c, x, ec, g


@pytest.mark.parametrize("policy", ["A", "B"])
@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_policies_A_and_B_match_spec_for_ddpm(policy, delta):
    ts, c, x, ec, g = pxp_case()
    got = run(FixedModel(ec), ts, x, guidance=gg.Classifier(linear_log_prob(g), 2.0),
              projection=gg.PixelAsParam(policy, delta=delta))
    g_den = c["c1"] * (x - c["s"] * ec) / c["a"]
    g_cls = 2.0 * c["beta_tilde"] * g
    g_div = math.sqrt(c["beta_tilde"]) * noise()
    den1, cls1 = pc_ref(g_den, g_cls, delta), pc_ref(g_cls, g_den, delta)
    if policy == "A":
        want = c["c2"] * x + den1 + cls1 + g_div
    else:
        want = c["c2"] * x + den1 + pc_ref(cls1, g_div, delta) + pc_ref(g_div, g_cls, delta)
    assert torch.allclose(got, want, atol=1e-10)
    # the conflict was real in sample 0, and the zero-norm partner left sample 1 unprojected
    assert per_sample_dot(g_den, g_cls)[0] < 0
    plain = run(FixedModel(ec), ts, x, guidance=gg.Classifier(linear_log_prob(g), 2.0))
    assert not torch.allclose(got[0], plain[0])
    if policy == "A":
        assert torch.allclose(got[1], plain[1], atol=1e-12)


def test_pcgrad_with_one_term_equals_policy_B():
    ts, c, x, ec, g = pxp_case()
    kw = dict(guidance=gg.Classifier(linear_log_prob(g), 2.0))
    assert torch.allclose(run(FixedModel(ec), ts, x, projection=gg.PixelAsParam("B", pcgrad=True), **kw),
                          run(FixedModel(ec), ts, x, projection=gg.PixelAsParam("B"), **kw), atol=1e-10)


def test_pcgrad_n_way():
    ts, c, x, ec, g = pxp_case()
    g2 = rand(*SHAPE, seed=9)
    got = run(FixedModel(ec), ts, x, sampler="ddim",
              guidance=[gg.Classifier(linear_log_prob(g), 2.0), gg.Classifier(linear_log_prob(g2), 1.5)],
              projection=gg.PixelAsParam("A", pcgrad=True))
    # directions for DDIM: den = c_0 x̂_0, each score shift contributes c_0 (1−ᾱ)/√ᾱ s ∇
    ap = c["abar_prev"]
    c_x = math.sqrt(1 - ap) / c["s"]
    c_0 = math.sqrt(ap) - c_x * c["a"]
    den = c_0 * (x - c["s"] * ec) / c["a"]
    k = c_0 * (1 - c["abar"]) / c["a"]
    d1, d2 = k * 2.0 * g, k * 1.5 * g2
    den_p = pc_ref(pc_ref(den, d1), d2)
    d1_p = pc_ref(pc_ref(d1, den), d2)
    d2_p = pc_ref(pc_ref(d2, den), d1)
    assert torch.allclose(got, c_x * x + den_p + d1_p + d2_p, atol=1e-10)


@pytest.mark.parametrize("convention", ["paper", "official"])
@pytest.mark.parametrize("clip", [None, True])
def test_policy_C_matches_spec_for_ddpm(clip, convention):
    ts = one_step(300, 250)
    c = coeffs(ts)
    x, ec, eu = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2), rand(*SHAPE, seed=3)
    eu[2] = 2 * ec[2]   # makes x̂_0c and Δ conflict in sample 2
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    w = 3.0
    got = run(FixedModel(ec, eu), ts, x, guidance=gg.CFG(w), projection=gg.PixelAsParam("C", convention=convention),
              cond={"y": y}, sampler=gg.Sampler(clip=clip))
    x0c, x0u = (x - c["s"] * ec) / c["a"], (x - c["s"] * eu) / c["a"]
    if clip and convention == "official":   # the authors' code clips both branches' x̂_0 first (docs/pixelasparam.md)
        x0c, x0u = x0c.clamp(-1, 1), x0u.clamp(-1, 1)
    delta = (w - 1) * (x0c - x0u)   # Ho's w' = w − 1
    x0 = pc_ref(x0c, delta) + pc_ref(delta, x0c)
    if clip:
        x0 = x0.clamp(-1, 1)
    want = c["c1"] * x0 + c["c2"] * x + math.sqrt(c["beta_tilde"]) * noise()
    assert torch.allclose(got, want, atol=1e-10)
    if clip:   # the two conventions really differ here
        other = run(FixedModel(ec, eu), ts, x, guidance=gg.CFG(w), cond={"y": y}, sampler=gg.Sampler(clip=clip),
                    projection=gg.PixelAsParam("C", convention={"paper": "official", "official": "paper"}[convention]))
        assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("convention", ["paper", "official"])
def test_policy_C_learned_range_sigma(convention):
    """Official code: σ from the unconditional branch's variance channels; paper: the conditional's."""
    ts = one_step(300, 250)
    c = coeffs(ts)
    x, ec, eu = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2), rand(*SHAPE, seed=3)
    vc, vu = rand(*SHAPE, seed=4).tanh(), rand(*SHAPE, seed=5).tanh()
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    model = FixedModel(torch.cat([ec, vc], 1), torch.cat([eu, vu], 1))
    got = run(model, ts, x, guidance=gg.CFG(3.0), projection=gg.PixelAsParam("C", convention=convention), cond={"y": y},
              sampler=gg.Sampler(variance="learned-range"))
    x0c, x0u = (x - c["s"] * ec) / c["a"], (x - c["s"] * eu) / c["a"]
    delta = 2.0 * (x0c - x0u)
    x0 = pc_ref(x0c, delta) + pc_ref(delta, x0c)
    f = ((vu if convention == "official" else vc) + 1) / 2
    log_var = f * math.log(c["beta"]) + (1 - f) * math.log(c["beta_tilde"])
    want = c["c1"] * x0 + c["c2"] * x + torch.exp(0.5 * log_var) * noise()
    assert torch.allclose(got, want, atol=1e-10)


def test_per_channel_granularity():
    ts, c, x, ec, g = pxp_case()
    got = run(FixedModel(ec), ts, x, guidance=gg.Classifier(linear_log_prob(g), 2.0),
              projection=gg.PixelAsParam("A", granularity="channel"))
    g_den = c["c1"] * (x - c["s"] * ec) / c["a"]
    g_cls = 2.0 * c["beta_tilde"] * g
    want = c["c2"] * x + math.sqrt(c["beta_tilde"]) * noise()
    for ch in range(SHAPE[1]):   # per (sample, channel) pairs
        want[:, ch] += pc_ref(g_den[:, ch:ch + 1], g_cls[:, ch:ch + 1])[:, 0] + \
            pc_ref(g_cls[:, ch:ch + 1], g_den[:, ch:ch + 1])[:, 0]
    assert torch.allclose(got, want, atol=1e-10)


def test_project_function():
    a, b = rand(6, 2, 5, seed=1), rand(6, 2, 5, seed=2)
    b[3] = 0.0
    a[0] = -b[0] + 0.1 * a[0]
    assert torch.allclose(gg.project(a, b, delta=0.8), pc_ref(a, b, 0.8), atol=1e-12)
    per_channel = gg.project(a, b, granularity="channel")
    for ch in range(2):
        assert torch.allclose(per_channel[:, ch], pc_ref(a[:, ch:ch + 1], b[:, ch:ch + 1])[:, 0], atol=1e-12)
    # after projection (δ = 1) no sample conflicts any more
    assert (per_sample_dot(gg.project(a, b), b) >= -1e-12).all()


def test_telemetry_pairs():
    ts, c, x, ec, g = pxp_case()
    records = []
    run(FixedModel(ec), ts, x, guidance=gg.Classifier(linear_log_prob(g), 2.0),
        diagnostics=gg.Diagnostics(telemetry=True, callback=records.append))
    tele = records[0].telemetry
    g_den = c["c1"] * (x - c["s"] * ec) / c["a"]
    g_cls = 2.0 * c["beta_tilde"] * g
    g_div = math.sqrt(c["beta_tilde"]) * noise()
    for pair, (a, b) in {"den/cls": (g_den, g_cls), "cls/div": (g_cls, g_div), "den/div": (g_den, g_div)}.items():
        na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
        dot = per_sample_dot(a, b)
        cos = torch.where(na * nb > 0, dot / (na * nb), torch.zeros_like(dot))
        phi = torch.where(na ** 2 + nb ** 2 > 0, 2 * na * nb / (na ** 2 + nb ** 2), torch.zeros_like(dot))
        assert torch.allclose(tele[pair]["cos"], cos, atol=1e-12), pair
        assert torch.allclose(tele[pair]["phi"], phi, atol=1e-12), pair
        assert tele[pair]["conflict_share"].item() == pytest.approx((cos < 0).double().mean().item())
    assert tele["den/cls"]["conflict_share"].item() > 0   # sample 0 conflicts by construction
