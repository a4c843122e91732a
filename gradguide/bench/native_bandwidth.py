"""``gradguide bench --suite native-bandwidth``: the native CPU ops against this machine's copy
bandwidth (the goal: reduce + combine at ADM-256 at >= 70 % of copy bandwidth on 2 threads, and
>= 2x the eager reference at SD-latent B=1).

Each pass is timed interleaved with the copy baselines in one process (round-robin, so load
from other processes hits every row alike) and reported as wall-clock median and minimum and
as CPU-time median (``time.process_time``: all threads of the process, so it shows work, not
waiting). Bytes are the minimum a pass must move, counted as ``gradguide/bench/ops.py`` does:

- reduce: K operands read; combine: K read + 1 written; reduce+combine: (2K + 1) x the operand
  size (the step of ``gradguide bench --suite ops``: reduce, weights from the Gram, combine into
  a fresh output);
- reduce+fused_combine: reduce, then ``gradguide::fused_combine`` (policy ``pxp-a``: its
  coefficient program inside the combine), the fused step's own two calls: into a fresh output
  as ``sample()`` runs it (the headline), and into an existing one through ``fused_combine_out``;
  reduce+combine (existing out): the ops suite's step into an existing output. The existing-output
  rows are like with like against copy_ into an existing dst; the gap to the fresh rows is a
  fresh output's first-touch page faults (recycling the loop's outputs was tried and measured
  no faster for a whole loop, where the model's own fresh tensors dominate);
- copy_ (the denominator of "copy fraction", as in the ops suite): ``dst.copy_(src)`` into an
  existing ``dst``, 1 read + 1 write; clone: the same into a fresh tensor (first-touch page
  faults included, which a fresh op output pays too), shown for comparison.

copy fraction = (bytes / median time of the pass) / (2 x size / median time of copy_).

To compare two builds of the extension, run the suite from each checkout in turn on a quiet
machine and compare the copy fractions (they are ratios to the same machine's copy bandwidth).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

K = 4
SIZES = {"adm256-b64": ("ADM-256 B=64", (64, 3, 256, 256)), "sd-b1": ("SD latent B=1", (1, 4, 64, 64))}


def _isa() -> str:
    from gradguide import _C   # registers the ops (the suite measures the installed build)
    return _C.cpu_isa() if hasattr(_C, "cpu_isa") else "?"


def measure(label: str, shape, reps: int) -> dict:
    from gradguide.ops import reference
    g = torch.Generator().manual_seed(0)
    ops_ = [torch.randn(shape, generator=g) for _ in range(K)]
    b = shape[0]
    coef = torch.randn(b, 1, K, generator=g, dtype=torch.float64)
    size = ops_[0].numel() * ops_[0].element_size()
    src, dst, out, out2 = ops_[0], torch.empty_like(ops_[0]), torch.empty_like(ops_[0]), torch.empty_like(ops_[0])
    native = torch.ops.gradguide

    def step():  # bench_ops' "reduce+combine": weights that depend on the Gram
        gram, _ = native.reduce(ops_, 1)
        return native.combine(coef + 1e-3 * gram[..., 0], ops_, None, None)

    def step_existing():  # the same, into an existing output
        gram, _ = native.reduce(ops_, 1)
        native.combine_out(coef + 1e-3 * gram[..., 0], ops_, None, None, out)
        return out

    # the fused step's own call: policy pxp-a's program (Gram of den, cls) inside the combine
    vectors = [torch.tensor([[[0.9, 0.0, 0.0, 0.0]]], dtype=torch.float64),
               torch.tensor([[[0.0, -0.05, 0.0, 0.0]]], dtype=torch.float64),
               torch.tensor([[[0.0, 0.0, 0.02, 0.0]]], dtype=torch.float64),
               torch.tensor([[[0.0, 0.0, 0.0, 0.01]]], dtype=torch.float64)]
    delta = [torch.ones(1, dtype=torch.float64)]

    def fused(into=None):
        gram, _ = native.reduce(ops_[:3], 1)   # the Gram over den, cls, div (pxp-a reads den, cls)
        if into is None:
            return native.fused_combine("pxp-a", ops_, gram, vectors, delta, None, None)
        native.fused_combine_out("pxp-a", ops_, gram, vectors, delta, None, None, into)
        return into

    def eager():
        gram, _ = reference.reduce(ops_, 1)
        return reference.combine(coef + 1e-3 * gram[..., 0], ops_)

    rows = {"copy_ (existing dst)": (lambda: dst.copy_(src), 2 * size),
            "clone (fresh dst)": (lambda: src.clone(), 2 * size),
            "reduce": (lambda: native.reduce(ops_, 1), K * size),
            "combine (fresh out)": (lambda: native.combine(coef, ops_, None, None), (K + 1) * size),
            "combine_out (existing out)": (lambda: native.combine_out(coef, ops_, None, None, out), (K + 1) * size),
            "reduce+combine": (step, (2 * K + 1) * size),
            "reduce+combine (existing out)": (step_existing, (2 * K + 1) * size)}
    if hasattr(native, "fused_combine_out"):
        rows["reduce+fused_combine (fresh out)"] = (fused, (3 + K + 1) * size)
        rows["reduce+fused_combine (existing out)"] = (lambda: fused(out2), (3 + K + 1) * size)
        torch.testing.assert_close(fused(out2), fused(), rtol=0, atol=0)
    if size <= 1 << 22:  # the eager reference takes seconds at ADM-256: timed at small sizes only
        rows["reduce+combine eager reference"] = (eager, (2 * K + 1) * size)
    torch.testing.assert_close(step(), eager(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_existing(), step(), rtol=0, atol=0)
    wall = {k: [] for k in rows}
    cpu = {k: [] for k in rows}
    inner = max(1, int(2e7 // (2 * K + 1) // size))  # small sizes: several calls per sample
    for fn, _ in rows.values():
        fn()
    for _ in range(reps):
        for k, (fn, _) in rows.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[k].append((t1 - t0) * 1e3 / inner)
            cpu[k].append((c1 - c0) * 1e3 / inner)
    copy_ms = statistics.median(wall["copy_ (existing dst)"])
    copy_gbs = 2 * size / copy_ms / 1e6
    out_rows = []
    for k, (_, nbytes) in rows.items():
        ms = statistics.median(wall[k])
        out_rows.append({"pass": k, "bytes": nbytes, "median_ms": ms, "min_ms": min(wall[k]),
                         "cpu_ms": statistics.median(cpu[k]), "gb_per_s": nbytes / ms / 1e6,
                         "copy_fraction": nbytes / ms / 1e6 / copy_gbs})
    eager = wall.get("reduce+combine eager reference")
    frac = {r["pass"]: r["copy_fraction"] for r in out_rows}
    return {"size": label, "shape": list(shape), "copy_gb_per_s": copy_gbs, "rows": out_rows,
            "fused_step_copy_fraction": frac.get("reduce+fused_combine (fresh out)"),
            "fresh_copy_fraction": frac["reduce+combine"],
            "existing_out_copy_fraction": frac["reduce+combine (existing out)"],
            "speedup_vs_eager": statistics.median(eager) / statistics.median(wall["reduce+combine"]) if eager else None}


def table(result: dict) -> str:
    speed = result["speedup_vs_eager"]
    lines = [f"### {result['size']} {tuple(result['shape'])}, K = {K}, float32: copy_ {result['copy_gb_per_s']:.2f} GB/s"
             + (f"; reduce+combine {speed:.2f}x the eager reference" if speed else ""), "",
             ("" if result["fused_step_copy_fraction"] is None else
              f"Headline: the fused step's reduce + fused_combine into a fresh output, as sample() runs it, at "
              f"{result['fused_step_copy_fraction']:.2f} of copy bandwidth; ")
             + f"reduce + combine {result['fresh_copy_fraction']:.2f} (into an existing output, like with like "
             f"against copy_: {result['existing_out_copy_fraction']:.2f}).",
             "",
             "| pass | bytes | median ms | min ms | CPU ms | GB/s | copy fraction |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['pass']} | {r['bytes'] / 1e6:.1f} MB | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                     f"{r['cpu_ms']:.3f} | {r['gb_per_s']:.2f} | {r['copy_fraction']:.2f} |")
    return "\n".join(lines)


def run(sizes=None, reps: int = 9, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    isa = _isa()
    results = [measure(*SIZES[name], reps) for name in (sizes or list(SIZES))]
    return {"threads": threads, "isa": isa, "torch": torch.__version__, "load": os.getloadavg()[0],
            "results": results}


def markdown(res: dict, header: dict) -> str:
    lines = ["# Native CPU ops against copy bandwidth", ""] + [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- threads {res['threads']}, CPU kernels {res['isa']}, load average {res['load']:.1f}", ""]
    return "\n".join(lines) + "\n" + "\n\n".join(table(r) for r in res["results"]) + "\n"


def run_cli(args) -> int:
    from gradguide.ops import native_backend

    from . import meta
    sizes = args.sizes.split(",") if args.sizes else (["sd-b1"] if args.quick else list(SIZES))
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"gradguide bench: --sizes: unknown {unknown} for the native-bandwidth suite; "
                         f"expected some of {','.join(SIZES)}")
    reason = native_backend.status(torch.device("cpu"))
    if reason is not True:
        raise SystemExit(f"gradguide bench --suite native-bandwidth: {reason}")
    date = meta.today()
    stem = f"native-bandwidth-cpu-{date}" + ("-quick" if args.quick else "")
    meta.claim_report(args.out, stem)
    threads = args.threads or 2
    reps = args.reps or (2 if args.quick else 9)
    res = run(sizes, reps=reps, threads=threads)
    header = {"command": f"OMP_NUM_THREADS={threads} gradguide bench --suite native-bandwidth --threads {threads} "
                         f"--reps {reps} --sizes {','.join(sizes)}",
              "commit": meta.git_commit(), "date": meta.now(), "device": meta.device_name(torch.device("cpu"))}
    md = markdown(res, header)
    return meta.print_report(meta.write_report(args.out, stem, dict(res, **header), md), md)
