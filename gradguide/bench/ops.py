"""The ``gradguide bench --suite ops`` harness: reduce + combine of a guided step, per policy.

For each built-in policy (plus the bare ``reduce + combine``) and each size, from a Stable
Diffusion latent batch (B = 1 and 8, 4x64x64) to an ADM-256 batch (B = 64, 3x256x256), it
times one step's two passes on every backend side by side in one run: the eager reference,
``torch.compile`` of the same reference function, the native ops and Triton (where each is
available), and writes JSON + a markdown table (docs/architecture.md#benchmarks-and-results).

Bytes moved are the minimum for the step: each operand read once per pass that needs it
(``reduce`` when the policy needs the Gram matrix, then ``combine``) and the output written
once. GB/s is that over the median time; "copy fraction" divides it by the bandwidth of
``dst.copy_(src)`` measured in the same run; "speedup" is the eager reference's median over
this backend's, same policy and size. CPU times are ``time.perf_counter`` medians; CUDA
times come from CUDA events (after a synchronize). On a shared CPU quote ratios, not times.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from gradguide import ops
from gradguide.bench import meta
from gradguide.ops import policies, reference

K = 4  # operands of a typical step: x_t, model output(s) / guidance gradient, noise

FULL_SIZES = [("SD latent B=1", (1, 4, 64, 64)), ("SD latent B=8", (8, 4, 64, 64)),
              ("ADM-256 B=64", (64, 3, 256, 256))]
QUICK_SIZES = [("tiny B=2", (2, 4, 16, 16)), ("small B=4", (4, 3, 32, 32))]

# workload -> the fused policy it runs (None: bare reduce + combine with given weights)
WORKLOADS = {"reduce+combine": None, "cfg": "cfg", "pxp-a": "pxp-a", "pxp-b": "pxp-b", "pxp-c": "pxp-c",
             "apg": "apg", "lookahead": "lookahead"}


def _params(policy: str, b: int, device, acc) -> Dict[str, object]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in policies.POLICIES[policy][0]:
        out[name] = torch.randn(b, 1, K, generator=g, dtype=acc).to(device)
    scalars = {"cfg": {"scale": 7.5}, "pxp-a": {"delta": 1.0}, "pxp-b": {"delta": 1.0},
               "pxp-c": {"scale": 4.0, "delta": 1.0, "delta2": 1.0, "post": 0.5},
               "apg": {"scale": 5.0, "eta": 0.0, "norm_threshold": 15.0, "post": 0.5},
               "lookahead": {"a": 0.7, "h": 0.51, "sigma": 0.1, "target": 1.0, "multiplier": 1.0, "beta": 0.0,
                             "beta_per_sample": 1.0, "post": 0.3}}[policy]
    for name, value in scalars.items():  # per-step scalars live on the device, as in a step
        out[name] = torch.full((b,), value, dtype=acc, device=device)
    return out


def _eager_bare(ops_, coef):
    gram, _ = reference.reduce(ops_, 1)
    return reference.combine(coef + 1e-3 * gram[..., 0], ops_)  # weights that depend on the Gram


def _eager_policy(policy, ops_, vectors, scalars):
    names_v, names_s = policies.POLICIES[policy]
    gram = reference.reduce(ops_, 1)[0] if policies.NEEDS_GRAM[policy] else None
    coef = policies.coefficients(policy, gram, dict(zip(names_v, vectors)),
                                 {n: s.reshape(-1, 1, 1) for n, s in zip(names_s, scalars)})
    return reference.combine(coef, ops_)


_COMPILED: Dict[str, Callable] = {}


def _compiled(workload: str) -> Callable:
    """One torch.compile per workload, dynamic shapes, so sizes do not each recompile."""
    if workload not in _COMPILED:
        # all policies share _eager_policy's code object, and dynamo's per-code cache would
        # otherwise hit its recompile limit and silently run the later policies eagerly
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        policy = WORKLOADS[workload]
        fn = _eager_bare if policy is None else (lambda o, v, s, _p=policy: _eager_policy(_p, o, v, s))
        _COMPILED[workload] = torch.compile(fn, dynamic=True)
    return _COMPILED[workload]


def _step_fn(workload: str, backend: str, operands, device) -> Callable[[], torch.Tensor]:
    """One step's passes for ``workload`` on ``backend`` (``"compile"``: torch.compile of the
    reference function)."""
    b = operands[0].shape[0]
    acc = reference.accumulation_dtype(operands[0].dtype)
    policy = WORKLOADS[workload]
    if policy is None:
        coef = torch.randn(b, 1, K, generator=torch.Generator().manual_seed(1), dtype=acc).to(device)
        if backend == "reference":
            return lambda: _eager_bare(operands, coef)
        if backend == "compile":
            fn = _compiled(workload)
            return lambda: fn(operands, coef)

        def run():
            gram, _ = ops.reduce(operands, 1, backend=backend)
            return ops.combine(coef + 1e-3 * gram[..., 0], operands, backend=backend)
        return run

    params = _params(policy, b, device, acc)
    vectors = [params[n] for n in policies.POLICIES[policy][0]]
    scalars = [params[n] for n in policies.POLICIES[policy][1]]
    if backend == "reference":
        return lambda: _eager_policy(policy, operands, vectors, scalars)
    if backend == "compile":
        fn = _compiled(workload)
        return lambda: fn(operands, vectors, scalars)
    return lambda: ops.fused_combine(policy, operands, backend=backend, **params)


# -- whole guided steps: general LinComb step, fused step, and torch.compile of the fused step --------

STEP_WORKLOADS = ("DDIM + CFG", "DDIM + APG", "DDPM + CFG + PxP-C")
STEP_SIZES = [("SD latent B=1", (1, 4, 64, 64)), ("SD latent B=8", (8, 4, 64, 64))]
STEP_QUICK_SIZES = [("tiny B=2", (2, 4, 16, 16))]


def _cheap_model(x, t, y=None):
    """A model that costs one elementwise pass, so the sampler's own cost shows."""
    return 0.5 * x + 0.1 if y is not None else 0.5 * x


def _step_callable(workload: str, shape, device, dtype, fused: bool):
    """One guided step of ``workload`` as a function of (x, idx, noise), and its inputs."""
    import gradguide as gg
    from gradguide import sampling
    cond = {"y": torch.zeros(shape[0], device=device)}
    sampler, terms, projection = {"DDIM + CFG": ("ddim", gg.CFG(7.5), None),
                                  "DDIM + APG": ("ddim", gg.APG(5.0), None),
                                  "DDPM + CFG + PxP-C": ("ddpm", gg.CFG(3.0), gg.PixelAsParam("C"))}[workload]
    run = sampling.prepare_run(_cheap_model, shape, schedule=gg.Schedule.linear(1000), sampler=sampler, steps=10,
                               guidance=terms, projection=projection, cond=cond,
                               execution=gg.Execution(device=device, dtype=dtype, fused=fused))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    state = sampling.initial_state(run, x)
    i = 2
    noise = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if run.tables.draws_noise[i] else None
    idx = run.step_ids[i:i + 1]
    return (lambda x, idx, noise: sampling.step(run, x, i, idx, state, noise, False)[0]), (x, idx, noise), run


def step_rows(quick: bool, device, dtype, reps: int, progress: bool = True) -> List[dict]:
    """Per-step medians of the general step (``Execution(fused=False)``), the fused step, and
    ``torch.compile(fused step, fullgraph=True)`` (the whole step, the native custom ops inside;
    the per-call setup cache), timed interleaved in one run; ratios against the general step."""
    rows = []
    sizes = STEP_QUICK_SIZES if quick else STEP_SIZES
    for label, shape in sizes:
        for workload in STEP_WORKLOADS:
            general, inputs, run_g = _step_callable(workload, shape, device, dtype, fused=False)
            fused, _, run_f = _step_callable(workload, shape, device, dtype, fused=True)
            t0 = time.perf_counter()
            compiled = torch.compile(fused, fullgraph=True)
            compiled(*inputs)
            compile_s = time.perf_counter() - t0
            ref = general(*inputs)
            err = max(float((compiled(*inputs) - ref).abs().max()), float((fused(*inputs) - ref).abs().max()))
            fns = {"general eager": general, "fused eager": fused, "fused compiled (fullgraph)": compiled}
            times = {k: [] for k in fns}
            for _ in range(max(reps, 5)):   # interleaved: the machine's load hits every variant alike
                for k, fn in fns.items():
                    times[k].append(_time(lambda: fn(*inputs), device, 3, 1))
            base = statistics.median(times["general eager"])
            base_spread = meta.spread(times["general eager"])
            for k, ts in times.items():
                ms = statistics.median(ts)
                spread = meta.spread(ts)
                rows.append({"workload": workload, "size": label, "shape": list(shape), "variant": k,
                             "backend": run_f.backend, "median_ms": ms, "speedup_vs_general": base / ms,
                             "max_abs_diff_vs_general": err, "compile_s": compile_s if "compiled" in k else None,
                             "times_ms": ts, "spread": spread, "unstable": meta.unstable(spread, base_spread)})
    return rows


def step_markdown(rows: List[dict]) -> str:
    lines = ["", "## Whole guided step (cheap model): general vs fused vs torch.compile(fullgraph=True)", "",
             "| workload | size | variant | backend | median ms | speedup vs general step | max abs diff | spread |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['size']} | {r['variant']} | {r['backend']} | {r['median_ms']:.3f} | "
                     f"{r['speedup_vs_general']:.2f}x | {r['max_abs_diff_vs_general']:.1e} | {meta.spread_cell(r)} |")
    return "\n".join(lines) + "\n"


def _time(fn: Callable[[], object], device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn``."""
    return statistics.median(_times(fn, device, reps, warmup))


def _times(fn: Callable[[], object], device, reps: int, warmup: int) -> List[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(quick: bool = False, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
        backends: Optional[List[str]] = None, workloads: Optional[List[str]] = None, reps: Optional[int] = None,
        compile_reference: bool = True, progress: bool = True, steps: bool = True) -> dict:
    """Run the suite; returns the result dict (see :func:`write` for the files). ``steps``: also
    time whole guided steps (:func:`step_rows`: general, fused, compiled fused)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = QUICK_SIZES if quick else FULL_SIZES
    reps = reps or (3 if quick else 5)
    have = ops.available_backends(dev)
    wanted = backends or ["reference", "compile", "native", "triton"]
    if not compile_reference and "compile" in wanted:
        wanted.remove("compile")
    chosen, skipped = [], {}
    for b in wanted:
        if b in ("reference", "compile"):
            chosen.append(b)
        elif have.get(b) is True and not (b == "triton" and dev.type == "cpu"):
            chosen.append(b)  # interpreted Triton on CPU measures the interpreter, not a kernel
        else:
            skipped[b] = have.get(b) if have.get(b) is not True else "the Triton interpreter is not a benchmark"
    workloads = workloads or list(WORKLOADS)
    largest = max(sizes, key=lambda s: torch.Size(s[1]).numel())[1]
    src = torch.randn(largest, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = _time(lambda: dst.copy_(src), dev, max(reps, 5), 2)
    copy_gbs = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    del src, dst

    rows = []
    jobs = [(w, label, shape) for label, shape in sizes for w in workloads]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs) * len(chosen), desc="bench ops", unit="row", disable=None)  # None: off on a non-terminal
    for label, shape in sizes:
        g = torch.Generator().manual_seed(0)
        operands = [torch.randn(shape, generator=g).to(device=dev, dtype=dtype) for _ in range(K)]
        numel = operands[0].numel() * operands[0].element_size()
        for workload in workloads:
            policy = WORKLOADS[workload]
            passes = (2 * K + 1) if (policy is None or policies.NEEDS_GRAM[policy]) else (K + 1)
            nbytes = passes * numel
            eager_ms = eager_spread = None
            for backend in chosen:
                t_compile = None
                fn = _step_fn(workload, backend, operands, dev)
                if backend == "compile":
                    t0 = time.perf_counter()
                    fn()
                    t_compile = time.perf_counter() - t0
                times = _times(fn, dev, reps, 1)
                ms, spread = statistics.median(times), meta.spread(times)
                if backend == "reference":
                    eager_ms, eager_spread = ms, spread
                gbs = nbytes / ms / 1e6
                rows.append({"workload": workload, "size": label, "backend": backend, "shape": list(shape),
                             "dtype": str(dtype).replace("torch.", ""), "k": K, "median_ms": ms,
                             "bytes_moved": nbytes, "gb_per_s": gbs, "copy_fraction": gbs / copy_gbs,
                             "speedup_vs_eager": (eager_ms / ms) if eager_ms else None,
                             "compile_s": t_compile, "times_ms": times, "spread": spread,
                             # a ratio is as noisy as the noisier of its two timings
                             "unstable": meta.unstable(spread, eager_spread if eager_ms else None)})
                if bar is not None:
                    bar.update(1)
        del operands
    if bar is not None:
        bar.close()
    srows = step_rows(quick, dev, dtype, reps) if steps and dev.type == "cpu" else []
    return {"suite": "ops", "quick": quick, "step_rows": srows, "spread_limit": meta.SPREAD_LIMIT,
            "unstable_rows": meta.count_unstable(rows + srows), "timed_rows": len(rows) + len(srows),
            "date": meta.now(), "commit": meta.git_commit(), "device": meta.device_name(dev), "device_type": dev.type,
            "threads": torch.get_num_threads(), "versions": meta.versions("torch", "cuda", "triton"), "dtype": str(dtype).replace("torch.", ""),
            "copy_bandwidth_gb_per_s": copy_gbs, "backends": chosen, "skipped_backends": skipped,
            "timer": "CUDA events" if dev.type == "cuda" else "time.perf_counter", "reps": reps, "rows": rows}


def markdown(result: dict, note: str = "") -> str:
    lines = [f"# gradguide bench --suite ops ({'quick' if result['quick'] else 'full'})", "",
             f"- device: {result['device']}; torch {result['versions']['torch']}, triton "
             f"{result['versions']['triton']}, CUDA {result['versions']['cuda']}",
             f"- commit {result['commit']}, {result['date']}, dtype {result['dtype']}, K = {K} operands, "
             f"median of {result['reps']} ({result['timer']})",
             f"- measured copy bandwidth (`dst.copy_(src)`): {result['copy_bandwidth_gb_per_s']:.1f} GB/s",
             f"- {meta.spread_note(result.get('spread_limit', meta.SPREAD_LIMIT))}"]
    for b, why in result["skipped_backends"].items():
        lines.append(f"- backend `{b}` not run: {why}")
    if note:
        lines.append(f"- {note}")
    lines += ["", "| workload | size | backend | median ms | bytes moved | GB/s | copy fraction | speedup vs eager | "
                  "spread |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        lines.append(f"| {r['workload']} | {r['size']} | {r['backend']} | {r['median_ms']:.3f} | "
                     f"{r['bytes_moved'] / 1e6:.1f} MB | {r['gb_per_s']:.2f} | {r['copy_fraction']:.2f} | {speed} | "
                     f"{meta.spread_cell(r)} |")
    return "\n".join(lines) + "\n" + (step_markdown(result["step_rows"]) if result.get("step_rows") else "")


def stem(suite: str, device_type: str, quick: bool, date: str) -> str:
    """``<suite>-<device>-[quick-]<date>``: the name of a suite's result files."""
    return f"{suite}-{device_type}-{'quick-' if quick else ''}{date[:10]}"


def write(result: dict, out_dir: str, note: str = "", render=None) -> List[str]:
    """Write ``<suite>-<device>-[quick-]<date>.json`` and ``.md`` (``render``: the suite's markdown)."""
    name = stem(result["suite"], result["device_type"], result["quick"], result["date"])
    return meta.write_report(out_dir, name, dict(result, note=note), (render or markdown)(result, note))
