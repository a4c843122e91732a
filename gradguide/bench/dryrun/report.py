"""The dry run's report (see :mod:`gradguide.bench.dryrun`): table rows, the markdown, the JSON
files and the generated block of ``docs/performance.md``."""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .fake import PHASES, ZERO_LAUNCH
from .workloads import run_all_combinations, run_workload

# -- report ---------------------------------------------------------------------------------------------

# the paper workloads, then SD3-medium and Flux at full size (gradguide/bench/flow_workloads.py)
FLOW = ("sd3m-cfg", "flux-dev-truecfg", "flux-schnell-truecfg")
PAPER = ("sim-lookahead", "sd-cfg-lookahead", "adm64-cls-pxpA") + FLOW
PAPER_FIGURES = {"sim-lookahead": "4.6 s per pass, one A100 (Guo et al. 2024, Table 1)",
                 "sd-cfg-lookahead": "not given per pass", "adm64-cls-pxpA": "not given per pass"}


# the fused step's targets: <= 8 launches beyond the model, bytes <= 1.1x the minimum
TARGETS = (("ddim", "cfg", "none"), ("ddpm", "classifier", "A"), ("ddpm", "G_loss", "none"), ("ddim", "apg", "none"),
           ("ddim", "cfg", "C"), ("ddim", "tcfg", "none"), ("ddim", "mambo-g", "none"), ("ddim", "cfg++", "none"))
TARGET_LAUNCHES, TARGET_RATIO = 8, 1.1
# perturbed-branch guiders (CFG on, the perturbed term on at the measured step): their branches share one
# model call of batch 3B, whose input (x_t three times, the labels) is stacked beyond the model
BRANCH_TARGETS = (("ddim", "pag", "none"), ("ddim", "slg", "none"))
BRANCH_NOTE = ("PAG, SLG (CFG and the perturbed term on): the three branches are one model call of batch 3B; "
               "stacking its input (x_t three times in one pass, and the labels) is 2 of the launches; the minimum "
               "counts that input (x read once, written three times) and the combine (its 4 operands and x_(t-1)); "
               "one call per branch (Execution(batch_branches=False)) stacks nothing.")


def targets_table(report: dict) -> str:
    rows = {(c.get("sampler"), c.get("guidance"), c.get("projection")): c for c in report.get("combinations", [])}
    lines = [f"| step | launches beyond the model (target ≤ {TARGET_LAUNCHES}) | bytes / minimum (target ≤ "
             f"{TARGET_RATIO}) | met |", "|---|---:|---:|---|"]
    branch_rows = False
    for key in TARGETS + BRANCH_TARGETS:
        c = rows.get(key)
        if c is None or c.get("status") != "ok":
            continue
        branch_rows |= key in BRANCH_TARGETS
        met = c["guidance_launches"] <= TARGET_LAUNCHES and (c["ratio"] or 0) <= TARGET_RATIO
        lines.append(f"| {' + '.join(k for k in key if k != 'none')} | {c['guidance_launches']} | {c['ratio']:.2f}× | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines + (["", BRANCH_NOTE] if branch_rows else []))


def flow_targets_table(report: dict) -> str:
    """The flow workloads (flow Euler + CFG, bfloat16, full size) against the fused step's targets."""
    rows = [r for r in report.get("workloads", []) if r["workload"] in FLOW]
    if not rows:
        return ""
    lines = [f"| workload | step | launches beyond the model (target ≤ {TARGET_LAUNCHES}) | bytes / minimum (target ≤ "
             f"{TARGET_RATIO}) | met | projected GPU memory MiB | PROJECTION: H100 ms per step, eager / graph | "
             "PROJECTION: A100 ms per step, eager / graph | PROJECTION: beyond the model, H100 µs per step |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["summary"]
        met = s["guidance_launches"] <= TARGET_LAUNCHES and (s["ratio"] or 0) <= TARGET_RATIO
        h, a = r["projection"]["H100-SXM"], r["projection"]["A100-SXM"]
        lines.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {r['config'].get('sampler', '-')} + "
                     f"{r['config'].get('guidance', '-')} | {s['guidance_launches']} | {s['ratio']:.2f}× | "
                     f"{'yes' if met else 'no'} | {_mib(s['projected_memory_bytes'])} | "
                     f"{h['eager_step_s'] * 1e3:.1f} / {h['graph_step_s'] * 1e3:.1f} | "
                     f"{a['eager_step_s'] * 1e3:.1f} / {a['graph_step_s'] * 1e3:.1f} | "
                     f"{h['guidance_eager_s'] * 1e6:.1f} |")
    return "\n".join(lines)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f}"


def summarize(result: dict) -> dict:
    """The table row of one dry run (its first measured step stands for a guided step)."""
    if result.get("status") == "refused":
        return {"name": result["name"], "status": "refused", "reason": result["reason"]}
    step = next(iter(result["steps_measured"].values()))
    g = step["guidance"]
    big = g["bytes_read"] + g["bytes_written"]
    model_launches = step["forward"]["launches"] + step["backward"]["launches"]
    peaks = {p: step[p]["peak_live_bytes"] for p in PHASES}
    graph = result.get("graph") or {}
    memory = result["weight_bytes"] + max(peaks.values()) + graph.get("static_buffer_bytes", 0)
    return {"name": result["name"], "status": "ok", "fake_device": result["fake_device"], "backend": result["backend"],
            "model_launches": model_launches, "guidance_launches": g["launches"],
            # host-side launches per replayed step: the graph, the copy-ins, the noise draw
            "graph_replay_launches": (1 + graph["copy_in_launches"] + graph["noise_launches"]) if graph else None,
            "guidance_bytes": big, "minimum_bytes": step["min_guidance_bytes"],
            "ratio": big / step["min_guidance_bytes"] if step["min_guidance_bytes"] else None,
            "model_bytes": sum(step[p]["bytes_read"] + step[p]["bytes_written"] for p in ("forward", "backward")),
            "model_flops": step["forward"]["flops"] + step["backward"]["flops"],
            "weight_bytes": result["weight_bytes"], "peak_live_bytes": peaks,
            "graph_static_bytes": graph.get("static_buffer_bytes"), "projected_memory_bytes": memory,
            "top_guidance_ops": list(g["ops"].items())[:8]}


def header() -> dict:
    import platform
    from gradguide.bench import meta
    return {"date": meta.now(), "machine": platform.node(), "cpu": meta.cpu_name(),
            **meta.versions("torch", "triton", "gradguide"), "git_commit": meta.git_commit(),
            "cuda_available": torch.cuda.is_available()}


def markdown(report: dict) -> str:
    from gradguide.bench import projection
    lines = [f"# gradguide dry run (fake CUDA, no GPU) — {report['date'][:10]}", "",
             f"Command: `{report['command']}`. Machine: {report['machine']} ({report['cpu']}), torch {report['torch']}, "
             f"triton {report['triton']}, commit {report['git_commit'][:12]}. No GPU: every number below comes "
             "from running the step on fake tensors (counts) or from a roofline formula (projections).", "",
             "Launches are aten + custom ops (views/metadata ops count zero: " + ", ".join(sorted(ZERO_LAUNCH)[:12])
             + ", …). Bytes: tensors with at least as many elements as x_t, read + written (a broadcast input read "
             "once). Minimum: each operand read once per pass that needs it, each output written once, the model's "
             "input where the step forms one (a flow model's x_σ, CFG's batched rows) written once from x "
             "(gradguide.bench.dryrun.minimum_bytes). "
             "Memory: weights + peak live tensor bytes of the step + graph static buffers.", ""]
    for name, why in (report.get("skipped_workloads") or {}).items():
        lines += [f"Skipped workload `{name}`: {why}.", ""]
    if report.get("workloads"):
        lines += ["## Paper workloads (one guided step)", "",
                  "| workload | fake device | backend | launches: model | launches beyond the model (eager) | "
                  "graph replay launches | guidance bytes / minimum | model GFLOP, GiB moved | weights MiB | "
                  "peak live MiB fwd / bwd / guidance | graph static MiB | projected GPU memory MiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in report["workloads"]:
            s = r["summary"]
            p = s["peak_live_bytes"]
            lines.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {s['fake_device']} | {s['backend']} | "
                         f"{s['model_launches']} | {s['guidance_launches']} | {s['graph_replay_launches']} | "
                         f"{s['ratio']:.2f}× ({_mib(s['guidance_bytes'])} / {_mib(s['minimum_bytes'])} MiB) | "
                         f"{s['model_flops'] / 1e9:.1f}, {s['model_bytes'] / 2 ** 30:.2f} | "
                         f"{_mib(s['weight_bytes'])} | {_mib(p['forward'])} / {_mib(p['backward'])} / "
                         f"{_mib(p['guidance'])} | {_mib(s['graph_static_bytes'])} | {_mib(s['projected_memory_bytes'])} |")
        lines += ["", "Most frequent ops beyond the model (launches, large-tensor bytes):", ""]
        for r in report["workloads"]:
            ops_ = ", ".join(f"{k.replace('aten.', '')} {v['launches']}" for k, v in r["summary"]["top_guidance_ops"])
            lines.append(f"- {r['name']}: {ops_}")
        flow = flow_targets_table(report)
        if flow:
            lines += ["", "## Flow workloads against the fused step's targets", "",
                      "SD3-medium and Flux architectures at 1024², bfloat16 transformer and latents, one guided "
                      "flow-Euler step with both CFG branches in one transformer call (gradguide/bench/flow_workloads.py). "
                      "Beyond the model (an eager step, as sample() runs it: its row of the tables is a view): the model "
                      "input (x_σ = x · scale written for both branches in one pass) and the fused combine.", "", flow]
        lines += ["", "## Projected GPU time (PROJECTION)", "", projection_table(report), "",
                  projection.ASSUMPTIONS, ""]
    if report.get("combinations"):
        lines += ["## Targets for the fused step", "", targets_table(report), ""]
        ok = [c for c in report["combinations"] if c["status"] == "ok"]
        lines += ["## Every sampler × guidance × projection (small model, shape 2×4×8×8)", "",
                  f"{len(ok)} combinations ran, {len(report['combinations']) - len(ok)} refused by `sample` "
                  "(projection without a direction to project, or policy C without CFG; PixelAsParam over PAG/SLG with "
                  "x̂_0 clipping; PAG/SLG's transformer with learned variance).", "",
                  "| sampler | guidance | projection | fake device | backend | launches beyond the model | model launches "
                  "| guidance bytes / minimum |", "|---|---|---|---|---|---:|---:|---:|"]
        for c in ok:
            lines.append(f"| {c['sampler']} | {c['guidance']} | {c['projection']} | {c['fake_device']} | {c['backend']} | "
                         f"{c['guidance_launches']} | {c['model_launches']} | "
                         + (f"{c['ratio']:.2f}× |" if c["ratio"] else "- |"))
    lines += ["", "## Checks (each run)", ""] + [f"- {c}" for c in report.get("checks", [])]
    return "\n".join(lines) + "\n"


def projection_table(report: dict) -> str:
    lines = ["| workload | steps | H100 eager pass s | H100 graph pass s | A100 eager pass s | A100 graph pass s | "
             "beyond-model share of an eager step (A100) | papers' figure |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["workloads"]:
        p = r["projection"]
        a = p["A100-SXM"]
        share = a["guidance_eager_s"] / a["eager_step_s"]   # guidance/sampler kernels + their launches
        lines.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {r['steps']} | "
                     f"{p['H100-SXM']['eager_pass_s']:.3f} | {p['H100-SXM']['graph_pass_s']:.3f} | "
                     f"{a['eager_pass_s']:.3f} | {a['graph_pass_s']:.3f} | {share:.1%} | "
                     f"{PAPER_FIGURES.get(r['workload'], '-')} |")
    return "\n".join(lines)


def build_report(workloads=PAPER, combinations: bool = True, quick: bool = False, backend: str = "auto",
                 progress: bool = True, command: str = "gradguide dryrun") -> dict:
    from gradguide.bench import projection
    report = header()
    report.update(command=command, quick=quick, backend_requested=backend, workloads=[], combinations=[])
    bar = None
    if progress and workloads:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(workloads), desc="dry run: workloads", unit="workload", disable=None)  # off on a non-tty
    checks = set()
    for name in workloads:
        r = run_workload(name, quick=quick, backend=backend)
        checks.update(r["checks"])
        r["summary"] = summarize(r)
        r["projection"] = projection.project_workload(r)
        for step in r["steps_measured"].values():
            step.pop("roofline_ops")   # per-op lists: used for the projection, too long for the JSON
        report["workloads"].append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if combinations:
        for c in run_all_combinations(backend=backend, progress=progress):
            if c["status"] == "ok":
                checks.update(c["checks"])
                s = summarize(c)
                s.update(sampler=c["sampler"], guidance=c["guidance"], projection=c["projection"])
                report["combinations"].append(s)
            else:
                report["combinations"].append(c)
    report["checks"] = sorted(checks)
    return report


def stem(quick: bool, date: str) -> str:
    return f"dryrun-{'quick-' if quick else ''}{date[:10]}"


def write(report: dict, out_dir: str) -> List[str]:
    from gradguide.bench import meta
    return meta.write_report(out_dir, stem(report["quick"], report["date"]), report, markdown(report), indent=1)


DOCS_BEGIN = "<!-- dryrun:begin (generated by `gradguide dryrun --write-docs`; do not edit by hand) -->"
DOCS_END = "<!-- dryrun:end -->"


def write_docs(report: dict, path: Optional[str] = None) -> str:
    """Replace the generated block of ``docs/performance.md`` with this report's tables (default:
    the checkout's, when the package runs from one; else ``docs/performance.md`` under the
    working directory, never a file inside an installed package)."""
    from gradguide.bench import projection
    if path is None:
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))   # up from gradguide/bench/dryrun
        checkout = os.path.join(root, "docs", "performance.md")
        path = checkout if os.path.exists(checkout) else os.path.join("docs", "performance.md")
    text = open(path).read() if os.path.exists(path) else f"# Performance\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{path}: the markers {DOCS_BEGIN!r} … {DOCS_END!r} are missing")
    rows = ["| workload | fake device | backend | launches: model | beyond the model (eager) | graph replay | "
            "guidance bytes / minimum | projected GPU memory MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["workloads"]:
        s = r["summary"]
        rows.append(f"| {r['name']}{' (quick)' if r.get('quick') else ''} | {s['fake_device']} | {s['backend']} | "
                    f"{s['model_launches']} | {s['guidance_launches']} | {s['graph_replay_launches']} | "
                    f"{s['ratio']:.2f}× | {_mib(s['projected_memory_bytes'])} |")
    block = "\n".join([DOCS_BEGIN, "",
                       f"Generated {report['date'][:10]} at commit {report['git_commit'][:12]} by `{report['command']}`.",
                       "", "Dry run (counted on fake tensors, one guided step):", ""] + rows +
                      (["", "The targets for the fused step (small model, every combination in the report):", "",
                        targets_table(report)] if report.get("combinations") else []) +
                      (["", "The flow workloads (flow Euler + CFG, both branches in one call, bfloat16) against the "
                        "same targets:", "", flow_targets_table(report)] if flow_targets_table(report) else []) +
                      ["", "Projected time per sampling pass (PROJECTION, not measured):", "",
                       projection_table(report), "", projection.ASSUMPTIONS, "", DOCS_END])
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    with open(path, "w") as f:
        f.write(text[:start] + block + text[end:])
    return path
