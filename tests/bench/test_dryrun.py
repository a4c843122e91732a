"""The fake-CUDA dry run: guided steps on fake tensors prove device, sync and
trace properties, and count launches, bytes and memory. Small shapes: the whole module runs in
about a minute on two CPU cores."""
import math

import pytest
import torch
from torch import nn

import gradguide as gg
from gradguide.bench import dryrun, projection
from gradguide.debug import HostSyncError
from helpers import ChannelScale

SCHED = gg.Schedule.linear(1000)
SHAPE = (2, 4, 8, 8)
S = 2 * 4 * 8 * 8 * 4   # bytes of one float32 x_t


def _meta(module):
    return module.to("meta")


def test_unguided_ddim_counts_are_exact():
    # model: one mul; step: x_{t-1} = c_x x + c_0 x̂_0 is one reduce-free combine of (x, eps)
    r = dryrun.dry_run(_meta(ChannelScale()), SHAPE, schedule=SCHED, sampler="ddim", steps=5, backend="reference",
                       graph=True, steps_measured=[1])
    step = r["steps_measured"]["1"]
    assert r["fake_device"] == "cuda" and r["backend"] == "reference"
    assert step["forward"]["launches"] == 1 and step["forward"]["ops"] == {"aten.mul": {"launches": 1,
                                                                                       "large_bytes": 2 * S}}
    assert step["backward"]["launches"] == 0
    # minimum: one combine reading x and eps, writing x_{t-1}
    assert step["structure"]["combine_k"] == [2] and step["min_guidance_bytes"] == 3 * S
    assert step["guidance"]["bytes_read"] + step["guidance"]["bytes_written"] >= 3 * S
    assert r["weight_bytes"] == 16
    g = r["graph"]
    assert g["captures"] == 1 and g["static_buffers"] == 2          # x and idx (no noise, no state)
    assert g["static_buffer_bytes"] == S + 8


def test_views_are_zero_launches_and_large_bytes_are_counted():
    tracker = dryrun.Tracker()
    world = dryrun.FakeWorld("meta")
    counter = dryrun.Counter(tracker, large=1000)
    tracker.enter("guidance")
    with world.mode, counter:
        a = torch.randn(10, 100, device="meta")       # 1 launch, written 4000 B (large)
        v = a.view(100, 10).t().unsqueeze(0)          # views: 0 launches
        b = a.sum(1)                                  # 1 launch, reads 4000 B, writes 40 B (small)
        del v, b
    s = counter.stats["guidance"]
    assert s["launches"] == 2 and s["views"] == 3
    assert s["bytes_written"] == 4000 and s["bytes_read"] == 4000
    assert counter.peak["guidance"] >= 4000


def test_peak_memory_sees_a_models_activations():
    class Wide(nn.Module):
        def forward(self, x, t, **_):
            h = x.repeat(1, 8, 1, 1)          # 8 S alive at once
            return h[:, :4] + h[:, 4:8]
    r = dryrun.dry_run(Wide(), SHAPE, schedule=SCHED, sampler="ddim", steps=5, backend="reference", graph=False)
    step = next(iter(r["steps_measured"].values()))
    assert step["forward"]["peak_live_bytes"] >= 8 * S + S   # activations + the input x


class CpuMixer(nn.Module):
    def forward(self, x, t, **_):
        return x + torch.ones(SHAPE)          # a CPU tensor inside the step


class Syncer(nn.Module):
    def forward(self, x, t, **_):
        return x * x.abs().max().item()


class Brancher(nn.Module):
    def forward(self, x, t, **_):
        if (x > 0).any():
            return x
        return -x


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_a_cpu_tensor_in_the_step_raises(device):
    with pytest.raises(Exception, match="device|Device|non-Fake|fake"):
        dryrun.dry_run(CpuMixer(), SHAPE, schedule=SCHED, sampler="ddim", steps=3, backend="reference",
                       graph=False, device=device)


@pytest.mark.parametrize("model", [Syncer(), Brancher()], ids=["item", "branch"])
def test_host_sync_and_data_dependent_branches_raise(model):
    with pytest.raises((HostSyncError, RuntimeError)):
        dryrun.dry_run(model, SHAPE, schedule=SCHED, sampler="ddim", steps=3, backend="reference", graph=False)


def test_vjp_steps_need_meta_on_cpu_only_torch():
    if torch.cuda.is_available():
        pytest.skip("a CUDA torch runs autograd on fake cuda tensors")
    with pytest.raises(ValueError, match="vector-Jacobian"):
        dryrun.dry_run(_meta(ChannelScale()), SHAPE, schedule=SCHED, sampler="ddim", steps=3, backend="reference",
                       guidance=gg.LookAhead(torch.empty(SHAPE, device="meta"), 0.0), device="cuda")


def test_fake_cuda_is_available():
    # fake cuda tensors need a CUDA device guard: built once with torch's load_inline (ninja + g++)
    assert dryrun.fake_cuda_status() is None


def test_native_and_triton_ops_trace_on_fake_tensors():
    assert dryrun.probe_backend("native", "cuda") is None
    assert dryrun.probe_backend("reference", "meta") is None
    # the Triton kernels are custom ops with fake kernels: "auto" picks them on a fake GPU
    assert dryrun.probe_backend("triton", "cuda") is None and dryrun.probe_backend("triton", "meta") is None
    assert dryrun.pick_backend("auto", "cuda") == ("triton", [])


# every guidance x projection on DDPM; every guidance on the other samplers
GUIDANCE_SUBSET = [("ddpm", g, p) for g in dryrun.GUIDANCE for p in dryrun.PROJECTIONS] + \
    [(s, g, "none") for s in dryrun.SAMPLERS if s != "ddpm" for g in dryrun.GUIDANCE]


@pytest.mark.parametrize("sampler,guidance,proj", GUIDANCE_SUBSET)
def test_every_combination_runs_or_is_refused(sampler, guidance, proj):
    r = dryrun.run_combination(sampler, guidance, proj, backend="native", graph=(proj == "none"), steps=4)
    if r["status"] == "refused":
        assert proj != "none" and ("projection" in r["reason"])
        return
    s = dryrun.summarize(r)
    assert s["guidance_launches"] > 0 and s["model_launches"] > 0
    assert s["fake_device"] == ("meta" if guidance in ("classifier", "G_loss", "dps") else "cuda")
    assert s["guidance_bytes"] >= s["minimum_bytes"] > 0
    assert s["projected_memory_bytes"] > s["weight_bytes"]


@pytest.mark.parametrize("sampler,proj", [(s, p) for s in dryrun.SAMPLERS for p in dryrun.BRANCH_PROJECTIONS])
def test_every_sampler_and_projection_with_pag_runs_or_is_refused(sampler, proj):
    r = dryrun.run_combination(sampler, "pag", proj, backend="native", graph=(proj == "none"), steps=4)
    if r["status"] == "refused":   # no learned-variance transformer; what PixelAsParam refuses over a guider
        assert sampler in ("ddpm-learned", "ddim-clip") and ("learned-variance" in r["reason"] or
                                                             "projection" in r["reason"]), r["reason"]
        assert proj != "none" or sampler == "ddpm-learned"
        return
    s = dryrun.summarize(r)
    assert s["guidance_launches"] > 0 and s["model_launches"] > 0 and s["fake_device"] == "cuda"
    assert s["guidance_bytes"] >= s["minimum_bytes"] > 0
    fused = next(iter(r["steps_measured"].values()))["structure"].get("fused", False)
    # stateless samplers run fused, except policy C over three directions (general: N-way projections)
    assert fused == (sampler != "dpmpp-2m" and proj != "C"), (sampler, proj)


def test_quick_paper_workload_report_and_projection(tmp_path):
    report = dryrun.build_report(["sim-lookahead"], combinations=False, quick=True, backend="native", progress=False,
                                 command="test")
    (r,) = report["workloads"]
    s = r["summary"]
    assert r["fake_device"] == "meta" and s["backend"] == "native"
    assert s["model_launches"] > 0 and s["guidance_launches"] > 0 and s["peak_live_bytes"]["backward"] > 0
    assert s["graph_replay_launches"] == 1 + r["graph"]["copy_in_launches"] + r["graph"]["noise_launches"]
    p = r["projection"]["A100-SXM"]
    assert p["graph_pass_s"] < p["eager_pass_s"]        # replay saves the per-op host cost
    assert r["projection"]["H100-SXM"]["model_kernel_s"] < p["model_kernel_s"]
    paths = dryrun.write(report, str(tmp_path))
    md = open(paths[1]).read()
    assert "sim-lookahead (quick)" in md and "PROJECTION" in md
    docs = tmp_path / "performance.md"
    docs.write_text(f"# x\n\n{dryrun.DOCS_BEGIN}\nold\n{dryrun.DOCS_END}\ntail\n")
    dryrun.write_docs(report, str(docs))
    text = docs.read_text()
    assert "old" not in text and "sim-lookahead (quick)" in text and text.endswith("tail\n")


def _full_size_step(workload: str):
    """A paper workload's dry run at full size on fake CUDA with Triton: (summary, the step's ops
    beyond the model)."""
    pytest.importorskip("diffusers")
    report = dryrun.build_report([workload], combinations=False, quick=False, backend="triton",
                                 progress=False, command="test")
    (r,) = report["workloads"]
    return r["summary"], next(iter(r["steps_measured"].values()))["guidance"]["ops"]


def test_decoded_g_loss_paper_workload_is_the_fused_step():
    """SD + CFG 7.5 + G_loss through the U-Net and the VAE decoder (the gradient-guidance paper's
    image workload at full size on fake CUDA, Triton; its latent-sized extras — the batched
    model's input, the cotangent — weigh against the 512² image only at full size): the step is
    the fused plan — the x̂_0 stage,
    the decoder's pullback, both branches' VJPs from one backward pass, one final combine — at
    most 8 launches beyond the model (decoder and reward included in the model) and at most 1.2×
    the minimum big-tensor bytes; the general path took 74 on the full-size workload."""
    s, ops_ = _full_size_step("sd-cfg-lookahead")
    assert s["guidance_launches"] <= 8, ops_
    assert s["ratio"] <= 1.2, s
    assert ops_["gradguide_triton.fused_combine"]["launches"] == 2, ops_


def test_learned_variance_paper_workload_is_the_fused_step():
    """ADM-64 with a learned-range variance + classifier guidance (mean form) + PixelAsParam A, DDPM
    with clipping (the PixelAsParam paper's workload, full size on fake CUDA, Triton): the step is the
    fused plan — the clipped x̂_0, one reduce and one fused combine reading Σ ⊙ g and √Σ ⊙ z as
    Σ-scaled operands (formed from g, z and the variance channels as they load, ε and v read in place
    in the model's output) — at most 8 launches beyond the model and at most 1.2× the minimum bytes
    (the minimum reads the variance channels in each pass that reads a scaled operand); the general
    path took 94 launches at 4.6×."""
    s, ops_ = _full_size_step("adm64-cls-pxpA")
    assert s["guidance_launches"] <= 8, ops_
    assert s["ratio"] <= 1.2, s
    assert ops_["gradguide_triton.fused_combine"]["launches"] == 2 and "aten.exp" not in ops_, ops_


def test_roofline_formula():
    gpu = projection.GPUS["A100-SXM"]
    ops = [(2.039e9, 0, "float32", "add"),                 # 1 ms of bandwidth
           (0, 312e9, "float16", "mm"),                   # 1 ms of fp16 tensor-core FLOPs
           (2.039e6, 19.5e9, "float32", "mm")]            # max(1 µs, 1 ms) on CUDA cores
    assert projection.kernel_time(ops, gpu) == pytest.approx(3e-3)


def test_cli(tmp_path, capsys):
    from gradguide.cli import main
    assert main(["dryrun", "--quick", "--workload", "sim-lookahead", "--no-combinations", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("dryrun-quick-") and files[0].endswith(".json")
    assert "| sim-lookahead (quick) | meta | triton |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"\.md exists; pass --force"):      # the markdown is kept...
        main(["dryrun", "--from-json", str(tmp_path / files[0])])
    assert main(["dryrun", "--from-json", str(tmp_path / files[0]), "--force"]) == 0   # ...or re-rendered, no run
    assert "| sim-lookahead (quick) | meta | triton |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--workload: unknown"):
        main(["dryrun", "--workload", "sdxl", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--backend"):
        main(["dryrun", "--backend", "cuda", "--out", str(tmp_path)])


def test_targets_table_marks_what_is_met():
    def combo(s, g, p, launches, ratio):
        return {"sampler": s, "guidance": g, "projection": p, "status": "ok", "guidance_launches": launches,
                "ratio": ratio}
    report = {"combinations": [combo("ddim", "cfg", "none", 6, 1.0), combo("ddpm", "G_loss", "none", 9, 1.0),
                               combo("ddim", "cfg", "C", 5, 1.2)]}
    lines = dryrun.targets_table(report).splitlines()[2:]
    assert lines == ["| ddim + cfg | 6 | 1.00× | yes |", "| ddpm + G_loss | 9 | 1.00× | no |",
                     "| ddim + cfg + C | 5 | 1.20× | no |"]


@pytest.mark.parametrize("key", dryrun.TARGETS, ids=[" + ".join(k) for k in dryrun.TARGETS])
def test_issue11_targets_on_triton(key):
    """The fused step's targets on the GPU path: each target step, on fake tensors with backend "triton",
    is at most 8 launches beyond the model at <= 1.1x the minimum big-tensor bytes, and runs as
    the Triton reduce + fused combine (no torch coefficient ops, no padded Gram)."""
    r = dryrun.run_combination(*key, backend="triton")
    assert r["status"] == "ok" and r["backend"] == "triton"
    s = dryrun.summarize(r)
    ops_ = next(iter(r["steps_measured"].values()))["guidance"]["ops"]
    assert s["guidance_launches"] <= dryrun.TARGET_LAUNCHES, ops_
    assert s["ratio"] <= dryrun.TARGET_RATIO, s
    assert "gradguide_triton.fused_combine" in ops_ and "gradguide_triton.combine" not in ops_
    assert not {"aten.constant_pad_nd", "aten._to_copy", "aten.clone", "aten.bmm"} & set(ops_), ops_
    table = dryrun.targets_table({"combinations": [dict(s, sampler=key[0], guidance=key[1], projection=key[2])]})
    assert table.splitlines()[-1].endswith("| yes |")


@pytest.mark.parametrize("key", dryrun.BRANCH_TARGETS, ids=[" + ".join(k) for k in dryrun.BRANCH_TARGETS])
def test_perturbed_guiders_run_the_fused_step(key):
    """PAG + CFG and SLG + CFG (a small diffusers-block transformer, the guider's hooks on block 0), on fake
    CUDA tensors with the Triton backend, at a step where both terms are on: the fused step, one combine
    over x and the three branch outputs, <= 8 launches beyond the model. The perturbed branch adds rows to
    the model call, not sampler launches: beyond the combine, only the stacking of the batched call's input
    (x_t three times in one pass, and the labels; the eager step reads its row of the tables: no
    index_select), at the minimum traffic.
    PAG's hook acts on the fake tensors: the hooked block runs as is and perturbed, and its perturbed
    attention is its values (no attention kernel), so two attention launches for two blocks."""
    r = dryrun.run_combination(*key, backend="triton")
    assert r["status"] == "ok" and r["backend"] == "triton" and r["fake_device"] == "cuda"
    s = dryrun.summarize(r)
    step = next(iter(r["steps_measured"].values()))
    ops_ = step["guidance"]["ops"]
    assert s["guidance_launches"] <= dryrun.TARGET_LAUNCHES, ops_
    assert set(ops_) == {"aten.cat", "aten.clone", "gradguide_triton.fused_combine"}, ops_
    assert ops_["gradguide_triton.fused_combine"]["launches"] == 1
    assert ops_["aten.clone"]["launches"] == 1 and ops_["aten.cat"]["launches"] == 1   # x three times; the labels
    assert step["structure"]["fused"] and step["structure"]["combine_k"] == [4]   # x, cond, uncond, perturbed
    # the minimum: the combine (4 operands, x_(t-1)) and the 3B input (x read once, written three times)
    assert s["minimum_bytes"] == 9 * S and ops_["aten.clone"]["large_bytes"] == 4 * S
    assert s["guidance_bytes"] == s["minimum_bytes"]
    if key[1] == "pag":
        assert step["forward"]["ops"]["aten._scaled_dot_product_efficient_attention"]["launches"] == 2
    table = dryrun.targets_table({"combinations": [dict(s, sampler=key[0], guidance=key[1], projection=key[2])]})
    assert f"| {key[0]} + {key[1]} | {s['guidance_launches']} |" in table and "one model call of batch 3B" in table


def test_ddim_clip_cfg_pxp_c_on_triton_runs_the_clip_shift_kernel():
    """ddim-clip + cfg + policy C on "triton": the clipped branch difference (the precision fix's
    clamp(p + s) − clamp(p)) is the Triton clip_shift kernel, not the torch reference (which
    made this step 28 launches at 58x the minimum bytes): <= 8 launches, and the big-tensor
    traffic is exactly the plan's four passes: clip_shift (read x, both model outputs; write
    the clipped x̂_0 and the shift), the reduce over those two, the fused pxp-c combine (read
    2, write x̂_0) and the linear x_next (read 2, write 1): 13 tensors, 1.86x the 7-tensor
    minimum of a two-pass step that recomputes the clip in both passes (a 1.5x target would
    need clip_shift folded into the reduce and the combine)."""
    r = dryrun.run_combination("ddim-clip", "cfg", "C", backend="triton")
    assert r["status"] == "ok" and r["backend"] == "triton"
    s = dryrun.summarize(r)
    ops_ = next(iter(r["steps_measured"].values()))["guidance"]["ops"]
    assert ops_["gradguide_triton.clip_shift"]["launches"] == 1, ops_
    assert not {"aten.clamp", "aten.where", "aten.sub", "aten.stack", "aten._to_copy"} & set(ops_), ops_
    assert s["guidance_launches"] <= 8, ops_
    big = sum(o["large_bytes"] for o in ops_.values())
    assert s["minimum_bytes"] == 7 * S and big == s["guidance_bytes"] == 13 * S, (big, s)
    assert s["ratio"] <= 1.9, s


def test_a_broadcast_input_is_read_once():
    tracker = dryrun.Tracker()
    world = dryrun.FakeWorld("meta")
    counter = dryrun.Counter(tracker, large=1000)
    tracker.enter("guidance")
    with world.mode, counter:
        a = torch.randn(10, 100, device="meta")
        counter.reset()
        b = a.unsqueeze(0).expand(2, 10, 100) * 2.0    # reads a once, writes two copies
        del b
    s = counter.stats["guidance"]
    assert s["launches"] == 1 and s["bytes_read"] == 4000 and s["bytes_written"] == 8000


@pytest.mark.parametrize("name", dryrun.FLOW)
def test_flow_workloads_meet_the_targets(name):
    """SD3 / Flux architectures (quick sizes: the same classes and code path as the full-size rows),
    bfloat16, flow Euler + CFG with both branches in one transformer call: on the fake GPU with
    Triton, at most 8 launches beyond the model at <= 1.1x the minimum bytes; the model input
    x_σ = x · scale for both branches is one multiply (no cat of the latents, no second pass)."""
    report = dryrun.build_report([name], combinations=False, quick=True, backend="triton", progress=False,
                                 command="test")
    (r,) = report["workloads"]
    s = r["summary"]
    ops_ = next(iter(r["steps_measured"].values()))["guidance"]["ops"]
    assert r["fake_device"] == "cuda" and r["dtype"] == "bfloat16" and s["backend"] == "triton"
    assert s["model_launches"] > 20 and s["weight_bytes"] > 0
    assert s["guidance_launches"] <= dryrun.TARGET_LAUNCHES, ops_
    assert s["ratio"] <= dryrun.TARGET_RATIO, (s, ops_)
    assert ops_["aten.mul"]["launches"] == 1 and ops_["gradguide_triton.fused_combine"]["launches"] == 1, ops_
    assert ops_.get("aten.cat", {"large_bytes": 0})["large_bytes"] == 0, ops_   # (the timesteps' cat only)
    structure = next(iter(r["steps_measured"].values()))["structure"]
    assert structure["fused"] and structure["combine_k"] == [3]          # x, both branches' velocities
    table = dryrun.flow_targets_table(report)
    row = table.splitlines()[-1]
    assert row.startswith(f"| {name} (quick) |") and "| yes |" in row
    h100_step_ms = float(row.split(" | ")[6].split(" / ")[0])   # the projected eager step (PROJECTION)
    assert h100_step_ms == pytest.approx(r["projection"]["H100-SXM"]["eager_step_s"] * 1e3, abs=0.05)
    assert "## Flow workloads against the fused step's targets" in dryrun.markdown(report)


def test_flow_workloads_are_built_as_the_pipelines_build_them():
    from gradguide.bench import flow_workloads, loop
    from gradguide.flow_schedules import calculate_shift
    w = loop.build_workload("flux-dev-truecfg", quick=True, device="cpu")
    assert w.shape == (1, 16, 16) and w.fixed["execution"].dtype == torch.bfloat16
    cond = w.fixed["cond"]
    assert cond["img_ids"].shape == (1, 16, 3) and cond["txt_ids"].shape == (1, 6, 3)
    assert cond["guidance"].tolist() == [flow_workloads.FLUX_EMBEDDED]       # dev: the embedded guidance
    sigmas = (w.fixed["sampler"].timesteps.t / 1000).tolist()   # the model timesteps: σ · 1000
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 0.5)]   # linspace(1, 1/N, N), shifted
    assert sigmas == pytest.approx(expected, rel=1e-6)
    cfg = w.per_pass(lambda f: f, 0)["guidance"]
    assert isinstance(cfg, gg.CFG) and cfg.scale == flow_workloads.FLUX_TRUE_CFG
    assert "guidance" not in loop.build_workload("flux-schnell-truecfg", quick=True, device="cpu").fixed["cond"]
    sd3 = loop.build_workload("sd3m-cfg", quick=True, device="cpu")
    assert sd3.shape == (1, 4, 8, 8) and set(sd3.fixed["cond"]) == {"encoder_hidden_states", "pooled_projections"}
