"""The reproduction runs of the gradient-guidance simulation (docs/reproduction.md), as a resumable queue.

Every run is one ``gradguide optimize`` (or ``gradguide train-sim``) process at ``nice`` with one
torch thread; ``--jobs`` of them run at a time (default 2: this project's machine has two shared
cores). Each run ``NAME`` writes ``OUT/NAME.json`` (the command's ``--json``), ``OUT/NAME.log``
(its stdout and stderr) and ``OUT/NAME.time.json`` (wall, user and system seconds, exit status).
A run whose ``.time.json`` says it finished with status 0 is skipped, so the queue can be
stopped and started again (an interrupted run restarts from round 0: ``optimize`` has no resume).

    python -m gradguide.bench.reproduce_runs --out /work/runs            # run everything pending
    python -m gradguide.bench.reproduce_runs --out /work/runs --list     # what is done / pending
    python -m gradguide.bench.reproduce_runs --out /work/runs --only 'roff_*'

Run it from a copy of the package that nobody edits (``git archive HEAD | tar -x -C DIR``), so
edits in a working tree cannot change a run half-way. ``gradguide.bench.reproduce_report``
turns the JSONs into tables and plots.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

SEEDS = (1234, 2345, 3456, 4567, 5678)
WIDE_WEIGHTS = "sim_h256_d4.safetensors"  # a 4.4x larger SmallScoreNet (hidden 256, depth 4), trained by a run


@dataclass
class Run:
    name: str
    args: List[str]                  # arguments after `python -m gradguide.cli`
    after: Optional[str] = None      # a run that must have finished first (e.g. the weights it loads)
    group: str = ""                  # for reports: which question the run answers
    tags: dict = field(default_factory=dict)


def _opt(name, objective, alg, guid, seed, *extra, group, after=None, **tags) -> Run:
    args = ["optimize", "--objective", objective, "--algorithm", str(alg), "--guidance", guid,
            "--seed", str(seed), "--threads", "1", "--no-progress", *extra]
    return Run(name, args, after=after, group=group,
               tags={"objective": objective, "algorithm": alg, "guidance": guid, "seed": seed, **tags})


def runs() -> List[Run]:
    """Every run, most decisive first (the queue starts them in this order)."""
    out: List[Run] = []
    # 1. Algorithm 2's r_off ratio: one change at a time against the baseline (seed 1234,
    #    f1/θ2, lr 1e-5, k_ft 40/60, per-round fine-tuning, the shipped network; logs already in
    #    docs/figures/full_alg2_*.json).
    for guid in ("G_loss", "G"):
        out.append(_opt(f"roff_lr1e-6_alg2_{guid}_1234", "f1-theta2", 2, guid, 1234, "--ft-lr", "1e-6",
                        group="roff", variant="lr 1e-6"))
    for guid in ("G_loss", "G"):
        out.append(_opt(f"roff_history_alg2_{guid}_1234", "f1-theta2", 2, guid, 1234, "--finetune", "history",
                        group="roff", variant="history"))
    # network size: a wider, deeper SmallScoreNet trained with the shipped recipe
    out.append(Run("train_h256_d4", ["train-sim", "--hidden", "256", "--depth", "4", "--no-progress",
                                     "--out", "{out}/" + WIDE_WEIGHTS], group="train"))
    for guid in ("G_loss", "G"):
        out.append(_opt(f"roff_h256_alg2_{guid}_1234", "f1-theta2", 2, guid, 1234,
                        "--weights", "{out}/" + WIDE_WEIGHTS, after="train_h256_d4", group="roff",
                        variant="hidden 256 depth 4"))
    # fine-tuning start: both at 40, both at 60 (the paper's code uses 40 for G and 60 for G_loss)
    out.append(_opt("roff_kft40_alg2_G_loss_1234", "f1-theta2", 2, "G_loss", 1234, "--k-ft", "40",
                    group="roff", variant="k_ft 40"))
    out.append(_opt("roff_kft60_alg2_G_1234", "f1-theta2", 2, "G", 1234, "--k-ft", "60",
                    group="roff", variant="k_ft 60"))
    # 2. f2 (cheap: 50 rounds) and the remaining f1/θ2 seeds. The paper's f2 and f1/θ1 results
    #    (its Figure 9, the authors' README) are Algorithm 1 with G_loss; G runs beside it for the
    #    r_off comparison. Algorithm 2 is not run for f2: its k_ft (40 / 60) is past f2's 50 rounds.
    for objective in ("f2-b1", "f2-b2"):
        for seed in SEEDS[:3]:
            for guid in ("G_loss", "G"):
                out.append(_opt(f"{objective}_alg1_{guid}_{seed}", objective, 1, guid, seed, group="objectives"))
    for seed in SEEDS[3:]:
        for guid in ("G_loss", "G"):
            out.append(_opt(f"f1-theta2_alg2_{guid}_{seed}", "f1-theta2", 2, guid, seed, group="seeds"))
    # 3. f1/θ1 (three seeds, Algorithm 1) and the remaining Algorithm 1 seeds of f1/θ2
    for guid in ("G_loss", "G"):
        for seed in SEEDS[:3]:
            out.append(_opt(f"f1-theta1_alg1_{guid}_{seed}", "f1-theta1", 1, guid, seed, group="objectives"))
    for seed in SEEDS[1:]:
        for guid in ("G_loss", "G"):
            out.append(_opt(f"f1-theta2_alg1_{guid}_{seed}", "f1-theta2", 1, guid, seed, group="seeds"))
    return out


def _done(out: str, name: str) -> bool:
    try:
        with open(os.path.join(out, name + ".time.json")) as f:
            return json.load(f).get("returncode") == 0
    except (OSError, ValueError):
        return False


def _command(run: Run, out: str) -> List[str]:
    args = [a.replace("{out}", out) for a in run.args]
    if args[0] == "optimize":
        args += ["--json", os.path.join(out, run.name + ".json")]
    return [sys.executable, "-m", "gradguide.cli", *args]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradguide.bench.reproduce_runs", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder for NAME.json / .log / .time.json")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--nice", type=int, default=10, help="nice level of each run (default 10)")
    p.add_argument("--only", nargs="+", default=None, help="shell patterns of run names to consider (default all)")
    p.add_argument("--list", action="store_true", help="print each run's state and command, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"reproduce_runs: --jobs must be positive, got {args.jobs}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    todo = [r for r in runs() if args.only is None or any(fnmatch.fnmatch(r.name, pat) for pat in args.only)]
    if args.list:
        for r in todo:
            state = "done" if _done(out, r.name) else "pending"
            print(f"{state:8s} {r.name:40s} {' '.join(_command(r, out)[2:])}")
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = [r for r in todo if not _done(out, r.name)]
    running = {}  # pid -> (run, start, log file)
    failed = set()
    print(f"reproduce_runs: {len(pending)} pending of {len(todo)}", flush=True)
    while pending or running:
        while len(running) < args.jobs:
            ready = [r for r in pending if r.after is None or _done(out, r.after)]
            ready = [r for r in ready if r.after not in failed]
            if not ready:
                break
            run = ready[0]
            pending.remove(run)
            log = open(os.path.join(out, run.name + ".log"), "w")
            cmd = ["nice", "-n", str(args.nice), *_command(run, out)]
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc.pid] = (run, time.time(), log, cmd)
            print(f"{time.strftime('%H:%M:%S')} start {run.name} (pid {proc.pid})", flush=True)
        if not running:  # what is left waits on a failed run
            for r in pending:
                print(f"skip {r.name}: {r.after} failed", flush=True)
            break
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        run, start, log, cmd = running.pop(pid)
        log.close()
        code = os.waitstatus_to_exitcode(status)
        record = {"name": run.name, "command": " ".join(cmd), "returncode": code, "wall_s": time.time() - start,
                  "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "group": run.group, **run.tags}
        with open(os.path.join(out, run.name + ".time.json"), "w") as f:
            json.dump(record, f, indent=1)
        if code != 0:
            failed.add(run.name)
        print(f"{time.strftime('%H:%M:%S')} {'done' if code == 0 else f'FAILED ({code})'} {run.name}: "
              f"wall {record['wall_s']:.0f} s, cpu {record['user_s'] + record['sys_s']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
