"""Generative optimisation with gradient guidance: Algorithms 1 and 2 of Guo et al., "Gradient
Guidance for Diffusion Models: An Optimization Perspective" (NeurIPS 2024; docs/mathematics.md#generative-optimisation).

**Algorithm 1** (iterative gradient-guided diffusion). ``B`` parallel chains; ``z_0`` is an
unguided batch. Round ``k``: query ``g_{k,i} = ∇f(z_{k,i})``, set the target
``y_{k,i} = g_{k,i}ᵀz_{k,i} + δ`` and draw ``z_{k+1}`` with the guided sampler (naive ``G`` or
look-ahead ``G_loss``), sample ``i`` using its own ``g``, ``y`` (``query="per-sample"``, as the
authors' code). ``query="mean"`` is the paper's text: one query at the batch mean ``z̄_k``,
``g = ∇f(z̄_k)``, ``y = gᵀz̄_k + δ`` for every chain.

**Algorithm 2** (with adaptive fine-tuning). Algorithm 1 plus, in rounds ``k ≥ k_ft``, a
fine-tuning step of the score network on generated samples before drawing ``z_{k+1}``:
``finetune="per-round"`` is the authors' code (Adam, lr 1e-6, betas (0.9, 0.99), one step of the
ε-prediction loss on the current batch ``z_k``); ``finetune="history"`` is the paper's weighted
score-matching loss over the generated sets ``z_{k_ft}..z_k``, with weights ``∝ decay^{k−j}``
(the paper's weights could not be confirmed; this geometric choice is ours).

Per round the log holds the mean and top-4 reward, the mean ``r_off`` and the mean ``r_off`` of
the top-4 samples, and the seconds the round took. A non-finite reward or gradient stops the run
cleanly with the log so far (``result.stopped`` says why).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..guidance import LookAhead, NaiveGradient
from ..config import Execution
from ..sampling import sample
from ..schedules import Schedule

GUIDANCES = ("G", "G_loss")
QUERIES = ("per-sample", "mean")
FINETUNES = ("per-round", "history")
TOP_K = 4


@dataclass
class RoundLog:
    round: int                 # 0 = the unguided batch z_0
    reward_mean: float
    reward_top4: float         # mean reward of the top-4 samples
    r_off_mean: Optional[float]
    r_off_top4: Optional[float]  # mean r_off of the top-4 samples by reward
    seconds: float
    finetuned: bool = False    # a fine-tuning step ran this round (before sampling z_{k+1})
    ft_loss: Optional[float] = None


@dataclass
class OptimizeResult:
    settings: dict
    log: List[RoundLog]
    samples: torch.Tensor                  # the last finite batch z_k
    snapshots: Dict[int, torch.Tensor] = field(default_factory=dict)  # round -> batch, for plots
    stopped: Optional[str] = None          # why the run ended early (None: all rounds ran)

    @property
    def final(self) -> RoundLog:
        return self.log[-1]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "stopped": self.stopped, "rounds_completed": self.log[-1].round,
                "log": [asdict(r) for r in self.log]}

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)


def optimize(model: Callable, reward: Optional[Callable] = None, *, reward_grad: Optional[Callable] = None,
             dim: int, schedule: Schedule, rounds: int, delta: float, algorithm: int = 1, guidance: str = "G_loss",
             batch_size: int = 32, sampler: str = "ddpm", steps=None, query: str = "per-sample", sigma: float = 0.1,
             basis: Optional[torch.Tensor] = None, k_ft: int = 40, finetune: str = "per-round", ft_lr: float = 1e-6,
             ft_betas=(0.9, 0.99), ft_steps: int = 1, history: int = 10, history_decay: float = 0.9,
             ft_rounds: Optional[int] = None, seed: int = 0, snapshot_rounds=(), progress: bool = True,
             backend: str = "auto", graph=False,
             callback: Optional[Callable[[RoundLog, torch.Tensor], None]] = None) -> OptimizeResult:
    """Run Algorithm 1 or 2 and return the per-round log (see the module docstring).

    ``model(x_t, t)``: an ε-prediction network (for Algorithm 2 a ``torch.nn.Module``, whose
    weights are fine-tuned in place). The reward is either ``reward(x) -> [B]``, differentiable
    (gradients by autograd), or ``reward_grad(x) -> (values [B], gradients [B, dim])``.
    ``basis``: the subspace ``A`` ``[dim, d]`` for ``r_off`` (None: r_off not logged).
    ``steps``: sampler steps (None: all T). ``seed`` fixes the noise of every round and the
    fine-tuning draws. ``ft_rounds``: fine-tune in rounds ``k_ft .. k_ft + ft_rounds − 1`` only
    (the authors' ``--sm_ft_round``; None: to the last round, as their published commands).
    ``snapshot_rounds``: rounds whose batch is kept for plots.
    ``callback(round_log, z_k)`` runs after each round. ``graph``: ``True`` samples every round
    by replaying CUDA graphs kept in one :class:`~gradguide.graphs.GraphCache` (captured in the
    first guided round; later rounds load their new gradients and targets into it, and
    Algorithm 2's in-place fine-tuning is read by the replays); a ``GraphCache`` may be passed
    instead. On CPU, ``True`` runs eagerly with a notice.
    """
    _check(model, reward, reward_grad, dim, rounds, delta, algorithm, guidance, batch_size, query, k_ft, finetune,
           ft_lr, ft_steps, history, history_decay)
    if ft_rounds is not None and (not isinstance(ft_rounds, int) or isinstance(ft_rounds, bool) or ft_rounds < 1):
        raise ValueError(f"optimize: ft_rounds: expected None or an integer >= 1, got {ft_rounds!r}")
    settings = {"algorithm": algorithm, "guidance": guidance, "rounds": rounds, "delta": delta,
                "batch_size": batch_size, "sampler": sampler, "steps": steps, "query": query, "sigma": sigma,
                "seed": seed, "dim": dim}
    if algorithm == 2:
        settings.update({"k_ft": k_ft, "finetune": finetune, "ft_lr": ft_lr, "ft_betas": list(ft_betas),
                         "ft_steps": ft_steps, "ft_rounds": ft_rounds})
        if finetune == "history":
            settings.update({"history": history, "history_decay": history_decay})
    device = _device_of(model)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    graphs = _graph_cache(graph, device)
    ft_gen = torch.Generator().manual_seed(seed + 7919)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    opt = torch.optim.Adam(params, lr=ft_lr, betas=tuple(ft_betas)) if algorithm == 2 else None
    snapshots: Dict[int, torch.Tensor] = {}
    log: List[RoundLog] = []
    past: List[torch.Tensor] = []

    def draw(guide_terms):
        x_T = torch.randn((batch_size, dim), generator=noise_gen, device=device)
        _requires_grad(params, False)  # sampling never needs weight gradients
        try:
            z = sample(model, (batch_size, dim), schedule=schedule, sampler=sampler, steps=steps,
                       guidance=guide_terms, x_T=x_T, generator=noise_gen,
                       execution=Execution(backend=backend, graph=graphs if graphs is not None else False))
        finally:
            _requires_grad(params, True)
        return z.detach()

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds, desc=f"Alg.{algorithm} {guidance}", leave=False, disable=None)  # off on a non-tty
    stopped = None
    start = time.perf_counter()
    z = draw([])
    values, grads, why = _evaluate(reward, reward_grad, z, "z_0")
    if why is not None:
        raise ValueError(f"optimize: reward: {why} already on the unguided batch z_0")
    log.append(_round_log(0, values, z, basis, time.perf_counter() - start))
    if 0 in snapshot_rounds:
        snapshots[0] = z.cpu()
    if callback is not None:
        callback(log[-1], z)
    for k in range(rounds):
        start = time.perf_counter()
        # query the gradient(s) and set the targets y = gᵀz + δ
        if query == "mean":
            zbar = z.mean(0, keepdim=True)
            _, g_mean, why = _evaluate(reward, reward_grad, zbar, f"the batch mean of round {k}")
            if why is not None:
                stopped = f"round {k + 1}: {why}"
                break
            g = g_mean.expand(batch_size, dim)
            y = (g_mean * zbar).sum(1).expand(batch_size) + delta
        else:
            g = grads
            y = (g * z).sum(1) + delta
        # Algorithm 2: fine-tune on generated samples from round k_ft on (authors' order: before sampling)
        ft_loss = None
        if algorithm == 2 and k >= k_ft and (ft_rounds is None or k < k_ft + ft_rounds):
            past.append(z)
            del past[:-history]
            ft_loss = _finetune(model, opt, z, past, schedule, finetune, ft_steps, history_decay, ft_gen)
        term = (NaiveGradient if guidance == "G" else LookAhead)(g.detach().clone(), y.detach().clone(), sigma=sigma)
        z_new = draw([term])
        values_new, grads_new, why = _evaluate(reward, reward_grad, z_new, f"round {k + 1}")
        if why is None and not torch.isfinite(z_new).all():
            why = "the sampler produced non-finite samples"
        if why is not None:
            stopped = f"round {k + 1}: {why}"
            break
        z, values, grads = z_new, values_new, grads_new
        log.append(_round_log(k + 1, values, z, basis, time.perf_counter() - start, ft_loss is not None, ft_loss))
        if (k + 1) in snapshot_rounds:
            snapshots[k + 1] = z.cpu()
        if callback is not None:
            callback(log[-1], z)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{log[-1].reward_mean:.3f}",
                            r_off=f"{log[-1].r_off_mean:.3g}" if log[-1].r_off_mean is not None else "-")
    if bar is not None:
        bar.close()
    if stopped is not None:
        settings["rounds_completed"] = log[-1].round
    return OptimizeResult(settings=settings, log=log, samples=z.cpu(), snapshots=snapshots, stopped=stopped)


# -- pieces -------------------------------------------------------------------------------------

def _requires_grad(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _check(model, reward, reward_grad, dim, rounds, delta, algorithm, guidance, batch_size, query, k_ft, finetune,
           ft_lr, ft_steps, history, history_decay) -> None:
    if not callable(model):
        raise TypeError(f"optimize: model: expected a callable model(x_t, t), got {type(model).__name__}")
    if (reward is None) == (reward_grad is None):
        raise ValueError("optimize: give exactly one of reward (a differentiable function x -> [B]) or "
                         "reward_grad (x -> (values [B], gradients [B, dim]))")
    for name, f in (("reward", reward), ("reward_grad", reward_grad)):
        if f is not None and not callable(f):
            raise TypeError(f"optimize: {name}: expected a callable, got {type(f).__name__}")
    for name, v, low in (("dim", dim, 1), ("rounds", rounds, 0), ("batch_size", batch_size, 1),
                         ("k_ft", k_ft, 0), ("ft_steps", ft_steps, 1), ("history", history, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"optimize: {name}: expected an integer >= {low}, got {v!r}")
    if not isinstance(delta, (int, float)) or not math.isfinite(delta):
        raise ValueError(f"optimize: delta: expected a finite number, got {delta!r}")
    if algorithm not in (1, 2):
        raise ValueError(f"optimize: algorithm: expected 1 or 2, got {algorithm!r}")
    if guidance not in GUIDANCES:
        raise ValueError(f"optimize: guidance: expected one of {GUIDANCES}, got {guidance!r}")
    if query not in QUERIES:
        raise ValueError(f"optimize: query: expected one of {QUERIES}, got {query!r}")
    if finetune not in FINETUNES:
        raise ValueError(f"optimize: finetune: expected one of {FINETUNES}, got {finetune!r}")
    if not (ft_lr > 0) or not (0 < history_decay <= 1):
        raise ValueError(f"optimize: expected ft_lr > 0 and 0 < history_decay <= 1, got {ft_lr}, {history_decay}")
    if algorithm == 2 and not (isinstance(model, torch.nn.Module) and any(True for _ in model.parameters())):
        raise TypeError("optimize: algorithm=2 fine-tunes the score network: model must be a torch.nn.Module "
                        "with parameters")


def _evaluate(reward, reward_grad, x: torch.Tensor, where: str):
    """Reward values ``[B]`` and gradients ``[B, D]`` at ``x``; ``why`` is set when non-finite."""
    b = x.shape[0]
    if reward is not None:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            values = reward(xg)
            _check_values(values, b, "reward")
            (grads,) = torch.autograd.grad(values.sum(), xg, allow_unused=True)
            if grads is None:
                grads = torch.zeros_like(xg)
        values = values.detach()
    else:
        out = reward_grad(x.detach())
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("optimize: reward_grad: expected a tuple (values [B], gradients [B, D]), got "
                            f"{type(out).__name__}")
        values, grads = out
        _check_values(values, b, "reward_grad values")
        if not isinstance(grads, torch.Tensor) or tuple(grads.shape) != tuple(x.shape):
            got = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"optimize: reward_grad gradients: expected shape {tuple(x.shape)}, got {got}")
        values, grads = values.detach(), grads.detach()
    values, grads = values.to(x.dtype), grads.to(x.dtype)
    if not torch.isfinite(values).all():
        return values, grads, f"non-finite reward at {where}"
    if not torch.isfinite(grads).all():
        return values, grads, f"non-finite reward gradient at {where}"
    return values, grads, None


def _check_values(values, b: int, name: str) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"optimize: {name}: expected a tensor of shape [B] = [{b}], got {type(values).__name__}")
    if tuple(values.shape) != (b,):
        raise ValueError(f"optimize: {name}: expected one value per sample, shape [B] = [{b}], got "
                         f"{tuple(values.shape)}")


def _round_log(k, values, z, basis, seconds, finetuned=False, ft_loss=None) -> RoundLog:
    top = values.topk(min(TOP_K, values.numel())).indices
    r_mean = r_top = None
    if basis is not None:
        from ..metrics import off_support_ratio
        r = off_support_ratio(z, basis.to(device=z.device, dtype=z.dtype))
        r_mean, r_top = float(r.mean()), float(r[top].mean())
    return RoundLog(round=k, reward_mean=float(values.mean()), reward_top4=float(values[top].mean()),
                    r_off_mean=r_mean, r_off_top4=r_top, seconds=seconds, finetuned=finetuned, ft_loss=ft_loss)


def _finetune(model, opt, z, past, schedule, mode, ft_steps, decay, gen) -> float:
    """One round of fine-tuning: ``ft_steps`` Adam steps of the ε-prediction loss."""
    from .simulation import diffusion_loss
    model.train()
    try:
        for _ in range(ft_steps):
            if mode == "per-round":
                loss = diffusion_loss(model, z, schedule, gen)
            else:
                # the weighted score-matching loss over the kept generated sets, newest weighted most
                # batch j gets total weight ∝ decay^(k−j), shared equally by its samples
                w = torch.tensor([decay ** (len(past) - 1 - j) for j in range(len(past))], dtype=z.dtype)
                sizes = torch.tensor([p.shape[0] for p in past])
                x0 = torch.cat(past)
                weights = torch.repeat_interleave(w / w.sum() / sizes.to(w.dtype), sizes)
                loss = diffusion_loss(model, x0, schedule, gen, weights=weights.to(x0.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        model.eval()
    return float(loss.detach())


# -- plots --------------------------------------------------------------------------------------

def plot_results(results: Dict[str, OptimizeResult], path: str, basis: Optional[torch.Tensor] = None,
                 direction: Optional[torch.Tensor] = None, optimum: Optional[float] = None, title: str = "") -> None:
    """Reward vs round, r_off vs round, and sample projections (as the paper's figures).

    The projection panel shows, for the last batch of each run, the on-support coordinate of
    each sample along the objective's in-subspace direction ``Pθ/‖Pθ‖`` against its
    off-support norm ``‖(I − P)x‖`` (the paper plots samples against the data subspace).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 3 if basis is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    axes = [axes] if panels == 1 else list(axes)
    for label, res in results.items():
        rounds = [r.round for r in res.log]
        line, = axes[0].plot(rounds, [r.reward_mean for r in res.log], label=label)
        axes[0].plot(rounds, [r.reward_top4 for r in res.log], color=line.get_color(), ls=":", lw=0.8)
        if basis is not None:
            axes[1].semilogy(rounds, [max(r.r_off_mean, 1e-12) for r in res.log], label=label, color=line.get_color())
            A = basis.to(res.samples.dtype)
            x = res.samples
            on = (x @ A) @ A.T
            off = (x - on).norm(dim=1)
            if direction is not None:
                u = (A @ (A.T @ direction.to(x.dtype)))
                u = u / u.norm().clamp_min(1e-12)
                coord = on @ u
                axes[2].set_xlabel("on-support coordinate along Pθ/‖Pθ‖")
            else:
                coord = on.norm(dim=1)
                axes[2].set_xlabel("‖Px‖ (on-support norm)")
            axes[2].scatter(coord, off, s=8, alpha=0.7, color=line.get_color(), label=label)
    if optimum is not None:
        axes[0].axhline(optimum, color="k", lw=0.8, ls="--", label=f"optimum {optimum:g}")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("reward (solid: mean, dotted: top-4)")
    axes[0].legend(fontsize=7)
    if basis is not None:
        axes[1].set_xlabel("round")
        axes[1].set_ylabel("mean r_off = ‖(I−P)x‖/‖Px‖")
        axes[2].set_ylabel("‖(I − P)x‖ (off-support norm)")
        axes[2].set_title("final samples", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line: `gradguide optimize` ---------------------------------------------------------

PAPER_DELTA = {("f1-theta2", "G"): 0.9, ("f1-theta2", "G_loss"): 0.2, ("f1-theta1", "G"): 0.05,
               ("f1-theta1", "G_loss"): 0.05, ("f2-b1", "G"): 1.0, ("f2-b1", "G_loss"): 1.0,
               ("f2-b2", "G"): 1.0, ("f2-b2", "G_loss"): 1.0}
PAPER_ROUNDS = {"f1-theta2": (1000, 1200), "f1-theta1": (1000, 1200), "f2-b1": (50, 50), "f2-b2": (50, 50)}
PAPER_KFT = {"G": 40, "G_loss": 60}


def _graph_cache(graph, device):
    """The GraphCache the rounds share, or None for eager sampling."""
    from ..graphs import GraphCache
    if graph is False or graph is None:
        return None
    if isinstance(graph, GraphCache):
        return graph
    if graph is not True:
        raise TypeError(f"optimize: graph: expected True, False or a GraphCache, got {type(graph).__name__}")
    if device.type != "cuda":
        warnings.warn(f"optimize: graph=True needs a CUDA device; optimising eagerly on {device.type}", stacklevel=3)
        return None
    return GraphCache()


def add_arguments(p) -> None:
    """The ``gradguide optimize`` options (the paper's simulation settings are the defaults)."""
    from .simulation import OBJECTIVES
    p.add_argument("--objective", choices=OBJECTIVES, default="f1-theta2", help="objective (default f1-theta2)")
    p.add_argument("--algorithm", type=int, choices=[1, 2], nargs="+", default=[1, 2],
                   help="algorithm(s) (default 1 2)")
    p.add_argument("--guidance", choices=GUIDANCES, nargs="+", default=list(GUIDANCES), help="G and/or G_loss")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds (default: the paper's, 1000/1200 for f1, 50 for f2)")
    p.add_argument("--delta", type=float, default=None, help="δ, reward increment per round (default: the paper's)")
    p.add_argument("--batch-size", type=int, default=32, help="B parallel chains (default 32)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default all T = 200)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpmpp-2m"], help="sampler (default ddpm)")
    p.add_argument("--query", choices=QUERIES, default="per-sample", help="per-sample (authors' code) or mean (paper)")
    p.add_argument("--k-ft", type=int, default=None, help="first fine-tuning round (default 40 for G, 60 for G_loss)")
    p.add_argument("--finetune", choices=FINETUNES, default="per-round", help="per-round (code) or history (paper)")
    p.add_argument("--ft-lr", type=float, default=1e-5, help="fine-tuning Adam lr (default 1e-5, see docs)")
    p.add_argument("--ft-steps", type=int, default=1, help="Adam steps per fine-tuning round (default 1)")
    p.add_argument("--ft-rounds", type=int, default=None,
                   help="fine-tune in this many rounds from k_ft on, then stop (the authors' --sm_ft_round; "
                        "default: to the last round)")
    p.add_argument("--history", type=int, default=10,
                   help="--finetune history: generated batches kept, newest first (default 10)")
    p.add_argument("--history-decay", type=float, default=0.9,
                   help="--finetune history: batch k-j weighted by decay^j (default 0.9; 1 = equal weights)")
    p.add_argument("--model", choices=["small", "analytic", "unet"], default="small",
                   help="score: the shipped small network, the exact analytic score, or the paper's U-Net (--weights)")
    p.add_argument("--weights", default=None,
                   help="safetensors from `gradguide train-sim` (default: the shipped small weights)")
    p.add_argument("--seed", type=int, nargs="+", default=[1234], help="seed(s) (paper: 1234 2345 3456 4567 5678)")
    p.add_argument("--sim-seed", type=int, default=0, help="simulation seed fixing A, θ, b (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="write every run's settings and log to this JSON")
    p.add_argument("--plot", default=None, help="write the reward / r_off / projection plot to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _partial_writer(args, runs, alg, guid, seed, rounds, every: int = 50):
    """A callback that prints a progress line and rewrites ``--json`` with the log so far every
    ``every`` rounds, so a long run that is stopped still leaves its rounds behind."""
    log, start = [], time.perf_counter()

    def callback(entry: RoundLog, z) -> None:
        log.append(asdict(entry))
        if entry.round % every or entry.round == 0:
            return
        wall = time.perf_counter() - start
        print(f"  Alg.{alg} {guid} seed {seed}: round {entry.round}/{rounds} reward {entry.reward_mean:.3f} "
              f"r_off {entry.r_off_mean:.4g} ({wall:.0f} s)", flush=True)
        if args.json:
            current = {"algorithm": alg, "guidance": guid, "objective": args.objective, "seed": seed,
                       "rounds": rounds, "rounds_completed": entry.round, "partial": True, "wall_s": wall,
                       "log": log}
            with open(args.json, "w") as fh:
                json.dump({"command": "gradguide optimize", "runs": runs + [current]}, fh)
    return callback


def build_model(kind: str, sim, weights: Optional[str] = None):
    if kind == "analytic":
        from .analytic import SubspaceGaussian
        return SubspaceGaussian(sim.schedule, sim.basis)
    if kind == "unet":
        if weights is None:
            raise SystemExit("--model unet: give --weights PATH from `gradguide train-sim --arch unet --out PATH`")
        from .simulation import load_unet
        return load_unet(weights)
    from .simulation import SMALL_WEIGHTS, load_small
    return load_small(weights or SMALL_WEIGHTS)


def run_cli(args) -> int:
    from .simulation import Simulation
    if args.model == "analytic" and 2 in args.algorithm:
        raise SystemExit("gradguide optimize: --algorithm 2 fine-tunes a network; the analytic score has no "
                         "weights (use --model small or unet)")
    for name in ("rounds", "batch_size", "steps", "threads", "ft_steps", "history", "ft_rounds"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "rounds" else 1):
            raise SystemExit(f"gradguide optimize: --{name.replace('_', '-')} must be positive, got {value}")
    from ..tools import outputs
    for path, option in ((args.json, "--json"), (args.plot, "--plot")):
        if path:   # refused before the rounds run, not after
            outputs.claim(path, option=option)
    torch.set_num_threads(args.threads)
    sim = Simulation(args.sim_seed)
    objective = sim.objective(args.objective)
    runs, results = [], {}
    for alg in args.algorithm:
        for guid in args.guidance:
            for seed in args.seed:
                model = build_model(args.model, sim, args.weights)  # fresh weights per run (Alg. 2 edits them)
                rounds = args.rounds if args.rounds is not None else PAPER_ROUNDS[args.objective][alg - 1]
                delta = args.delta if args.delta is not None else PAPER_DELTA[(args.objective, guid)]
                k_ft = args.k_ft if args.k_ft is not None else PAPER_KFT[guid]
                start = time.perf_counter()
                partial = _partial_writer(args, runs, alg, guid, seed, rounds)
                res = optimize(model, objective, dim=sim.D, schedule=sim.schedule, rounds=rounds, delta=delta,
                               algorithm=alg, guidance=guid, batch_size=args.batch_size, sampler=args.sampler,
                               steps=args.steps, query=args.query, basis=sim.basis, k_ft=k_ft,
                               finetune=args.finetune, ft_lr=args.ft_lr, ft_steps=args.ft_steps,
                               ft_rounds=args.ft_rounds, history=args.history, history_decay=args.history_decay,
                               seed=seed, progress=not args.no_progress, callback=partial)
                wall = time.perf_counter() - start
                f = res.final
                print(f"Alg.{alg} {guid:6s} seed {seed}: rounds {f.round}/{rounds}  reward {f.reward_mean:.3f} "
                      f"(top-4 {f.reward_top4:.3f})  r_off {f.r_off_mean:.4g}  {wall:.1f} s"
                      + (f"  STOPPED: {res.stopped}" if res.stopped else ""), flush=True)
                entry = {"algorithm": alg, "guidance": guid, "objective": args.objective, "seed": seed,
                         "model": args.model, "weights": args.weights, "sim_seed": args.sim_seed, "rounds": rounds,
                         "final_reward": f.reward_mean, "final_r_off": f.r_off_mean, "wall_s": wall,
                         **res.to_dict()}
                runs.append(entry)
                results[f"Alg.{alg} {guid} s{seed}"] = res
                if args.json:  # rewrite after each run, so a long job leaves its finished runs behind
                    with open(args.json, "w") as fh:
                        json.dump({"command": "gradguide optimize", "runs": runs}, fh, indent=1)
    if args.plot:
        direction = sim.theta1 if args.objective == "f1-theta1" else sim.theta2 if args.objective == "f1-theta2" \
            else None
        plot_results(results, args.plot, basis=sim.basis, direction=direction, optimum=objective.optimum,
                     title=f"{args.objective}, B={args.batch_size}, steps={args.steps or sim.T}")
    return 0


def plot_logs(paths, out: str, title: str = "") -> Dict[str, dict]:
    """Reward and r_off vs round from ``gradguide optimize --json`` files (finished or partial runs).

    Returns, per run label, its last logged round (for tables)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    last = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for run in data["runs"]:
            label = f"Alg.{run['algorithm']} {run['guidance']} s{run['seed']}"
            log = run["log"]
            rounds = [r["round"] for r in log]
            line, = axes[0].plot(rounds, [r["reward_mean"] for r in log], label=label, lw=1)
            axes[1].semilogy(rounds, [max(r["r_off_mean"], 1e-12) for r in log], color=line.get_color(), lw=1)
            last[label] = {**log[-1], "rounds_planned": run["rounds"], "partial": bool(run.get("partial")),
                           "wall_s": run.get("wall_s")}
    axes[0].axhline(10.0, color="k", lw=0.8, ls="--", label="f1* = 10")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("mean reward")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean r_off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return last
