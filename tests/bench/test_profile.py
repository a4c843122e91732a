"""``gradguide profile`` (gradguide/bench/profile.py, gradguide/bench/profiling.py): phases, memory sources, the quick CLI run."""
import json
import os

import pytest
import torch

import gradguide
from gradguide import cli
from gradguide.bench.profiling import (MemorySampler, NVMLReader, PhaseTracker, RSSReader, _uuid_key, phased,
                                 profile_sampling)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_profile_quick(tmp_path):
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "--quick", "--graph", "--trace", str(trace), "--out", str(tmp_path),
                     "--no-progress", "--interval", "0.002"]) == 0
    [name] = [f for f in os.listdir(tmp_path) if f.startswith("profile-") and f.endswith(".json")]
    result = json.loads((tmp_path / name).read_text())
    assert result["workload"] == "sim-lookahead" and result["device_type"] == "cpu" and result["finite"]
    phases = result["phases"]
    assert set(phases) == {"setup", "forward", "backward", "guidance"}
    steps = result["config"]["steps"]
    # G_loss: one model call and one VJP through it per step
    assert phases["forward"]["count"] == steps and phases["backward"]["count"] == steps
    assert len(result["step_ends_s"]) == steps
    for row in phases.values():
        assert row["peak_rss_bytes"] > 50 * 2 ** 20 and row["time_s"] >= 0
    assert sum(r["time_s"] for r in phases.values()) <= result["pass_s"] * 1.01
    assert result["graph"]["captured"] is False and "eagerly" in result["graph"]["note"]
    assert "not a CUDA device" in result["nvml"] and result["rss_method"] in ("psutil", "statm")
    # no CUDA device: the dry run's projected GPU memory is reported next to RSS
    proj = result["projected_gpu"]
    assert "error" not in proj and proj["total_bytes"] > proj["weight_bytes"] > 0
    assert proj["peak_live_bytes"]["backward"] > 0
    assert len(result["timeline"]) >= 2 and all("rss" in p for p in result["timeline"])
    png = tmp_path / name.replace(".json", ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)


def test_phases_classifier_workload():
    """Classifier guidance + PixelAsParam: two forwards per step (model, classifier), one VJP
    (through the classifier only)."""
    from gradguide.bench import loop as bl
    w = bl.build_workload("loop-cls-pxpA", quick=True)
    result = profile_sampling(lambda wrap: w.sample_kwargs(wrap=wrap), "cpu", progress=False)
    assert result["phases"]["forward"]["count"] == 2 * w.steps
    assert result["phases"]["backward"]["count"] == w.steps


def test_tracker_nesting_and_unbalanced_exit():
    tr = PhaseTracker("cpu")
    tr.enter("guidance")
    tr.enter("forward")
    tr.exit("forward")
    tr.enter("backward")
    tr.enter("backward")       # two branches' VJPs may overlap
    tr.exit("backward")
    tr.exit("backward")
    tr.exit("forward")         # not open: ignored
    tr.enter("forward")
    tr.exit("guidance")        # closes the forward left open, then guidance
    assert tr.stack == []
    # an inner phase splits the outer one's time into two intervals
    assert [p for p, _, _ in tr.intervals] == ["guidance", "forward", "guidance", "backward", "backward", "backward",
                                               "guidance", "forward", "guidance"]
    assert tr.summary()["backward"]["count"] == 2


def test_phased_marks_backward_only_with_grad():
    tr = PhaseTracker("cpu")
    lin = torch.nn.Linear(4, 4)
    f = phased(lambda x, t: lin(x), tr)
    tr.enter("guidance")
    with torch.no_grad():
        f(torch.randn(2, 4), None)
    x = torch.randn(2, 4, requires_grad=True)
    y = f(x, None)
    torch.autograd.grad(y.sum(), x)
    tr.close()
    s = tr.summary()
    assert s["forward"]["count"] == 2 and s["backward"]["count"] == 1
    with pytest.raises(TypeError, match="fn: expected a callable"):
        phased(3, tr)


def test_phased_model_matches_plain_sampling():
    """Wrapping changes nothing numerically."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh())
    model = lambda x, t: net(x)
    g = torch.randn(2, 5)
    kw = dict(schedule=gradguide.Schedule.linear(1000), steps=4, guidance=gradguide.LookAhead(g, 1.0))
    a = gradguide.sample(model, (2, 5), generator=torch.Generator().manual_seed(3), **kw)
    b = gradguide.sample(phased(model, PhaseTracker("cpu")), (2, 5), generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_sources():
    for method in ("statm", "getrusage"):
        reader = RSSReader(method)
        assert reader() > 10 * 2 ** 20
    assert RSSReader("getrusage").is_high_water_mark and not RSSReader("statm").is_high_water_mark
    try:
        import psutil  # noqa: F401
        assert RSSReader("psutil")() > 10 * 2 ** 20
    except ImportError:
        with pytest.raises(RuntimeError, match="psutil is not installed"):
            RSSReader("psutil")
    with pytest.raises(ValueError, match="method: expected"):
        RSSReader("ps")
    nv = NVMLReader(torch.device("cpu"))
    assert not nv.available and nv.reason == "not a CUDA device"
    assert _uuid_key("GPU-AbC-12") == _uuid_key(b"abc-12") == _uuid_key("MIG-abc-12") == "abc-12"
    with pytest.raises(ValueError, match="interval: expected seconds > 0"):
        MemorySampler("cpu", interval=0)
    with MemorySampler("cpu", interval=0.001) as sampler:
        big = torch.ones(64 * 2 ** 20 // 4)   # 64 MiB, touched
        sampler.read()
        del big
    assert sampler.peak("rss") >= sampler.samples[0][1]["rss"] and len(sampler.samples) >= 3
    assert sampler.peak("rss", 1e9) is None


def test_cli_profile_bad_workload(tmp_path):
    with pytest.raises(SystemExit, match="--workload: expected one of"):
        cli.main(["profile", "--quick", "--workload", "sdxl", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--interval must be positive"):
        cli.main(["profile", "--quick", "--interval", "0", "--out", str(tmp_path)])
