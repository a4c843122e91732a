"""Plumbing of `gradguide bench --suite peers` on tiny sizes: both runners run, their outputs
agree, gradguide's CFG evaluates both branches in one model call like the diffusers loop, and
the result files name the machine, versions, commit and command."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
from gradguide import cli  # noqa: E402
from gradguide.bench import peers  # noqa: E402


def test_quick_suite_rows(one_thread):
    result = peers.run(quick=True, sizes=["sd-b1"], reps=1, progress=False)
    rows = {r["workload"]: r for r in result["rows"]}
    assert set(rows) == {"cheap-sd-b1-none", "cheap-sd-b1-cfg", "unet-sd-b1-none", "unet-sd-b1-cfg"}
    for name, r in rows.items():
        assert r["finite"] and r["speed_ratio"] > 0 and r["per_step_ms"]["gradguide"] > 0
        assert len(r["pass_s_all"]["gradguide"]) == len(r["pass_s_all"]["diffusers"]) == 1
        # CFG: one batched call; the model-only runner (the ceiling) makes the same calls as diffusers
        assert r["calls_per_step"] == {"gradguide": 1.0, "diffusers": 1.0, "model only": 1.0}, name
        assert r["ceiling"] > 0 and r["per_step_ms"]["model only"] > 0
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["output_scale"]), (name, r["max_abs_diff"])
        assert r["gradguide_step"] == "fused", name   # DDIM (+ CFG) is a built-in fused program
    assert rows["unet-sd-b1-cfg"]["within_tolerance"]
    assert result["versions"]["diffusers"] and result["device"]


def test_runners_really_differ_from_a_wrong_loop():
    # the comparison can fail: a loop with another guidance scale is far from gradguide's output
    w = peers.Workload("cheap", "px-b3", True, quick=True, seed=0)
    ref = w.gradguide_runner()()
    assert (ref - w.diffusers_pass()).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    scale = peers.GUIDANCE_SCALE
    try:
        peers.GUIDANCE_SCALE = 2.0
        other = w.diffusers_pass()
    finally:
        peers.GUIDANCE_SCALE = scale
    assert (ref - other).abs().max() > 1e-2


def test_cli_writes_results(tmp_path, one_thread, capsys):
    rc = cli.main(["bench", "--suite", "peers", "--quick", "--sizes", "px-b3", "--workloads", "cheap", "--reps", "1",
                   "--out", str(tmp_path), "--note", "test run"])
    assert rc == 0
    (js,) = tmp_path.glob("peers-cpu-quick-*.json")
    data = json.loads(js.read_text())
    assert [r["workload"] for r in data["rows"]] == ["cheap-px-b3-none", "cheap-px-b3-cfg"]
    assert data["command"].startswith("gradguide ") and data["commit"] and data["threads"] == torch.get_num_threads()
    md = js.with_suffix(".md").read_text()
    assert "| cheap | 3×8×8 | 3 | CFG 7.5 |" in md and "test run" in md and "torch " in md
    assert "| fused |" in md and "like with like" in md
    assert "| spread |" in md and all(r["spread"] is None and not r["unstable"] for r in data["rows"])  # one rep
    # a second run on the same date is refused before it runs (no --force); the first results stay
    with pytest.raises(SystemExit, match=f"{js.name} exists; pass --force"):
        cli.main(["bench", "--suite", "peers", "--quick", "--sizes", "px-b3", "--workloads", "cheap", "--reps", "1",
                  "--out", str(tmp_path)])
    assert json.loads(js.read_text()) == data


def test_bad_arguments():
    with pytest.raises(ValueError, match="models: unknown"):
        peers.run(quick=True, models=["vae"], progress=False)
    with pytest.raises(ValueError, match="sizes: unknown"):
        peers.run(quick=True, sizes=["sd-b1000"], progress=False)
    with pytest.raises(SystemExit, match="runs on the CPU"):
        cli.main(["bench", "--suite", "peers", "--device", "cuda"])


def test_from_diffusers_follows_a_recast_unet():
    # DiffusersModel caches the U-Net's dtype (diffusers' ModelMixin.dtype costs ~1 ms a call); a
    # recast after from_diffusers must still be followed
    import gradguide
    unet = peers.tiny_unet(4, 8, seed=0, quick=True)
    model, _ = gradguide.from_diffusers(unet, peers.Workload("cheap", "sd-b1", False, True, 0).scheduler)
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, peers.TEXT_LEN, peers.TEXT_DIM)
    out32 = model(x, t, encoder_hidden_states=e)
    unet.double()
    out64 = model(x, t, encoder_hidden_states=e.double())
    assert out64.dtype == torch.float32 and torch.allclose(out64, out32, atol=1e-4)
    ref = unet(x.double(), t, encoder_hidden_states=e.double()).sample
    assert torch.equal(out64, ref.float())


def test_cheap_model_is_its_convolution():
    # the cheap model contracts channels with einsum (torch's CPU conv2d is ~30x slower from batch 16):
    # the same 1×1 convolution, checked against conv2d at the batch where the paths differ
    m = peers.CheapModel(4, seed=0)
    x, e = torch.randn(16, 4, 8, 8, dtype=torch.float64), torch.randn(16, peers.TEXT_LEN, peers.TEXT_DIM)
    m = m.double()
    ref = m.conv(x) + 0.01 * e.double()[:, 0, :4, None, None]
    assert torch.allclose(m(x, None, e.double()), ref, rtol=1e-12, atol=1e-12)


def test_model_only_runner_follows_the_step_count():
    # benchmarks/callgrind/peers_pass.py changes ``steps`` after construction: the ceiling's runner
    # must make as many model calls as the other two then
    w = peers.Workload("cheap", "px-b3", True, quick=True, seed=0)
    w.steps = 5
    for fn in (w.model_only_pass, w.diffusers_pass):
        _, calls = peers._count_calls(w.model, fn)
        assert calls == 5


def test_quick_flow_rows(one_thread):
    """The flow rows: gradguide (from_diffusers + sample, flow-Euler, CFG in one batched call) against
    diffusers' SD3 loop on the same transformer and noise; the samples agree and both make one
    transformer call per step."""
    result = peers.run(quick=True, models=["flow-cheap", "flow-sd3"], reps=1, progress=False)
    rows = {r["workload"]: r for r in result["rows"]}
    assert set(rows) == {"flow-cheap-sd3-b1-none", "flow-cheap-sd3-b1-cfg", "flow-sd3-sd3-b1-none",
                         "flow-sd3-sd3-b1-cfg"}
    for name, r in rows.items():
        assert r["finite"] and r["speed_ratio"] > 0 and r["shape"] == [16, 8, 8]
        assert r["calls_per_step"] == {"gradguide": 1.0, "diffusers": 1.0, "model only": 1.0}, name
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["output_scale"]), (name, r["max_abs_diff"])
        assert r["gradguide_step"] == "fused", name   # flow Euler (+ CFG) is a built-in fused program
    assert rows["flow-sd3-sd3-b1-cfg"]["within_tolerance"] and rows["flow-sd3-sd3-b1-cfg"]["guidance"] == "CFG 7.0"
    md = peers.markdown(result)
    assert "flow rows" in md and "StableDiffusion3Pipeline" in md and "| flow-sd3 | 16×8×8 | 1 | CFG 7.0 |" in md


def test_flow_runners_really_differ_from_a_wrong_loop():
    from gradguide.bench import peers_flow
    w = peers_flow.FlowWorkload("flow-sd3", "sd3-b1", True, quick=True, seed=0)
    ref = w.gradguide_runner()()
    assert (ref - w.diffusers_pass()).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    scale = peers_flow.FLOW_GUIDANCE_SCALE
    try:
        peers_flow.FLOW_GUIDANCE_SCALE = 2.0
        other = w.diffusers_pass()
    finally:
        peers_flow.FLOW_GUIDANCE_SCALE = scale
    assert (ref - other).abs().max() > 1e-2
    w.steps = 5   # the ceiling's runner follows the step count, as diffusers' does
    for fn in (w.model_only_pass, w.diffusers_pass):
        assert peers._count_calls(w.model, fn)[1] == 5


def test_sizes_belong_to_their_models():
    with pytest.raises(ValueError, match="sizes: unknown"):
        peers.run(quick=True, models=["flow-sd3"], sizes=["sd-b1"], progress=False)
    assert peers.size_table("flow-cheap", quick=False) == peers.FLOW_SIZES
    assert peers.size_table("unet", quick=True) == peers.QUICK_SIZES


def test_report_names_say_which_rows_ran():
    """The flow rows alone get a file of their own (a run of the DDIM rows the same day is another file)."""
    assert peers.stem(False, "2026-12-07T10:00", ["flow-cheap", "flow-sd3"]) == "peers-flow-cpu-2026-12-07"
    assert peers.stem(False, "2026-12-07T10:00", ["cheap", "flow-sd3"]) == "peers-cpu-2026-12-07"
    assert peers.stem(True, "2026-12-07T10:00", ["cheap"]) == "peers-cpu-quick-2026-12-07"
