"""``gradguide bench --suite gpu``: it cannot measure anything here (no GPU),
so these tests check that it refuses clearly without CUDA, and run its plumbing on the CPU
(``allow_cpu=True``: every section on tiny workloads, the report labelled as a plumbing test)."""
import pytest
import torch

from gradguide.bench import gpu
from gradguide.cli import main

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


@needs_no_cuda
def test_refuses_without_a_cuda_device(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device; none is present"):
        main(["bench", "--suite", "gpu", "--out", str(tmp_path)])
    with pytest.raises(gpu.GPURequired, match="dryrun"):
        gpu.run()
    with pytest.raises(gpu.GPURequired):
        gpu.run(device="cuda", allow_cpu=True)      # asking for CUDA explicitly cannot be waived
    assert not list(tmp_path.iterdir())


def test_plumbing_on_cpu(tmp_path):
    report = gpu.run(device="cpu", quick=True, allow_cpu=True, reps=1, graph_workloads=["loop-cfg", "loop-lookahead"],
                     paper_workloads=["sim-lookahead"], memory_workload="sim-lookahead", progress=False)
    assert report["plumbing_test"] is True and report["device_type"] == "cpu"
    (bw,) = report["bandwidth"]
    assert bw["copy_bandwidth_gb_per_s"] > 0 and all(r["gb_per_s"] > 0 for r in bw["rows"])
    for row in report["graph"]:
        assert row["equal"] and row["max_abs_diff"] == 0.0       # emulated replay runs the same ops
        assert row["captures"] >= 1 and row["graph"].startswith("emulated")
    assert {r["workload"] for r in report["paper"]["rows"]} == {"sim-lookahead"}
    assert all(r["status"] == "ok" for r in report["paper"]["rows"])
    m = report["memory"]
    assert m["phases"]["forward"]["peak_rss_bytes"] > 0
    assert m["projected_memory_bytes"] and m["projected_memory_bytes"] > 0
    paths = gpu.write(report, str(tmp_path))
    assert paths[0].endswith(".json") and "cpu-plumbing" in paths[0]
    md = open(paths[1]).read()
    assert "PLUMBING TEST ON CPU" in md and "Graph replay vs eager" in md and "Kernel vs copy bandwidth" in md
