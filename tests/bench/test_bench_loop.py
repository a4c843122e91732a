"""``gradguide bench --suite loop|paper`` (gradguide/bench/loop.py): quick runs on CPU write
valid JSON + markdown, rows carry what the issue asks for, failures become notes, and the
workloads are the papers' architectures."""
import json
import os

import pytest
import torch

import gradguide
from gradguide import cli, ops
from gradguide.bench import loop as bl


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_ok_row(row, steps, batch):
    assert row["status"] == "ok", row.get("note")
    assert row["finite"]
    assert row["steps"] == steps and row["batch"] == batch
    assert row["pass_s"] > 0 and row["per_step_ms"] > 0 and row["peak_memory_bytes"] > 0
    assert row["samples_per_s"] == pytest.approx(batch / row["pass_s"])


def test_cli_loop_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "res"
    assert cli.main(["bench", "--suite", "loop", "--quick", "--threads", "1", "--out", str(out), "--note", "test"]) == 0
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    result = json.loads((out / files[0]).read_text())
    assert result["suite"] == "loop" and result["quick"] and result["device_type"] == "cpu"
    assert {"torch", "triton", "diffusers"} <= set(result["versions"]) and result["commit"] and result["date"]
    rows = result["rows"]
    assert [(r["workload"], r["variant"]) for r in rows] == \
        [(w, v) for w in bl.LOOP_WORKLOADS for v in ("eager", "fused", "fused+graph")]
    fused = ops.resolve_backend("auto", torch.device("cpu"))
    for r in rows:
        _check_ok_row(r, steps=6, batch=2)
        assert r["backend"] == ("reference" if r["variant"] == "eager" else fused)
        if r["variant"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert "ratio_to_paper_pass" not in r   # only the full simulation workload compares with the paper
    graph_rows = [r for r in rows if r["variant"] == "fused+graph"]
    assert all("samples eagerly" in r["note"] for r in graph_rows)
    md = (out / files[1]).read_text()
    assert md.count("| loop-") == len(rows) and "test" in md and "not a graph measurement" in md


def test_paper_quick_all_workloads(tmp_path):
    result = bl.run("paper", quick=True, device="cpu", progress=False)
    names = [r["workload"] for r in result["rows"]]
    assert sorted(set(names)) == sorted(["sim-lookahead", "sim-unguided", "sd-cfg-lookahead", "adm64-cls-pxpA"])
    for r in result["rows"]:
        _check_ok_row(r, steps=4, batch={"sim": 4, "sd-": 1, "adm": 2}[r["workload"][:3]])
    paths = bl.write(result, str(tmp_path))
    again = json.loads(open(paths[0]).read())
    assert len(again["rows"]) == 12 and "GPU workloads and are not run on this CPU" in open(paths[1]).read()


def test_paper_ratio_and_projection():
    w = bl.build_workload("sim-unguided", quick=True)
    w.paper_ratio = True   # the arithmetic of the full workload's columns, on the tiny one
    row = bl._run_variant(w, "fused", torch.device("cpu"), 1, 0, False)
    assert row["ratio_to_paper_pass"] == pytest.approx(row["pass_s"] / 4.6)
    assert row["projected_run_min"] == pytest.approx(1000 * row["pass_s"] / 60)
    assert row["ratio_to_paper_run"] == pytest.approx(row["projected_run_min"] / 76.0)
    md = bl.markdown(dict(bl.run_header(torch.device("cpu")), suite="paper", quick=True, reps=1, seed=0,
                          timer="t", paper={"pass_s": 4.6, "run_min": 76.0, "rounds": 1000}, variants=["fused"],
                          rows=[dict(row, speedup_vs_eager=None)]))
    assert f"{row['ratio_to_paper_pass']:.2f}x" in md


def test_compile_row_ok_or_noted():
    result = bl.run("loop", quick=True, device="cpu", workloads=["loop-unguided"], variants=["eager", "compile"],
                    progress=False)
    row = result["rows"][1]
    assert row["variant"] == "compile"
    if row["status"] == "ok":
        assert row["finite"] and "first pass (compile)" in row["note"]
    else:
        assert row["note"].startswith("failed: ")


def test_failure_becomes_a_note(monkeypatch):
    def broken(self):
        raise RuntimeError("no compiler here\nsecond line")
    monkeypatch.setattr(bl.Workload, "compiled", broken)
    result = bl.run("paper", quick=True, device="cpu", workloads=["sim-unguided"], variants=["eager", "compile"],
                    progress=False)
    ok, failed = result["rows"]
    assert ok["status"] == "ok"
    assert failed["status"] == "failed" and failed["note"] == "failed: RuntimeError: no compiler here"
    assert failed["speedup_vs_eager"] is None
    assert "| sim-unguided | compile | - |" in bl.markdown(result)


def test_bad_arguments():
    with pytest.raises(ValueError, match="workloads: unknown"):
        bl.run("paper", quick=True, workloads=["nope"], progress=False)
    with pytest.raises(ValueError, match="variants: unknown"):
        bl.run("paper", quick=True, variants=["fast"], progress=False)
    with pytest.raises(ValueError, match="suite: expected"):
        bl.run("ops", quick=True, progress=False)
    with pytest.raises(ValueError, match="reps: expected a positive"):
        bl.run("loop", quick=True, reps=0, progress=False)
    with pytest.raises(SystemExit, match="gradguide bench: workloads: unknown"):
        cli.main(["bench", "--suite", "paper", "--quick", "--workloads", "sd-xl"])


def test_architectures_match_the_papers():
    """Parameter counts on the meta device (nothing allocated): SD-1.5's U-Net and VAE exactly,
    the 1-D U-Net ≈ 14.9 M, ResNet-18 with a 1-output head, ADM-like sizes near ADM's."""
    from gradguide.experiments.nets import UNet1D
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        assert count(bl.sd15_unet(False)) == 859_520_964
        assert count(bl.sd_vae(False)) == 83_653_863
        assert abs(count(UNet1D(64)) - 14.9e6) < 0.1e6
        assert count(bl.ResNet18Reward()) == 11_176_512 + 513   # ResNet-18 trunk + Linear(512 -> 1)
        # ADM (Dhariwal & Nichol): conditional 64² ≈ 296 M, 128² ≈ 422 M, 256² ≈ 554 M parameters
        for res, millions in ((64, 296), (128, 422), (256, 554)):
            width, mults, depth = bl.ADM[res][:3]
            assert abs(count(bl.adm_unet(res, width, mults, depth)) / 1e6 - millions) / millions < 0.03


def test_decoded_lookahead_is_lookahead_through_the_decoder():
    """With an identity decoder, the image-space G_loss (L = ½(gᵀx̂_0 + b − y*)², G = −β∇L)
    equals LookAhead with target y* − b and constant β/2 — same samples for the same seed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
    model = lambda x, t: net(x) * (1 + t[:, None] / 1000)
    g = torch.randn(3, 6)
    offset = torch.tensor([0.5, -1.0, 2.0])
    common = dict(schedule=gradguide.Schedule.linear(1000), sampler="ddim", steps=5,
                  execution=gradguide.Execution(backend="reference"))
    scaling = 0.18215
    decoded = gradguide.DecodedLookAhead(lambda z: z * scaling, g, offset, target=3.0, beta=0.4, scaling=scaling)
    a = gradguide.sample(model, (3, 6), guidance=decoded, generator=torch.Generator().manual_seed(1), **common)
    look = gradguide.LookAhead(g, 3.0 - offset, beta=0.2)
    b = gradguide.sample(model, (3, 6), guidance=look, generator=torch.Generator().manual_seed(1), **common)
    plain = gradguide.sample(model, (3, 6), generator=torch.Generator().manual_seed(1), **common)
    torch.testing.assert_close(a, b)
    assert (a - plain).abs().max() > 1e-3   # the guidance did something
