"""``gradguide profile``: peak memory per phase of a bench workload's sampling pass
(:mod:`gradguide.bench.profiling` measures it), a memory-over-time plot, an optional
torch.profiler trace, and without CUDA the GPU memory the fake-CUDA dry run projects."""
from __future__ import annotations

import json
import os

import torch

import gradguide

from .profiling import plot, profile_sampling


def add_arguments(p) -> None:
    p.add_argument("--workload", default="sim-lookahead",
                   help="a workload of the bench harness (gradguide/bench/loop.py): sim-lookahead (default), "
                        "sim-unguided, sd-cfg-lookahead, adm64-cls-pxpA, adm128-cls-pxpA, adm256-cls-pxpA, or a "
                        "loop-* workload")
    p.add_argument("--quick", action="store_true", help="the workload's tiny configuration (seconds on a CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--backend", default="auto", help="ops backend (default auto)")
    p.add_argument("--graph", action="store_true",
                   help="also profile a graph=True pass (CUDA: capture pool and replay peak; CPU: the eager fallback)")
    p.add_argument("--trace", default=None, help="write a torch.profiler chrome trace of one pass to this path")
    p.add_argument("--out", default="benchmarks/results", help="output folder for JSON + PNG (default benchmarks/results)")
    p.add_argument("--interval", type=float, default=0.005, help="polling interval in seconds (default 0.005)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's inputs and noise (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-projection", action="store_true",
                   help="without CUDA, skip the projected GPU memory from the fake-CUDA dry run (default: report it "
                        "next to RSS; it costs one dry-run step of the workload)")


def run_cli(args) -> int:
    if args.interval <= 0:
        raise SystemExit("gradguide profile: --interval must be positive")
    from . import loop as bench   # imported when the command runs: the parser is built for every command
    dev = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.workload not in bench.ALL_WORKLOADS:
        raise SystemExit(f"gradguide profile: --workload: expected one of {', '.join(bench.ALL_WORKLOADS)}, "
                         f"got {args.workload!r}")
    from ..tools import outputs
    stem = os.path.join(args.out, f"profile-{args.workload}-{dev.type}-{'quick-' if args.quick else ''}"
                                  f"{bench.meta.today()}")
    outputs.claim(stem + ".json", stem + ".png")   # refused before the run, not after
    if args.trace:
        outputs.claim(args.trace, option="--trace")
    workload = bench.build_workload(args.workload, quick=args.quick, device=dev, seed=args.seed)

    def make_run(wrap):
        kwargs = workload.sample_kwargs(wrap=wrap, seed=args.seed)
        kwargs["execution"] = gradguide.Execution(backend=args.backend)
        return kwargs

    result = profile_sampling(make_run, dev, graph=args.graph, trace=args.trace, interval=args.interval,
                              progress=not args.no_progress)
    common = bench.run_header(dev)
    result = dict(common, suite="profile", workload=args.workload, quick=args.quick, backend=args.backend,
                  config=workload.config, params=workload.params, **result)
    if dev.type != "cuda" and not getattr(args, "no_projection", False):
        result["projected_gpu"] = projected_gpu_memory(args.workload, args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"profile-{args.workload}-{dev.type}-{'quick-' if args.quick else ''}"
                                  f"{result['date'][:10]}")
    outputs.claim(stem + ".json", stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, stem + ".png", title=f"gradguide profile: {args.workload} on {result['device']}")
    print(stem + ".json")
    print(stem + ".png")
    if result["trace"]:
        print(result["trace"])
    print(summary_text(result))
    return 0


def projected_gpu_memory(workload: str, quick: bool) -> dict:
    """Without a CUDA device: the GPU memory the same workload would need, from the fake-CUDA
    dry run (:mod:`gradguide.bench.dryrun`; weights + peak live tensor bytes per phase + graph
    static buffers). A projection, labelled so; an error becomes the entry's ``error``."""
    try:
        from . import dryrun
        r = dryrun.run_workload(workload, quick=quick)
    except Exception as exc:   # the projection is an addition to the profile: never fail the profile for it
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    s = dryrun.summarize(r)
    return {"source": f"gradguide dryrun (fake {r['fake_device']} tensors, backend {r['backend']}; a projection)",
            "weight_bytes": s["weight_bytes"], "peak_live_bytes": s["peak_live_bytes"],
            "graph_static_bytes": s["graph_static_bytes"], "total_bytes": s["projected_memory_bytes"]}


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f}"


def summary_text(result: dict) -> str:
    lines = [f"{result.get('workload', '')} on {result.get('device', result['device_type'])}: one pass "
             f"{result['pass_s']:.3f} s; sources {', '.join(result['sources'])} (RSS via {result['rss_method']}; "
             f"NVML: {result['nvml']})",
             "| phase | calls | time s | peak CUDA allocated MiB | peak NVML used MiB | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for phase, row in result["phases"].items():
        lines.append(f"| {phase} | {row['count']} | {row['time_s']:.3f} | "
                     f"{_mib(row.get('peak_cuda_allocated_bytes'))} | {_mib(row.get('peak_nvml_bytes'))} | "
                     f"{_mib(row.get('peak_rss_bytes'))} |")
    proj = result.get("projected_gpu")
    if proj and "error" not in proj:
        lines.append(f"Projected GPU memory ({proj['source']}): weights {_mib(proj['weight_bytes'])} MiB + peak live "
                     + ", ".join(f"{p} {_mib(v)}" for p, v in proj["peak_live_bytes"].items())
                     + f" MiB + graph buffers {_mib(proj['graph_static_bytes'])} MiB = "
                       f"{_mib(proj['total_bytes'])} MiB (measured RSS above is this CPU process, not a GPU)")
    elif proj:
        lines.append(f"Projected GPU memory: unavailable ({proj['error']})")
    g = result.get("graph")
    if g:
        if g.get("captured"):
            lines.append(f"| graph pool (reserved by captures) | {g['captures']} | {g['capture_pass_s']:.3f} | "
                         f"{_mib(g['graph_pool_reserved_bytes'])} | - | - |")
            lines.append(f"| graph replay pass | {g['reuses']} | {g['replay_pass_s']:.3f} | "
                         f"{_mib(g['replay_pass_peak_cuda_allocated_bytes'])} | - | - |")
        else:
            lines.append(f"graph=True: not captured ({g['note']})")
    return "\n".join(lines)
