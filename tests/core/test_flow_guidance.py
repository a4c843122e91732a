"""Every guidance term × PixelAsParam policy on every flow sampler (docs/flow.md).

A flow state is the variance-preserving state ``x = x_σ/√((1−σ)² + σ²)``, so each guidance
term on a flow model is, by construction, that term on the equivalent ε model: checked here
term by term (CFG-Zero* and Rescale act on the model's own output, the velocity, so they are
the exception and are checked against their formulas in test_flow_closed_forms.py). The
smoke matrix runs every combination on every flow sampler; the fused step matches the
general one on the flow samplers it covers.
"""
import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide import predictions
from gradguide.experiments.analytic import FlowGaussianMixture
from gradguide.sampling import prepare_run

F64 = torch.float64
B, D = 6, 4
GM = FlowGaussianMixture([0.3, 0.3, 0.4], [[1.0, -0.5, 0.2, 0.0], [-1.2, 0.4, 0.0, 0.6], [0.1, 1.1, -0.7, -0.3]],
                         [0.2, 0.5, 0.3])
Y = torch.tensor([0, 1, 2, 0, 1, 2])
G = torch.tensor([0.5, -0.2, 0.8, 0.1], dtype=F64)
SIGMAS = np.linspace(0.95, 0.1, 5)    # σ_0 < 1: every sampler here (and an ε model) is defined there
X_T = torch.randn(B, D, generator=torch.Generator().manual_seed(0), dtype=F64)


def model(x, t, y=None):
    return GM(x, t, y)


def terms(log_prob=GM.log_prob_class):
    measurement = torch.zeros(B, 2, dtype=F64)
    return {
        "CFG": gg.CFG(2.0),
        "APG": gg.APG(2.0),
        "Rescale": gg.Rescale(2.0),
        "CFGZeroStar": gg.CFGZeroStar(2.0, zero_init_steps=1),
        "CFG++": gg.CFGPlusPlus(0.6),
        "Classifier": gg.Classifier(log_prob, 1.0),
        "DPS": gg.DPS(lambda x0: x0[:, :2], measurement, zeta=0.3),
        "G": gg.NaiveGradient(G, 1.0),
        "G_loss": gg.LookAhead(G, 1.0),
    }


BRANCH = ("CFG", "APG", "Rescale", "CFGZeroStar", "CFG++")
SAMPLERS = [("flow-euler", {}), ("flow-euler", {"stochastic": True}), ("flow-heun", {}), ("flow-lcm", {}),
            ("unipc", {}), ("dpmpp-2m", {}), ("dpmpp-2m-sde", {}), ("ddim", {})]


def combos():
    for name in terms():
        for policy in (None, "A", "B", "C"):
            if policy == "C" and name in BRANCH and name != "CFG":
                continue   # policy C projects CFG's two branches
            yield name, policy


def guidance_for(name, policy, table):
    term = table[name]
    if policy in ("A", "B") and name in BRANCH:
        return [term, table["G"]]     # A and B project a guidance direction against the denoising one
    if policy == "C" and name not in BRANCH:
        return [table["CFG"], term]
    return [term]


def run(sampler, options, guidance, policy, model=model, schedule=None, **kw):
    sched = schedule or gg.FlowSchedule(shift=3.0)
    return gg.sample(model, (B, D), schedule=sched, sampler=gg.Sampler(sampler, sigmas=SIGMAS, **options), x_T=X_T.clone(),
                     cond={"y": Y}, guidance=guidance, projection=None if policy is None else gg.PixelAsParam(policy),
                     generator=torch.Generator().manual_seed(1), **kw)


@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s + ("-stochastic" if o else "") for s, o in SAMPLERS])
def test_every_guidance_term_and_policy_runs_on_every_flow_sampler(sampler, options):
    plain = run(sampler, options, [], None)
    assert torch.isfinite(plain).all()
    for name, policy in combos():
        out = run(sampler, options, guidance_for(name, policy, terms()), policy)
        assert out.shape == (B, D) and torch.isfinite(out).all(), (name, policy)
        assert (out - plain).abs().max() > 1e-6, (name, policy)   # the guidance acts


def _vp_equivalent():
    """The ε model of the same law: ε̂(x, t) from the velocity at x_σ = x/(a + s)."""
    def eps_model(x, t, y=None):
        sigma = (t / 1000).reshape(-1, 1)
        r = ((1 - sigma) ** 2 + sigma ** 2).sqrt()
        a, s = (1 - sigma) / r, sigma / r
        return predictions.eps_from("flow", GM(x * r, t, y), x, a, s)

    def log_prob(x, t, y):
        sigma = (t / 1000).reshape(-1, 1)
        return GM.log_prob_class(x * ((1 - sigma) ** 2 + sigma ** 2).sqrt(), t, y)
    return eps_model, log_prob


@pytest.mark.parametrize("name,policy", [c for c in combos() if c[0] not in ("Rescale", "CFGZeroStar")])
def test_a_guided_flow_step_is_the_guided_step_of_the_equivalent_eps_model(name, policy):
    flow = run("flow-euler", {}, guidance_for(name, policy, terms()), policy)
    eps_model, log_prob = _vp_equivalent()
    ts = gg.FlowSchedule(shift=3.0).timesteps_from_sigmas(SIGMAS)   # the same σ's, ᾱ's, scales
    vp = gg.sample(eps_model, (B, D), schedule=gg.Schedule.linear(),
                   sampler=gg.Sampler("ddim", timesteps=ts, prediction="eps"), x_T=X_T.clone(), cond={"y": Y},
                   guidance=guidance_for(name, policy, terms(log_prob)),
                   projection=None if policy is None else gg.PixelAsParam(policy))
    assert torch.allclose(flow, vp, atol=1e-9), (flow - vp).abs().max()


FUSED = [("flow-euler", [gg.CFG(3.0)], None), ("flow-lcm", [gg.CFG(3.0)], None),
         ("flow-euler", [gg.Classifier(GM.log_prob_class, 2.0)], "A"), ("flow-euler", [gg.LookAhead(G, 1.0)], None),
         ("flow-euler", [gg.CFG(3.0)], "C"), ("flow-lcm", [gg.Classifier(GM.log_prob_class, 2.0)], "B"),
         ("flow-euler", [gg.APG(2.0)], None)]


@pytest.mark.parametrize("sampler,guidance,policy", FUSED)
def test_the_fused_step_runs_the_flow_samplers(sampler, guidance, policy):
    sched = gg.FlowSchedule(shift=3.0)
    projection = None if policy is None else gg.PixelAsParam(policy)
    prepared = prepare_run(model, (B, D), schedule=sched, sampler=sampler, steps=5, x_T=X_T, cond={"y": Y},
                           guidance=guidance, projection=projection)
    assert prepared.plan is not None, prepared.fused_reason
    fused, general = (gg.sample(model, (B, D), schedule=sched, sampler=sampler, steps=5, x_T=X_T.clone(),
                                cond={"y": Y}, guidance=guidance, projection=projection,
                                execution=gg.Execution(fused=f), generator=torch.Generator().manual_seed(2)) for f in (True, False))
    assert torch.allclose(fused, general, atol=1e-10)


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun", "flow-lcm"])
def test_flow_steps_never_sync_and_replay_as_captured_graphs(sampler):
    from gradguide.graphs import GraphCache
    sched = gg.FlowSchedule(shift=3.0)
    kw = dict(schedule=sched, sampler=sampler, steps=4, x_T=X_T.clone(), cond={"y": Y}, guidance=[gg.CFG(3.0)])
    eager = gg.sample(model, (B, D), generator=torch.Generator().manual_seed(2), **kw)
    checked = gg.sample(model, (B, D), generator=torch.Generator().manual_seed(2),
                        diagnostics=gg.Diagnostics(check_sync=True), **kw)
    replayed = gg.sample(model, (B, D), generator=torch.Generator().manual_seed(2),
                         execution=gg.Execution(graph=GraphCache(emulate=True)), **kw)
    assert torch.allclose(eager, checked, atol=0) and torch.allclose(eager, replayed, atol=1e-12)
