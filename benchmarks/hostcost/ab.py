"""Before/after host cost of gradguide's step, two checkouts interleaved in one run.

usage: python benchmarks/hostcost/ab.py BEFORE_DIR AFTER_DIR [--rounds 6] [--reps 8] [--sizes sd-b1,sd-b8,px-b16]

Each round starts one worker process per checkout (``PYTHONPATH=DIR``, order flipped every
round); a worker runs the peers suite's cheap-model rows (gradguide/bench/peers.py: gradguide,
the diffusers loop and the model-only runner, interleaved, one thread) and prints every pass
time. Per row and checkout: the median per-step time of each runner over all rounds, the speed
ratio diffusers / gradguide, and after / before of gradguide's own time; in wall time and in
process CPU time (less sensitive to other processes on a shared machine). The two checkouts
must hold the same peers fixture (bench/peers.py); they differ in the library only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
import gradguide
assert gradguide.__file__.startswith(sys.argv[3]), (gradguide.__file__, sys.argv[3])
torch.set_num_threads(1)
from gradguide.bench.peers import Workload
sizes, reps = sys.argv[1].split(","), int(sys.argv[2])
out = {}
for size in sizes:
    for cfg in (False, True):
        w = Workload("cheap", size, cfg, False, 0)
        runners = {"gradguide": w.gradguide_runner(), "diffusers": w.diffusers_pass, "model only": w.model_only_pass}
        for f in runners.values():
            f(); f()
        times = {k: [] for k in runners}
        cpu = {k: [] for k in runners}
        order = list(runners)
        for r in range(reps):
            for k in (order if r % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                runners[k]()
                times[k].append((time.perf_counter() - t0) / w.steps)
                cpu[k].append((time.process_time() - c0) / w.steps)
        out[w.name] = {"wall": times, "cpu": cpu}
print(json.dumps(out))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--sizes", default="sd-b1,sd-b4,sd-b8,px-b16")
    args = p.parse_args(argv)
    dirs = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    times = {}
    for r in range(args.rounds):
        for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
            env = dict(os.environ, PYTHONPATH=dirs[version], OMP_NUM_THREADS="1")
            # cwd = the checkout: ``python -c`` puts the working directory first on sys.path
            res = subprocess.run([sys.executable, "-c", WORKER, args.sizes, str(args.reps), dirs[version]], env=env, cwd=dirs[version],
                                 capture_output=True, text=True, check=True)
            for row, clocks in json.loads(res.stdout.strip().splitlines()[-1]).items():
                for clock, by_runner in clocks.items():
                    for runner, ts in by_runner.items():
                        times.setdefault(clock, {}).setdefault(row, {}).setdefault(version, {}).setdefault(
                            runner, []).extend(ts)
    load = os.getloadavg()
    print(f"# gradguide host cost per step, before / after, interleaved ({args.rounds} rounds x {args.reps} passes "
          f"per runner; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load[0]:.1f})\n")
    print(f"before: {dirs['before']}\nafter: {dirs['after']}\n")
    for clock in ("wall", "cpu"):
        table(clock, times[clock])


def table(clock, times):
    print(f"\n{'Wall' if clock == 'wall' else 'Process CPU'} time per step (medians over all rounds):\n")
    print("| row | gradguide µs/step before | after | after / before | diffusers µs/step | model-only µs/step | "
          "speed ratio before | after | ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, v in times.items():
        med = {ver: {k: statistics.median(ts) * 1e6 for k, ts in by.items()} for ver, by in v.items()}
        # diffusers and model-only run the same code in both checkouts: pool them
        diff = statistics.median(v["before"]["diffusers"] + v["after"]["diffusers"]) * 1e6
        model = statistics.median(v["before"]["model only"] + v["after"]["model only"]) * 1e6
        gb, ga = med["before"]["gradguide"], med["after"]["gradguide"]
        rb = med["before"]["diffusers"] / gb
        ra = med["after"]["diffusers"] / ga
        print(f"| {row} | {gb:.1f} | {ga:.1f} | {ga / gb:.2f} | {diff:.1f} | {model:.1f} | {rb:.2f}x | {ra:.2f}x | "
              f"{diff / model:.2f}x |")


if __name__ == "__main__":
    main()
