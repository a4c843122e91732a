"""Deterministic training of the four shipped digits models (``gradguide train-digits``).

One CPU thread, fixed seeds and a fixed batch order, so a retrain on the same machine and torch
version reproduces the shipped weights bit for bit (across machines: to float rounding).

- ε-models: the DDPM loss ``‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²`` with ``t ~ U{0..T−1}``
  (Ho et al. 2020, Eq. 14) on the cosine schedule; the conditional one drops its label to the null
  label with probability ``p_uncond`` (Ho & Salimans 2022). Adam, cosine-decayed learning rate,
  and an exponential moving average of the weights (decay 0.999 after a warm-up) — the EMA weights ship.
- noisy classifier: cross-entropy on ``x_t`` at uniformly drawn ``t`` (Dhariwal & Nichol 2021).
- evaluation classifier: cross-entropy on clean images with ±1-pixel random shifts; its held-out
  accuracy is recorded in the weights' metadata.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from . import models
from .data import NUM_CLASSES, load_split

DEFAULT_STEPS = {"eps_cond": 3000, "eps_uncond": 3000, "noisy_classifier": 2000, "eval_classifier": 1500}
BATCH = 128
P_UNCOND = 0.15


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, disable=None)  # None: off when stderr is not a terminal


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background −1 fills the border)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    rows = (dy.view(b, 1) + torch.arange(8)).view(b, 1, 8, 1).expand(b, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(8)).view(b, 1, 1, 8).expand(b, 1, 8, 8)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(classifier, x: torch.Tensor, y: torch.Tensor, t: Optional[torch.Tensor] = None) -> float:
    return float((classifier(x, t).argmax(1) == y).float().mean())


def train_model(name: str, steps: Optional[int] = None, seed: int = 0, lr: float = 2e-3,
                progress: bool = True, log: Callable = print):
    """Train one model; returns ``(net, info)``. ``name`` is one of :data:`models.MODEL_NAMES`."""
    if name not in models.MODEL_NAMES:
        raise ValueError(f"train_model: name: expected one of {models.MODEL_NAMES}, got {name!r}")
    steps = DEFAULT_STEPS[name] if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"train_model: steps: expected a positive integer, got {steps}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # a different seed per model keeps them independent but each fixed
        offset = models.MODEL_NAMES.index(name) * 1000
        torch.manual_seed(seed + offset)
        g = torch.Generator().manual_seed(seed + offset + 1)
        x, y = load_split("train")
        x_te, y_te = load_split("heldout")
        schedule = models.digits_schedule()
        abar_all = schedule.alphas_cumprod.to(torch.float32)
        net = {"eps_cond": lambda: models.EpsNet(NUM_CLASSES), "eps_uncond": lambda: models.EpsNet(0),
               "noisy_classifier": lambda: models.DigitClassifier(time_cond=True),
               "eval_classifier": lambda: models.DigitClassifier(time_cond=False)}[name]()
        is_eps = name.startswith("eps")
        ema = copy.deepcopy(net).requires_grad_(False) if is_eps else None
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99),
                               weight_decay=0.0 if is_eps else 1e-4)
        warm = max(1, steps // 50)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * k / steps)))
        bar = _bar(steps, progress, f"train {name}")
        start, running, n = time.perf_counter(), 0.0, len(y)
        perm, pos = torch.randperm(n, generator=g), 0
        for k in range(steps):
            if pos + BATCH > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + BATCH]
            pos += BATCH
            xb, yb = x[idx], y[idx]
            if name == "eval_classifier":
                loss = F.cross_entropy(net(_shift(xb, g)), yb)
            else:
                t = torch.randint(0, abar_all.numel(), (BATCH,), generator=g)
                noise = torch.randn(xb.shape, generator=g)
                abar = abar_all[t].view(-1, 1, 1, 1)
                xt = abar.sqrt() * xb + (1 - abar).sqrt() * noise
                if name == "noisy_classifier":
                    loss = F.cross_entropy(net(xt, t), yb)
                else:
                    if name == "eps_cond":  # label dropout -> the null label (index 10)
                        drop = torch.rand(BATCH, generator=g) < P_UNCOND
                        yb = torch.where(drop, torch.full_like(yb, NUM_CLASSES), yb)
                        loss = F.mse_loss(net(xt, t, yb), noise)
                    else:
                        loss = F.mse_loss(net(xt, t), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                decay = min(0.999, (1 + k) / (10 + k))  # EMA warm-up: forget the random init quickly
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1 - decay)
            running = 0.98 * running + 0.02 * loss.item() if k else loss.item()
            if bar is not None:
                bar.update(1)
                if k % 100 == 0:
                    bar.set_postfix(loss=f"{running:.4f}")
        if bar is not None:
            bar.close()
        final = (ema if ema is not None else net).eval()
        info: Dict[str, object] = {"name": name, "seed": seed, "steps": steps, "batch": BATCH, "lr": lr,
                                   "loss_ema": round(running, 5), "seconds": round(time.perf_counter() - start, 1),
                                   "torch": torch.__version__}
        if name == "eps_cond":
            info["p_uncond"] = P_UNCOND
        if name == "eval_classifier":
            info["heldout_accuracy"] = accuracy(final, x_te, y_te)
            info["train_accuracy"] = accuracy(final, x, y)
        if name == "noisy_classifier":  # accuracy on held-out x_t at a few noise levels
            gt = torch.Generator().manual_seed(1)
            for t_val in (0, 250, 500, 750):
                abar = abar_all[t_val]
                xt = abar.sqrt() * x_te + (1 - abar).sqrt() * torch.randn(x_te.shape, generator=gt)
                info[f"heldout_accuracy_t{t_val}"] = accuracy(final, xt, y_te, torch.full((len(y_te),), t_val))
        log(f"trained {name}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "name"))
        return final, info
    finally:
        torch.set_num_threads(threads)


DEFAULT_OUT = "digits-weights"   # `gradguide train-digits`'s folder, relative to the working directory


def add_train_arguments(p) -> None:
    p.add_argument("--models", nargs="+", default=list(models.MODEL_NAMES), choices=list(models.MODEL_NAMES),
                   help="which models to train (default: all four)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder of the .safetensors files (default {DEFAULT_OUT} in the working directory; "
                        "the shipped weights in the package are never overwritten: use yours with "
                        "`gradguide sweep-digits --weights`)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0: the shipped weights)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per model (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
                        + ")")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args) -> int:
    from ...tools import outputs
    outputs.claim(*(models.weights_path(name, args.out) for name in args.models))   # before training, not after
    for name in args.models:
        net, info = train_model(name, steps=args.steps, seed=args.seed, progress=not args.no_progress)
        print(f"  -> {models.save(net, name, info, args.out)}")
    return 0
