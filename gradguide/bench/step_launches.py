"""Kernel launches and big-tensor bytes of one guided step beyond the model, counted on CPU.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op and every
custom op (``torch.ops.gradguide.*``) a step dispatches: in eager mode each non-view op is
one kernel launch on a GPU. The model and the classifier run inside an autograd function
whose forward and backward pause the count, so what is left is the sampler's and the
guidance's own cost (the fused step's target: ≤ 8 launches per guided step beyond the model).

Bytes: for every counted op, the bytes of its tensor inputs and outputs that are as large as
the sample batch ("big" tensors; the Gram matrix, coefficients and per-step scalars are not).
:func:`minimum_bytes` is the least a step can move: each operand read once per pass that
needs it, the output written once (see each workload's ``passes``).

``python -m gradguide.bench.step_launches`` prints the table for the six workloads.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PAUSED = [0]


@contextlib.contextmanager
def paused():
    """Ops inside are the model's: not counted."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


class LaunchCounter(TorchDispatchMode):
    """Counts non-view aten/custom ops and the bytes of big tensors they touch."""

    def __init__(self, big_numel: int):
        super().__init__()
        self.big_numel = big_numel
        self.ops: List[str] = []
        self.bytes = 0

    def _big_bytes(self, value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size() if value.numel() >= self.big_numel else 0
        if isinstance(value, (list, tuple)):
            return sum(self._big_bytes(v) for v in value)
        return 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _PAUSED[0] and not getattr(func, "is_view", False) and func.namespace != "prim":
            self.ops.append(str(func.overloadpacket.__name__) if func.namespace == "aten"
                            else f"{func.namespace}::{func.overloadpacket.__name__}")
            self.bytes += self._big_bytes(list(args) + list(kwargs.values())) + self._big_bytes(out)
        return out


# -- an opaque model and classifier (their forward and backward are not counted) --------------

class _Opaque(torch.autograd.Function):
    """``y = 0.5 tanh(x) + 0.1 x + bias`` elementwise: a per-sample stand-in for a network."""

    @staticmethod
    def forward(ctx, x, bias):
        with paused():
            ctx.save_for_backward(x)
            return 0.5 * torch.tanh(x) + 0.1 * x + bias

    @staticmethod
    def backward(ctx, grad):
        with paused():
            (x,) = ctx.saved_tensors
            return grad * (0.5 * (1 - torch.tanh(x) ** 2) + 0.1), None


class _OpaqueLogProb(torch.autograd.Function):
    """``log p(y|x) = <d, sin x>`` per sample."""

    @staticmethod
    def forward(ctx, x, d):
        with paused():
            ctx.save_for_backward(x, d)
            return (torch.sin(x) * d).flatten(1).sum(1)

    @staticmethod
    def backward(ctx, grad):
        with paused():
            x, d = ctx.saved_tensors
            return grad.reshape(-1, *([1] * (x.dim() - 1))) * torch.cos(x) * d, None


class OpaqueModel:
    """``learned``: also ADM's learned-range variance channels, ``[B, 2C, ...]`` like ADM's U-Net."""

    def __init__(self, shape, seed: int = 0, learned: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.bias_c = 0.1 * torch.randn(shape[1:], generator=g)
        self.bias_u = 0.1 * torch.randn(shape[1:], generator=g)
        self.learned = learned

    def __call__(self, x, t, y=None):
        with paused():
            bias = (self.bias_c if y is not None else self.bias_u).to(x.dtype)
            if self.learned:
                bias = torch.cat([bias, -bias])
                x = torch.cat([x, x], 1)
        return _Opaque.apply(x, bias)


def opaque_log_prob(direction: torch.Tensor) -> Callable:
    return lambda x, t, y=None: _OpaqueLogProb.apply(x, direction.to(x.dtype))


# -- the six workloads ----------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    kwargs: Callable[[tuple], dict]   # shape -> sample() keyword arguments
    passes: int                       # big-tensor reads + writes of the ideal step (see minimum_bytes)
    # the traffic a fused step reaches: the minimum, but where a clipped x̂_0 is written once and read
    # by the reduce and the combine (an ideal step would recompute the clamp in both)
    target_ratio: float = 1.1


def _workloads() -> Dict[str, Workload]:
    import gradguide as gg

    def ddim_cfg(shape):
        return dict(sampler="ddim", guidance=gg.CFG(7.5), cond={"y": torch.zeros(shape[0], dtype=torch.long)})

    def ddpm_cls_pxpa(shape):
        d = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        return dict(sampler="ddpm", guidance=gg.Classifier(opaque_log_prob(d), scale=2.0),
                    projection=gg.PixelAsParam("A"))

    def adm_learned_cls_pxpa(shape):
        d = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        return dict(sampler=gg.Sampler("ddpm", variance="learned-range", clip=True), learned=True,
                    guidance=gg.Classifier(opaque_log_prob(d), scale=2.0, form="mean"), projection=gg.PixelAsParam("A"))

    def ddpm_lookahead(shape):
        g = torch.Generator().manual_seed(4)
        return dict(sampler="ddpm", guidance=gg.LookAhead(torch.randn(shape, generator=g), target=1.0))

    def apg(shape):
        return dict(sampler="ddim", guidance=gg.APG(5.0), cond={"y": torch.zeros(shape[0], dtype=torch.long)})

    def cfg_pxpc(shape):
        return dict(sampler="ddpm", guidance=gg.CFG(3.0), projection=gg.PixelAsParam("C"),
                    cond={"y": torch.zeros(shape[0], dtype=torch.long)})

    # passes: the ideal step reads each operand once per pass that needs it and writes x_{t-1} once.
    return {
        # combine(x, eps_c, eps_u) -> x': 3 reads + 1 write (no Gram needed)
        "DDIM + CFG": Workload("DDIM + CFG", ddim_cfg, 4),
        # reduce(x, eps, grad) [den = c0 x0(x, eps), cls = grad] + combine(x, eps, grad, z) + write
        "DDPM + classifier + PxP-A": Workload("DDPM + classifier + PxP-A", ddpm_cls_pxpa, 3 + 4 + 1),
        # ADM's learned range, clipped x̂_0: Σ = exp(slope v + offset) scales the classifier gradient g, √Σ the
        # noise: reduce(x, eps, v, g) [den = c0 clip(x0(x, eps)), cls = Σ g] + combine(x, eps, v, g, z) + write
        # (x̂_0 clipped: written once from x, eps and read in place of both: 12 passes against 10)
        "ADM learned Σ + classifier + PxP-A": Workload("ADM learned Σ + classifier + PxP-A", adm_learned_cls_pxpa,
                                                       4 + 5 + 1, target_ratio=1.2),
        # reduce(x, eps, g, J^T g) [<g, x0>, |vjp|^2] + combine(x, eps, g, J^T g, z) + write
        "DDPM + G_loss": Workload("DDPM + G_loss", ddpm_lookahead, 4 + 5 + 1),
        # reduce(x, eps_c, eps_u) + combine(x, eps_c, eps_u) + write (eta = 0: no noise)
        "DDIM + APG": Workload("DDIM + APG", apg, 3 + 3 + 1),
        # reduce(x, eps_c, eps_u) + combine(x, eps_c, eps_u, z) + write
        "DDPM + CFG + PxP-C": Workload("DDPM + CFG + PxP-C", cfg_pxpc, 3 + 4 + 1),
    }


WORKLOADS = _workloads


def count_step(workload: Workload, shape=(2, 3, 8, 8), step_index: int = 1, backend: str = "auto",
               steps: int = 4, fused: bool = True) -> dict:
    """Launches and big-tensor bytes of step ``step_index`` (a noisy, guided step) of ``workload``
    (``fused=False``: the general LinComb step)."""
    import gradguide as gg
    from gradguide import sampling
    kwargs = workload.kwargs(shape)
    model = OpaqueModel(shape, learned=kwargs.pop("learned", False))
    run = sampling.prepare_run(model, shape, schedule=gg.Schedule.linear(1000), sampler=kwargs.pop("sampler"),
                               steps=steps, guidance=kwargs.pop("guidance", ()), projection=kwargs.pop("projection", None),
                               cond=kwargs.pop("cond", None), execution=gg.Execution(backend=backend, fused=fused))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    state = sampling.initial_state(run, x)
    noise = torch.randn(shape, generator=g) if run.tables.draws_noise[step_index] else None
    idx = run.step_ids[step_index:step_index + 1]
    sampling.step(run, x, step_index, idx, state, noise, False)  # warm (lazy imports, caches)
    counter = LaunchCounter(big_numel=x.numel())
    with counter:
        sampling.step(run, x, step_index, idx, state, noise, False)
    sample_bytes = x.numel() * x.element_size()
    return {"workload": workload.name, "backend": run.backend, "fused": run.plan is not None, "launches": len(counter.ops), "ops": counter.ops,
            "bytes": counter.bytes, "minimum_bytes": workload.passes * sample_bytes,
            "traffic_ratio": counter.bytes / (workload.passes * sample_bytes)}


class _FirstStep(Exception):
    pass


def count_setup(workload: Workload, shape=(2, 3, 8, 8), backend: str = "auto", steps: int = 4,
                fused: bool = True) -> List[str]:
    """The ops one ``sample()`` call issues before its first step when an earlier call had the same
    configuration (its tables and plan come from the setup cache): argument checks, the copies of
    the device tables the run owns, the model inputs of the branches."""
    import gradguide as gg
    from gradguide import sampling
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kwargs, schedule = workload.kwargs(shape), gg.Schedule.linear(1000)   # the caller's objects, made once
    model = OpaqueModel(shape, learned=kwargs.pop("learned", False))

    def call():
        return gg.sample(model, shape, schedule=schedule, steps=steps, x_T=x_T,
                         execution=gg.Execution(backend=backend, fused=fused), **kwargs)
    call()   # fills the setup cache
    counter = LaunchCounter(big_numel=x_T.numel())
    real_step = sampling.step

    def first_step(*args, **kwargs):
        raise _FirstStep
    sampling.step = first_step
    try:
        with counter:
            call()
    except _FirstStep:
        pass
    finally:
        sampling.step = real_step
    return counter.ops


def table(rows: List[dict]) -> str:
    lines = ["| workload | backend | step | launches | big-tensor bytes / minimum | ops | setup ops (cached) |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        setup = len(r["setup_ops"]) if r.get("setup_ops") is not None else "—"
        lines.append(f"| {r['workload']} | {r['backend']} | {'fused' if r['fused'] else 'general'} | {r['launches']} | {r['traffic_ratio']:.2f} | "
                     f"{' '.join(r['ops'])} | {setup} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    import argparse
    import platform
    import sys

    from . import meta
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="native,reference", help="comma-separated ops backends (default: native,reference)")
    p.add_argument("--out", default=None, help="write step-launches-cpu-<date>.{json,md} into this folder")
    args = p.parse_args(argv)
    rows = [dict(count_step(w, backend=b, fused=fused), setup_ops=count_setup(w, backend=b) if fused else None)
            for b in args.backends.split(",") for fused in (False, True) for w in WORKLOADS().values()]
    print(table(rows))
    if args.out:
        commit, date = meta.git_commit(), meta.now()
        info = {"command": "python -m gradguide.bench.step_launches " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": date, "commit": commit, "torch": torch.__version__, "machine": platform.machine(),
                "shape": [2, 3, 8, 8], "step": 1}
        meta.write_report(
            args.out, f"step-launches-cpu-{date[:10]}", dict(info, rows=rows),
            "# Kernel launches and big-tensor traffic of one guided step beyond the model (CPU count)\n\n"
            f"- command: `{info['command']}`; commit {commit}, {date}, torch {torch.__version__}\n"
            "- counted with a TorchDispatchMode: aten ops that are not views + custom ops "
            "(`gradguide::*`); the model and the classifier (forward and backward) are not counted\n"
            "- `general`: the LinComb step (`Execution(fused=False)`, the path without a built-in program); "
            "`fused`: `gradguide.stepplan`\n"
            "- traffic: bytes of tensors as large as the batch read/written by counted ops, over the "
            "minimum (each operand read once per pass that needs it, x_{t-1} written once)\n"
            "- setup ops (cached): ops of one `sample()` call before its first step, when an earlier call had "
            "the same configuration (`count_setup`)\n\n"
            + table(rows) + "\n")


if __name__ == "__main__":
    main()
