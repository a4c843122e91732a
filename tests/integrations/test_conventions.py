"""Conventions, both ways: each row of the mapping table in docs/diffusers.md, tested.

gradguide's guidance term with ``convention="diffusers"`` (or the paper convention where the
table says so) against diffusers 0.42's own guider on the same inputs, float64, ≤ 1e-5: a
three-step DDIM run records ``x_t`` and the guided x̂_0 of every step; the diffusers guider gets
the model outputs at that ``x_t`` (its ``set_state`` called as diffusers' loops call it) and its
guided prediction, turned into x̂_0, must equal gradguide's.
"""
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,  # noqa: E402
                               ClassifierFreeZeroStarGuidance)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

import gradguide as gg  # noqa: E402
from gradguide import predictions  # noqa: E402

D = torch.float64
SHAPE = (4, 3, 5, 6)
NULL = 9
Y = torch.tensor([0, 1, 2, 3])
SCHED = gg.Schedule.linear(1000)
TIMESTEPS = [700, 500, 300]
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def raw_output(x, t, y):
    """A smooth 'model': its raw output (ε, v or x̂_0 alike), per-sample conditional on y."""
    tt = t.to(D).view(-1, 1, 1, 1) / 1000
    base = 0.6 * x + 0.4 * torch.sin(3 * x + tt)
    yy = y.to(D).view(-1, 1, 1, 1)
    shift = torch.where(yy == NULL, torch.zeros_like(x), 0.8 * torch.cos(x * (1 + yy)) - 0.3 * yy * x)
    return base + shift


def model(x, t, y):
    return raw_output(x, t, y)


def gradguide_run(term, prediction, seed=0):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=D)
    records = []
    gg.sample(model, SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", prediction=prediction), steps=TIMESTEPS, x_T=x_T,
              guidance=term, cond={"y": Y}, diagnostics=gg.Diagnostics(callback=records.append))
    xs = [x_T] + [r.x for r in records[:-1]]
    return xs, records


def diffusers_x0(guider, prediction, xs, momentum=None):
    """The diffusers guider on the same inputs, step by step, as x̂_0."""
    if momentum is not None:   # what the guider's prepare_inputs does at step 0
        guider.momentum_buffer = MomentumBuffer(momentum)
    out = []
    for i, (x, t) in enumerate(zip(xs, TIMESTEPS)):
        tb = torch.full((SHAPE[0],), t)
        c, u = raw_output(x, tb, Y), raw_output(x, tb, torch.full_like(Y, NULL))
        guider.set_state(step=i, num_inference_steps=len(TIMESTEPS), timestep=torch.tensor(t))
        pred = guider.forward(c, u).pred
        abar = SCHED.alphas_cumprod[t].item()
        out.append(predictions.x0_from(prediction, pred, x, math.sqrt(abar), math.sqrt(1 - abar)))
    return out


def assert_rows_equal(term, guider, prediction, momentum=None):
    xs, records = gradguide_run(term, prediction)
    ref = diffusers_x0(guider, prediction, xs, momentum)
    for i, (r, want) in enumerate(zip(records, ref)):
        err = (r.x0 - want).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"step {i}: max error {err:.3g}"


NU = {"y": torch.full_like(Y, NULL)}

# (id, gradguide term, diffusers guider, predictions, momentum for diffusers' buffer)
ROWS = [
    ("cfg", lambda: gg.CFG(5.0, uncond=NU), lambda: ClassifierFreeGuidance(guidance_scale=5.0),
     ("eps", "v", "x0"), None),
    ("cfg-paper", lambda: gg.CFG(4.0, uncond=NU, convention="paper"),
     lambda: ClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True), ("eps", "v"), None),
    ("cfg-original", lambda: gg.CFG(4.0, uncond=NU, convention="diffusers-original"),
     lambda: ClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True), ("eps",), None),
    ("apg", lambda: gg.APG(6.0, uncond=NU, convention="diffusers"),
     lambda: AdaptiveProjectedGuidance(guidance_scale=6.0), ("eps", "v", "x0"), None),
    ("apg-eta-r-momentum", lambda: gg.APG(4.0, eta=0.3, norm_threshold=4.0, momentum=-0.5, uncond=NU,
                                          convention="diffusers"),
     lambda: AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.3, adaptive_projected_guidance_rescale=4.0,
                                       adaptive_projected_guidance_momentum=-0.5), ("eps", "v"), -0.5),
    ("apg-original", lambda: gg.APG(3.0, eta=0.2, norm_threshold=4.0, uncond=NU, convention="diffusers-original"),
     lambda: AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.2, adaptive_projected_guidance_rescale=4.0,
                                       use_original_formulation=True), ("eps", "v"), None),
    ("apg-off-at-1", lambda: gg.APG(1.0, eta=0.0, norm_threshold=2.0, uncond=NU, convention="diffusers"),
     lambda: AdaptiveProjectedGuidance(guidance_scale=1.0, eta=0.0, adaptive_projected_guidance_rescale=2.0),
     ("v",), None),
    # Sadat et al.'s APG(w) on x̂_0 is diffusers' original formulation with w − 1 on an x̂_0 model
    ("apg-paper-x0", lambda: gg.APG(4.0, norm_threshold=4.0, momentum=-0.5, uncond=NU),
     lambda: AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.0, adaptive_projected_guidance_rescale=4.0,
                                       adaptive_projected_guidance_momentum=-0.5, use_original_formulation=True),
     ("x0",), -0.5),
    ("cfg-zero-star", lambda: gg.CFGZeroStar(5.0, uncond=NU, convention="diffusers"),
     lambda: ClassifierFreeZeroStarGuidance(guidance_scale=5.0), ("eps", "v", "x0"), None),
    ("cfg-zero-star-original", lambda: gg.CFGZeroStar(3.0, zero_init_steps=0, uncond=NU,
                                                      convention="diffusers-original"),
     lambda: ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=0, use_original_formulation=True),
     ("v",), None),
    # the paper convention works on ε̂: for an ε model that is diffusers' guider with no zero-init step
    ("cfg-zero-star-paper-eps", lambda: gg.CFGZeroStar(5.0, uncond=NU),
     lambda: ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0), ("eps",), None),
    ("rescale", lambda: gg.Rescale(7.0, phi=0.7, uncond=NU),
     lambda: ClassifierFreeGuidance(guidance_scale=7.0, guidance_rescale=0.7), ("eps", "v", "x0"), None),
    ("rescale-diffusers", lambda: gg.Rescale(7.0, phi=0.5, uncond=NU, convention="diffusers"),
     lambda: ClassifierFreeGuidance(guidance_scale=7.0, guidance_rescale=0.5), ("v",), None),
    ("rescale-original", lambda: gg.Rescale(3.0, phi=0.7, uncond=NU, convention="diffusers-original"),
     lambda: ClassifierFreeGuidance(guidance_scale=3.0, guidance_rescale=0.7, use_original_formulation=True),
     ("v",), None),
]
CASES = [pytest.param(make_term, make_guider, p, m, id=f"{name}-{p}")
         for name, make_term, make_guider, preds, m in ROWS for p in preds]


@pytest.mark.parametrize("make_term, make_guider, prediction, momentum", CASES)
def test_row_matches_diffusers_guider(make_term, make_guider, prediction, momentum):
    assert_rows_equal(make_term(), make_guider(), prediction, momentum)


@pytest.mark.parametrize("make_term, prediction", [pytest.param(r[1], r[3][-1], id=r[0]) for r in ROWS])
def test_row_is_the_same_without_a_callback(make_term, prediction):
    """The rows above read x̂_0 from callback records; a run without a callback (which fast
    paths may take) must give the same samples."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=D)
    runs = [gg.sample(model, SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", prediction=prediction),
                      steps=TIMESTEPS, x_T=x_T, guidance=make_term(), cond={"y": Y},
                      diagnostics=gg.Diagnostics(callback=cb))
            for cb in (None, lambda record: None)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


def test_conventions_differ_where_the_table_says():
    """The switch changes the result (else the rows above would prove nothing)."""
    def x0s(term, prediction="v"):
        return gradguide_run(term, prediction)[1][1].x0
    assert (x0s(gg.APG(4.0, uncond=NU)) - x0s(gg.APG(4.0, uncond=NU, convention="diffusers"))).abs().max() > 1e-2
    assert (x0s(gg.CFGZeroStar(4.0, zero_init_steps=0, uncond=NU))
            - x0s(gg.CFGZeroStar(4.0, zero_init_steps=0, uncond=NU, convention="diffusers"))).abs().max() > 1e-2
    assert (x0s(gg.CFG(4.0, uncond=NU)) - x0s(gg.CFG(4.0, uncond=NU, convention="paper"))).abs().max() > 1e-2
    # Rescale's paper and diffusers conventions are one rule
    assert torch.equal(x0s(gg.Rescale(4.0, uncond=NU)), x0s(gg.Rescale(4.0, uncond=NU, convention="diffusers")))


def test_defaults():
    assert gg.CFG(3.0).convention == "diffusers"
    assert gg.APG(3.0).convention == "paper" and gg.APG(3.0).eta == 0.0
    assert gg.APG(3.0, convention="diffusers").eta == 1.0
    assert gg.CFGZeroStar(3.0).zero_init_steps == 0
    assert gg.CFGZeroStar(3.0, convention="diffusers").zero_init_steps == 1
    assert gg.Rescale(3.0).convention == "paper"
    # CFG's paper convention is Ho & Salimans' w' = w − 1
    assert gg.CFG(2.5, convention="paper").scale == 3.5


def test_rescale_on_a_v_model_follows_lin_et_al():
    """Lin et al.'s Algorithm (and diffusers' rescale_noise_cfg) on the v prediction itself."""
    term = gg.Rescale(7.5, phi=0.7, uncond=NU)
    xs, records = gradguide_run(term, "v")
    x, t = xs[1], TIMESTEPS[1]
    tb = torch.full((SHAPE[0],), t)
    v_c, v_u = raw_output(x, tb, Y), raw_output(x, tb, torch.full_like(Y, NULL))
    v_cfg = v_u + 7.5 * (v_c - v_u)
    std = lambda v: v.flatten(1).std(dim=1).view(-1, 1, 1, 1)   # noqa: E731
    v = 0.7 * v_cfg * std(v_c) / std(v_cfg) + 0.3 * v_cfg
    torch.testing.assert_close(v, rescale_noise_cfg(v_cfg, v_c, 0.7))
    a, s = math.sqrt(SCHED.alphas_cumprod[t].item()), math.sqrt(1 - SCHED.alphas_cumprod[t].item())
    torch.testing.assert_close(records[1].x0, a * x - s * v, rtol=1e-10, atol=1e-10)
    # rescaling ε̂ of the same v model instead gives a different sample (the old behaviour)
    eps_c, eps_u = s * x + a * v_c, s * x + a * v_u
    e_cfg = eps_u + 7.5 * (eps_c - eps_u)
    e = 0.7 * e_cfg * std(eps_c) / std(e_cfg) + 0.3 * e_cfg
    assert ((x - s * e) / a - records[1].x0).abs().max() > 0.1


def test_bad_convention():
    for make in (gg.CFG, gg.APG, gg.Rescale, gg.CFGZeroStar):
        with pytest.raises(ValueError, match="convention: expected one of"):
            make(3.0, convention="k-diffusion")


# -- PixelAsParam policy C: the official code's conventions (docs/pixelasparam.md) ----------------------------

def _pc_factor(a, b):
    """The per-sample factor f of PC(a|b) = a − f b (f = min(0, <a,b>)/‖b‖², 0 where ‖b‖ = 0)."""
    ab, bb = (a * b).flatten(1).sum(1), (b * b).flatten(1).sum(1)
    f = torch.where(bb > 0, ab.clamp(max=0) / torch.where(bb > 0, bb, torch.ones_like(bb)), torch.zeros_like(bb))
    return f.view(-1, *[1] * (a.dim() - 1))


def test_policy_C_official_clip_keeps_the_lookahead_gradient():
    """G_loss with policy C and clipping: the VJP goes through the clipped branches (clip′ = 0
    outside the range), not through a detached copy of them."""
    t_now, t_prev = 400, 300
    shape = (3, 2, 4)
    w_c = torch.randn(shape[1:], generator=torch.Generator().manual_seed(3), dtype=D)

    def eps_model(x, t, y=None):
        out = 0.3 * x + 0.2 * torch.sin(2 * x)
        return out if y is None else out + 0.3 * torch.cos(x + w_c)
    x = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=D)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=D)
    target = torch.tensor([2.0, -1.0, 0.5], dtype=D)
    records = []
    gg.sample(eps_model, shape, schedule=SCHED, sampler=gg.Sampler("ddim", clip=True), steps=[t_now, t_prev], x_T=x,
              guidance=[gg.CFG(3.0), gg.LookAhead(g, target)], projection=gg.PixelAsParam("C"),
              cond={"y": torch.zeros(3, dtype=torch.long)}, diagnostics=gg.Diagnostics(callback=records.append))
    abar = SCHED.alphas_cumprod[t_now].item()
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    xg = x.clone().requires_grad_(True)
    x0c = ((xg - s * eps_model(xg, None, y=0)) / a).clamp(-1, 1)
    x0u = ((xg - s * eps_model(xg, None)) / a).clamp(-1, 1)
    assert ((x0c.detach().abs() == 1).double().mean() > 0.1)   # clipping is active
    delta = 2.0 * (x0c - x0u)
    f1, f2 = _pc_factor(x0c.detach(), delta.detach()), _pc_factor(delta.detach(), x0c.detach())
    x0_pre = (x0c - f1 * delta) + (delta - f2 * x0c)    # projection weights held constant (gradient.py)
    gx0 = (g * x0_pre).flatten(1).sum(1)
    (vjp,) = torch.autograd.grad(gx0.sum(), xg)
    assert vjp.abs().max() > 1e-3
    beta = (a * a / 2) / (a * a * 0.1 ** 2 + (1 - abar) * (vjp * vjp).flatten(1).sum(1))
    G = (2 * beta * (target - gx0.detach())).view(-1, 1, 1) * vjp
    want = (x0_pre.detach() + (1 - abar) / a * G).clamp(-1, 1)
    torch.testing.assert_close(records[0].x0, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_policy_C_official_clip_is_the_same_without_a_callback(sampler):
    x_T = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=D)
    runs = [gg.sample(model, SHAPE, schedule=SCHED, sampler=gg.Sampler(sampler, clip=True), steps=TIMESTEPS, x_T=x_T,
                      guidance=gg.CFG(3.0, uncond=NU), cond={"y": Y}, projection=gg.PixelAsParam("C"),
                      generator=torch.Generator().manual_seed(1), diagnostics=gg.Diagnostics(callback=cb))
            for cb in (None, lambda record: None)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


def test_policy_C_conventions_are_equal_without_clipping():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=D)
    runs = [gg.sample(model, SHAPE, schedule=SCHED, sampler="ddpm", steps=TIMESTEPS, x_T=x, guidance=gg.CFG(3.0, uncond=NU),
                      cond={"y": Y}, projection=gg.PixelAsParam("C", convention=c),
                      generator=torch.Generator().manual_seed(1)) for c in ("official", "paper")]
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="PixelAsParam: convention"):
        gg.PixelAsParam("C", convention="diffusers")


# -- DecodedLookAhead: the official Stable Diffusion code's β (docs/mathematics.md#guidance-terms) ---------------------------

def _decoded_case(batch):
    lat_shape = (batch, 2, 3, 3)
    w_dec = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=D)

    def decode(z):   # a small nonlinear "VAE decoder": 2 latent channels -> 3 image channels
        return torch.tanh(torch.einsum("oc,bchw->bohw", w_dec, z))

    def eps_model(x, t, y=None):
        out = 0.4 * x + 0.1 * torch.sin(3 * x)
        return out if y is None else out + 0.2 * torch.cos(x)
    x = torch.randn(lat_shape, generator=torch.Generator().manual_seed(1), dtype=D)
    g = torch.randn((batch, 3, 3, 3), generator=torch.Generator().manual_seed(2), dtype=D)
    offset = torch.randn(batch, generator=torch.Generator().manual_seed(3), dtype=D)
    return lat_shape, decode, eps_model, x, g, offset


def _decoded_x0(batch, **kw):
    lat_shape, decode, eps_model, x, g, offset = _decoded_case(batch)
    records = []
    gg.sample(eps_model, lat_shape, schedule=SCHED, sampler="ddim", steps=[500, 400], x_T=x,
              guidance=[gg.CFG(7.5), gg.DecodedLookAhead(decode, g, offset=offset, target=10.0, scaling=0.5, **kw)],
              cond={"y": torch.zeros(batch, dtype=torch.long)}, diagnostics=gg.Diagnostics(callback=records.append))
    return records[0].x0


def test_decoded_lookahead_official_batch_scaling_is_beta_over_B():
    # --guidance 100 at batch 5 in the authors' code is beta = 20 per sample
    official = _decoded_x0(5, beta=100.0, official_batch_scaling=True)
    # (the loss is accumulated in float32 by DecodedLookAhead, hence rtol 1e-6)
    torch.testing.assert_close(official, _decoded_x0(5, beta=20.0), rtol=1e-6, atol=1e-6)
    assert (official - _decoded_x0(5, beta=100.0)).abs().max() > 1e-3


def test_decoded_lookahead_official_batch_scaling_matches_the_authors_loss():
    """The authors' pipeline: l2 = 0.5 * MSELoss()(out [B], target [B, 1]) (broadcast),
    noise_pred += sqrt(1 − ᾱ) * β * ∇_latents l2, with out = <g, decode(ẑ_0 / scaling)> + b."""
    import warnings
    batch, beta, t = 5, 100.0, 500
    lat_shape, decode, eps_model, x, g, offset = _decoded_case(batch)
    abar = SCHED.alphas_cumprod[t].item()
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    lat = x.clone().requires_grad_(True)
    e_u, e_c = eps_model(lat, None), eps_model(lat, None, y=0)
    noise_pred = e_u + 7.5 * (e_c - e_u)
    clean = decode(((lat - s * noise_pred) / a) / 0.5)
    out = torch.einsum("bijk,bijk->b", g, clean) + offset
    target = torch.full((batch, 1), 10.0, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # MSELoss warns about the broadcast the authors rely on
        l2 = 0.5 * torch.nn.MSELoss()(out, target)
    (grad,) = torch.autograd.grad(l2, lat)
    eps = noise_pred.detach() + s * beta * grad
    got = _decoded_x0(batch, beta=beta, official_batch_scaling=True)
    torch.testing.assert_close(got, (x - s * eps) / a, rtol=1e-6, atol=1e-6)
