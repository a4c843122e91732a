"""CUDA-graph bookkeeping, tested without CUDA through GraphCache(emulate=True).

The emulated cache runs exactly the capture/replay plumbing of the real one (static buffers
copied in before each replay, per-variant captures, signature-based reuse, tensor values
loaded into a reused capture), with "replay" re-running the recorded step.
"""

import pytest
import torch

import gradguide as gg
from gradguide.experiments.analytic import SubspaceGaussian
from gradguide.experiments.demo_mixture import default_mixture
from gradguide.graphs import GraphCache

SCHED = gg.Schedule.linear(200)
GM = default_mixture(SCHED)
Y = torch.full((16,), 2)


def uncond(x, t, **_):
    return GM(x, t)


def both(**kw):
    kw.setdefault("generator", None)
    eager = gg.sample(**{**kw, "generator": torch.Generator().manual_seed(3)})
    cache = GraphCache(emulate=True)
    graphed = gg.sample(execution=gg.Execution(graph=cache), **{**kw, "generator": torch.Generator().manual_seed(3)})
    return eager, graphed, cache


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
@pytest.mark.parametrize("case", ["cfg", "classifier+A", "apg-momentum", "cfg-zero*"])
def test_emulated_replay_equals_eager(sampler, case):
    terms, proj, model = {
        "cfg": ([gg.CFG(3.0)], None, GM),
        "classifier+A": ([gg.Classifier(GM.log_prob_class, 2.0)], gg.PixelAsParam("A"), GM),
        "apg-momentum": ([gg.APG(3.0, momentum=-0.5)], None, GM),
        "cfg-zero*": ([gg.CFGZeroStar(3.0, zero_init_steps=2)], None, GM),
    }[case]
    eager, graphed, cache = both(model=model, shape=(16, 2), schedule=SCHED,
                                 sampler=gg.Sampler(sampler, eta=0.5 if sampler == "ddim" else None), steps=8,
                                 guidance=terms, projection=proj, cond={"y": Y})
    assert torch.equal(eager, graphed)
    # one capture per distinct host-side variant: noise or not (the last step has none; DPM-Solver++
    # never draws), and CFG-Zero*'s zero-init steps (the first 2 of 8)
    noise = [True] * 7 + [False] if sampler != "dpmpp-2m" else [False] * 8
    zero_init = [i < 2 if case == "cfg-zero*" else False for i in range(8)]
    assert cache.captures == len(set(zip(noise, zero_init)))


def test_lookahead_reuses_the_capture_with_new_values_and_is_never_stale():
    sched = gg.Schedule.cosine(50)
    sub = SubspaceGaussian.random(sched, D=8, d=2, seed=0)
    cache = GraphCache(emulate=True)
    outs = []
    for k in range(3):   # like Algorithm 1's rounds: new gradients and targets each time
        g = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))
        target = torch.full((4,), float(k))
        kw = dict(schedule=sched, steps=10, guidance=gg.LookAhead(g, target))
        graphed = gg.sample(sub, (4, 8), generator=torch.Generator().manual_seed(k),
                            execution=gg.Execution(graph=cache), **kw)
        eager = gg.sample(sub, (4, 8), generator=torch.Generator().manual_seed(k), **kw)
        assert torch.equal(graphed, eager)
        outs.append(graphed)
    assert cache.captures == 2 and cache.reuses == 2      # captured once (2 variants), reused twice
    assert not torch.equal(outs[0], outs[1])


def test_a_new_schedule_with_the_same_step_count_reuses_and_changes_the_output():
    cache = GraphCache(emulate=True)
    a = gg.sample(uncond, (16, 2), schedule=gg.Schedule.linear(200), steps=6, execution=gg.Execution(graph=cache),
                  generator=torch.Generator().manual_seed(0))
    b = gg.sample(uncond, (16, 2), schedule=gg.Schedule.cosine(200), steps=6, execution=gg.Execution(graph=cache),
                  generator=torch.Generator().manual_seed(0))
    eager_b = gg.sample(uncond, (16, 2), schedule=gg.Schedule.cosine(200), steps=6,
                        generator=torch.Generator().manual_seed(0))
    assert cache.reuses == 1 and torch.equal(b, eager_b) and not torch.equal(a, b)


@pytest.mark.parametrize("change", ["shape", "dtype", "scale", "steps", "projection", "model", "cond-shape"])
def test_structural_changes_recapture(change):
    cache = GraphCache(emulate=True)
    base = dict(model=GM, shape=(16, 2), schedule=SCHED, steps=6, guidance=[gg.CFG(3.0)], cond={"y": Y})
    gg.sample(execution=gg.Execution(graph=cache), generator=torch.Generator().manual_seed(0), **base)
    first = cache.captures
    changed, dtype = dict(base), None
    if change == "shape":
        changed.update(shape=(8, 2), cond={"y": Y[:8]})
    elif change == "dtype":
        dtype = torch.float64
    elif change == "scale":
        changed["guidance"] = [gg.CFG(4.0)]
    elif change == "steps":
        changed["steps"] = 7
    elif change == "projection":
        changed["projection"] = gg.PixelAsParam("C")
    elif change == "model":
        changed["model"] = default_mixture(SCHED)
    elif change == "cond-shape":
        changed["model"] = lambda x, t, y=None, extra=None: GM(x, t, y)
        changed["cond"] = {"y": Y, "extra": torch.zeros(16, 3)}
    out = gg.sample(execution=gg.Execution(graph=cache, dtype=dtype), generator=torch.Generator().manual_seed(0),
                    **changed)
    eager = gg.sample(**changed, execution=gg.Execution(dtype=dtype), generator=torch.Generator().manual_seed(0))
    assert cache.reuses == 0 and cache.captures > first
    assert torch.equal(out, eager)


def test_records_from_replays_are_copies():
    records = []
    cache = GraphCache(emulate=True)
    gg.sample(GM, (16, 2), schedule=SCHED, steps=5, guidance=[gg.Classifier(GM.log_prob_class, 2.0)],
              projection=gg.PixelAsParam("A"), cond={"y": Y}, execution=gg.Execution(graph=cache),
              diagnostics=gg.Diagnostics(callback=records.append), generator=torch.Generator().manual_seed(0))
    eager = []
    gg.sample(GM, (16, 2), schedule=SCHED, steps=5, guidance=[gg.Classifier(GM.log_prob_class, 2.0)],
              projection=gg.PixelAsParam("A"), cond={"y": Y}, diagnostics=gg.Diagnostics(callback=eager.append),
              generator=torch.Generator().manual_seed(0))
    for r, e in zip(records, eager):
        assert torch.equal(r.x, e.x) and torch.equal(r.x0, e.x0)
        assert torch.equal(r.telemetry["den/cls"]["cos"], e.telemetry["den/cls"]["cos"])
    assert records[0].x.data_ptr() != records[1].x.data_ptr()


def test_graph_true_on_cpu_falls_back_to_eager_with_a_notice():
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device; sampling eagerly on cpu"):
        out = gg.sample(uncond, (4, 2), schedule=SCHED, steps=4, execution=gg.Execution(graph=True),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, gg.sample(uncond, (4, 2), schedule=SCHED, steps=4,
                                      generator=torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="graph: expected True, False or a gradguide.graphs.GraphCache"):
        gg.sample(uncond, (4, 2), schedule=SCHED, steps=4, execution=gg.Execution(graph="yes"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real capture and replay")
def test_cuda_graph_replay_equals_eager():
    cond = {"y": Y.cuda()}
    kw = dict(schedule=SCHED, steps=10, guidance=[gg.Classifier(GM.log_prob_class, 2.0)],
              projection=gg.PixelAsParam("A"), cond=cond)
    eager = gg.sample(GM, (16, 2), generator=torch.Generator("cuda").manual_seed(0),
                      execution=gg.Execution(device="cuda"), **kw)
    graphed = gg.sample(GM, (16, 2), generator=torch.Generator("cuda").manual_seed(0),
                        execution=gg.Execution(graph=True, device="cuda"), **kw)
    assert torch.allclose(eager, graphed, atol=1e-5)
