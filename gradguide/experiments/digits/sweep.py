"""Guidance sweeps on the 8×8 digits, baseline vs PixelAsParam (the paper's study, docs/mathematics.md#pixelasparam).

Three settings, as in the paper:

- policy **A** — class-conditional ε-model + noisy classifier, classifier scale ``s``;
- policy **B** — unconditional ε-model + noisy classifier, classifier scale ``s``;
- policy **C** — class-conditional ε-model with classifier-free guidance, scale ``w`` (diffusers'
  convention, ``w = 1`` is the conditional model; the paper's ``w' = w − 1``).

Each point is sampled twice from the same initial noise and the same per-step noise (one seeded
generator): without projection (baseline) and with :class:`~gradguide.PixelAsParam`; with DDPM
(respaced, the paper's sampler) and DDIM (η = 0, the generalisation of gradguide: there is no
diversity direction, so policy B acts like A). Target labels cycle through the ten classes.
Metrics (:mod:`gradguide.experiments.evaluation`): accuracy under the evaluation classifier, classifier-FID
and precision / recall against the 360 held-out digits. Conflict telemetry (share of samples
with cos < 0 and Φ per pair and step) is recorded for the first seed.

Every run writes one JSON file under ``OUT/runs/`` (the sweep resumes where it stopped, and
several processes may share ``OUT`` with different ``--policies``); ``--report`` draws the plots
and the markdown tables from whatever runs exist.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ... import CFG, Classifier, Diagnostics, Execution, PixelAsParam, Sampler, sample
from . import models
from .data import NUM_CLASSES

CLS_SCALES = (0.0, 2.0, 5.0, 10.0)
CFG_SCALES = (1.0, 2.0, 4.0)
SAMPLER_STEPS = {"ddpm": 100, "ddim": 50}
PAIRS = {"A": ("den/cls", "cls/div", "den/div"), "B": ("den/cls", "cls/div", "den/div"),
         "C": ("cond/cfg", "den/div")}


class Models:
    """The shipped digits models, loaded once."""

    def __init__(self, directory: Optional[str] = None):
        self.cond = models.load("eps_cond", directory)
        self.uncond = models.load("eps_uncond", directory)
        self.noisy = models.load("noisy_classifier", directory)
        self.schedule = models.digits_schedule()


def sample_point(m: Models, policy: str, scale: float, project: bool, sampler: str, steps: int, n: int,
                 seed: int, telemetry: bool = False, progress: bool = False):
    """Draw ``n`` samples for one sweep point. Returns ``(x [n,1,8,8], labels [n], telemetry)``;
    ``telemetry`` maps each pair to per-step lists ``timestep``, ``conflict_share``, ``phi``, ``cos``
    (means over samples) when asked for, else ``None``."""
    if policy not in PAIRS:
        raise ValueError(f"sample_point: policy: expected 'A', 'B' or 'C', got {policy!r}")
    labels = torch.arange(n) % NUM_CLASSES
    cond = {"y": labels}
    if policy == "C":
        model = m.cond
        guidance = [CFG(scale, uncond={"y": torch.full_like(labels, NUM_CLASSES)})]
    else:
        model = m.cond if policy == "A" else m.uncond
        guidance = [Classifier(m.noisy.log_prob, scale)]
    records: Dict[str, Dict[str, List[float]]] = {}

    def callback(rec):
        for pair, tel in rec.telemetry.items():
            r = records.setdefault(pair, {"timestep": [], "conflict_share": [], "phi": [], "cos": []})
            r["timestep"].append(int(rec.timestep))
            r["conflict_share"].append(float(tel["conflict_share"]))
            r["phi"].append(float(tel["phi"].mean()))
            r["cos"].append(float(tel["cos"].mean()))

    # convention="paper": docs/digits.md's policy C results were made with the printed formula
    # (unclipped branches), before the official-code convention became the default
    x = sample(model, (n, 1, 8, 8), schedule=m.schedule, sampler=Sampler(sampler, clip=True), steps=steps,
               guidance=guidance, projection=PixelAsParam(policy, convention="paper") if project else None, cond=cond,
               generator=torch.Generator().manual_seed(seed), execution=Execution(backend="reference"),
               diagnostics=Diagnostics(callback=callback if telemetry else None, telemetry=telemetry,
                                       progress=progress))
    return x.detach(), labels, (records if telemetry else None)


def _key(policy, sampler, scale, project, seed) -> str:
    return f"{policy}_{sampler}_s{scale:g}_{'pxp' if project else 'base'}_seed{seed}"


def plan(policies, samplers, cls_scales, cfg_scales, seeds) -> List[dict]:
    """The runs of a sweep. At the unguided end (classifier scale 0, CFG w = 1) the guidance
    direction is zero, so the projection is the identity: only the baseline is sampled there."""
    runs = []
    for policy in policies:
        scales = cfg_scales if policy == "C" else cls_scales
        neutral = 1.0 if policy == "C" else 0.0
        for sampler in samplers:
            for scale in scales:
                for project in ((False,) if scale == neutral else (False, True)):
                    for seed in seeds:
                        runs.append(dict(policy=policy, sampler=sampler, scale=float(scale), project=project,
                                         seed=seed, key=_key(policy, sampler, scale, project, seed)))
    return runs


def run_sweep(out: str, policies=("A", "B", "C"), samplers=("ddpm", "ddim"), cls_scales=CLS_SCALES,
              cfg_scales=CFG_SCALES, seeds=(0, 1, 2), n: int = 300, steps: Optional[Dict[str, int]] = None,
              telemetry_seed: int = 0, weights: Optional[str] = None, progress: bool = True, log=print) -> List[dict]:
    """Run (or resume) a sweep; returns the list of run records."""
    from tqdm.auto import tqdm

    from ..evaluation import DigitsEvaluator
    steps = dict(SAMPLER_STEPS, **(steps or {}))
    torch.set_num_threads(1)  # shared CPU: one thread per sweep process
    m = Models(weights)
    evaluator = DigitsEvaluator()
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    todo = plan(policies, samplers, cls_scales, cfg_scales, seeds)
    results = []
    bar = tqdm(todo, desc="sweep-digits", disable=None if progress else True)  # None: off on a non-terminal
    for run in bar:
        path = os.path.join(out, "runs", run["key"] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            continue
        bar.set_postfix_str(run["key"])
        start = time.perf_counter()
        x, labels, tel = sample_point(m, run["policy"], run["scale"], run["project"], run["sampler"],
                                      steps[run["sampler"]], n, run["seed"], telemetry=run["seed"] == telemetry_seed)
        record = dict(run, n=n, steps=steps[run["sampler"]], seconds=round(time.perf_counter() - start, 1),
                      metrics=evaluator(x, labels), telemetry=tel)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        results.append(record)
    return results


# -- aggregation, plots and tables -------------------------------------------------------------

def load_runs(out: str) -> List[dict]:
    folder = os.path.join(out, "runs")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sweep-digits: no runs under {folder}")
    runs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                runs.append(json.load(f))
    return runs


def aggregate(runs: List[dict]) -> Dict[tuple, dict]:
    """``(policy, sampler, project, scale) -> {metric: (mean, std, n_seeds)}``; the neutral point
    (scale 0 / w = 1) counts for both arms. std is the sample std over seeds (ddof = 1)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        neutral = (r["policy"] == "C" and r["scale"] == 1.0) or (r["policy"] != "C" and r["scale"] == 0.0)
        arms = (False, True) if neutral else (r["project"],)
        for arm in arms:
            groups.setdefault((r["policy"], r["sampler"], arm, r["scale"]), []).append(r["metrics"])
    agg = {}
    for key, ms in groups.items():
        agg[key] = {}
        for metric in ("accuracy", "fid", "precision", "recall"):
            v = np.array([m_[metric] for m_ in ms], dtype=np.float64)
            agg[key][metric] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))
    return agg


def matched_fid(agg, policy, sampler) -> List[dict]:
    """For each PixelAsParam point, the baseline FID at the same accuracy: linear interpolation
    along the baseline curve in scale order, up to the first scale where accuracy stops rising
    (beyond it accuracy is saturated and FID is not a function of it); only inside that range."""
    by_scale = sorted((scale, v["accuracy"][0], v["fid"][0]) for (p, s, pr, scale), v in agg.items()
                      if p == policy and s == sampler and not pr)
    base = []
    for _, acc, fid in by_scale:  # the monotone part: once accuracy stops rising, it is saturated
        if base and acc <= base[-1][0]:
            break
        base.append((acc, fid))
    if len(base) < 2:
        return []
    acc_b, fid_b = np.array([a for a, _ in base]), np.array([f for _, f in base])
    rows = []
    for (p, s, pr, scale), v in sorted(agg.items()):
        if p != policy or s != sampler or not pr:
            continue
        acc = v["accuracy"][0]
        inside = acc_b.min() <= acc <= acc_b.max()
        rows.append({"scale": scale, "accuracy": acc, "fid_pxp": v["fid"][0],
                     "fid_base_matched": float(np.interp(acc, acc_b, fid_b)) if inside else None})
    return rows


def plot_tradeoffs(agg, sampler: str, path: str, x_metric: str, y_metric: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"A": "A: cond. + classifier (scale s)", "B": "B: uncond. + classifier (scale s)",
             "C": "C: CFG (w, diffusers)"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, policy in zip(axes, "ABC"):
        for project, color, label in ((False, "tab:blue", "baseline"), (True, "tab:red", "PixelAsParam")):
            pts = sorted((scale, v) for (p, s, pr, scale), v in agg.items()
                         if p == policy and s == sampler and pr == project)
            if not pts:
                continue
            xs = [v[x_metric][0] for _, v in pts]
            ys = [v[y_metric][0] for _, v in pts]
            ax.errorbar(xs, ys, xerr=[v[x_metric][1] for _, v in pts], yerr=[v[y_metric][1] for _, v in pts],
                        color=color, marker="o", ms=4, capsize=3, label=label)
            for (scale, _), xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{scale:g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
        ax.set_title(names[policy], fontsize=10)
        ax.set_xlabel(x_metric)
        ax.set_ylabel(y_metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_telemetry(runs: List[dict], sampler: str, path: str, title: str) -> None:
    """Per policy (rows) and pair (columns): conflict share and Φ vs timestep at every scale
    (PixelAsParam runs of the telemetry seed; telemetry is of the unprojected directions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = ("den/cls", "cls/div", "den/div")
    fig, axes = plt.subplots(3, 3, figsize=(15, 10), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, policy in enumerate("ABC"):
        sel = sorted((r for r in runs if r["policy"] == policy and r["sampler"] == sampler and r.get("telemetry")
                      and (r["project"] or r["scale"] in (0.0, 1.0))), key=lambda r: r["scale"])
        cols = ("cond/cfg", "den/div") if policy == "C" else pairs
        for col in range(3):
            ax = axes[row][col]
            if col >= len(cols):
                ax.axis("off")
                continue
            pair = cols[col]
            if not any(r["telemetry"].get(pair) for r in sel):  # e.g. no noise direction in DDIM (eta = 0)
                ax.text(0.5, 0.5, f"{pair}: no such pair here\n(deterministic sampler: no noise)",
                        ha="center", va="center", transform=ax.transAxes, fontsize=9)
                ax.set_title(f"policy {policy}: {pair}", fontsize=10)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            twin = ax.twinx()
            for j, r in enumerate(sel):
                tel = r["telemetry"].get(pair)
                if not tel:
                    continue
                c = cmap(j / max(1, len(sel) - 1))
                ax.plot(tel["timestep"], tel["conflict_share"], color=c, lw=1.4, label=f"scale {r['scale']:g}")
                twin.plot(tel["timestep"], tel["phi"], color=c, lw=0.9, ls="--")
            ax.set_xlim(max(ax.get_xlim()), min(ax.get_xlim()))  # sampling order: noisy -> clean
            ax.set_ylim(-0.03, 1.03)
            twin.set_ylim(-0.03, 1.03)
            ax.set_title(f"policy {policy}: {pair}", fontsize=10)
            ax.set_xlabel("timestep t (sampling runs from left, t = T, to right, t = 0)")
            ax.set_ylabel("share cos<0 (solid)")
            twin.set_ylabel("mean Φ (dashed)")
            ax.grid(alpha=0.3)
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}" if v[0] < 10 else f"{v[0]:.2f} ± {v[1]:.2f}"


def report(out: str, figures: str, prefix: str = "digits") -> str:
    """Write the plots into ``figures`` and return the markdown tables of the sweep in ``out``."""
    from ...tools import outputs
    runs = load_runs(out)
    agg = aggregate(runs)
    samplers = sorted({r["sampler"] for r in runs}, key=lambda s: list(SAMPLER_STEPS).index(s))
    outputs.claim(*(os.path.join(figures, f"{prefix}-{kind}-{sampler}.png") for sampler in samplers
                    for kind in ("fid-acc", "pr", "telemetry")), option="--figures")
    os.makedirs(figures, exist_ok=True)
    lines = []
    for sampler in samplers:
        n = {r["n"] for r in runs if r["sampler"] == sampler}
        steps = {r["steps"] for r in runs if r["sampler"] == sampler}
        seeds = sorted({r["seed"] for r in runs if r["sampler"] == sampler})
        what = f"{sampler.upper()}, {'/'.join(map(str, steps))} steps, N = {'/'.join(map(str, n))}, seeds {seeds}"
        plot_tradeoffs(agg, sampler, os.path.join(figures, f"{prefix}-fid-acc-{sampler}.png"), "accuracy", "fid",
                       f"classifier-FID vs accuracy ({what}; mean ± std over seeds)")
        plot_tradeoffs(agg, sampler, os.path.join(figures, f"{prefix}-pr-{sampler}.png"), "recall", "precision",
                       f"precision vs recall ({what}; mean ± std over seeds)")
        plot_telemetry(runs, sampler, os.path.join(figures, f"{prefix}-telemetry-{sampler}.png"),
                       f"conflict telemetry, {what.split(', seeds')[0]}, seed {seeds[0]}: share of samples with "
                       "cos < 0 (solid) and mean Φ (dashed) per pair")
        lines.append(f"\n### {what}\n")
        lines.append("| policy | scale | arm | accuracy | classifier-FID | precision | recall |")
        lines.append("|---|---|---|---|---|---|---|")
        for (p, s, pr, scale), v in sorted(agg.items()):
            if s != sampler:
                continue
            lines.append(f"| {p} | {scale:g} | {'PixelAsParam' if pr else 'baseline'} | {_fmt(v['accuracy'])} | "
                         f"{_fmt(v['fid'])} | {_fmt(v['precision'])} | {_fmt(v['recall'])} |")
        lines.append("\nFID at matched accuracy (baseline curve, in scale order up to where its accuracy "
                     "stops rising, interpolated at the PixelAsParam point's mean accuracy; '—' outside that "
                     "range):\n")
        lines.append("| policy | scale | accuracy (PxP) | FID PixelAsParam | FID baseline, same accuracy |")
        lines.append("|---|---|---|---|---|")
        for policy in "ABC":
            for row in matched_fid(agg, policy, sampler):
                fb = "—" if row["fid_base_matched"] is None else f"{row['fid_base_matched']:.2f}"
                lines.append(f"| {policy} | {row['scale']:g} | {row['accuracy']:.3f} | {row['fid_pxp']:.2f} | {fb} |")
    return "\n".join(lines)


def conflict_summary(runs: List[dict]) -> str:
    """Markdown: per run with telemetry, the peak conflict share per pair and the timestep range
    where it is non-zero."""
    lines = ["| policy | sampler | scale | arm | pair | max share cos<0 | steps with conflicts | t range |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in runs if r.get("telemetry")),
                    key=lambda r: (r["policy"], r["sampler"], r["scale"], r["project"])):
        for pair, tel in sorted(r["telemetry"].items()):
            share = np.array(tel["conflict_share"])
            ts = np.array(tel["timestep"])
            on = share > 0
            rng = f"{ts[on].max()}–{ts[on].min()}" if on.any() else "—"
            lines.append(f"| {r['policy']} | {r['sampler']} | {r['scale']:g} | {'PxP' if r['project'] else 'base'} | "
                         f"{pair} | {share.max():.3f} | {int(on.sum())}/{len(share)} | {rng} |")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------

def _floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"gradguide sweep-digits: expected comma-separated numbers, got {text!r}") from None


def add_arguments(p) -> None:
    p.add_argument("--out", default="digits-sweep", help="run folder (one JSON per run; resumable; default digits-sweep)")
    p.add_argument("--policies", nargs="+", default=["A", "B", "C"], choices=["A", "B", "C"],
                   help="settings to sweep (default A B C)")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=["ddpm", "ddim"],
                   help="samplers (default ddpm ddim)")
    p.add_argument("--cls-scales", default=",".join(f"{s:g}" for s in CLS_SCALES),
                   help=f"classifier scales for A and B (default {','.join(f'{s:g}' for s in CLS_SCALES)})")
    p.add_argument("--cfg-scales", default=",".join(f"{s:g}" for s in CFG_SCALES),
                   help=f"CFG w for C, diffusers convention (default {','.join(f'{s:g}' for s in CFG_SCALES)})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--n", type=int, default=300, help="samples per point (default 300)")
    p.add_argument("--ddpm-steps", type=int, default=SAMPLER_STEPS["ddpm"], help="respaced DDPM steps (default 100)")
    p.add_argument("--ddim-steps", type=int, default=SAMPLER_STEPS["ddim"], help="DDIM steps, eta 0 (default 50)")
    p.add_argument("--weights", default=None, help="folder of retrained weights (default: the shipped ones)")
    p.add_argument("--report", action="store_true", help="after sampling, draw the plots and print the tables")
    p.add_argument("--report-only", action="store_true", help="only draw the plots / print tables from --out")
    p.add_argument("--figures", default="docs/figures", help="plot folder (default docs/figures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    from ...tools import outputs
    if outputs.inside_package(args.out):   # the run folder resumes (finished runs are kept): only the package rule
        outputs.claim(args.out)
    if args.n < 20:
        raise SystemExit(f"gradguide sweep-digits: --n: expected at least 20 samples (k-NN metrics), got {args.n}")
    if not args.report_only:
        seeds = tuple(int(s) for s in _floats(args.seeds))
        run_sweep(args.out, tuple(args.policies), tuple(args.samplers), _floats(args.cls_scales),
                  _floats(args.cfg_scales), seeds, args.n, {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps},
                  telemetry_seed=seeds[0], weights=args.weights, progress=not args.no_progress)
    if args.report or args.report_only:
        print(report(args.out, args.figures))
        print("\n## Conflict telemetry summary\n")
        print(conflict_summary(load_runs(args.out)))
    return 0
