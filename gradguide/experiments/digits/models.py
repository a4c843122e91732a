"""Small conv nets for 8×8 digits, with sinusoidal time and learned label embeddings.

- :class:`EpsNet` — ε-prediction (DDPM, Ho et al. 2020): ``num_classes=10`` makes it
  class-conditional with an extra *null* label (index 10) for classifier-free guidance (Ho &
  Salimans 2022, label dropout in training); ``num_classes=0`` is unconditional and ignores ``y``.
- :class:`DigitClassifier` — ``time_cond=True``: the noisy classifier ``p_φ(y | x_t, t)`` of
  classifier guidance (Dhariwal & Nichol 2021); ``time_cond=False``: the clean evaluation
  classifier whose penultimate features define classifier-FID and precision / recall.

All four are tens of thousands of parameters: they train in minutes on one CPU thread.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...schedules import Schedule

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "weights",
                           "digits")  # gradguide/weights/digits
MODEL_NAMES = ("eps_cond", "eps_uncond", "noisy_classifier", "eval_classifier")
T_STEPS = 1000


def digits_schedule() -> Schedule:
    """The diffusion schedule every digits model is trained with: cosine, T = 1000 (Nichol &
    Dhariwal 2021; better than linear at 8×8, where linear destroys the signal too early)."""
    return Schedule.cosine(T_STEPS)


def timestep_embedding(t: torch.Tensor, dim: int, T: int = T_STEPS) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as in DDPM), on ``t / T · 1000``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.to(torch.float32) * (1000.0 / T)).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the embedding as a per-channel bias, twice; residual."""

    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.e = nn.Linear(emb, ch)
        self.n2, self.c2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h, e):
        r = self.c1(F.silu(self.n1(h))) + self.e(e)[:, :, None, None]
        return h + self.c2(F.silu(self.n2(r)))


class EpsNet(nn.Module):
    """ε-model ``net(x_t [B,1,8,8], t [B] int64, y=None) -> ε̂ [B,1,8,8]``.

    ``num_classes > 0``: ``y`` is required, values ``0..num_classes`` (``num_classes`` is the null
    label of classifier-free guidance). ``num_classes == 0``: unconditional; ``y`` is accepted and
    ignored, so the same ``cond={"y": ...}`` serves both models in a sweep.
    """

    def __init__(self, num_classes: int = 10, ch: int = 32, emb: int = 64, blocks: int = 2):
        super().__init__()
        self.num_classes, self.ch, self.emb_dim, self.blocks = num_classes, ch, emb, blocks
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes > 0 else None
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.body = nn.ModuleList([_ResBlock(ch, emb) for _ in range(blocks)])
        self.out_norm, self.out = nn.GroupNorm(8, ch), nn.Conv2d(ch, 1, 3, padding=1)

    def config(self) -> dict:
        return {"kind": "eps", "num_classes": self.num_classes, "ch": self.ch, "emb": self.emb_dim,
                "blocks": self.blocks}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.t_mlp(timestep_embedding(t, self.emb_dim))
        if self.label is not None:
            if y is None:
                raise ValueError("EpsNet: y: the class-conditional model needs labels y [B] "
                                 f"(0..{self.num_classes - 1}, or {self.num_classes} for the null label)")
            e = e + self.label(y)
        e = F.silu(e)
        h = self.inp(x)
        for block in self.body:
            h = block(h, e)
        return self.out(F.silu(self.out_norm(h)))


class DigitClassifier(nn.Module):
    """Conv classifier ``net(x [B,1,8,8], t=None) -> logits [B,10]``; ``features(x, t)`` returns
    the penultimate (pooled, ``2·ch``-dimensional) features used by classifier-FID and P/R."""

    def __init__(self, time_cond: bool = False, ch: int = 32, emb: int = 64, num_classes: int = 10):
        super().__init__()
        self.time_cond, self.ch, self.emb_dim, self.num_classes = time_cond, ch, emb, num_classes
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb)) if time_cond else None
        self.c1 = nn.Conv2d(1, ch, 3, padding=1)
        self.b1 = _ResBlock(ch, emb) if time_cond else None
        self.c2 = nn.Conv2d(ch, 2 * ch, 3, padding=1, stride=2)  # 8x8 -> 4x4
        self.c3 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.e3 = nn.Linear(emb, 2 * ch) if time_cond else None
        self.head = nn.Linear(2 * ch, num_classes)

    def config(self) -> dict:
        return {"kind": "classifier", "time_cond": self.time_cond, "ch": self.ch, "emb": self.emb_dim,
                "num_classes": self.num_classes}

    def features(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.silu(self.c1(x))
        if self.time_cond:
            if t is None:
                raise ValueError("DigitClassifier: t: the noisy classifier needs timesteps t [B]")
            e = F.silu(self.t_mlp(timestep_embedding(t, self.emb_dim)))
            h = self.b1(h, e)
        h = F.silu(self.c2(h))
        h = self.c3(h)
        if self.time_cond:
            h = h + self.e3(e)[:, :, None, None]
        return F.silu(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.features(x, t))

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
        """``log p_φ(y | x_t, t)`` per sample, ``[B]`` — the ``log_prob`` of
        :class:`gradguide.Classifier` (extra conditioning inputs are ignored)."""
        return F.log_softmax(self(x_t, t), dim=1).gather(1, y.view(-1, 1)).squeeze(1)


def build(config: dict) -> nn.Module:
    """A fresh network from its ``config()`` dict."""
    kind = config.get("kind")
    if kind == "eps":
        return EpsNet(config["num_classes"], config["ch"], config["emb"], config["blocks"])
    if kind == "classifier":
        return DigitClassifier(config["time_cond"], config["ch"], config["emb"], config["num_classes"])
    raise ValueError(f"build: config['kind']: expected 'eps' or 'classifier', got {kind!r}")


def weights_path(name: str, directory: Optional[str] = None) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"digits model name: expected one of {MODEL_NAMES}, got {name!r}")
    return os.path.join(directory or WEIGHTS_DIR, f"{name}.safetensors")


def save(net: nn.Module, name: str, info: dict, directory: Optional[str] = None) -> str:
    from safetensors.torch import save_file

    from ...tools import outputs
    path = weights_path(name, directory)
    outputs.claim(path)   # never into the package: the shipped weights are what the other commands load
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"config": json.dumps(net.config()), "info": json.dumps(info)}
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)
    return path


def load(name: str, directory: Optional[str] = None) -> nn.Module:
    """A shipped (or retrained, from ``directory``) digits model, in eval mode with frozen
    parameters; its training record is in ``.info`` (seed, steps, loss, held-out accuracy)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = weights_path(name, directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits: no weights at {path}; train them with `gradguide train-digits`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    net = build(json.loads(meta["config"]))
    net.load_state_dict(load_file(path))
    net.info = json.loads(meta.get("info", "{}"))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
