"""Tables and plots of the gradient-guidance simulation runs (docs/optimization.md, docs/reproduction.md).

Reads every ``gradguide optimize --json`` file it is given (folders are searched for ``*.json``),
classifies each run by its settings (objective, algorithm, guidance, seed and what differs from
the paper's settings: the *variant*), and writes one markdown file of tables plus the figures:

    python -m gradguide.bench.reproduce_report                       # docs/figures/{full_*,seeds/}
    python -m gradguide.bench.reproduce_report --collect /work/runs  # first copy finished queue runs in

``--collect DIR`` copies each run the queue (:mod:`gradguide.bench.reproduce_runs`) finished in
``DIR`` into ``docs/figures/seeds/NAME.json``, with its wall and CPU time (``timing``) added.
Runs still in progress (partial JSONs) are left out of the tables and listed as pending.

Statistics: mean ± sample standard deviation (ddof 1) over seeds. ``r_off`` of one round is a
mean over 32 samples and jumps from round to round, so besides the final round the tables give
the mean over the last 50 rounds ("last 50"), and ratio curves use 51-round windows.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import sys
from typing import Dict, List, Optional

PAPER_LR = 1e-5        # our full-setting fine-tuning lr (docs/optimization.md); the paper's is 1e-6
WINDOW = 25            # ratio curves: mean over rounds k-25..k+25
RATIO_ROUNDS = (100, 300, 500, 600, 800, 1000, 1175)
DEFAULT_INPUTS = ("docs/figures/full_alg1_G.json", "docs/figures/full_alg1_G_loss.json",
                  "docs/figures/full_alg2_G.json", "docs/figures/full_alg2_G_loss.json", "docs/figures/seeds")


def _paper():
    from gradguide.experiments.optimize import PAPER_DELTA, PAPER_KFT, PAPER_ROUNDS
    return PAPER_DELTA, PAPER_KFT, PAPER_ROUNDS


def variant_of(run: dict) -> str:
    """What differs from the paper's settings (our fine-tuning lr 1e-5 counts as the baseline)."""
    delta, kft, rounds = _paper()
    s, out = run.get("settings", {}), []
    alg, guid, obj = run["algorithm"], run["guidance"], run["objective"]
    if alg == 2:
        if not math.isclose(s.get("ft_lr", PAPER_LR), PAPER_LR):
            out.append(f"ft-lr {s['ft_lr']:g}")
        if s.get("finetune", "per-round") != "per-round":
            out.append(f"finetune {s['finetune']} (history {s.get('history')}, decay {s.get('history_decay')})")
        if s.get("k_ft", kft[guid]) != kft[guid]:
            out.append(f"k_ft {s['k_ft']}")
        if s.get("ft_rounds") is not None:
            out.append(f"fine-tuning stops at round {s.get('k_ft', kft[guid]) + s['ft_rounds']}")
        if s.get("ft_steps", 1) != 1:
            out.append(f"ft-steps {s['ft_steps']}")
    if run.get("weights"):
        out.append("net " + os.path.splitext(os.path.basename(run["weights"]))[0])
    if run.get("model", "small") != "small":
        out.append(f"model {run['model']}")
    for key, default in (("steps", None), ("query", "per-sample"), ("batch_size", 32), ("sampler", "ddpm")):
        if s.get(key, default) != default:
            out.append(f"{key} {s[key]}")
    if run.get("rounds") != rounds[obj][alg - 1]:
        out.append(f"rounds {run.get('rounds')}")
    if not math.isclose(s.get("delta", delta[(obj, guid)]), delta[(obj, guid)]):
        out.append(f"delta {s['delta']}")
    if run.get("sim_seed", 0) != 0:
        out.append(f"sim-seed {run['sim_seed']}")
    return ", ".join(out) or "paper"


def load_runs(paths) -> (List[dict], List[dict]):
    """(finished runs, partial runs), each a dict with the run's JSON plus ``variant`` and ``file``."""
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    done, partial, seen = [], [], set()
    for f in files:
        if f.endswith(".time.json"):
            continue
        try:
            with open(f) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        for run in data.get("runs", []) if isinstance(data, dict) else []:
            if "log" not in run or "guidance" not in run:
                continue
            run = dict(run, file=f, timing=data.get("timing"))
            run["variant"] = variant_of(run)
            key = (run["objective"], run["algorithm"], run["guidance"], run["seed"], run["variant"])
            finished = not run.get("partial") and run["log"][-1]["round"] == run["rounds"]
            if not finished:
                partial.append(run)
            elif key not in seen:
                seen.add(key)
                done.append(run)
    return done, partial


# -- per-run numbers --------------------------------------------------------------------------

def last_mean(run, field="r_off_mean", n=50) -> float:
    vals = [r[field] for r in run["log"][-n:]]
    return sum(vals) / len(vals)


def window_mean(run, k, field="r_off_mean", w=WINDOW) -> Optional[float]:
    vals = [r[field] for r in run["log"] if abs(r["round"] - k) <= w]
    return sum(vals) / len(vals) if vals else None


def cpu_s(run) -> Optional[float]:
    t = run.get("timing")
    return None if not t else t.get("user_s", 0) + t.get("sys_s", 0)


def _ms(values, digits=3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _time(run) -> str:
    wall, cpu = run.get("wall_s"), cpu_s(run)
    return f"{wall:.0f}" + (f" / {cpu:.0f}" if cpu is not None else "") if wall is not None else "–"


def index(runs):
    return {(r["objective"], r["algorithm"], r["guidance"], r["seed"], r["variant"]): r for r in runs}


# -- tables -----------------------------------------------------------------------------------

def table_seeds(runs, objective="f1-theta2") -> List[str]:
    """Paper settings, G vs G_loss per seed, both algorithms."""
    idx, lines = index(runs), []
    for alg in (1, 2):
        seeds = sorted({r["seed"] for r in runs if r["objective"] == objective and r["algorithm"] == alg
                        and r["variant"] == "paper"})
        if not seeds:
            continue
        lines += [f"**{objective}, Algorithm {alg}** (paper settings; final round, and r_off's mean over the last 50 "
                  "rounds)", "",
                  "| seed | G reward | G r_off (final / last 50) | G_loss reward | G_loss r_off (final / last 50) "
                  "| ratio G_loss/G (final / last 50) | wall / CPU s (G; G_loss) |",
                  "|---|---|---|---|---|---|---|"]
        cols = {k: [] for k in ("gr", "go", "go50", "lr", "lo", "lo50", "ratio", "ratio50")}
        for seed in seeds:
            g, gl = idx.get((objective, alg, "G", seed, "paper")), idx.get((objective, alg, "G_loss", seed, "paper"))
            row = [str(seed)]
            for run, kr, ko, ko50 in ((g, "gr", "go", "go50"), (gl, "lr", "lo", "lo50")):
                if run is None:
                    row += ["pending", "pending"]
                    continue
                fo, o50 = run["log"][-1]["r_off_mean"], last_mean(run)
                cols[kr].append(run["log"][-1]["reward_mean"])
                cols[ko].append(fo)
                cols[ko50].append(o50)
                row += [_f(run["log"][-1]["reward_mean"], 2), f"{fo:.3f} / {o50:.3f}"]
            if g and gl:
                ratio = gl["log"][-1]["r_off_mean"] / g["log"][-1]["r_off_mean"]
                ratio50 = last_mean(gl) / last_mean(g)
                cols["ratio"].append(ratio)
                cols["ratio50"].append(ratio50)
                row.append(f"{ratio:.2f} / {ratio50:.2f}")
            else:
                row.append("–")
            row.append(f"{_time(g) if g else '–'}; {_time(gl) if gl else '–'}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append(f"| mean ± std (n = {len(cols['ratio'])} pairs) | {_ms(cols['gr'], 2)} | {_ms(cols['go'])} / "
                     f"{_ms(cols['go50'])} | {_ms(cols['lr'], 2)} | {_ms(cols['lo'])} / {_ms(cols['lo50'])} | "
                     f"{_ms(cols['ratio'], 2)} / {_ms(cols['ratio50'], 2)} | |")
        lines.append("")
    return lines


def table_ratio_curve(runs, objective="f1-theta2") -> List[str]:
    """Algorithm 2's ratio along the run (51-round window means), per seed: where it passes 1/3."""
    idx = index(runs)
    seeds = sorted({r["seed"] for r in runs if r["objective"] == objective and r["algorithm"] == 2
                    and r["variant"] == "paper"})
    lines = ["**Algorithm 2, r_off ratio G_loss / G along the run** (means over rounds k ± 25; paper settings)", "",
             "| seed | " + " | ".join(f"k = {k}" for k in RATIO_ROUNDS) + " |",
             "|---|" + "---|" * len(RATIO_ROUNDS)]
    per_k = {k: [] for k in RATIO_ROUNDS}
    for seed in seeds:
        g, gl = idx.get((objective, 2, "G", seed, "paper")), idx.get((objective, 2, "G_loss", seed, "paper"))
        if not (g and gl):
            continue
        row = [str(seed)]
        for k in RATIO_ROUNDS:
            a, b = window_mean(g, k), window_mean(gl, k)
            r = b / a if a and b is not None else None
            if r is not None:
                per_k[k].append(r)
            row.append(_f(r, 2))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| mean ± std | " + " | ".join(_ms(per_k[k], 2) for k in RATIO_ROUNDS) + " |")
    lines += ["", "G's reward (mean over seeds, same windows): " + ", ".join(
        f"k={k}: {_ms([window_mean(idx[(objective, 2, 'G', s, 'paper')], k, 'reward_mean') for s in seeds if (objective, 2, 'G', s, 'paper') in idx], 2)}"
        for k in RATIO_ROUNDS), ""]
    return lines


def hypothesis_pairs(runs, objective="f1-theta2", seed=1234):
    """(label, G run, G_loss run) for the baseline and every Algorithm 2 variant at ``seed``; a variant
    run on one guidance only is paired with the other guidance's baseline run."""
    idx = index(runs)
    variants = sorted({r["variant"] for r in runs if r["objective"] == objective and r["algorithm"] == 2
                       and r["seed"] == seed})
    pairs = []
    for v in ["paper"] + [v for v in variants if v != "paper"]:
        g, gl = idx.get((objective, 2, "G", seed, v)), idx.get((objective, 2, "G_loss", seed, v))
        label = "baseline (lr 1e-5, per-round, k_ft 40/60, shipped net)" if v == "paper" else v
        # k_ft variants change one guidance by design (the paper's k_ft differs: 40 for G, 60 for
        # G_loss): pair them with the other guidance's baseline; other one-sided variants are pending
        if v.startswith("k_ft") and g is None and gl is not None:
            g = idx.get((objective, 2, "G", seed, "paper"))
            label = f"G_loss {v}, G baseline (k_ft 40): both {v}"
        elif v.startswith("k_ft") and gl is None and g is not None:
            gl = idx.get((objective, 2, "G_loss", seed, "paper"))
            label = f"G {v}, G_loss baseline (k_ft 60): both {v}"
        if g is not None or gl is not None:
            pairs.append((label, g, gl))
    return pairs


def table_hypotheses(runs, objective="f1-theta2", seed=1234) -> List[str]:
    lines = [f"**Algorithm 2 r_off hypotheses** ({objective}, seed {seed}; one change at a time; ratio = G_loss / G "
             "r_off; window means over rounds k ± 25)", "",
             "| setting | G reward | G r_off last 50 | G_loss reward | G_loss r_off last 50 | ratio final / last 50 "
             "| ratio at k = 300 / 600 / 900 | wall / CPU s (G; G_loss) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, g, gl in hypothesis_pairs(runs, objective, seed):
        row = [label]
        for run in (g, gl):
            row += ["pending", "pending"] if run is None else [_f(run["log"][-1]["reward_mean"], 2),
                                                               _f(last_mean(run))]
        if g and gl:
            row.append(f"{gl['log'][-1]['r_off_mean'] / g['log'][-1]['r_off_mean']:.2f} / "
                       f"{last_mean(gl) / last_mean(g):.2f}")
            mids = []
            for k in (300, 600, 900):
                a, b = window_mean(g, k), window_mean(gl, k)
                mids.append(_f(b / a if a and b is not None else None, 2))
            row.append(" / ".join(mids))
        else:
            row += ["–", "–"]
        row.append(f"{_time(g) if g else '–'}; {_time(gl) if gl else '–'}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def table_objectives(runs) -> List[str]:
    """Every objective × algorithm × guidance at the paper's settings: mean ± std over seeds."""
    from gradguide.experiments.simulation import Simulation
    lines = ["**All objectives, paper settings** (final round; mean ± std over seeds)", "",
             "| objective | optimum | algorithm | guidance | seeds | final reward | final top-4 | r_off final "
             "| r_off last 50 | wall s per run (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    sim = Simulation(0)
    groups: Dict[tuple, list] = {}
    for r in runs:
        if r["variant"] == "paper":
            groups.setdefault((r["objective"], r["algorithm"], r["guidance"]), []).append(r)
    for (obj, alg, guid), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        walls = [r["wall_s"] for r in rs if r.get("wall_s") is not None]
        lines.append(f"| {obj} | {sim.objective(obj).optimum:g} | {alg} | {guid} | {', '.join(str(r['seed']) for r in rs)} "
                     f"| {_ms([r['log'][-1]['reward_mean'] for r in rs], 2)} "
                     f"| {_ms([r['log'][-1]['reward_top4'] for r in rs], 2)} "
                     f"| {_ms([r['log'][-1]['r_off_mean'] for r in rs])} | {_ms([last_mean(r) for r in rs])} "
                     f"| {statistics.mean(walls):.0f} |" if walls else "| – |")
    lines.append("")
    return lines


def table_costs(runs, extra_records=()) -> List[str]:
    """Every queue run with its command and what it cost (the timing ``--collect`` merged in;
    ``extra_records``: timing records of runs without a run JSON, e.g. training)."""
    timed = [r for r in runs if r.get("timing")] + [{"timing": t} for t in extra_records]
    timed.sort(key=lambda r: r["timing"].get("finished", ""))
    if not timed:
        return []
    lines = ["**Queue runs: command and cost** (wall / CPU seconds of the one process, `nice` 10 or 19, one torch "
             "thread, on the shared 2-core machine)", "",
             "| finished | run | command | wall s | CPU s |", "|---|---|---|---|---|"]
    for r in timed:
        t = r["timing"]
        cmd = t.get("command", "").split("gradguide.cli ", 1)[-1].split(" --json ")[0].strip()
        lines.append(f"| {t.get('finished', '–')} | {t.get('name', '–')} | `gradguide {cmd}` | {t['wall_s']:.0f} "
                     f"| {cpu_s(r):.0f} |")
    lines.append("")
    return lines


# -- plots ------------------------------------------------------------------------------------

def _ratio_curve(g, gl, step=10):
    ks = list(range(WINDOW, min(g["rounds"], gl["rounds"]) - WINDOW + 1, step))
    return ks, [window_mean(gl, k) / window_mean(g, k) for k in ks]


def plot_ratio(runs, out, objective="f1-theta2") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = index(runs)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
    seeds = sorted({r["seed"] for r in runs if r["objective"] == objective and r["algorithm"] == 2
                    and r["variant"] == "paper"})
    for seed in seeds:
        g, gl = idx.get((objective, 2, "G", seed, "paper")), idx.get((objective, 2, "G_loss", seed, "paper"))
        if g and gl:
            ks, ratio = _ratio_curve(g, gl)
            axes[0].plot(ks, ratio, lw=1, label=f"seed {seed}")
    axes[0].set_title("baseline, per seed", fontsize=9)
    for label, g, gl in hypothesis_pairs(runs, objective):
        if g and gl:
            ks, ratio = _ratio_curve(g, gl)
            line, = axes[1].plot(ks, ratio, lw=1, label=label[:48])
            axes[3].plot([window_mean(g, k, "reward_mean") for k in ks], ratio, lw=0.8, color=line.get_color())
            axes[2].plot([r["round"] for r in gl["log"]], [r["reward_mean"] for r in gl["log"]], lw=0.8,
                         color=line.get_color())
            axes[2].plot([r["round"] for r in g["log"]], [r["reward_mean"] for r in g["log"]], lw=0.8, ls=":",
                         color=line.get_color())
    axes[1].set_title("seed 1234, one change at a time", fontsize=9)
    for ax in axes[:2]:
        ax.axhline(1 / 3, color="k", lw=0.8, ls="--", label="1/3")
        ax.set_xlabel("round")
        ax.set_ylabel("r_off ratio G_loss / G (51-round means)")
        ax.legend(fontsize=6)
    axes[2].axhline(10, color="k", lw=0.8, ls="--")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("mean reward (solid G_loss, dotted G)")
    axes[2].set_title("reward, same settings as the middle panel", fontsize=9)
    axes[3].axhline(1 / 3, color="k", lw=0.8, ls="--")
    axes[3].set_xlabel("G's mean reward (51-round means)")
    axes[3].set_ylabel("r_off ratio G_loss / G")
    axes[3].set_title("ratio against G's progress (middle panel's runs)", fontsize=9)
    fig.suptitle(f"{objective}, Algorithm 2: r_off of G_loss relative to G", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_seeds(runs, out, objective="f1-theta2") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {(1, "G"): "tab:blue", (1, "G_loss"): "tab:orange", (2, "G"): "tab:green", (2, "G_loss"): "tab:red"}
    labelled = set()
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["objective"] != objective or r["variant"] != "paper":
            continue
        key = (r["algorithm"], r["guidance"])
        label = None if key in labelled else f"Alg.{key[0]} {key[1]}"
        labelled.add(key)
        rounds = [e["round"] for e in r["log"]]
        axes[0].plot(rounds, [e["reward_mean"] for e in r["log"]], lw=0.7, color=colors[key], label=label)
        axes[1].semilogy(rounds, [max(e["r_off_mean"], 1e-9) for e in r["log"]], lw=0.7, color=colors[key])
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("mean reward (one line per seed)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean r_off")
    fig.suptitle(f"{objective}, paper settings, every seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- collect and main -------------------------------------------------------------------------

def collect(src: str, dest: str) -> List[str]:
    """Copy the queue's finished runs from ``src`` into ``dest`` (timing merged in); returns the names."""
    os.makedirs(dest, exist_ok=True)
    copied = []
    for tpath in sorted(glob.glob(os.path.join(src, "*.time.json"))):
        name = os.path.basename(tpath)[:-len(".time.json")]
        with open(tpath) as f:
            timing = json.load(f)
        run_json = os.path.join(src, name + ".json")
        if timing.get("returncode") != 0:
            continue
        if not os.path.exists(run_json):  # e.g. a training run: keep its record only
            shutil.copyfile(tpath, os.path.join(dest, name + ".time.json"))
            continue
        with open(run_json) as f:
            data = json.load(f)
        data["timing"] = timing
        with open(os.path.join(dest, name + ".json"), "w") as f:
            json.dump(data, f, separators=(",", ":"))
        copied.append(name)
    return copied


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradguide.bench.reproduce_report", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", default=list(DEFAULT_INPUTS),
                   help="run JSONs or folders of them (default: docs/figures/full_*.json and docs/figures/seeds)")
    p.add_argument("--collect", default=None, help="first copy finished queue runs from this folder into --seeds-dir")
    p.add_argument("--seeds-dir", default="docs/figures/seeds", help="where --collect copies to (default %(default)s)")
    p.add_argument("--md", default="docs/figures/reproduction_tables.md", help="markdown tables (default %(default)s)")
    p.add_argument("--figures", default="docs/figures", help="folder for the PNGs (default %(default)s)")
    args = p.parse_args(argv)
    if args.collect:
        names = collect(args.collect, args.seeds_dir)
        print(f"collected {len(names)} finished runs into {args.seeds_dir}")
    runs, partial = load_runs(args.inputs)
    if not runs:
        raise SystemExit(f"reproduce_report: no finished runs in {args.inputs}")
    lines = ["# Simulation runs: tables", "",
             "Generated by `python -m gradguide.bench.reproduce_report` from the run logs in "
             "`docs/figures/full_*.json` and `docs/figures/seeds/`; do not edit by hand. Wall / CPU times are "
             "seconds on this project's shared 2-core machine (one torch thread, `nice` 10 or 19, several other jobs "
             "running), so they vary with its load.", ""]
    for objective in ("f1-theta2",):
        lines += table_seeds(runs, objective)
        lines += table_ratio_curve(runs, objective)
    lines += table_hypotheses(runs)
    lines += table_objectives(runs)
    records = []
    for path in glob.glob(os.path.join(args.seeds_dir, "*.time.json")):
        with open(path) as f:
            records.append(json.load(f))
    lines += table_costs(runs, records)
    if partial:
        lines += ["**In progress when generated** (partial logs, not in the tables above):", ""]
        lines += [f"- {r['objective']} Alg.{r['algorithm']} {r['guidance']} seed {r['seed']} ({r['variant']}): "
                  f"round {r['log'][-1]['round']}/{r['rounds']}" for r in partial]
        lines.append("")
    os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
    with open(args.md, "w") as f:
        f.write("\n".join(lines))
    plot_ratio(runs, os.path.join(args.figures, "repro_roff_ratio.png"))
    plot_seeds(runs, os.path.join(args.figures, "repro_seeds_f1_theta2.png"))
    print(f"wrote {args.md}, {args.figures}/repro_roff_ratio.png, {args.figures}/repro_seeds_f1_theta2.png "
          f"({len(runs)} finished runs, {len(partial)} partial)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
