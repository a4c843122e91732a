"""diffusers' two-branch guiders as gradguide terms (TCFG, MAMBO-G, APG/CFG mix, FDG): a guided
``gradguide.sample`` run equals diffusers' own loop — the scheduler stepping, each step,
diffusers' guider called on the same model's conditional and unconditional outputs — in float64
to ≤ 1e-5, over several steps, on an ε model (DDIM) and a flow (velocity) model (flow-match
Euler), with start/stop windows, rescale and both formulations."""
import contextlib

import pytest
import torch

import gradguide as gg

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers import guiders as dg  # noqa: E402
from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer  # noqa: E402

SHAPE = (3, 4, 8, 8)
NULL = 2
Y = torch.tensor([0, 1, 0])
STEPS = 8


class Tiny(torch.nn.Module):
    """A small nonlinear class-conditional model in float64 (its output is ε or a velocity)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.6)
        self.emb = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))

    def forward(self, x, t, class_labels=None, return_dict=True):
        lead = (-1,) + (1,) * (x.dim() - 1)
        tt = (t.to(torch.float64) / 1000).view(lead)
        e = self.emb[class_labels].view((-1, 4) + (1,) * (x.dim() - 2))
        h = torch.einsum("oc,bc...->bo...", self.w, x) + e * (1 + tt)
        ramp = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
        return (torch.tanh(h) + 0.4 * e * ramp + 0.3 * x * torch.cos(3 * tt),)


class EpsTiny(Tiny):
    """An ε model whose x̂_0 is Tiny's bounded output: ε = (x − √ᾱ_t D(x))/√(1 − ᾱ_t), so a guided
    DDIM trajectory stays of order one (a raw Tiny output read as ε blows x̂_0 up by 1/√ᾱ_t)."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar.to(torch.float64)

    def forward(self, x, t, class_labels=None, return_dict=True):
        abar = self.abar[t.long()].view((-1,) + (1,) * (x.dim() - 1))
        return ((x - abar.sqrt() * super().forward(x, t, class_labels)[0]) / (1 - abar).sqrt(),)


def _scheduler(kind):
    return DDIMScheduler(clip_sample=False, timestep_spacing="trailing") if kind == "eps" \
        else FlowMatchEulerDiscreteScheduler(shift=3.0)


@contextlib.contextmanager
def float32_casts_off(on=True):
    """diffusers' TCFG casts the stacked branches to float32 for its SVD whatever their dtype; inside
    this context ``Tensor.float()`` leaves float64 tensors as they are, so the same code runs in
    float64 (the comparison at float64 precision; the float32 one is tested separately)."""
    if not on:
        yield
        return
    cast = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else cast(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = cast


def diffusers_loop(module, sched, guider, x, steps=STEPS, float64_svd=True):
    sched.set_timesteps(steps)
    if hasattr(sched, "final_alpha_cumprod"):   # DDIM's step arithmetic in float64 too, as gradguide's
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    for i, t in enumerate(sched.timesteps):
        both = module(torch.cat([x, x]), t.expand(2 * x.shape[0]), class_labels=torch.cat([torch.full_like(Y, NULL), Y]))[0]
        out_u, out_c = both.chunk(2)
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        if i == 0 and getattr(guider, "adaptive_projected_guidance_momentum", None) is not None:
            guider.momentum_buffer = MomentumBuffer(guider.adaptive_projected_guidance_momentum)  # its prepare_inputs
        with float32_casts_off(float64_svd):
            pred = guider.forward(out_c, out_u).pred
        x = sched.step(pred, t, x, return_dict=False)[0]
    return x


def gradguide_run(module, sched, term, x):
    model, schedule = gg.from_diffusers(module, sched)
    return gg.sample(model, x.shape, schedule=schedule, steps=STEPS, x_T=x, cond={"class_labels": Y},
                     guidance=term)   # the schedule carries what the scheduler fixes


def _uncond():
    return {"class_labels": torch.full_like(Y, NULL)}


# (gradguide term, diffusers guider) pairs with the same settings
CASES = {
    "tcfg": lambda: (gg.TCFG(5.0, uncond=_uncond()), dg.TangentialClassifierFreeGuidance(guidance_scale=5.0)),
    "tcfg-window-rescale": lambda: (
        gg.TCFG(4.0, guidance_rescale=0.5, start=0.25, stop=0.75, uncond=_uncond()),
        dg.TangentialClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.5, start=0.25, stop=0.75)),
    "tcfg-original": lambda: (gg.TCFG(3.0, convention="diffusers-original", uncond=_uncond()),
                              dg.TangentialClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True)),
    "mambo": lambda: (gg.MamboG(6.0, alpha=2.0, uncond=_uncond()),
                      dg.MagnitudeAwareGuidance(guidance_scale=6.0, alpha=2.0)),
    "mambo-original-rescale": lambda: (
        gg.MamboG(5.0, alpha=1.0, guidance_rescale=0.3, stop=0.5, convention="diffusers-original", uncond=_uncond()),
        dg.MagnitudeAwareGuidance(guidance_scale=5.0, alpha=1.0, guidance_rescale=0.3, stop=0.5,
                                  use_original_formulation=True)),
    "apgmix": lambda: (gg.APGMix(3.5, 6.0, apg_start_step=2, norm_threshold=3.0, uncond=_uncond()),
                       dg.AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_scale=6.0,
                                                       adaptive_projected_guidance_start_step=2,
                                                       adaptive_projected_guidance_rescale=3.0)),
    "apgmix-original-nomomentum": lambda: (
        gg.APGMix(2.0, 4.0, momentum=None, eta=0.3, norm_threshold=0.0, apg_start_step=3, start=0.125,
                  guidance_rescale=0.2, convention="diffusers-original", uncond=_uncond()),
        dg.AdaptiveProjectedMixGuidance(guidance_scale=2.0, adaptive_projected_guidance_scale=4.0,
                                        adaptive_projected_guidance_momentum=None, eta=0.3,
                                        adaptive_projected_guidance_rescale=0.0,
                                        adaptive_projected_guidance_start_step=3, start=0.125, guidance_rescale=0.2,
                                        use_original_formulation=True)),
}

FDG_CASES = {
    "fdg": lambda: (gg.FDG([6.0, 3.0], uncond=_uncond()), dg.FrequencyDecoupledGuidance(guidance_scales=[6.0, 3.0])),
    "fdg-3-levels-parallel-rescale": lambda: (
        gg.FDG([5.0, 3.0, 2.0], parallel_weights=[0.5, 0.8, 1.0], guidance_rescale=0.4, stop=0.75, uncond=_uncond()),
        dg.FrequencyDecoupledGuidance(guidance_scales=[5.0, 3.0, 2.0], parallel_weights=[0.5, 0.8, 1.0],
                                      guidance_rescale=0.4, stop=0.75)),
    "fdg-original-freq-rescale": lambda: (
        gg.FDG([4.0, 2.0], guidance_rescale=[0.3, 0.6], guidance_rescale_space="freq", parallel_weights=0.7,
               convention="diffusers-original", uncond=_uncond()),
        dg.FrequencyDecoupledGuidance(guidance_scales=[4.0, 2.0], guidance_rescale=[0.3, 0.6],
                                      guidance_rescale_space="freq", parallel_weights=0.7,
                                      use_original_formulation=True)),
}


# diffusers 0.42's magnitude-aware guider takes torch.norm over dims 1..: with this torch that fails
# for 4-D latents (a matrix norm over three dims), so it is compared on token-shaped latents
# [B, C, L] (the packed sequences of transformer models), where diffusers' call works
TOKENS = (3, 4, 16)


def _check(case, kind, shape=SHAPE):
    module = EpsTiny(_scheduler(kind).alphas_cumprod) if kind == "eps" else Tiny()
    ours, theirs = case()
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = diffusers_loop(module, _scheduler(kind), theirs, x_T.clone())
        got = gradguide_run(module, _scheduler(kind), ours, x_T.clone())
        plain = gradguide_run(module, _scheduler(kind), gg.CFG(3.0, uncond=_uncond()), x_T.clone())
    assert got.dtype == torch.float64
    assert ref.abs().max() < 50   # a trajectory of order one: an absolute bound means something
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err
    assert (got - plain).abs().max() > 1e-3   # a guider that fell back to CFG would not pass


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", list(CASES))
def test_guider_matches_diffusers(name, kind):
    _check(CASES[name], kind, TOKENS if name.startswith("mambo") else SHAPE)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_tcfg_against_diffusers_float32_svd(kind):
    """diffusers' TCFG as it runs (its SVD in float32): the same trajectory to float32 precision."""
    module = EpsTiny(_scheduler(kind).alphas_cumprod) if kind == "eps" else Tiny()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = diffusers_loop(module, _scheduler(kind), dg.TangentialClassifierFreeGuidance(guidance_scale=5.0),
                             x_T.clone(), float64_svd=False)
        exact = diffusers_loop(module, _scheduler(kind), dg.TangentialClassifierFreeGuidance(guidance_scale=5.0),
                               x_T.clone())
        got = gradguide_run(module, _scheduler(kind), gg.TCFG(5.0, uncond=_uncond()), x_T.clone())
    scale = ref.abs().max().item()
    assert (got - ref).abs().max() <= 1e-4 * scale
    # with the SVD in float64 the ε trajectories agree to rounding (the flow adapter's σ's add ~1e-7)
    assert (got - exact).abs().max() <= (1e-12 if kind == "eps" else 1e-6) * scale
    assert (ref - exact).abs().max() > (got - exact).abs().max()


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", list(FDG_CASES))
def test_fdg_matches_diffusers(name, kind):
    _check(FDG_CASES[name], kind)


# -- TCFG and MAMBO-G on the fused step: their coefficient programs inside the combine -----------

def _fused_model(x, t, y=None):
    tt = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
    return torch.tanh(1.3 * x + y.view(-1, 1, 1, 1) * torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)) * (1 - tt) \
        + 0.2 * x


def _tcfg_run(term, fused, prediction="eps", clip=None, backend="reference", dtype=torch.float64, schedule=None):
    from gradguide import sampling
    runs = {}
    original = sampling._finish_prepare

    def spy(run, fused_flag=True):
        original(run, fused_flag)
        runs["run"] = run
    sampling._finish_prepare = spy
    try:
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        out = gg.sample(_fused_model, SHAPE, schedule=schedule or gg.Schedule.linear(1000),
                        sampler=gg.Sampler("flow-euler" if prediction == "flow" else "ddim", prediction=prediction, clip=clip),
                        steps=6, x_T=x_T, cond={"y": torch.tensor([1.0, -1.0, 0.5])}, guidance=term,
                        execution=gg.Execution(backend=backend, fused=fused))
    finally:
        sampling._finish_prepare = original
    return out, runs["run"]


FUSED_TERMS = {"tcfg": lambda **kw: gg.TCFG(4.0, uncond={"y": torch.zeros(3)}, **kw),
               "mambo": lambda **kw: gg.MamboG(4.0, alpha=1.5, uncond={"y": torch.zeros(3)}, **kw)}


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("kw", [dict(), dict(start=0.2, stop=0.7), dict(convention="diffusers-original", stop=0.5)])
@pytest.mark.parametrize("policy", list(FUSED_TERMS))
def test_fused_step_equals_the_general_path(policy, prediction, kw):
    schedule = gg.FlowSchedule(shift=3.0) if prediction == "flow" else None
    term = FUSED_TERMS[policy](**kw)
    want, general = _tcfg_run(term, False, prediction, schedule=schedule)
    got, run = _tcfg_run(term, True, prediction, schedule=schedule)
    assert general.plan is None and run.plan is not None, run.fused_reason
    stages = {tuple(st.policy for st in v.stages) for v in run.plan.variants.values()}
    assert (policy,) in stages and stages <= {(policy,), ("linear",)}   # one pass; "linear" outside the window
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (want - _tcfg_run(gg.CFG(4.0, uncond={"y": torch.zeros(3)}), False, prediction,
                             schedule=schedule)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("policy", list(FUSED_TERMS))
def test_fused_step_on_every_backend_with_clipping(policy, backend):
    if gg.ops.available_backends("cpu")[backend] is not True:
        pytest.fail(f"{backend} backend not available here")
    term = FUSED_TERMS[policy](start=0.1)
    want, _ = _tcfg_run(term, False, clip=(-1.0, 1.0))
    got, run = _tcfg_run(term, True, clip=(-1.0, 1.0), backend=backend)
    assert run.plan is not None and run.backend == backend
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    got32, _ = _tcfg_run(term, True, clip=(-1.0, 1.0), backend=backend, dtype=torch.float32)
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_rescale_and_the_other_guiders_take_the_general_path():
    from gradguide import sampling
    for term, why in ((gg.TCFG(3.0, guidance_rescale=0.5), "rescale"),
                      (gg.MamboG(3.0, guidance_rescale=0.5), "rescale"),
                      (gg.APGMix(3.0), "APGMix"), (gg.FDG([3.0, 2.0]), "FDG")):
        run = sampling.prepare_run(_fused_model, SHAPE, schedule=gg.Schedule.linear(1000), sampler="ddim", steps=4,
                                   guidance=term, cond={"y": torch.ones(3)})
        assert run.plan is None and why in run.fused_reason


def test_pixelasparam_projects_the_guiders_output_against_other_guidance():
    """PixelAsParam policy A treats the guided branch combination (here TCFG's x̂_0) and a
    classifier's shift as two update directions. One DDIM step from t = T (c_x = 0, c_0 = 1:
    x_next is the guided x̂_0), so with D = TCFG's x̂_0 and C = the classifier's shift (both read
    off runs without the projection) the projected run must be PC(D|C) + PC(C|D) per sample."""
    uncond = {"y": torch.zeros(3)}
    cond = {"y": torch.tensor([1.0, -1.0, 0.5])}
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    run = lambda guidance, projection=None: gg.sample(  # noqa: E731
        _fused_model, SHAPE, schedule=gg.Schedule.linear(1000), sampler="ddim", steps=1, x_T=x_T, cond=cond,
        guidance=guidance, projection=projection)
    d = run(gg.TCFG(4.0, uncond=uncond))
    # a classifier whose gradient opposes D on the first sample and agrees on the others
    direction = d * torch.tensor([-1.0, 0.5, 0.2], dtype=torch.float64).view(-1, 1, 1, 1) + 0.3 * x_T
    log_prob = lambda x, t, y=None: (x * direction).flatten(1).sum(1)   # noqa: E731
    terms = [gg.TCFG(4.0, uncond=uncond), gg.Classifier(log_prob, 0.02, form="score")]
    c = run(terms) - d
    got = run(terms, gg.PixelAsParam("A"))
    flat_d, flat_c = d.flatten(1), c.flatten(1)
    dc = (flat_d * flat_c).sum(1, keepdim=True)
    want = (flat_d - dc.clamp(max=0) / (flat_c * flat_c).sum(1, keepdim=True) * flat_c) \
        + (flat_c - dc.clamp(max=0) / (flat_d * flat_d).sum(1, keepdim=True) * flat_d)
    assert (dc[:, 0] < 0).tolist() == [True, False, False]   # the case really conflicts, on one sample
    torch.testing.assert_close(got.flatten(1), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="policy C projects the two branches of classifier-free guidance"):
        run(gg.TCFG(4.0, uncond=uncond), gg.PixelAsParam("C"))


def test_fdg_with_equal_scales_is_cfg_and_its_pyramid_rebuilds_exactly():
    """The Laplacian pyramid rebuilds its input, so FDG with one weight on every
    band (no parallel weights) is CFG with that weight."""
    from gradguide.guidance.fdg import laplacian_pyramid, rebuild
    x = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bands = laplacian_pyramid(x, 3)
    assert [tuple(b.shape[2:]) for b in bands] == [(16, 8), (8, 4), (4, 2)]
    torch.testing.assert_close(rebuild(bands), x, rtol=0, atol=1e-13)
    uncond = {"y": torch.zeros(3)}
    fdg, _ = _tcfg_run(gg.FDG([3.0, 3.0, 3.0], uncond=uncond), False)
    cfg, _ = _tcfg_run(gg.CFG(3.0, uncond=uncond), False)
    torch.testing.assert_close(fdg, cfg, rtol=1e-10, atol=1e-10)
    split, _ = _tcfg_run(gg.FDG([6.0, 3.0, 1.5], uncond=uncond), False)
    assert (split - cfg).abs().max() > 1e-2


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="TCFG: convention"):
        gg.TCFG(3.0, convention="paper")
    with pytest.raises(ValueError, match="MamboG: start"):
        gg.MamboG(3.0, start=1.5)
    with pytest.raises(TypeError, match="APGMix: apg_start_step"):
        gg.APGMix(3.0, apg_start_step=0.5)
    with pytest.raises(ValueError, match="FDG: stop: expected 2 values"):
        gg.FDG([3.0, 2.0], stop=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="FDG: scales"):
        gg.FDG(3.0)
    with pytest.raises(ValueError, match="FDG: height and width 12 × 12"):
        gg.sample(_fused_model, (3, 4, 12, 12), schedule=gg.Schedule.linear(1000), sampler="ddim", steps=2,
                  cond={"y": torch.ones(3)}, guidance=gg.FDG([3.0, 2.0]))
    with pytest.raises(ValueError, match="FDG: the Laplacian pyramid needs image-shaped samples"):
        gg.sample(_fused_model, (3, 4, 8), schedule=gg.Schedule.linear(1000), sampler="ddim", steps=2,
                  cond={"y": torch.ones(3)}, guidance=gg.FDG([3.0, 2.0]))


@pytest.mark.parametrize("name", ["tcfg-window", "mambo", "apgmix", "fdg"])
def test_emulated_graph_replay_equals_eager(name):
    """The step windows and APG-mix's phases are host-side variants (one captured graph each) and
    its momentum buffer carried state: the graph stepper's replays equal the eager steps."""
    from gradguide.graphs import GraphCache
    uncond = {"y": torch.zeros(3)}
    term = {"tcfg-window": lambda: gg.TCFG(4.0, start=0.2, stop=0.7, uncond=uncond),
            "mambo": lambda: gg.MamboG(4.0, alpha=1.0, stop=0.5, guidance_rescale=0.3, uncond=uncond),
            "apgmix": lambda: gg.APGMix(3.0, 5.0, apg_start_step=2, start=0.1, uncond=uncond),
            "fdg": lambda: gg.FDG([5.0, 2.0], parallel_weights=0.5, uncond=uncond)}[name]
    kw = dict(schedule=gg.Schedule.linear(1000), sampler="ddim", steps=8, cond={"y": torch.tensor([1.0, -1.0, 0.5])},
              x_T=torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    eager = gg.sample(_fused_model, SHAPE, guidance=term(), **kw)
    cache = GraphCache(emulate=True)
    graphed = gg.sample(_fused_model, SHAPE, guidance=term(), execution=gg.Execution(graph=cache), **kw)
    assert torch.equal(eager, graphed)
    bound = term().for_steps(8)
    assert cache.captures == len({bound.variant(i) for i in range(8)}) > (1 if name != "fdg" else 0)
