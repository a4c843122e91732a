"""``gradguide bench --suite gpu``: the GPU acceptance run, one command, one report.

On a machine with a CUDA device it runs, side by side in one process, and writes one JSON +
markdown report (``gpu-<device>-<date>.{json,md}``):

1. **bandwidth** — reduce + combine of every built-in policy vs ``dst.copy_(src)`` (the
   ops suite, ``gradguide/bench/ops.py``): GB/s and the fraction of the measured copy
   bandwidth, fp32 and fp16;
2. **graph** — CUDA-graph replay vs eager on the loop workloads: the same seed must give the
   same samples (max |Δ|, ``torch.allclose`` at the dtype's tolerance), and the speedup
   (median pass times, CUDA events);
3. **paper** — the papers' workloads (simulation pass, SD-1.5 + VAE + G_loss, ADM +
   classifier + PixelAsParam A) eager / fused / fused+graph / torch.compile
   (``gradguide/bench/loop.py``), with the ratio to the paper's 4.6 s per simulation pass;
4. **memory** — a profiled pass (``gradguide profile``'s machinery): per-phase peak of torch's
   allocator and of NVML's device-wide used memory, and the graph pool, next to the dry run's
   projected memory for the same workload.

No GPU has been available to this project, so this suite has never produced GPU figures here:
without a CUDA device it refuses with :class:`GPURequired`. ``allow_cpu=True``
(``--allow-cpu``) runs the same plumbing on the CPU for tests; such a report says so in its
title and its numbers are not GPU measurements.
"""
from __future__ import annotations

import statistics
import warnings
from typing import List, Optional

import torch

from gradguide.bench import meta
from gradguide.bench.loop import sync, timed_passes

GRAPH_WORKLOADS = ("loop-cfg", "loop-apg", "loop-cfg-pxpC", "loop-cls-pxpA", "loop-lookahead")
PAPER_WORKLOADS = ("sim-lookahead", "sd-cfg-lookahead", "adm64-cls-pxpA")


class GPURequired(RuntimeError):
    """The GPU suite was asked to run where no CUDA device is present."""


_NO_GPU = ("this suite measures a GPU and needs a CUDA device; none is present "
           "(torch.cuda.is_available() is False). Without a GPU, `gradguide dryrun` gives the counted "
           "launches/bytes/memory and the projected times; --allow-cpu runs this suite's plumbing on the CPU "
           "for testing (its numbers are not GPU measurements).")


def _device(allow_cpu: bool, device: Optional[str]) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GPURequired(_NO_GPU)
    if dev.type != "cuda" and not allow_cpu:
        raise GPURequired(_NO_GPU if not torch.cuda.is_available() else
                          f"device={device!r}: the GPU suite runs on CUDA (--allow-cpu: plumbing test only)")
    return dev


def graph_vs_eager(bench, names, dev, quick: bool, reps: int, seed: int = 0) -> List[dict]:
    """Graph replay vs eager, same seed: equality and speed per loop workload."""
    import gradguide
    from gradguide.graphs import GraphCache
    rows = []
    for name in names:
        w = bench.build_workload(name, quick=quick, device=dev, seed=seed)
        # on a CPU (plumbing test) the graph stepper's emulation stands in for capture + replay
        cache = GraphCache(emulate=dev.type != "cuda")

        def one(graph):
            kw = w.sample_kwargs(seed=seed)
            kw["execution"] = gradguide.Execution(backend="auto", graph=graph)
            model, shape = kw.pop("model"), kw.pop("shape")
            return gradguide.sample(model, shape, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = one(False)
            graphed = one(cache)          # captures each step variant, then replays
            sync(dev)
            t_eager = timed_passes(lambda: one(False), dev, reps)
            t_graph = timed_passes(lambda: one(cache), dev, reps)
        diff = (eager - graphed).abs().max().item()
        spreads = {"eager": meta.spread(t_eager), "graph": meta.spread(t_graph)}
        rtol = 1e-5 if eager.dtype == torch.float32 else 1e-2
        rows.append({"workload": name, "shape": list(w.shape), "steps": w.steps, "max_abs_diff": diff,
                     "equal": bool(torch.allclose(eager, graphed, rtol=rtol, atol=rtol)),
                     "captures": cache.captures, "eager_pass_s": statistics.median(t_eager),
                     "graph_pass_s": statistics.median(t_graph),
                     "speedup": statistics.median(t_eager) / statistics.median(t_graph),
                     "graph": "CUDA graph" if dev.type == "cuda" else "emulated (CPU plumbing test)",
                     "eager_pass_s_all": t_eager, "graph_pass_s_all": t_graph, "spread_by_variant": spreads,
                     "spread": max((v for v in spreads.values() if v is not None), default=None),
                     "unstable": meta.unstable(*spreads.values())})
    return rows


def memory(bench, name: str, dev, quick: bool, seed: int = 0) -> dict:
    """A profiled pass of ``name`` (allocator + NVML per phase, graph pool) and the dry run's
    projection for the same workload, side by side."""
    from gradguide.bench import profiling
    w = bench.build_workload(name, quick=quick, device=dev, seed=seed)

    def make_run(wrap):
        return w.sample_kwargs(wrap=wrap, seed=seed)
    measured = profiling.profile_sampling(make_run, dev, graph=True, progress=False)
    out = {"workload": name, "phases": measured["phases"], "nvml": measured["nvml"], "graph": measured["graph"],
           "sources": measured["sources"]}
    try:
        from . import dryrun
        r = dryrun.run_workload(name, quick=quick)
        out["projected_memory_bytes"] = dryrun.summarize(r)["projected_memory_bytes"]
    except Exception as exc:   # the projection is a comparison, not the measurement: report, go on
        out["projected_memory_bytes"] = None
        out["projection_error"] = f"{type(exc).__name__}: {exc}"
    return out


def run(device: Optional[str] = None, quick: bool = False, allow_cpu: bool = False, reps: Optional[int] = None,
        graph_workloads=None, paper_workloads=None, memory_workload: str = "sim-lookahead",
        sections=("bandwidth", "graph", "paper", "memory"), progress: bool = True) -> dict:
    """Run the GPU acceptance suite; returns one report dict (see :func:`write`)."""
    dev = _device(allow_cpu, device)
    from gradguide.bench import loop as bench_loop, ops as bench_ops
    reps = reps or (1 if quick else 5)
    report = dict(bench_loop.run_header(dev), suite="gpu", quick=quick,
                  plumbing_test=dev.type != "cuda", sections=list(sections))
    if "bandwidth" in sections:
        dtypes = (torch.float32, torch.float16) if dev.type == "cuda" else (torch.float32,)
        report["bandwidth"] = [bench_ops.run(quick=quick, device=str(dev), dtype=dt, progress=progress,
                                             compile_reference=not quick) for dt in dtypes]
    if "graph" in sections:
        report["graph"] = graph_vs_eager(bench_loop, list(graph_workloads or GRAPH_WORKLOADS), dev, quick, reps)
    if "paper" in sections:
        report["paper"] = bench_loop.run(suite="paper", quick=quick, device=str(dev),
                                         workloads=list(paper_workloads or PAPER_WORKLOADS),
                                         variants=list(bench_loop.QUICK_VARIANTS) if quick else None, reps=reps,
                                         progress=progress)
    if "memory" in sections:
        report["memory"] = memory(bench_loop, memory_workload, dev, quick)
    report["spread_limit"] = meta.SPREAD_LIMIT
    report["unstable_rows"], report["timed_rows"] = _flagged(report)
    return report


def _flagged(report: dict):
    """(unstable rows, timed rows) over the report's sections."""
    parts = [(b["unstable_rows"], b["timed_rows"]) for b in report.get("bandwidth", ())]
    if "graph" in report:
        parts.append((meta.count_unstable(report["graph"]), len(report["graph"])))
    if "paper" in report:
        parts.append((report["paper"]["unstable_rows"], report["paper"]["timed_rows"]))
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f}"


def markdown(report: dict) -> str:
    title = "GPU acceptance" if not report["plumbing_test"] else \
        "PLUMBING TEST ON CPU — not a GPU measurement"
    lines = [f"# gradguide bench --suite gpu: {title}", "",
             f"- device: {report['device']}; versions {report['versions']}; commit {report['commit']}, {report['date']}"]
    if "bandwidth" in report:
        from gradguide.bench import ops as bench_ops
        for b in report["bandwidth"]:
            lines += ["", "## Kernel vs copy bandwidth", "", bench_ops.markdown(b)]
    if "graph" in report:
        lines += ["", "## Graph replay vs eager (same seed)", "",
                  f"{meta.spread_note(report.get('spread_limit', meta.SPREAD_LIMIT))}", "",
                  "| workload | steps | graph | equal | max abs diff | captures | eager pass s | graph pass s | speedup | "
                  "spread |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["graph"]:
            lines.append(f"| {r['workload']} | {r['steps']} | {r['graph']} | {r['equal']} | {r['max_abs_diff']:.2e} | "
                         f"{r['captures']} | {r['eager_pass_s']:.4f} | {r['graph_pass_s']:.4f} | {r['speedup']:.2f}x | "
                         f"{meta.spread_cell(r)} |")
    if "paper" in report:
        from gradguide.bench import loop as bench_loop
        lines += ["", "## Paper workloads", "", bench_loop.markdown(report["paper"])]
    if "memory" in report:
        m = report["memory"]
        lines += ["", f"## Memory ({m['workload']}; NVML: {m['nvml']})", "",
                  "| phase | peak CUDA allocated MiB | peak NVML used MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
        for phase, row in m["phases"].items():
            lines.append(f"| {phase} | {_mib(row.get('peak_cuda_allocated_bytes'))} | {_mib(row.get('peak_nvml_bytes'))} "
                         f"| {_mib(row.get('peak_rss_bytes'))} |")
        g = m.get("graph") or {}
        if g.get("captured"):
            lines.append(f"| graph pool (reserved) | {_mib(g['graph_pool_reserved_bytes'])} | - | - |")
        lines.append(f"\nDry-run projection for the same workload (weights + peak live + graph buffers): "
                     f"{_mib(m.get('projected_memory_bytes'))} MiB")
    return "\n".join(lines) + "\n"


def stem(device_type: str, quick: bool, date: str) -> str:
    kind = device_type if device_type == "cuda" else "cpu-plumbing"
    return f"gpu-{kind}-{'quick-' if quick else ''}{date[:10]}"


def write(report: dict, out_dir: str) -> List[str]:
    return meta.write_report(out_dir, stem(report["device_type"], report["quick"], report["date"]), report,
                             markdown(report), indent=1)


def run_cli(args) -> int:
    """``gradguide bench --suite gpu`` (arguments from gradguide/cli.py)."""
    try:
        dev = _device(args.allow_cpu, args.device)   # refuse a GPU-less machine before anything else
        meta.claim_report(args.out, stem(dev.type, args.quick, meta.today()))
        report = run(device=args.device, quick=args.quick, allow_cpu=args.allow_cpu, reps=args.reps,
                     paper_workloads=args.workloads.split(",") if args.workloads else None,
                     progress=not getattr(args, "no_progress", False))
    except GPURequired as exc:
        raise SystemExit(f"gradguide bench --suite gpu: {exc}") from None
    status = meta.print_report(write(report, args.out), markdown(report))
    meta.warn_unstable("gradguide bench --suite gpu", report["unstable_rows"], report["timed_rows"])
    return status
