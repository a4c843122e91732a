"""The dry run's workloads (see :mod:`gradguide.bench.dryrun`): the bench harness's paper and
loop workloads built on ``meta``, and every sampler × guidance × projection on a small model."""
from __future__ import annotations

import time
from typing import List, Optional

import torch
from torch import nn

import gradguide as gg
from gradguide.tools import guidance_spec

from .fake import Tracker
from .step import dry_run

# -- workloads ------------------------------------------------------------------------------------------

def _load_bench():
    from gradguide.bench import loop
    return loop


class _BigOnMeta(torch.overrides.TorchFunctionMode):
    """Allocate large tensors (>= 4096 elements, no device or generator given) on ``meta``, so
    building an SD-1.5-size network costs no memory and no initialisation time; small tensors
    (schedules, biases, vectors the harness reads on the host) stay real. The harness then
    moves everything to ``meta`` and the dry run makes it fake."""
    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None and kwargs.get("generator") is None:
            size = args[0] if len(args) == 1 or func is torch.full else args
            if func is torch.full:
                size = args[0]
            if isinstance(size, (list, tuple, torch.Size)) and len(size) and isinstance(size[0], (list, tuple)):
                size = size[0]
            try:
                numel = 1
                for d in (size if isinstance(size, (list, tuple, torch.Size)) else [size]):
                    numel *= int(d)
            except (TypeError, ValueError):
                numel = 0
            if numel >= 4096:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def paper_workload(name: str, tracker: Tracker, quick: bool = False, dtype: Optional[torch.dtype] = None) -> tuple:
    """``(model, shape, sample kwargs, facts)`` of a workload of the bench harness
    (``gradguide/bench/loop.py``), built on the ``meta`` device, with its classifier or decoder
    marked as a model phase on ``tracker``. U-Net weights default to float16, as the harness
    runs them on CUDA."""
    from gradguide.bench.profiling import phased
    bench = _load_bench()
    if name not in bench.ALL_WORKLOADS:
        raise ValueError(f"workload: expected one of {', '.join(bench.ALL_WORKLOADS)}, got {name!r}")
    with _BigOnMeta():
        w = bench.build_workload(name, quick=quick, device="meta", seed=0, dtype=dtype or torch.float16)
        kw = dict(w.fixed)
        kw.update(w.per_pass(lambda fn: phased(fn, tracker), 0))
    return w.model, w.shape, kw, {"config": w.config, "params": w.params, "paper_ratio": w.paper_ratio}


def run_workload(name: str, quick: bool = False, backend: str = "auto", graph: bool = True,
                 dtype: Optional[torch.dtype] = None) -> dict:
    """Dry-run a paper/loop workload of the bench harness (see :func:`dry_run`)."""
    t0 = time.perf_counter()
    tracker = Tracker()
    model, shape, kw, facts = paper_workload(name, tracker, quick, dtype)
    build_s = time.perf_counter() - t0
    result = dry_run(model, shape, graph=graph, backend=backend, name=name, tracker=tracker, steps_measured=[1], **kw)
    result.update(workload=name, quick=quick, build_s=build_s, **facts)
    return result


# -- every sampler x guidance x projection -----------------------------------------------------------

# sampler variants: name -> sample() arguments (DDPM's three variances, DDIM deterministic,
# stochastic and with x̂_0 clipping, DPM-Solver++(2M)); "learned-range": the model outputs 2C channels
SAMPLER_VARIANTS = {
    "ddpm": gg.Sampler("ddpm"),
    "ddpm-large": gg.Sampler("ddpm", variance="fixed-large"),
    "ddpm-learned": gg.Sampler("ddpm", variance="learned-range"),
    "ddim": gg.Sampler("ddim"),
    "ddim-eta1": gg.Sampler("ddim", eta=1.0),
    "ddim-clip": gg.Sampler("ddim", clip=(-1.0, 1.0)),   # x̂_0 clipping (image models; ADM clips)
    "dpmpp-2m": gg.Sampler("dpmpp-2m"),
}
SAMPLERS = tuple(SAMPLER_VARIANTS)
# the guidance and projection names: the harness's one factory (gradguide/tools/guidance_spec.py)
GUIDANCE = tuple(n for n in guidance_spec.GUIDANCE if n != "G_loss-decoded")   # (its decoder: a paper workload)
PROJECTIONS = guidance_spec.PROJECTIONS


class _TinyClassifier(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def log_prob(self, x, t, class_labels):
        logits = self.head(torch.nn.functional.silu(self.conv(x)).mean(dim=(2, 3)))
        return logits.log_softmax(-1).gather(1, class_labels[:, None])[:, 0]


# perturbed-branch guiders: their branches come from diffusers' hooks on the model's transformer blocks, so
# they run on a small transformer (:class:`TinyDiT`), not on the convolution the other rows use
BRANCH_GUIDANCE = ("pag", "slg")
BRANCH_PROJECTIONS = ("none", "A", "C")


class TinyDiT(nn.Module):
    """A class-conditional transformer over the 8×8 latent's tokens with a diffusers block stack
    (``transformer_blocks``: ``BasicTransformerBlock``s), which PAG's and SLG's hooks find with
    ``layers=[0]`` as they find a DiT's. Class ``classes`` is the unconditional label."""

    def __init__(self, channels: int = 4, dim: int = 16, heads: int = 2, depth: int = 2, classes: int = 10):
        from diffusers.models.attention import BasicTransformerBlock
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.embed = nn.Embedding(classes + 1, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, dim // heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x, t, class_labels=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2)) + self.embed(class_labels)[:, None]
        for block in self.transformer_blocks:
            tokens = block(tokens)
        # contiguous, as a DiT's unpatchify returns its output (a strided view would cost the step a copy)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w).contiguous()


def _branch_guider(name: str, denoiser: nn.Module, uncond: dict):
    # the perturbed term on at every step it can be (diffusers' window excludes its ends: steps 1..N-1)
    cls = {"pag": gg.PAG, "slg": gg.SLG}[name]
    return [cls(4.0, 3.0, layers=[0], perturbed_start=0.0, perturbed_stop=1.0, uncond=uncond, denoiser=denoiser)]


def _guidance_terms(name: str, shape, tracker: Tracker):
    """The terms of ``name`` with their model-side inputs on ``meta`` (classifier and DPS operator
    marked as model phases on ``tracker``)."""
    from gradguide.bench.profiling import phased
    meta = torch.device("meta")
    if name not in GUIDANCE:
        raise ValueError(f"guidance: expected one of {GUIDANCE}, got {name!r}")
    inputs = {}
    if name == "classifier":
        inputs["classifier"] = phased(_TinyClassifier(shape[1]).to(meta).log_prob, tracker)
    elif name in ("G", "G_loss"):
        inputs.update(gradient=torch.empty(shape, device=meta), target=torch.empty(shape[0], device=meta))
    elif name == "dps":
        inputs.update(operator=phased(lambda x0: x0 * 0.5, tracker), measurement=torch.empty(shape, device=meta))
    return guidance_spec.guidance_terms(name, **inputs)


def run_combination(sampler: str, guidance: str, projection: str, backend: str = "auto", graph: bool = False,
                    shape=(2, 4, 8, 8), steps: int = 6) -> dict:
    """Dry-run one ``sampler × guidance × projection`` on a small conditional model.
    A combination that ``gradguide.sample`` refuses is returned with ``status: refused``."""
    if sampler not in SAMPLER_VARIANTS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if guidance in BRANCH_GUIDANCE and projection not in BRANCH_PROJECTIONS:
        raise ValueError(f"projection: expected one of {BRANCH_PROJECTIONS} with {guidance!r}, got {projection!r}")
    variant = SAMPLER_VARIANTS[sampler]
    learned = variant.variance == "learned-range"
    tracker = Tracker()
    labels = torch.zeros(shape[0], dtype=torch.long, device="meta")
    if guidance in BRANCH_GUIDANCE:
        if learned:
            return {"name": f"{sampler} + {guidance} + {projection}", "status": "refused",
                    "reason": "guidance: the perturbed-branch rows' transformer has no learned-variance output"}
        model = TinyDiT(shape[1]).to("meta").eval().requires_grad_(False)
        terms = _branch_guider(guidance, model, {"class_labels": torch.full_like(labels, 10)})
    else:
        model = _load_bench().CheapEps(shape[1], out_channels=2 * shape[1] if learned else None)
        model = model.to("meta").eval().requires_grad_(False)
        terms = _guidance_terms(guidance, shape, tracker)
    for term in terms:
        for v in vars(term).values():
            if isinstance(getattr(v, "__self__", None), nn.Module):
                v.__self__.requires_grad_(False)
    name = f"{sampler} + {guidance} + {projection}"
    try:
        result = dry_run(model, shape, schedule=gg.Schedule.linear(1000), steps=steps, guidance=terms,
                         projection=guidance_spec.projection(projection), cond={"class_labels": labels}, graph=graph,
                         backend=backend, tracker=tracker, name=name, sampler=variant)
    except ValueError as exc:
        if "projection" in str(exc) or "guidance" in str(exc):
            return {"name": name, "status": "refused", "reason": str(exc).splitlines()[0]}
        raise
    result["status"] = "ok"
    result.update(sampler=sampler, guidance=guidance, projection=projection)
    return result


def run_all_combinations(backend: str = "auto", progress: bool = True, graph: bool = True) -> List[dict]:
    combos = [(s, g, p) for s in SAMPLERS for g in GUIDANCE for p in PROJECTIONS]
    combos += [(s, g, p) for s in SAMPLERS for g in BRANCH_GUIDANCE for p in BRANCH_PROJECTIONS]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(combos), desc="dry run: combinations", unit="combo", disable=None)  # off on a non-tty
    out = []
    for s, g, p in combos:
        out.append(run_combination(s, g, p, backend=backend, graph=graph))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
