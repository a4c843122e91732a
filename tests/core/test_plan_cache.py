"""sample()'s setup cache (gradguide.sampling._PLAN_CACHE): repeated calls with one
configuration reuse the sampler tables and the fused plan, and give bit-identical samples to the
uncached path; any change of what the tables or the plan read gives a fresh, right answer; the
cache is bounded and a caller cannot corrupt it through a run."""
import subprocess
import sys

import pytest
import torch

import gradguide as gg
from gradguide import sampling

SCHED = gg.Schedule.linear(1000)
SHAPE = (2, 2, 4, 4)
COND = {"y": torch.ones(SHAPE[0])}


def _model(x, t, y=None):
    """A per-sample nonlinear ε model (tests/core/test_fused_step.py's kind)."""
    s = (t.to(torch.float64) / 1000.0).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    out = 0.6 * x + 0.1 * torch.tanh(x) * (1 + s)
    if y is not None:
        out = out + 0.05 * y.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return out


def _classifier(x, t, y=None):
    return -(0.3 * (x - 0.5) ** 2).flatten(1).sum(1)


def _guidance(name):
    return {"none": [], "cfg": [gg.CFG(3.0, uncond={"y": torch.zeros(SHAPE[0])})],
            "apg": [gg.APG(2.0, uncond={"y": torch.zeros(SHAPE[0])})],
            "classifier": [gg.Classifier(_classifier, scale=0.5)]}[name]


def _sample(sampler="ddim", guidance=("cfg",), projection=None, terms=None, schedule=SCHED, steps=5, execution=None):
    if terms is None:
        terms = [t for g in guidance for t in _guidance(g)]
    dtype = execution.dtype if execution is not None and execution.dtype is not None else torch.float32
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    return gg.sample(_model, SHAPE, schedule=schedule, sampler=sampler, steps=steps, guidance=terms,
                     projection=projection, cond=COND, x_T=x_T, generator=torch.Generator().manual_seed(2),
                     execution=execution)


def _uncached(monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr(sampling, "PLAN_CACHE_SIZE", 0)   # every entry is dropped as soon as it is made
        return _sample(**kw)


@pytest.fixture(autouse=True)
def _fresh_cache():
    sampling.clear_plan_cache()
    yield
    sampling.clear_plan_cache()


def _count_builds(monkeypatch):
    calls = []
    original = sampling._build_tables_and_plan

    def counting(run, fused):
        calls.append(run.tables)
        return original(run, fused)
    monkeypatch.setattr(sampling, "_build_tables_and_plan", counting)
    return calls


CONFIGS = [
    dict(sampler="ddim", guidance=("cfg",)),
    dict(sampler=gg.Sampler("ddim", eta=1.0), guidance=("cfg",)),
    dict(sampler="ddpm", guidance=("none",)),
    dict(sampler=gg.Sampler("ddpm", clip=True), guidance=("apg",)),
    dict(sampler=gg.Sampler("ddim", clip=True), guidance=("cfg",), projection=gg.PixelAsParam("C", delta=0.5)),
    dict(sampler="ddpm", guidance=("classifier",), projection=gg.PixelAsParam("A")),
    dict(sampler="ddim", guidance=("classifier",), projection=gg.PixelAsParam("B"),
         execution=gg.Execution(dtype=torch.float64)),
    dict(sampler="dpmpp-2m", guidance=("cfg",)),
    dict(sampler="unipc", guidance=("none",)),
    dict(sampler="ddim", guidance=("cfg",), execution=gg.Execution(fused=False)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_repeated_calls_are_cache_hits_and_bit_identical_to_the_uncached_path(config, monkeypatch):
    reference = _uncached(monkeypatch, **config)
    builds = _count_builds(monkeypatch)
    first, second, third = (_sample(**config) for _ in range(3))
    assert len(builds) == 1   # built once, then taken from the cache
    for out in (first, second, third):
        assert torch.equal(out, reference)


def test_cached_result_equals_a_fresh_process():
    code = ("import torch, sys; sys.path.insert(0, 'tests/core'); import test_plan_cache as t; "
            "out = t._sample(sampler=t.gg.Sampler('ddim', clip=True), guidance=('cfg',), "
            "projection=t.gg.PixelAsParam('C')); "
            "print(repr(out.flatten().tolist()))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    _sample(sampler=gg.Sampler("ddim", clip=True), guidance=("cfg",), projection=gg.PixelAsParam("C"))
    cached = _sample(sampler=gg.Sampler("ddim", clip=True), guidance=("cfg",), projection=gg.PixelAsParam("C"))
    assert repr(cached.flatten().tolist()) == fresh.strip()


BASE = dict(sampler=gg.Sampler("ddim"), guidance=("cfg",))
CHANGES = {
    "steps": dict(steps=7),
    "eta": dict(sampler=gg.Sampler("ddim", eta=0.5)),
    "sampler": dict(sampler="ddpm"),
    "dtype": dict(execution=gg.Execution(dtype=torch.float64)),
    "projection": dict(projection=gg.PixelAsParam("C", delta=0.3)),
    "projection-delta": dict(projection=gg.PixelAsParam("C", delta=0.7)),
    "clip": dict(sampler=gg.Sampler("ddim", clip=(-0.5, 0.5))),
    "clip_eps": dict(sampler=gg.Sampler("ddim", clip=(-0.5, 0.5), clip_eps="model")),
    "prediction": dict(sampler=gg.Sampler("ddim", prediction="v")),
    "spacing": dict(sampler=gg.Sampler("ddim", spacing="trailing")),
    "betas": dict(schedule=gg.Schedule.linear(1000, beta_end=0.03)),
    "guidance": dict(guidance=("apg",)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changing_a_key_component_gives_the_uncached_answer(change, monkeypatch):
    config = {**BASE, **CHANGES[change]}
    if change == "projection-delta":   # the cache holds policy C with delta 0.3 first
        _sample(**{**BASE, **CHANGES["projection"]})
    base = _sample(**BASE)
    _sample(**BASE)
    changed = _sample(**config)
    assert torch.equal(changed, _uncached(monkeypatch, **config))
    assert changed.dtype != base.dtype or not torch.equal(changed.to(base.dtype), base)


def test_changing_a_guidance_objects_scale_between_calls(monkeypatch):
    cfg = gg.CFG(3.0, uncond={"y": torch.zeros(SHAPE[0])})
    first = _sample(terms=[cfg])
    cfg.scale = 5.0
    second = _sample(terms=[cfg])
    assert not torch.equal(first, second)
    assert torch.equal(second, _uncached(monkeypatch, terms=[gg.CFG(5.0, uncond={"y": torch.zeros(SHAPE[0])})]))
    cls = gg.Classifier(_classifier, scale=0.5)
    before = _sample(sampler="ddpm", terms=[cls])
    cls.scale = 2.0
    after = _sample(sampler="ddpm", terms=[cls])
    assert not torch.equal(before, after)
    assert torch.equal(after, _uncached(monkeypatch, sampler="ddpm", terms=[gg.Classifier(_classifier, scale=2.0)]))
    apg = gg.APG(2.0, uncond={"y": torch.zeros(SHAPE[0])})
    before = _sample(terms=[apg])
    apg.norm_threshold = 0.5
    after = _sample(terms=[apg])
    assert torch.equal(after, _uncached(monkeypatch, terms=[gg.APG(2.0, norm_threshold=0.5,
                                                                   uncond={"y": torch.zeros(SHAPE[0])})]))
    assert not torch.equal(before, after)


def test_a_schedule_changed_in_place_is_not_served_stale(monkeypatch):
    sched = gg.Schedule.linear(1000)
    first = _sample(schedule=sched)
    sched.alphas_cumprod = gg.Schedule.cosine(1000).alphas_cumprod   # same object, other ᾱ
    second = _sample(schedule=sched)
    assert not torch.equal(first, second)
    assert torch.equal(second, _uncached(monkeypatch, schedule=gg.Schedule.cosine(1000)))


def test_the_cache_is_bounded_and_least_recently_used_goes_first(monkeypatch):
    monkeypatch.setattr(sampling, "PLAN_CACHE_SIZE", 3)
    for steps in range(2, 8):
        _sample(steps=steps)
        assert len(sampling._PLAN_CACHE) <= 3
    assert len(sampling._PLAN_CACHE) == 3
    builds = _count_builds(monkeypatch)
    _sample(steps=7)   # the most recent: cached
    assert len(builds) == 0
    _sample(steps=2)   # evicted long ago: built again
    assert len(builds) == 1


def test_a_caller_cannot_corrupt_the_cache_through_a_run(monkeypatch):
    """What a run owns (the device table a step reads, the timesteps, the plan's lists) is its own
    copy: changing it does not reach the cache."""
    kw = dict(sampler=gg.Sampler("ddim", clip=True), guidance=("cfg",), projection=gg.PixelAsParam("C"))
    reference = _uncached(monkeypatch, **kw)
    for _ in range(2):   # the second prepare_run is a cache hit
        run = sampling.prepare_run(_model, SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", clip=True), steps=5,
                                   cond=COND, guidance=[gg.CFG(3.0, uncond={"y": torch.zeros(SHAPE[0])})],
                                   projection=gg.PixelAsParam("C"))
        assert run.plan is not None
        run.table_rows.fill_(7.0)
        run.timesteps_dev.fill_(3)
        run.timestep_list.clear()
        for variant in run.plan.variants.values():
            variant.stages[0].vector_rows[0] = 0
            variant.stages.clear()
        run.plan.keys.clear()
        run.table_index.clear()
    assert torch.equal(_sample(**kw), reference)


def test_sampling_never_writes_the_shared_host_tables():
    """A cached run shares the host tables (sampler tables, timesteps) and step indices with the
    cache, read-only: repeated calls, eager and with a reused CUDA graph (which copies a later
    run's values into the captured run's tensors), leave them bit for bit as they were."""
    from gradguide.graphs import GraphCache
    _sample()
    (entry,) = sampling._PLAN_CACHE.values()
    tables, step_ids = entry[0], entry[-1]
    snapshot = [t.clone() for t in (tables.timesteps.t, tables.timesteps.abar, tables.timesteps.abar_prev, step_ids,
                                    *tables.tables.values())]
    draws = list(tables.draws_noise)
    cache = GraphCache(emulate=True)
    for schedule in (SCHED, gg.Schedule.cosine(1000)):   # the second reuses the capture with other values
        _sample(execution=gg.Execution(graph=cache), schedule=schedule)
        _sample(schedule=schedule)
    assert cache.reuses >= 1
    after = [tables.timesteps.t, tables.timesteps.abar, tables.timesteps.abar_prev, step_ids, *tables.tables.values()]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)) and tables.draws_noise == draws


def test_lookahead_runs_are_cached_and_read_each_calls_gradient_and_target(monkeypatch):
    """G_loss's plan reads its reward gradient and target from the running step's term (the plan
    holds neither), so a call with new ones reuses the entry and gives what an uncached run gives."""
    outs = []
    for k in range(2):
        g = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(6 + k))
        reward = gg.LookAhead(g, target=torch.linspace(-1, 1, SHAPE[0]) * (k + 1))
        kw = dict(sampler="ddpm", guidance=(), terms=[reward])
        got = _sample(**kw)
        run = sampling.prepare_run(_model, SHAPE, schedule=SCHED, sampler="ddpm", steps=5, guidance=[reward])
        assert run.plan is not None and len(sampling._PLAN_CACHE) == 1
        torch.testing.assert_close(got, _uncached(monkeypatch, **kw), rtol=0, atol=0)
        outs.append(got)
    assert not torch.equal(outs[0], outs[1])


def test_keys_tell_apart_values_that_compare_equal():
    from gradguide.runkey import Unkeyable, plain
    assert plain(True) != plain(1) != plain(1.0)
    assert plain(-0.0) != plain(0.0)
    assert plain((1.0, "a")) == plain([1.0, "a"])
    with pytest.raises(Unkeyable):
        plain(torch.tensor(1.0))


def test_threads_sharing_a_small_cache_get_their_own_answers(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    configs = [dict(steps=s) for s in (3, 4, 5, 6)]
    expected = [_uncached(monkeypatch, **c) for c in configs]
    monkeypatch.setattr(sampling, "PLAN_CACHE_SIZE", 2)   # entries evicted while other threads use them
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda j: (j % 4, _sample(**configs[j % 4])), range(24)))
    for j, out in outs:
        assert torch.equal(out, expected[j])
