"""sample()'s narrow signature and its three configuration objects: Sampler (filled from the
schedule's learnt configuration, then the defaults), Execution and Diagnostics."""
import copy
import dataclasses
import inspect
import pickle

import pytest
import torch

import gradguide as gg
from gradguide import sampling

SCHED = gg.Schedule.linear(100)


def _model(x, t, **_):
    return 0.1 * x


def test_sample_takes_at_most_twelve_parameters():
    params = inspect.signature(gg.sample).parameters
    assert len(params) <= 12
    assert list(params) == ["model", "shape", "schedule", "sampler", "steps", "guidance", "projection", "cond", "x_T",
                            "generator", "execution", "diagnostics"]
    # the harness's seam takes the same, plus its meta flag
    assert list(inspect.signature(sampling.prepare_run).parameters) == list(params) + ["meta"]
    # and the preparation no longer takes its arguments positionally
    prep = inspect.signature(sampling._prepare).parameters
    assert sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in prep.values()) <= 2


def test_the_objects_are_frozen_and_compare_by_value():
    s = gg.Sampler("ddim", eta=0.5, clip=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eta = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        gg.Execution().backend = "native"
    assert s == gg.Sampler("ddim", eta=0.5, clip=True) and s != gg.Sampler("ddim", eta=0.4, clip=True)
    assert gg.Sampler("dpmpp-2m", solver_order=3) == gg.Sampler("dpmpp-2m", options={"solver_order": 3})
    assert gg.Sampler(clip=(-1, 1)) == gg.Sampler(clip=[-1.0, 1.0]) != gg.Sampler(clip=True)
    assert gg.Sampler("dpmpp-2m", solver_order=3).options["solver_order"] == 3
    with pytest.raises(TypeError):
        gg.Sampler("dpmpp-2m", solver_order=3).options["solver_order"] = 2   # read-only
    assert repr(s) == "Sampler('ddim', eta=0.5, clip=True)"
    t = gg.sigmas_karras(5, 0.1, 10.0)
    assert gg.Sampler("euler", sigmas=t) == gg.Sampler("euler", sigmas=t.clone())
    assert gg.Sampler("euler", sigmas=t) != gg.Sampler("euler", sigmas=2 * t)
    assert dataclasses.replace(s, eta=1.0) == gg.Sampler("ddim", eta=1.0, clip=True)
    assert gg.Diagnostics(check_finite=True).check_finite == "step"
    # a configuration (and a schedule carrying one) copies and pickles
    s2 = gg.Sampler("dpmpp-2m", clip=(-1.0, 1.0), solver_order=3)
    for other in (copy.deepcopy(s2), pickle.loads(pickle.dumps(s2)), copy.copy(s2)):
        assert other == s2 and other.options["solver_order"] == 3
        with pytest.raises(TypeError):
            other.options["solver_order"] = 2
    sched = gg.Schedule.linear(100)
    sched.sampler_config = s2
    assert pickle.loads(pickle.dumps(sched)).sampler_config == s2


def test_resolution_order_call_then_schedule_then_defaults():
    learnt = gg.Sampler("dpmpp-2m", prediction="v", clip=(-2.0, 2.0), clip_eps="model", solver_order=3)
    # nothing set: the schedule's, every other field gradguide's default
    r = gg.Sampler().resolve(learnt)
    assert (r.name, r.prediction, r.clip, r.clip_eps, r.eta, r.variance, r.spacing) == \
        ("dpmpp-2m", "v", (-2.0, 2.0), "model", None, "fixed-small", "adm")   # η None: the sampler's own
    assert dict(r.options) == {"solver_order": 3}
    # the call's fields win, options merge
    r = gg.Sampler(clip=False, solver_type="heun").resolve(learnt)
    assert r.clip is False and r.prediction == "v" and dict(r.options) == {"solver_order": 3, "solver_type": "heun"}
    # what is particular to the learnt sampler stays with it
    r = gg.Sampler("ddim").resolve(learnt)
    assert dict(r.options) == {} and r.prediction == "v" and r.clip == (-2.0, 2.0)
    r = gg.Sampler("ddim").resolve(gg.Sampler("ddpm", variance="fixed-large", final_noise="t>0"))
    assert r.variance == "fixed-small" and dict(r.options) == {}
    # nothing learnt
    r = gg.Sampler().resolve(None)
    assert (r.name, r.prediction, r.clip, r.clip_eps) == ("ddpm", "eps", None, "clipped")
    # a schedule's explicit σ's apply only when the call chooses no steps itself
    sig = gg.Sampler(sigmas=[2.0, 1.0, 0.0])
    assert gg.Sampler().resolve(sig).sigmas == [2.0, 1.0, 0.0]
    assert gg.Sampler().resolve(sig, steps_given=True).sigmas is None


def test_a_schedules_configuration_is_used_and_overridden_per_field():
    learnt = gg.Schedule.linear(100)
    learnt.sampler_config = gg.Sampler("ddim", clip=(-0.5, 0.5))
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.9 * x   # a large x̂_0: clipping acts
    got = gg.sample(model, (4, 3), schedule=learnt, steps=5, x_T=x_T)
    want = gg.sample(model, (4, 3), schedule=SCHED, sampler=gg.Sampler("ddim", clip=(-0.5, 0.5)), steps=5, x_T=x_T)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    unclipped = gg.sample(model, (4, 3), schedule=learnt, sampler=gg.Sampler(clip=False), steps=5, x_T=x_T)
    assert torch.equal(unclipped, gg.sample(model, (4, 3), schedule=SCHED, sampler="ddim", steps=5, x_T=x_T))
    assert (unclipped - got).abs().max() > 1e-3
    run = sampling.prepare_run(model, (4, 3), schedule=learnt, steps=5)
    assert run.sampler.name == "ddim" and run.clip == (-0.5, 0.5) and run.sampler.timesteps is not None
    learnt.sampler_config = {"name": "ddim"}
    with pytest.raises(TypeError, match="schedule.sampler_config: expected a gradguide.Sampler"):
        gg.sample(model, (4, 3), schedule=learnt, steps=5)


def test_execution_and_diagnostics_reach_the_run():
    records = []
    out = gg.sample(_model, (2, 3), schedule=SCHED, steps=3, execution=gg.Execution(backend="reference",
                                                                                     dtype=torch.float64),
                    diagnostics=gg.Diagnostics(callback=records.append, telemetry=True))
    assert out.dtype == torch.float64 and len(records) == 3 and {r.backend for r in records} == {"reference"}
    run = sampling.prepare_run(_model, (2, 3), schedule=SCHED, steps=3,
                               execution=gg.Execution(fused=False), diagnostics=gg.Diagnostics(telemetry=True))
    assert run.plan is None and run.fused_reason == "fused=False" and run.telemetry is True


@pytest.mark.parametrize("make,match", [
    (lambda: gg.Sampler("ddim", eta=float("nan")), "sampler.eta: expected a finite number"),
    (lambda: gg.Sampler("ddim", eta=True), "sampler.eta: expected a finite number"),
    (lambda: gg.Sampler(clip="yes"), "sampler.clip: expected"),
    (lambda: gg.Sampler(sigmas=3.0), "sampler.sigmas: expected a sequence"),
    (lambda: gg.Sampler(options=[1]), "sampler.options: expected a mapping"),
    (lambda: gg.Execution(backend="gpu"), "execution.backend: expected one of"),
    (lambda: gg.Execution(device=True), "execution.device: expected a torch.device"),
    (lambda: gg.Diagnostics(check_sync=1), "diagnostics.check_sync: expected True or False"),
    (lambda: gg.Diagnostics(progress=None), "diagnostics.progress: expected True or False"),
])
def test_invalid_fields_are_named_when_built(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()
