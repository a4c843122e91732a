"""The fused step (gradguide.stepplan, docs/architecture.md#the-fused-step).

- A guided step that matches a built-in program runs as reduce + one fused combine: at most 8
  launches beyond the model (counted on CPU with a TorchDispatchMode: aten ops that are not
  views, plus custom ops) and big-tensor traffic within 1.1x the minimum, for the five workloads.
- Its output equals the general LinComb path's (``fused=False``, the reference) for every
  built-in sampler x guidance x projection x clipping x prediction combination.
- Combinations outside the built-ins take the general path; no host sync; the graph stepper works.
"""
import itertools

import pytest
import torch

import gradguide as gg
from gradguide import sampling
from gradguide.bench import step_launches

SCHED = gg.Schedule.linear(1000)
SHAPE = (3, 2, 4, 4)


# -- launches and traffic ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("name", list(step_launches.WORKLOADS()))
def test_a_guided_step_is_at_most_8_launches_at_minimum_traffic(name, backend):
    if gg.ops.available_backends("cpu")[backend] is not True:
        pytest.skip(f"{backend} not available")
    row = step_launches.count_step(step_launches.WORKLOADS()[name], backend=backend)
    assert row["launches"] <= 8, row["ops"]
    assert row["traffic_ratio"] <= step_launches.WORKLOADS()[name].target_ratio + 1e-9, row
    ns = "gradguide" if backend == "native" else "gradguide_triton"
    assert f"{ns}::fused_combine" in row["ops"]
    # no small torch ops around the kernels: what is left is the step's column of the tables
    # (index_select: weights and timesteps) and the classifier's backward seed (sum, ones_like)
    assert set(row["ops"]) <= {"index_select", "sum", "ones_like", f"{ns}::reduce", f"{ns}::fused_combine"}, row["ops"]
    # the general LinComb path really is the many-launch one this replaces
    general = step_launches.count_step(step_launches.WORKLOADS()[name], backend=backend, fused=False)
    assert general["launches"] > 2 * row["launches"]


def test_launch_counter_counts_custom_ops_and_skips_views_and_the_model():
    x = torch.randn(2, 8)
    counter = step_launches.LaunchCounter(big_numel=16)
    with counter:
        y = x.view(16).reshape(2, 8).detach()   # views: 0
        with step_launches.paused():
            y = y * 2                            # "the model": 0
        z = y + 1                                # 1
        if gg.ops.available_backends("cpu")["native"] is True:
            gg.ops.native_backend.reduce([z], 1)  # 1 custom op
    assert counter.ops[0] == "add" and len(counter.ops) in (1, 2)
    assert counter.bytes == 2 * 64 + (64 if len(counter.ops) == 2 else 0)   # add: read + write; reduce: read


# -- equal to the general path --------------------------------------------------------------------

def _model(x, t, y=None):
    """A per-sample nonlinear ε model near the exact one for N(0, I) data (ε = √(1−ᾱ) x_t), with
    perturbations scaled by √ᾱ so x̂_0 stays O(1) at every t; the conditional branch differs."""
    abar = SCHED.alphas_cumprod.to(x.dtype)[t].reshape(-1, *([1] * (x.dim() - 1)))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    out = s * x + a * (0.3 * torch.tanh(1.3 * x) + 0.2 * x.roll(1, -1))
    if y is None:
        return out
    return out + a * 0.4 * y.to(x.dtype).reshape(abar.shape) * torch.sin(x + 1.0)   # y = 0: the null label


_D = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))


def _log_prob(x, t, y=None):
    return (torch.sin(2 * x) * _D.to(x.dtype)).flatten(1).sum(1)


def _log_prob2(x, t, y=None):
    return -(0.3 * (x - 0.5) ** 2).flatten(1).sum(1)


def _decode(z):
    """A small nonlinear "decoder" to a larger image (latents [B, 2, 4, 4] -> images [B, 3, 8, 8])."""
    up = torch.nn.functional.interpolate(z, scale_factor=2.0, mode="bilinear", align_corners=False)
    return torch.cat([torch.tanh(up), up.sum(1, keepdim=True) * 0.5], 1) * 1.3


def _guidance(name):
    """Scales that keep 5 steps from t = 999 bounded (the score form multiplies by h/a ~ 150 there),
    so that outputs are compared, not amplified rounding."""
    g = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    return {
        "none": [], "cfg": [gg.CFG(3.0)], "apg": [gg.APG(4.0, eta=0.3, norm_threshold=2.0)],
        "apg-diffusers": [gg.APG(4.0, norm_threshold=2.0, convention="diffusers")], "cfg++": [gg.CFGPlusPlus(0.6)],
        "classifier": [gg.Classifier(_log_prob, 0.05)],
        "two-classifiers": [gg.Classifier(_log_prob, 0.04), gg.Classifier(_log_prob2, 0.03)],
        "cfg+classifier": [gg.CFG(2.0), gg.Classifier(_log_prob, 0.05)],
        "lookahead": [gg.LookAhead(g, target=torch.linspace(-1, 1, SHAPE[0]))],
        "lookahead-beta": [gg.LookAhead(g, target=0.5, beta=0.02, multiplier=2.0)],
        "cfg+lookahead": [gg.CFG(2.0), gg.LookAhead(g, target=0.5, beta=0.02)],
        "decoded": [gg.DecodedLookAhead(_decode, _IMAGE_GRAD, offset=torch.tensor([0.1, -0.2, 0.3]), target=1.0,
                                        beta=0.002, scaling=0.5)],
        "cfg+decoded": [gg.CFG(2.0), gg.DecodedLookAhead(_decode, _IMAGE_GRAD, target=1.0, beta=0.002, scaling=0.5,
                                                         official_batch_scaling=True)],
    }[name]


_IMAGE_GRAD = 0.2 * torch.randn(SHAPE[0], 3, 8, 8, generator=torch.Generator().manual_seed(7))


PROJECTIONS = {"none": None, "A": gg.PixelAsParam("A"), "B": gg.PixelAsParam("B", delta=0.8),
               "B-channel": gg.PixelAsParam("B", granularity="channel"), "C": gg.PixelAsParam("C", delta2=0.6)}


def _valid(guidance, projection):
    if projection == "C":
        return guidance == "cfg"
    if projection in ("A", "B", "B-channel"):
        return "classifier" in guidance
    return True


CASES = [c for c in itertools.product(["ddpm", "ddim", "ddim-eta1", "dpmpp-2m"], ["none", "cfg", "apg", "apg-diffusers",
                                                                                 "cfg++", "classifier",
                                                                                 "two-classifiers", "cfg+classifier",
                                                                                 "lookahead", "lookahead-beta",
                                                                                 "cfg+lookahead", "decoded",
                                                                                 "cfg+decoded"],
                                      list(PROJECTIONS), [None, True]) if _valid(c[1], c[2])]


def _sample_and_run(model, sampler, terms, projection, dtype, execution, diagnostics=None, steps=5):
    """``(samples, the run sample() prepared)`` from the fixed x_T and noise of these tests."""
    x_T = 1.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = {}
    original = sampling._finish_prepare

    def spy(run, fused_flag=True):
        original(run, fused_flag)
        runs["run"] = run
    sampling._finish_prepare = spy
    noise = sampling._noise
    # float32 and float64 runs must see the same noise: torch.randn's float32 and float64 streams
    # differ, so draw in float64 and round
    sampling._noise = lambda shape, gen, device, dt: noise(shape, gen, device, torch.float64).to(dt)
    try:
        out = gg.sample(model, SHAPE, schedule=SCHED, sampler=sampler, steps=steps, guidance=terms,
                        projection=projection, cond={"y": torch.ones(SHAPE[0])}, x_T=x_T.to(dtype),
                        execution=execution, diagnostics=diagnostics, generator=torch.Generator().manual_seed(2))
    finally:
        sampling._finish_prepare, sampling._noise = original, noise
    return out, runs["run"]


def _run(sampler, guidance, projection, clip, fused, dtype=torch.float64, prediction="eps", clip_eps="clipped",
         backend="auto", steps=5, graph=False, diagnostics=None):
    eta = 1.0 if sampler == "ddim-eta1" else None
    return _sample_and_run(_model, gg.Sampler(sampler.split("-eta")[0], eta=eta, prediction=prediction, clip=clip,
                                              clip_eps=clip_eps),
                           _guidance(guidance), PROJECTIONS[projection], dtype,
                           gg.Execution(backend=backend, fused=fused, graph=graph), diagnostics, steps)


def _expect_fused(sampler, guidance, projection, clip):
    return sampler != "dpmpp-2m"   # samplers with carried state take the general path


@pytest.mark.parametrize("sampler,guidance,projection,clip", CASES)
def test_fused_step_equals_the_general_path(sampler, guidance, projection, clip):
    want, general = _run(sampler, guidance, projection, clip, fused=False)
    got, run = _run(sampler, guidance, projection, clip, fused=True)
    assert general.plan is None
    assert (run.plan is not None) == _expect_fused(sampler, guidance, projection, clip), run.fused_reason
    assert want.abs().max() < 50
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if clip:  # the case really clips (else the clip stages are untested)
        assert (want - _run(sampler, guidance, projection, None, fused=False)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("case", [("ddim", "cfg", "none"), ("ddpm", "classifier", "B"), ("ddim", "apg", "none"),
                                  ("ddpm", "lookahead", "none"), ("ddpm", "cfg", "C")])
def test_fused_step_other_predictions(prediction, case):
    want, _ = _run(*case, None, fused=False, prediction=prediction)
    got, run = _run(*case, None, fused=True, prediction=prediction)
    assert run.plan is not None
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", [("ddim", "cfg", "none"), ("ddim", "classifier", "A"), ("ddim-eta1", "cfg+classifier", "B")])
def test_fused_step_clip_eps_model(case):
    want, _ = _run(*case, True, fused=False, clip_eps="model")
    got, run = _run(*case, True, fused=True, clip_eps="model")
    assert run.plan is not None
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


TRITON = gg.ops.available_backends("cpu")["triton"] is True


@pytest.mark.skipif(not TRITON, reason="triton (interpreted) not available")
@pytest.mark.parametrize("case", [("ddim", "cfg", "none", None), ("ddpm", "classifier", "A", None),
                                  ("ddim-eta1", "cfg+classifier", "B-channel", True), ("ddim", "apg", "none", True),
                                  ("ddpm", "lookahead", "none", None), ("ddim", "lookahead-beta", "none", None),
                                  ("ddpm", "cfg", "C", True), ("ddim", "two-classifiers", "none", True),
                                  ("ddim", "cfg+decoded", "none", None)])
def test_fused_step_on_triton_equals_the_general_reference_path(case):
    """float64 on the Triton kernels (interpreted): the fused step equals the general LinComb
    step on the reference backend, and it really ran the fused kernel for every stage."""
    want, _ = _run(*case, fused=False, backend="reference")
    calls = []
    real = gg.ops.triton_backend.fused_combine

    def spy(policy, *args, **kwargs):
        calls.append(policy)
        return real(policy, *args, **kwargs)
    gg.ops.triton_backend.fused_combine = spy
    try:
        got, run = _run(*case, fused=True, backend="triton")
    finally:
        gg.ops.triton_backend.fused_combine = real
    assert run.plan is not None and run.backend == "triton"
    stages = [st.policy for v in run.plan.variants.values() for st in v.stages if st.policy != "clip-shift"]
    assert set(calls) == set(stages) and len(calls) >= 5
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", [("ddpm", "classifier", "A", True), ("ddim", "apg", "none", None),
                                  ("ddpm", "lookahead", "none", None), ("ddpm", "cfg", "C", True)])
def test_fused_step_float32_every_backend(backend, case):
    if gg.ops.available_backends("cpu")[backend] is not True:
        pytest.skip(f"{backend} not available")
    want, _ = _run(*case, fused=False, backend="reference")
    got, run = _run(*case, fused=True, dtype=torch.float32, backend=backend)
    assert run.plan is not None and run.backend == backend
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_branches", [True, False])
@pytest.mark.parametrize("guidance", ["cfg+decoded", "cfg+lookahead"])
def test_vjp_through_both_cfg_branches_is_each_branchs_own(guidance, batch_branches):
    """G_loss (decoded or not) after CFG: the fused step takes each branch's Jᵀw (one backward
    pass, batched or not) and is the general path's autograd through the CFG-combined x̂_0; the
    term really moves the sample."""
    terms = _guidance(guidance)
    terms[0] = gg.CFG(2.0, uncond={"y": torch.zeros(SHAPE[0])})   # a null label: the branches can share a call
    common = dict(schedule=SCHED, sampler="ddim", steps=5, cond={"y": torch.ones(SHAPE[0])},
                  x_T=1.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    runs = [sampling.prepare_run(_model, SHAPE, guidance=terms, execution=gg.Execution(batch_branches=batch_branches),
                                 schedule=SCHED, sampler="ddim", steps=5, cond=common["cond"])]
    plan = runs[0].plan
    assert plan is not None, runs[0].fused_reason
    computed = {c.method for v in plan.variants.values() for c in v.computed.values() if c.position < 0}
    assert computed == {"model_cond", "model_uncond"}
    got = gg.sample(_model, SHAPE, guidance=terms, execution=gg.Execution(batch_branches=batch_branches), **common)
    want = gg.sample(_model, SHAPE, guidance=terms, execution=gg.Execution(fused=False, batch_branches=batch_branches),
                     **common)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    cfg_only = gg.sample(_model, SHAPE, guidance=terms[:1], **common)
    assert (want - cfg_only).abs().max() > 1e-3


@pytest.mark.parametrize("terms,projection,why", [
    ([gg.APG(3.0, momentum=-0.5)], None, "state carried between steps (apg_running)"),
    ([gg.Classifier(_log_prob, 1.0)], gg.PixelAsParam("A", pcgrad=True), "PixelAsParam._pcgrad"),
    ([gg.DPS(lambda x0: x0, torch.zeros(SHAPE))], None, "DPS"),
    ([gg.Rescale(3.0)], None, "Rescale")])
def test_other_combinations_take_the_general_path(terms, projection, why):
    run = sampling.prepare_run(_model, SHAPE, schedule=SCHED, sampler="ddpm", steps=4, guidance=terms,
                               projection=projection, cond={"y": torch.ones(3)})
    assert run.plan is None and why in run.fused_reason


def test_fused_steps_never_synchronise_and_replay_in_the_graph_stepper():
    from gradguide.graphs import GraphCache
    for case in [("ddpm", "classifier", "A", True), ("ddim", "cfg", "C", None), ("ddpm", "lookahead", "none", None)]:
        want, _ = _run(*case, fused=True, diagnostics=gg.Diagnostics(check_sync=True))
        cache = GraphCache(emulate=True)
        got, run = _run(*case, fused=True, graph=cache)
        assert run.plan is not None and cache.captures >= 1
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_callback_records_use_the_general_step():
    records = []
    _run("ddim", "cfg", "none", None, fused=True, diagnostics=gg.Diagnostics(callback=records.append))
    assert len(records) == 5 and records[-1].x0 is not None


# -- the native ops behind the fused step ---------------------------------------------------------

NATIVE = gg.ops.available_backends("cpu")["native"] is True


@pytest.mark.skipif(not NATIVE, reason="native ops not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("policy", ["linear", "pxp-a", "pxp-b", "pxp-c", "apg", "lookahead"])
def test_native_fused_combine_matches_the_torch_program(policy, dtype):
    """Broadcast [1, 1, K] vectors, a Gram over the first Kg < K operands, per-group rows,
    per-sample scalars: the C++ program equals policies.coefficients + the reference combine."""
    from gradguide.ops import policies
    g = torch.Generator().manual_seed(3)
    shape, k, groups = (3, 2, 7, 5), 5, 2
    operands = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]
    names_v, names_s = policies.POLICIES[policy]
    kg = k - 1 if policies.NEEDS_GRAM[policy] else 0
    vectors = [torch.randn(1, 1, k, generator=g, dtype=torch.float64) for _ in names_v]
    if kg:   # vectors whose inner products are taken vanish beyond Kg; "base"/"coef" need not
        vectors = [v if n in ("base", "coef") else torch.cat([v[..., :kg], torch.zeros(1, 1, k - kg,
                                                                                       dtype=torch.float64)], -1)
                   for n, v in zip(names_v, vectors)]
    scalars = [torch.rand(3, generator=g, dtype=torch.float64) + 0.5 for _ in names_s]
    gram = gg.ops.reduce(operands[:kg], groups, backend="reference")[0] if kg else None
    got = gg.ops.fused_unchecked(policy, "native", operands, gram, vectors, scalars, groups if kg else 1)
    want = gg.ops.fused_unchecked(policy, "reference", operands, gram, vectors, scalars, groups if kg else 1)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.skipif(not NATIVE, reason="native ops not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_native_clip_shift_matches_reference_and_is_exact_inside(dtype):
    g = torch.Generator().manual_seed(4)
    operands = [(2 * torch.randn(2, 3, 1023, generator=g, dtype=torch.float64)).to(dtype) for _ in range(3)]
    coef_p = torch.tensor([[0.7, -0.2, 0.0]], dtype=torch.float64)
    coef_s = torch.tensor([[0.0, 0.0, 1e-3]], dtype=torch.float64)
    got = gg.ops.clip_shift(coef_p, coef_s, operands, (-1.0, 1.0), backend="native")
    want = gg.ops.clip_shift(coef_p, coef_s, operands, (-1.0, 1.0), backend="reference")
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
    clipped, shift = got
    assert clipped.abs().max() <= 1
    p = 0.7 * operands[0].double() - 0.2 * operands[1].double()
    s = 1e-3 * operands[2].double()
    inside = (p.abs() < 1 - 1e-2) & ((p + s).abs() < 1 - 1e-2)
    # where nothing clips the shift is s itself, to s's own precision (not p's)
    torch.testing.assert_close(shift.double()[inside], s[inside].to(dtype).double(), rtol=tol, atol=0)


@pytest.mark.skipif(not NATIVE, reason="native ops not built")
def test_native_fused_ops_opcheck():
    g = torch.Generator().manual_seed(5)
    operands = [torch.randn(2, 3, 8, generator=g) for _ in range(4)]
    gram = gg.ops.reduce(operands[:3], 3, backend="native")[0]
    vectors = [torch.randn(1, 1, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    vectors = [v if j == 0 else torch.cat([v[..., :3], torch.zeros(1, 1, 1, dtype=torch.float64)], -1)
               for j, v in enumerate(vectors)]
    torch.library.opcheck(torch.ops.gradguide.fused_combine.default,
                          ("pxp-a", operands, gram, vectors, [torch.ones(1, dtype=torch.float64)], None, 1.5))
    torch.library.opcheck(torch.ops.gradguide.fused_combine.default,
                          ("linear", operands, None, vectors[:1], [], -1.0, None))
    coef = torch.randn(1, 4, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gradguide.clip_shift.default, (coef, 0.01 * coef, operands, -1.0, 1.0))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_fused_step_fullgraph_equals_eager(backend):
    """torch.compile of the whole fused step, fullgraph (no graph break), with the native ops
    ("auto" on CPU) or the Triton custom ops."""
    if gg.ops.available_backends("cpu")[backend if backend != "auto" else "reference"] is not True:
        pytest.skip(f"{backend} not available")
    run = sampling.prepare_run(_model, SHAPE, schedule=SCHED,
                               sampler=gg.Sampler("ddim", prediction="eps", variance="fixed-small"), steps=5,
                               guidance=[gg.CFG(3.0)], projection=gg.PixelAsParam("C"),
                               cond={"y": torch.ones(SHAPE[0])}, execution=gg.Execution(backend=backend))
    assert run.plan is not None and (backend == "auto" or run.backend == "triton")
    x = torch.randn(SHAPE)
    state = sampling.initial_state(run, x)

    def step(x, idx):
        return sampling.step(run, x, 2, idx, state, None, False)[0]
    compiled = torch.compile(step, fullgraph=True)
    idx = run.step_ids[2:3]
    torch.testing.assert_close(compiled(x, idx), step(x, idx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(step_launches.WORKLOADS()))
def test_a_cached_configuration_sets_up_in_at_most_10_ops(name):
    """A sample() call whose configuration is already planned issues at most 10 ops before its
    first step: the tables and the plan come from the setup cache, the run copies only the
    device tables it owns (no setup storm)."""
    ops = step_launches.count_setup(step_launches.WORKLOADS()[name])
    assert len(ops) <= 10, ops
    assert "_local_scalar_dense" not in ops or ops.count("_local_scalar_dense") <= 1, ops   # one host read at most


# -- learned variances: Σ-scaled operands ----------------------------------------------------------

def _model_learned(x, t, y=None):
    """:func:`_model`'s ε and variance channels v ∈ (−1, 1) (ADM's learned range), the branches differ."""
    return torch.cat([_model(x, t, y), torch.tanh(0.7 * x + (0.0 if y is None else 0.2))], 1)


def _run_learned(guidance, projection, clip, fused, variance="learned-range", backend="auto", dtype=torch.float64,
                 model=_model_learned, graph=False, diagnostics=None):
    return _sample_and_run(model, gg.Sampler("ddpm", variance=variance, clip=clip), guidance, projection, dtype,
                           gg.Execution(backend=backend, fused=fused, graph=graph), diagnostics)


LEARNED_CASES = [(g, p, c) for g in ("classifier", "cfg+classifier", "none") for p in ("none", "A", "B", "B-channel")
                 for c in (None, True) if g != "none" or p == "none"] + \
                [("cfg", p, c) for p in ("C", "C-paper") for c in (None, True)]


def _learned_terms(name):
    return {"classifier": [gg.Classifier(_log_prob, 0.05, form="mean")],
            "cfg+classifier": [gg.CFG(2.0), gg.Classifier(_log_prob, 0.05, form="mean")],
            "cfg": [gg.CFG(3.0)], "none": []}[name]


_LEARNED_PROJECTIONS = dict(PROJECTIONS, **{"C-paper": gg.PixelAsParam("C", convention="paper")})


@pytest.mark.parametrize("guidance,projection,clip", LEARNED_CASES)
def test_learned_range_variance_takes_the_fused_step(guidance, projection, clip):
    """ADM's learned range: Σ = exp(slope · v + offset) scales the classifier's mean shift and √Σ the
    noise, elementwise; the fused step reads them as Σ-scaled operands and equals the general path."""
    terms = _learned_terms(guidance)
    want, _ = _run_learned(terms, _LEARNED_PROJECTIONS[projection], clip, fused=False)
    got, run = _run_learned(terms, _LEARNED_PROJECTIONS[projection], clip, fused=True)
    assert run.plan is not None, run.fused_reason
    scaled = [st for v in run.plan.variants.values() for st in v.stages if st.scaling is not None]
    assert scaled and all(st.scaling[0] in ("variance_channels", "variance_uncond") for st in scaled)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_learned_range_fused_step_never_synchronises_and_replays_in_the_graph_stepper():
    from gradguide.graphs import GraphCache
    terms = _learned_terms("cfg+classifier")
    want, _ = _run_learned(terms, PROJECTIONS["A"], True, fused=True, diagnostics=gg.Diagnostics(check_sync=True))
    cache = GraphCache(emulate=True)
    got, run = _run_learned(terms, PROJECTIONS["A"], True, fused=True, graph=cache)
    assert run.plan is not None and cache.captures >= 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_learned_range_variance_changes_the_step():
    """The variance channels reach the step: moving v moves the sample (fused and general alike)."""
    terms = _learned_terms("classifier")
    base, _ = _run_learned(terms, PROJECTIONS["A"], True, fused=True)
    shifted, _ = _run_learned(terms, PROJECTIONS["A"], True, fused=True,
                              model=lambda x, t, y=None: _model_learned(x, t, y) * torch.tensor([1, 1, 0.5, 0.5]
                                                                                            ).view(1, -1, 1, 1))
    assert (base - shifted).abs().max() > 1e-3


def test_learned_variance_sigma_itself_takes_the_general_path():
    """diffusers' ``"learned"`` outputs Σ itself: log Σ = log v is no line in the output, so the
    fused trace refuses it by name and the general step runs it."""
    model = lambda x, t, y=None: torch.cat([_model(x, t, y), 0.01 + torch.sigmoid(x) * 0.02], 1)   # noqa: E731
    out, run = _run_learned(_learned_terms("classifier"), PROJECTIONS["A"], None, fused=True, variance="learned",
                            model=model)
    assert run.plan is None and "variance 'learned'" in run.fused_reason
    assert torch.isfinite(out).all()
