"""``gradguide bench --suite precision``: how far a float32 run lands from the float64 run of the
same sampling, on each backend, for the pinned precision cases.

Cases: DDIM with a classifier (scale 1.5) and ``PixelAsParam("B", granularity="channel")``,
``clip=True``, 5 steps, η 0 and 1 (the case where a float32 Gram matrix once lost 8 % of a
clipped shift's norm); three draws of the same case that property testing found near the
tolerance; APG 3 on DDIM (the fused step) and CFG 3 with PixelAsParam C (official convention)
on DPM-Solver++(2M) with clipping, both on the Gaussian mixture of the demos. The model and the
classifier evaluate in float64 and round their outputs (and input gradients) to float32 values
in both runs, so what is measured is gradguide's arithmetic, not the model's float32 error.
``tests/core/test_precision.py`` holds every backend to these figures (1e-4, or the floor).

Per case and backend, ``max |x32 − x64| / max |x64|``:

- ``unrounded``: the float64 run starts from the unrounded float64 ``x_T`` and noise, the
  float32 run from their float32 roundings;
- ``like``: both runs start from the same float32 values (the tests' measure);
- ``floor``: how far the float64 run itself moves when its ``x_t`` is stored in float32 after
  every step, or ``x_T`` moves by 1e-7 relative (largest of three runs): the sampling's
  conditioning, which no float32 arithmetic can beat.
"""
from __future__ import annotations

import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

SHAPE = (4, 3, 8, 8)
HYPOTHESIS_DRAWS = [(65, 1.0, 3.26171875), (377, 1.0, 1.0), (244, 0.0, 2.5)]


class _Float32Values(torch.autograd.Function):
    """Identity that rounds the value (forward) and the gradient (backward) to float32 values."""

    @staticmethod
    def forward(ctx, x):
        return x.float().to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.float().to(g.dtype)


def in_float64(fn):
    """``fn`` evaluated in float64, its output and its input-gradient rounded to float32 values in
    *both* runs: the float32 and float64 runs see the same model, so the comparison measures
    gradguide's arithmetic (and the conditioning of the sampling to float32 rounding of x_t),
    not the model's float32 error. (Without the rounding, policy C's Δ = x̂0_c − x̂0_u, a small
    difference of model outputs, makes even two float64 runs differ by 8e-2 when one model's
    outputs are rounded to float32: the problem's conditioning, not the arithmetic's.)"""
    return lambda x, t, **kw: _Float32Values.apply(fn(_Float32Values.apply(x).double(), t, **kw)).to(x.dtype)


def _sampler(name: str, **settings) -> dict:
    """sample()'s sampler keyword: the sampler and its settings."""
    from ..config import Sampler
    return {"sampler": Sampler(name, **settings)}


def _backend(backend: str) -> dict:
    """sample()'s execution keyword for a backend."""
    from ..config import Execution
    return {"execution": Execution(backend=backend)}


def _schedule():
    import gradguide as gg
    return gg.Schedule.linear(1000)


def _model(schedule):
    @in_float64
    def model(x, t, y=None):
        # an ε model near the exact one for N(0, I) data, nonlinear, x̂_0 = O(1) at every t
        abar = schedule.alphas_cumprod.to(x.dtype)[t].reshape(-1, *([1] * (x.dim() - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        out = s * x + a * (0.3 * torch.tanh(1.3 * x) + 0.2 * x.roll(1, -1))
        return out + a * 0.4 * torch.sin(x + 1.0) if y is not None else out
    return model


def _classifier(seed: int):
    d = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return in_float64(lambda x, t, y=None: (torch.sin(2 * x) * d).flatten(1).sum(1))


def classifier_case(eta: float = 0.0, seed: int = 0, scale: float = 1.5) -> dict:
    """DDIM, a classifier, PixelAsParam("B", granularity="channel"), clip=True, 5 steps."""
    import gradguide as gg
    schedule = _schedule()
    return dict(model=_model(schedule), shape=SHAPE, schedule=schedule, steps=5,
                guidance=gg.Classifier(_classifier(seed + 7), scale), cond={"y": torch.ones(SHAPE[0])},
                projection=gg.PixelAsParam("B", granularity="channel"), **_sampler("ddim", eta=eta, clip=True))


def cases() -> Iterator[Tuple[str, int, dict]]:
    """(name, seed, sample() keywords) of every pinned case."""
    import gradguide as gg
    from ..experiments.demo_mixture import default_mixture
    for eta in (0.0, 1.0):
        yield f"classifier + B, eta {eta:g}", 0, classifier_case(eta)
    for seed, eta, scale in HYPOTHESIS_DRAWS:
        yield f"classifier + B, seed {seed}, eta {eta:g}, scale {scale:g}", seed, classifier_case(eta, seed, scale)
    mixture = default_mixture(gg.Schedule.linear(200))
    model = in_float64(mixture)
    y = torch.full((8,), 2)
    yield "APG 3, ddim (fused step)", 0, dict(model=model, shape=(8, 2), schedule=mixture.schedule, steps=6,
                                              guidance=[gg.APG(3.0)], cond={"y": y}, **_sampler("ddim"))
    yield "cfg + C (official), dpmpp-2m, clip", 0, dict(
        model=model, shape=(8, 2), schedule=mixture.schedule, steps=6, guidance=[gg.CFG(3.0)],
        projection=gg.PixelAsParam("C", convention="official"), cond={"y": y},
        **_sampler("dpmpp-2m", clip=(-5.0, 5.0)))


def relative_error(x32: torch.Tensor, x64: torch.Tensor) -> float:
    return float((x32.double() - x64).abs().max() / x64.abs().max())


class _Noise:
    """Draw the sampler's noise in float64, optionally rounded to float32 values, for both runs."""

    def __init__(self, rounded: bool):
        from .. import sampling
        self.sampling, self.rounded, self.draw = sampling, rounded, sampling._noise

    def __enter__(self):
        draw, rounded = self.draw, self.rounded
        self.sampling._noise = lambda shape, gen, device, dt: (
            draw(shape, gen, device, torch.float64).float() if rounded else draw(shape, gen, device, torch.float64)
        ).to(dt)

    def __exit__(self, *exc):
        self.sampling._noise = self.draw


def pair(backend: str, seed: int, like: bool, **kw) -> float:
    """float32 run vs float64 run of the same sampling on ``backend``."""
    import gradguide as gg
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    with _Noise(rounded=like):
        for dt in (torch.float64, torch.float32):
            start = x_T.float().to(dt) if (like or dt == torch.float32) else x_T
            out[dt] = gg.sample(x_T=start, generator=torch.Generator().manual_seed(seed + 1), **_backend(backend),
                                **kw)
    return relative_error(out[torch.float32], out[torch.float64])


def float32_floor(seed: int = 0, fused: bool = True, **kw) -> float:
    """How far the float64 run moves when its state is stored as float32 values after every
    step, and when x_T moves by 1e-7 relative (two draws): the largest of the three. The runs
    take the reference backend (``fused``: the execution's fused step, on or off).

    Only x_t and the sampler's carried state are rounded: they are what every float32 run must
    store. Intermediates (clipped x̂_0, shifts) are not: how they are formed is gradguide's choice,
    and forming a small one as a difference of two stored large ones is what the precision tests
    catch."""
    import gradguide as gg
    from .. import sampling
    real = sampling.step

    def stored(*args, **kwargs):
        x, state, record = real(*args, **kwargs)
        return x.float().double(), {k: v.float().double() for k, v in state.items()}, record
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float().double()
    starts = [x_T] + [x_T * (1 + 1e-7 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(99 + j),
                                                    dtype=torch.float64)) for j in range(2)]

    def run(x, step):
        sampling.step = step   # read when the run's stepper is made
        try:
            return gg.sample(x_T=x, generator=torch.Generator().manual_seed(seed + 1),
                             execution=gg.Execution(backend="reference", fused=fused), **kw)
        finally:
            sampling.step = real
    with _Noise(rounded=True):
        exact = run(x_T, real)
        return max(relative_error(run(x, stored), exact) for x in starts)


def run(backends: Optional[List[str]] = None, quick: bool = False, progress=None) -> dict:
    """Every case on every backend (``quick``: the first case only)."""
    import gradguide as gg
    backends = backends or [b for b, ok in gg.ops.available_backends("cpu").items() if ok is True]
    rows = []
    for i, (name, seed, kw) in enumerate(cases()):
        if quick and i > 0:
            break
        floor = float32_floor(seed=seed, **kw)
        for backend in backends:
            t0 = time.perf_counter()
            rows.append({"case": name, "backend": backend, "unrounded": pair(backend, seed, False, **kw),
                         "like": pair(backend, seed, True, **kw), "floor": floor,
                         "seconds": time.perf_counter() - t0})
            if progress:
                progress(rows[-1])
    return {"backends": backends, "quick": quick, "rows": rows}


def markdown(result: dict, header: Dict[str, str]) -> str:
    lines = ["# float32 vs float64 on the pinned precision cases", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["- metric: max |x32 − x64| / max |x64|; *unrounded*: the float64 run from unrounded float64 x_T and "
              "noise; *like with like*: both runs from the same float32 values; *floor*: the float64 run's own "
              "movement under float32 storage of x_t (gradguide/bench/precision.py)", "",
              "| case | backend | unrounded | like with like | float32 floor |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['backend']} | {r['unrounded']:.2e} | **{r['like']:.2e}** | {r['floor']:.2e} |")
    return "\n".join(lines) + "\n"


def run_cli(args) -> int:
    import json
    import os
    import sys

    from . import meta
    backends = args.backends.split(",") if args.backends else None
    date = meta.today()
    stem = f"precision-cpu-{date}" + ("-quick" if args.quick else "")
    meta.claim_report(args.out, stem)
    torch.set_num_threads(args.threads or 1)
    show = None if args.no_progress else (lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    result = run(backends, quick=args.quick, progress=show)
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    header = {"command": f"{env}gradguide bench --suite precision" + (" --quick" if args.quick else ""),
              "commit": meta.git_commit(), "date": meta.now(), "torch": torch.__version__,
              "threads": str(torch.get_num_threads())}
    data = dict(result, **header)
    md = markdown(result, header)
    return meta.print_report(meta.write_report(args.out, stem, data, md), md)
