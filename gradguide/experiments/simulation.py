"""The linear-subspace simulation of the gradient-guidance paper (Guo et al., NeurIPS 2024, §6.1;
docs/mathematics.md#generative-optimisation).

Data ``x = A u`` with ``A`` a seeded random orthonormal ``64 × 16`` basis and ``u ~ N(0, I_16)``;
65,536 pre-training samples; cosine schedule, T = 200. Objectives:

- ``f1(x) = 10 − (θᵀx − 3)²`` with ``‖θ‖ = 1``: ``θ1 = Aβ*`` on the subspace, or ``θ2`` mostly
  off it (``‖θ_⊥‖ / ‖θ_∥‖ = 9``). Maximum ``f1* = 10``.
- ``f2(x) = 5 − ½‖x − b‖`` with ``b1 = 4·1`` or ``b2 ~ N(4·1, 9 I)``. Maximum 5.

:class:`Simulation` builds everything from one seed; :func:`train_small` trains the small score
network whose weights ship in ``gradguide/weights/`` (``gradguide train-sim`` or
``python -m gradguide.experiments.simulation`` retrains them deterministically).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..metrics import off_support_ratio
from ..schedules import Schedule

D_OUTER, D_INNER, T_STEPS, N_PRETRAIN = 64, 16, 200, 65536
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")  # gradguide/weights
SMALL_WEIGHTS = os.path.join(WEIGHTS_DIR, "sim_small.safetensors")
DEFAULT_OUT = "sim_small.safetensors"   # `gradguide train-sim`'s output, relative to the working directory
OBJECTIVES = ("f1-theta1", "f1-theta2", "f2-b1", "f2-b2")


@dataclass
class Objective:
    """A reward ``f`` (differentiable, ``[B, D] -> [B]``) and its maximum."""
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    optimum: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Simulation:
    """Seeded subspace ``A``, objective parameters ``θ1, θ2, b1, b2`` and the pre-training data.

    Everything is drawn in float64 from ``torch.Generator().manual_seed(seed)`` in a fixed order,
    so one seed fixes the whole problem (independent of the optimisation seeds).
    """

    def __init__(self, seed: int = 0, D: int = D_OUTER, d: int = D_INNER, T: int = T_STEPS):
        if not (0 < d < D):
            raise ValueError(f"Simulation: expected 0 < d < D, got d={d}, D={D}")
        self.seed, self.D, self.d, self.T = seed, D, d, T
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        self.basis64 = q                                   # A, [D, d], orthonormal columns
        P = q @ q.T
        beta = torch.randn(d, generator=g, dtype=torch.float64)
        theta1 = q @ beta
        self.theta1 = theta1 / theta1.norm()              # on the subspace
        par = q @ torch.randn(d, generator=g, dtype=torch.float64)
        perp = torch.randn(D, generator=g, dtype=torch.float64)
        perp = perp - P @ perp
        theta2 = par / par.norm() + 9.0 * perp / perp.norm()  # ‖θ_⊥‖ / ‖θ_∥‖ = 9
        self.theta2 = theta2 / theta2.norm()
        self.b1 = torch.full((D,), 4.0, dtype=torch.float64)
        self.b2 = 4.0 + 3.0 * torch.randn(D, generator=g, dtype=torch.float64)
        self.schedule = Schedule.cosine(T)

    @property
    def basis(self) -> torch.Tensor:
        return self.basis64.float()

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None,
                    dtype=torch.float32) -> torch.Tensor:
        """``n`` draws of ``x = A u``, ``u ~ N(0, I_d)``."""
        u = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        return (u @ self.basis64.T).to(dtype)

    def r_off(self, x: torch.Tensor) -> torch.Tensor:
        """The off-support ratio ``‖(I − AAᵀ)x‖ / ‖AAᵀx‖`` per sample."""
        return off_support_ratio(x, self.basis64.to(device=x.device, dtype=x.dtype))

    def objective(self, name: str) -> Objective:
        """``"f1-theta1"``, ``"f1-theta2"``, ``"f2-b1"`` or ``"f2-b2"``."""
        if name in ("f1-theta1", "f1-theta2"):
            theta = self.theta1 if name == "f1-theta1" else self.theta2

            def f1(x):
                return 10.0 - ((x @ theta.to(x)) - 3.0) ** 2
            return Objective(name, f1, 10.0)
        if name in ("f2-b1", "f2-b2"):
            b = self.b1 if name == "f2-b1" else self.b2

            def f2(x):
                return 5.0 - 0.5 * (x - b.to(x)).norm(dim=1)
            return Objective(name, f2, 5.0)
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {name!r}")


# -- training the score networks ---------------------------------------------------------------

def diffusion_loss(net, x0: torch.Tensor, schedule: Schedule, generator: Optional[torch.Generator] = None,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DDPM ε-prediction loss: ``t ~ U{0..T−1}``, ``x_t = √ᾱ x_0 + √(1−ᾱ) ε``,
    ``‖net(x_t, t) − ε‖²`` averaged (per-sample ``weights`` summing to 1 give a weighted mean)."""
    b = x0.shape[0]
    abar_all = schedule.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, abar_all.numel(), (b,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    abar = abar_all[t].unsqueeze(1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    per_sample = ((net(xt, t) - noise) ** 2).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum()


def train_small(seed: int = 0, sim_seed: int = 0, epochs: int = 40, batch: int = 512, lr: float = 2e-3,
                hidden: int = 128, depth: int = 3, progress: bool = True):
    """Train :class:`~gradguide.experiments.nets.SmallScoreNet` on the 65,536 pre-training samples.

    Adam (betas 0.9, 0.99) with a cosine-decayed learning rate; one thread and fixed seeds, so
    the result is bit-reproducible on one machine. Returns ``(net, info)``.
    """
    from .nets import SmallScoreNet
    sim = Simulation(sim_seed)
    return _fit(lambda: SmallScoreNet(sim.D, hidden=hidden, depth=depth,
                                      alphas_cumprod=sim.schedule.alphas_cumprod),
                sim, seed, epochs, batch, lr, cosine=True, device="cpu", progress=progress)


def train_unet(seed: int = 0, sim_seed: int = 0, epochs: int = 20, batch: int = 32, lr: float = 1e-4,
               device: str = "cpu", progress: bool = True):
    """Train the paper's :class:`~gradguide.experiments.nets.UNet1D` with the paper's recipe (20 epochs, Adam
    lr 1e-4, batch 32, as the paper trains it). About 41k steps of a 14.9 M-parameter network: a GPU job."""
    from .nets import UNet1D
    sim = Simulation(sim_seed)
    return _fit(lambda: UNet1D(sim.D), sim, seed, epochs, batch, lr, cosine=False, device=device, progress=progress)


def _fit(make_net, sim: "Simulation", seed, epochs, batch, lr, cosine, device, progress):
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)  # bit-reproducible on one machine, and polite on shared cores
    try:
        torch.manual_seed(seed)
        data = sim.sample_data(N_PRETRAIN, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        net = make_net().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
        per_epoch = N_PRETRAIN // batch
        total = epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, (lambda k: 0.5 * (1 + math.cos(math.pi * k / total))) if cosine else (lambda k: 1.0))
        gen = torch.Generator().manual_seed(seed + 2)
        start = time.perf_counter()
        bar = _bar(total, progress, "train-sim")
        losses = []
        for epoch in range(epochs):
            perm = torch.randperm(N_PRETRAIN, generator=gen).to(device)
            running = torch.zeros((), device=device)
            for i in range(per_epoch):
                loss = diffusion_loss(net, data[perm[i * batch:(i + 1) * batch]], sim.schedule, gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                running += loss.detach()
                if bar is not None:
                    bar.update(1)
            losses.append(float(running) / per_epoch)
        if bar is not None:
            bar.close()
        config = net.config() if hasattr(net, "config") else {"arch": "unet1d", "dim": sim.D, "width": net.width}
        info = {"seed": seed, "sim_seed": sim.seed, "epochs": epochs, "batch": batch, "lr": lr,
                "final_loss": losses[-1], "seconds": time.perf_counter() - start, **config}
        return net.eval(), info
    finally:
        torch.set_num_threads(threads)


def save_small(net, info: dict, path: str) -> None:
    """Write ``net`` and its training record to ``path`` (never into the package: the shipped
    weights are what every other command loads)."""
    from safetensors.torch import save_file

    from ..tools import outputs
    outputs.claim(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path,
              metadata={k: json.dumps(v) for k, v in info.items()})


def load_small(path: str = SMALL_WEIGHTS):
    """The shipped (or a retrained) :class:`~gradguide.experiments.nets.SmallScoreNet`, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .nets import SmallScoreNet
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_small: no weights at {path}; retrain them with `gradguide train-sim`")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    state = load_file(path)
    net = SmallScoreNet(meta.get("dim", D_OUTER), hidden=meta.get("hidden", 128), depth=meta.get("depth", 3),
                        emb=meta.get("emb", 32), sigma_data=meta.get("sigma_data", 0.5),
                        alphas_cumprod=state["alphas_cumprod"] if meta.get("preconditioned", True) else None)
    net.load_state_dict(state)
    net.info = meta
    return net.eval()


def load_unet(path: str, device: str = "cpu"):
    """A :class:`~gradguide.experiments.nets.UNet1D` trained with ``gradguide train-sim --arch unet``."""
    from safetensors.torch import load_file

    from .nets import UNet1D
    state = load_file(path)
    net = UNet1D(D_OUTER)
    net.load_state_dict(state)
    return net.to(device).eval()


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, disable=None)  # None: off when stderr is not a terminal


def unguided_check(net, sim: Simulation, n: int = 512, seed: int = 0, steps=None) -> Dict[str, float]:
    """Mean ``r_off`` and norm of unguided samples from ``net`` (a quick quality check)."""
    from ..sampling import sample
    with torch.no_grad():
        x = sample(net, (n, sim.D), schedule=sim.schedule, sampler="ddpm", steps=steps,
                   generator=torch.Generator().manual_seed(seed))
    return {"r_off_mean": float(sim.r_off(x).mean()), "norm_mean": float(x.norm(dim=1).mean())}


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gradguide train-sim", description=__doc__.splitlines()[0])
    add_train_arguments(p)
    return run_train(p.parse_args(argv))


def add_train_arguments(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped weights)")
    p.add_argument("--sim-seed", type=int, default=0, help="simulation seed fixing A (default 0)")
    p.add_argument("--arch", choices=["small", "unet"], default="small",
                   help="small (the shipped network) or unet (the paper's 14.9 M U-Net: 20 epochs, lr 1e-4, "
                        "batch 32; use a GPU)")
    p.add_argument("--epochs", type=int, default=None, help="epochs over the 65,536 samples (default 40 / 20)")
    p.add_argument("--hidden", type=int, default=128, help="small: hidden width of the MLP (default 128, shipped)")
    p.add_argument("--depth", type=int, default=3, help="small: hidden layers of the MLP (default 3, shipped)")
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--out", default=None,
                   help=f"output safetensors (default {DEFAULT_OUT} in the working directory for small; the shipped "
                        "weights in the package are never overwritten: load yours with `gradguide optimize --weights`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args) -> int:
    from ..tools import outputs
    if args.arch == "unet" and args.out is None:
        raise SystemExit("gradguide train-sim --arch unet: give --out PATH (the U-Net is ~60 MB, not shipped)")
    if args.arch == "small":
        for name in ("hidden", "depth"):
            if getattr(args, name) < 1:
                raise SystemExit(f"gradguide train-sim: --{name} must be positive, got {getattr(args, name)}")
    args.out = args.out or DEFAULT_OUT
    outputs.claim(args.out)   # before the epochs, not after
    if args.arch == "unet":
        net, info = train_unet(seed=args.seed, sim_seed=args.sim_seed, epochs=args.epochs or 20,
                               device=args.device, progress=not args.no_progress)
    else:
        net, info = train_small(seed=args.seed, sim_seed=args.sim_seed, epochs=args.epochs or 40,
                                hidden=args.hidden, depth=args.depth, progress=not args.no_progress)
    net = net.cpu()
    with torch.no_grad():
        check = unguided_check(net, Simulation(args.sim_seed))
    info.update({f"unguided_{k}": v for k, v in check.items()})
    save_small(net, info, args.out)
    print(json.dumps(info, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
