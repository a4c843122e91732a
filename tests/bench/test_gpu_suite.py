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
    # setup ops of a cached call, per step_launches workload
    assert {x["workload"] for x in report["setup"]} >= {"DDIM + CFG"}
    assert all(x["setup_ops"] == len(x["ops"]) and x["setup_ops"] > 0 for x in report["setup"])
    # the peers rows on this device: gradguide, diffusers and the model-only runner, unguided and CFG
    rows = report["peers"]["rows"]
    assert report["peers"]["device_type"] == "cpu" and {r["guidance"] for r in rows} == {"none", "CFG 7.5"}
    assert all(r["per_step_ms"]["gradguide"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    # the CPU has no roofline GPU: the section says so instead of inventing a bound
    assert report["roofline"]["gpu"] is None and report["roofline"]["rows"] == [] and "none of" in report["roofline"]["note"]
    paths = gpu.write(report, str(tmp_path))
    assert paths[0].endswith(".json") and "cpu-plumbing" in paths[0]
    md = open(paths[1]).read()
    assert "PLUMBING TEST ON CPU" in md and "Graph replay vs eager" in md and "Kernel vs copy bandwidth" in md
    assert "Setup ops per cached call" in md and "Peers: the diffusers DDIM loop" in md


def test_gpu_names_map_to_the_roofline_gpus():
    assert gpu.gpu_spec("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu.gpu_spec("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu.gpu_spec("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert gpu.gpu_spec("NVIDIA L40S") == "L40S" and gpu.gpu_spec("NVIDIA L4") == "L4"
    assert gpu.gpu_spec("NVIDIA H200") is None and gpu.gpu_spec("AMD EPYC (1 threads)") is None


def test_roofline_next_to_measured_bandwidth(tmp_path):
    import json
    # two SASS rows for H100: the fused CFG combine and the reduce, fp32 K=4
    sass = [{"op": "fused", "policy": "cfg", "dtype": "fp32", "k": 4, "roofline": {"H100": {"ratio": 1.0}}},
            {"op": "reduce", "dtype": "fp32", "k": 4, "roofline": {"H100": {"ratio": 1.2}}},
            {"op": "combine", "dtype": "fp32", "k": 4, "roofline": {"H100": {"ratio": 1.1}}}]
    (tmp_path / "kernels-gates-roofline.json").write_text(json.dumps({"rows": sass}))
    bandwidth = [{"rows": [
        {"backend": "triton", "workload": "cfg", "size": "s", "dtype": "float32", "k": 4, "gb_per_s": 2680.0},
        {"backend": "triton", "workload": "reduce+combine", "size": "s", "dtype": "float32", "k": 4, "gb_per_s": 2010.0},
        {"backend": "triton", "workload": "apg", "size": "s", "dtype": "float32", "k": 4, "gb_per_s": 1675.0},
        {"backend": "reference", "workload": "cfg", "size": "s", "dtype": "float32", "k": 4, "gb_per_s": 100.0}]}]
    r = gpu.roofline(bandwidth, "NVIDIA H100 80GB HBM3", results_dir=str(tmp_path))
    assert r["gpu"] == "H100" and r["spec_gb_per_s"] == 3350 and len(r["rows"]) == 3   # Triton rows only
    cfg, bare, apg = r["rows"]
    assert cfg["spec_fraction"] == pytest.approx(0.8) and cfg["projected_ratio"] == 1.0   # CFG: no reduce
    assert bare["projected_ratio"] == 1.2 and bare["projected_fraction"] == pytest.approx(2010 * 1.2 / 3350)
    assert apg["projected_ratio"] is None and apg["projected_fraction"] is None   # no APG row: not projected
