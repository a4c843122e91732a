"""A whole sampling loop on the native CPU backend, with and without recycled step outputs (issue 12).

The fused step writes x_(t-1) into the previous step's input when nothing else holds it
(``gradguide.graphs.EagerStepper``); ``EagerStepper.recycle = False`` allocates every output
fresh, as before. Both variants run the same loop, interleaved round by round in one process
(load from other processes hits both alike): DDIM, CFG 3.0 (both branches in one 2B model
call), a cheap model (a 1x1 channel mix, ``einsum``), ``x_T`` drawn by the loop. Reported per
step: wall-clock median and minimum, CPU-time median (all threads of the process), minor page
faults (``getrusage``; mostly the model's own fresh tensors: the native op advises a fresh output
to use 2 MiB pages, so the faults recycling removes are few but each zeroes 2 MiB), and the ratio
of the medians. Outputs are checked equal. Expect a gain only where a fresh output is mapped anew
(glibc: 32 MiB and more, e.g. ADM-256); below that freed heap memory comes back without faults.

    OMP_NUM_THREADS=2 python benchmarks/loop_recycling_issue12.py --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gradguide as gg  # noqa: E402
from gradguide import graphs  # noqa: E402

SIZES = {"ADM-like B=16": (16, 3, 256, 256), "ADM-256 B=64": (64, 3, 256, 256)}


class ChannelMix(torch.nn.Module):
    """ε = W x + 0.01 y per pixel (a 1x1 convolution as one einsum): a model that costs about two passes."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", 0.5 * torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g))

    def forward(self, x, t, y):
        return torch.einsum("bchw,dc->bdhw", x, self.w) + 0.01 * y.view(-1, 1, 1, 1)   # branches differ by y


def one_run(shape, steps, recycle):
    model = ChannelMix(shape[1])
    graphs.EagerStepper.recycle = recycle
    try:
        flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            x = gg.sample(model, shape, schedule=gg.Schedule.linear(1000), sampler="ddim", steps=steps,
                          guidance=[gg.CFG(3.0, uncond={"y": torch.zeros(shape[0])})], cond={"y": torch.ones(shape[0])}, backend="native",
                          generator=torch.Generator().manual_seed(1), check_finite=False)
        t1, c1 = time.perf_counter(), time.process_time()
        flt1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    finally:
        graphs.EagerStepper.recycle = True
    return x, (t1 - t0) * 1e3 / steps, (c1 - c0) * 1e3 / steps, (flt1 - flt0) / steps


def measure(label, shape, steps, rounds):
    ref, _, _, _ = one_run(shape, steps, False)
    got, _, _, _ = one_run(shape, steps, True)
    assert torch.equal(ref, got), "recycled outputs changed the samples"
    del ref, got
    rows = {True: [], False: []}
    for r in range(rounds):
        for recycle in ((True, False) if r % 2 else (False, True)):
            _, ms, cpu, faults = one_run(shape, steps, recycle)
            rows[recycle].append((ms, cpu, faults))
    out = {"size": label, "shape": list(shape), "steps": steps}
    for recycle, name in ((False, "fresh"), (True, "recycled")):
        ms, cpu, faults = zip(*rows[recycle])
        out[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "cpu_ms": statistics.median(cpu),
                     "minor_faults": statistics.median(faults), "all_ms": list(ms)}
    out["ratio_fresh_over_recycled"] = out["fresh"]["median_ms"] / out["recycled"]["median_ms"]
    out["cpu_ratio"] = out["fresh"]["cpu_ms"] / out["recycled"]["cpu_ms"]
    return out


def table(res) -> str:
    lines = [f"### {res['size']} {tuple(res['shape'])}, DDIM {res['steps']} steps, CFG (one 2B call), native: "
             f"per step, fresh / recycled = {res['ratio_fresh_over_recycled']:.2f}x wall, {res['cpu_ratio']:.2f}x CPU",
             "", "| step output | median ms | min ms | CPU ms | minor page faults |", "|---|---:|---:|---:|---:|"]
    for name in ("fresh", "recycled"):
        r = res[name]
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['cpu_ms']:.2f} | "
                     f"{r['minor_faults']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sizes", nargs="*", default=["ADM-like B=16"], choices=list(SIZES))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if gg.ops.available_backends("cpu")["native"] is not True:
        print("the native backend is not built here")
        return 1
    results = [measure(label, SIZES[label], args.steps, args.rounds) for label in args.sizes]
    res = {"threads": args.threads, "torch": torch.__version__, "load": os.getloadavg()[0], "results": results}
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(res) + "\n")
    print(f"threads {args.threads}, load average {res['load']:.1f}\n")
    for r in results:
        print(table(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
