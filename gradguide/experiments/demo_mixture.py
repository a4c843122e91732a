"""The closed-form Gaussian-mixture demo: every guidance method on an exact model.

A 2-D mixture of three isotropic Gaussians has an exact score and an exact noisy classifier
(:mod:`gradguide.experiments.analytic`), so each guidance method can be compared with the law it should
produce: unguided sampling reproduces the mixture, classifier guidance at scale 1 and CFG at
w = 1 reproduce the class-conditional law, larger scales sharpen it.
"""
from __future__ import annotations

import json
import time
from typing import List, Optional

import torch

from .. import APG, CFG, CFGPlusPlus, CFGZeroStar, Classifier, PixelAsParam, Rescale, Schedule, sample
from .analytic import GaussianMixture

TARGET_CLASS = 2


def default_mixture(schedule: Schedule) -> GaussianMixture:
    return GaussianMixture(schedule, weights=[0.5, 0.3, 0.2], means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]],
                           variances=[0.25, 0.09, 0.49])


def methods(gm: GaussianMixture):
    """(label, model, guidance, projection) for each method in the table."""
    log_prob = lambda x, t, y: gm.log_prob_class(x, t, y)
    uncond = lambda x, t, **_: gm(x, t)
    return [
        ("unguided", uncond, [], None),
        ("conditional", gm, [], None),
        ("classifier s=1", uncond, [Classifier(log_prob, 1.0)], None),
        ("classifier s=4", uncond, [Classifier(log_prob, 4.0)], None),
        ("classifier s=4 + PxP-B", uncond, [Classifier(log_prob, 4.0)], PixelAsParam("B")),
        ("cond + classifier s=4 + PxP-A", gm, [Classifier(log_prob, 4.0)], PixelAsParam("A")),
        ("CFG w=1", gm, [CFG(1.0)], None),
        ("CFG w=3", gm, [CFG(3.0)], None),
        ("CFG w=3 + PxP-C", gm, [CFG(3.0)], PixelAsParam("C")),
        ("APG w=3", gm, [APG(3.0)], None),
        ("Rescale w=3", gm, [Rescale(3.0)], None),
        ("CFG-Zero* w=3", gm, [CFGZeroStar(3.0)], None),
        ("CFG++ l=0.3 (ddim)", gm, [CFGPlusPlus(0.3)], None),
    ]


def run(n: int = 2000, steps: int = 100, sampler: str = "ddpm", seed: int = 0, plot: Optional[str] = None,
        json_path: Optional[str] = None, out=print) -> List[dict]:
    schedule = Schedule.linear(1000)
    gm = default_mixture(schedule)
    y = torch.full((n,), TARGET_CLASS, dtype=torch.int64)
    rows, samples = [], {}
    reference = gm.sample_data(n, TARGET_CLASS, generator=torch.Generator().manual_seed(seed)).float()
    for label, model, guidance, projection in methods(gm):
        this_sampler = "ddim" if "CFG++" in label else sampler
        start = time.perf_counter()
        x = sample(model, (n, 2), schedule=schedule, sampler=this_sampler, steps=steps, guidance=guidance,
                   projection=projection, cond={"y": y}, generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        samples[label] = x
        share = (gm.classify(x) == TARGET_CLASS).float().mean().item()
        rows.append({"method": label, "sampler": this_sampler, "steps": steps, "n": n, "class_share": share,
                     "mean": x.mean(0).tolist(), "spread": x.std(0).mean().item(), "seconds": seconds})
    out(f"Gaussian mixture, target class {TARGET_CLASS} (exact law: share 1.00, mean "
        f"({reference.mean(0)[0]:+.2f}, {reference.mean(0)[1]:+.2f}), spread {reference.std(0).mean():.2f}); "
        f"unguided mixture share of class {TARGET_CLASS}: {gm.weights[TARGET_CLASS]:.2f}")
    out(f"{'method':32s} {'sampler':8s} {'class share':>11s} {'mean':>16s} {'spread':>7s} {'s':>6s}")
    for r in rows:
        out(f"{r['method']:32s} {r['sampler']:8s} {r['class_share']:11.3f} "
            f"({r['mean'][0]:+6.2f}, {r['mean'][1]:+6.2f}) {r['spread']:7.3f} {r['seconds']:6.2f}")
    if plot:
        _scatter(samples, gm, plot)
        out(f"scatter plot: {plot}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"example": "gaussian-mixture", "seed": seed, "rows": rows}, f, indent=2)
        out(f"json: {json_path}")
    return rows


def _scatter(samples: dict, gm: GaussianMixture, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(samples)
    cols = 5
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), sharex=True, sharey=True)
    for ax, label in zip(axes.flat, labels):
        x = samples[label].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.scatter(gm.means[:, 0], gm.means[:, 1], marker="x", c="red", s=40)
        ax.set_title(label, fontsize=9)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-6, 4)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle("gradguide: guidance methods on an exact Gaussian mixture (red x: component means)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
