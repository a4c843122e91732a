"""``gradguide bench --suite gpu``: the GPU acceptance run, one command, one report.

On a machine with a CUDA device it runs, side by side in one process, and writes one JSON +
markdown report (``gpu-<device>-<date>.{json,md}``):

1. **bandwidth** — reduce + combine of every built-in policy vs ``dst.copy_(src)`` (the
   ops suite, ``gradguide/bench/ops.py``): GB/s and the fraction of the measured copy
   bandwidth, fp32 and fp16; next to it (**roofline**) the device's spec-sheet DRAM bandwidth
   and the SASS projection of the same kernels (``gradguide/bench/roofline.py``, read from the
   committed ``benchmarks/results/kernels-gates-*.json`` of a source checkout): measured GB/s
   over the spec-sheet bandwidth, and over the projected bound;
2. **graph** — CUDA-graph replay vs eager on the loop workloads: the same seed must give the
   same samples (max |Δ|, ``torch.allclose`` at the dtype's tolerance), and the speedup
   (median pass times, CUDA events);
3. **paper** — the papers' workloads (simulation pass, SD-1.5 + VAE + G_loss, ADM +
   classifier + PixelAsParam A) eager / fused / fused+graph / torch.compile
   (``gradguide/bench/loop.py``), with the ratio to the paper's 4.6 s per simulation pass;
4. **memory** — a profiled pass (``gradguide profile``'s machinery): per-phase peak of torch's
   allocator and of NVML's device-wide used memory, and the graph pool, next to the dry run's
   projected memory for the same workload;
5. **setup** — the ops one ``sample()`` call issues before its first step when an earlier call
   had the same configuration (``gradguide/bench/step_launches.py``'s ``count_setup``: a
   dispatch count, taken on the CPU, where the same call issues the same ops);
6. **peers** — the peers suite's rows (``gradguide/bench/peers.py``: gradguide against the
   plain diffusers DDIM loop and a model-only runner, unguided and CFG) on this device.

No GPU has been available to this project, so this suite has never produced GPU figures here:
without a CUDA device it refuses with :class:`GPURequired`. ``allow_cpu=True``
(``--allow-cpu``) runs the same plumbing on the CPU for tests; such a report says so in its
title and its numbers are not GPU measurements.
"""
from __future__ import annotations

import re
import statistics
import warnings
from typing import List, Optional

import torch

from gradguide.bench import meta
from gradguide.bench.loop import sync, timed_passes

GRAPH_WORKLOADS = ("loop-cfg", "loop-apg", "loop-cfg-pxpC", "loop-cls-pxpA", "loop-lookahead")
PAPER_WORKLOADS = ("sim-lookahead", "sd-cfg-lookahead", "adm64-cls-pxpA")
SECTIONS = ("bandwidth", "graph", "paper", "memory", "setup", "peers")
# the SASS roofline rows (gradguide check-kernels --json), where a source checkout has them
ROOFLINE_JSONS = ("kernels-gates-roofline.json", "kernels-gates-ci.json")


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


def gpu_spec(device_name: str) -> Optional[str]:
    """The :data:`gradguide.bench.roofline.GPUS` entry a CUDA device name is (``None``: not one of them)."""
    from .roofline import GPUS
    name = device_name.upper().replace("-", " ")
    # the longest name first: "L40S" before "L4"
    for gpu in sorted(GPUS, key=len, reverse=True):
        if re.search(r"(^|\W)" + re.escape(gpu.upper()) + r"($|\W)", name):
            return gpu
    return None


def _roofline_rows(results_dir: Optional[str] = None) -> list:
    """The compile gates' rows (``[]`` where no checkout's results are found, e.g. an installed package)."""
    import json
    from pathlib import Path
    folder = Path(results_dir) if results_dir else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    rows = []
    for name in ROOFLINE_JSONS:
        path = folder / name
        if path.is_file():
            rows += [r for r in json.loads(path.read_text())["rows"] if r.get("roofline")]
    return rows


def roofline(bandwidth: list, device_name: str, results_dir: Optional[str] = None) -> dict:
    """Each Triton row of the bandwidth section next to the device's roofline: the spec-sheet DRAM
    bandwidth (measured GB/s over it) and the SASS projection of the kernels the row launches
    (reduce, then combine or the policy's fused combine, at the row's dtype and K): the projected
    time of a pass is its memory-bound time times the kernel's projected ratio."""
    from .roofline import GPUS
    gpu = gpu_spec(device_name)
    out = {"device": device_name, "gpu": gpu, "spec_gb_per_s": GPUS[gpu]["bw"] if gpu else None, "rows": []}
    if gpu is None:
        out["note"] = f"{device_name!r} is none of the roofline's GPUs ({', '.join(GPUS)})"
        return out
    sass = _roofline_rows(results_dir)
    dtypes = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

    def projected(op: str, dtype: str, k: int, policy: Optional[str] = None) -> Optional[float]:
        rs = [r["roofline"][gpu]["ratio"] for r in sass if r["op"] == op and r["dtype"] == dtype and r["k"] == k
              and (policy is None or r.get("policy") == policy) and gpu in r["roofline"]]
        return max(rs) if rs else None
    for b in bandwidth:
        for r in b["rows"]:
            if r["backend"] != "triton":
                continue
            dt, k = dtypes.get(r["dtype"], r["dtype"]), r["k"]
            policy = bench_policy(r["workload"])
            # a policy without a Gram runs the fused combine alone; others reduce first
            ratios = [projected("fused", dt, k, policy) if policy else projected("combine", dt, k)]
            if policy is None or _needs_gram(policy):
                ratios.append(projected("reduce", dt, k))
            ratio = None if None in ratios else max(ratios)
            spec = GPUS[gpu]["bw"]
            out["rows"].append({"workload": r["workload"], "size": r["size"], "dtype": r["dtype"], "k": k,
                                "gb_per_s": r["gb_per_s"], "spec_fraction": r["gb_per_s"] / spec,
                                "projected_ratio": ratio,
                                "projected_fraction": None if ratio is None else r["gb_per_s"] * ratio / spec})
    if not sass:
        out["note"] = "no SASS roofline rows found (benchmarks/results/kernels-gates-*.json of a source checkout)"
    return out


def bench_policy(workload: str) -> Optional[str]:
    from gradguide.bench import ops as bench_ops
    return bench_ops.WORKLOADS.get(workload)


def _needs_gram(policy: str) -> bool:
    from gradguide.ops import policies
    return bool(policies.NEEDS_GRAM[policy])


def setup_ops() -> list:
    """Ops before the first step of a ``sample()`` call whose configuration an earlier call planned,
    per step_launches workload and backend "auto" (counted on the CPU)."""
    from gradguide.bench import step_launches
    return [{"workload": w.name, "setup_ops": len(ops_), "ops": ops_}
            for w in step_launches.WORKLOADS().values() for ops_ in [step_launches.count_setup(w)]]


def run(device: Optional[str] = None, quick: bool = False, allow_cpu: bool = False, reps: Optional[int] = None,
        graph_workloads=None, paper_workloads=None, memory_workload: str = "sim-lookahead",
        sections=SECTIONS, progress: bool = True, peers_models=None) -> dict:
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
    if "bandwidth" in sections:
        report["roofline"] = roofline(report["bandwidth"], report["device"])
    if "setup" in sections:
        report["setup"] = setup_ops()
    if "peers" in sections:
        from gradguide.bench import peers
        report["peers"] = peers.run(quick=quick, models=peers_models or (("cheap",) if quick else peers.MODELS),
                                    device=str(dev), progress=progress)
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
    if "peers" in report:
        parts.append((report["peers"]["unstable_rows"], report["peers"]["timed_rows"]))
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
    if "roofline" in report:
        r = report["roofline"]
        lines += ["", f"## Measured GB/s next to the roofline ({r['gpu'] or 'no roofline GPU'})", ""]
        if r.get("note"):
            lines.append(f"- {r['note']}")
        if r["rows"]:
            lines += [f"- spec-sheet DRAM bandwidth {r['spec_gb_per_s']} GB/s; projected ratio: the SASS roofline's "
                      "projected / memory-bound time of the row's kernels (a PROJECTION, docs/performance.md); "
                      "of projected bound: measured GB/s × ratio / spec", "",
                      "| workload | size | dtype | K | measured GB/s | of spec | projected ratio | of projected bound |",
                      "|---|---|---|---:|---:|---:|---:|---:|"]
            for x in r["rows"]:
                ratio = "-" if x["projected_ratio"] is None else f"{x['projected_ratio']:.2f}"
                frac = "-" if x["projected_fraction"] is None else f"{x['projected_fraction']:.2f}"
                lines.append(f"| {x['workload']} | {x['size']} | {x['dtype']} | {x['k']} | {x['gb_per_s']:.1f} | "
                             f"{x['spec_fraction']:.2f} | {ratio} | {frac} |")
    if "setup" in report:
        lines += ["", "## Setup ops per cached call (counted on the CPU)", "",
                  "| workload | ops before the first step | ops |", "|---|---:|---|"]
        lines += [f"| {x['workload']} | {x['setup_ops']} | {' '.join(x['ops'])} |" for x in report["setup"]]
    if "peers" in report:
        from gradguide.bench import peers
        lines += ["", "## Peers: the diffusers DDIM loop", "", peers.markdown(report["peers"])]
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
