"""``gradguide bench --suite peers``: gradguide against the loop users already run.

The peer is the plain diffusers loop as its pipelines write it (``StableDiffusionPipeline``):
``scheduler.set_timesteps(n)``; per step ``cat([latents] * 2)`` with CFG, ``scale_model_input``,
one U-Net call with the negative and positive prompt embeddings stacked, the CFG line
``u + w (c − u)`` and ``DDIMScheduler.step``. gradguide runs the same workload as a user
switching over would: :func:`gradguide.from_diffusers` (or the bare model), the scheduler's
schedule, ``gradguide.sample(..., sampler="ddim", guidance=CFG(w, uncond=...))`` with every
default (backend ``"auto"``, both branches in one call).

Both runners get the same model, the same initial noise and the same sizes, in one process;
passes alternate between the runners (the order flips every repetition) after one warm-up
pass each, whose outputs are compared (``max |Δ|``). Workloads, each unguided and with CFG 7.5,
25 DDIM steps on SD-1.5's scheduler configuration (scaled-linear betas 0.00085–0.012,
``steps_offset=1``, "leading" spacing, ``set_alpha_to_one=False``, no clipping, ε prediction):

- ``cheap``: a fixed 1×1 convolution (computed as a channel contraction) plus a per-channel
  bias read from the text embedding, so the time is the samplers' own per-step cost;
- ``unet``: a tiny SD-architecture ``UNet2DConditionModel`` (random weights, built in code from
  :data:`UNET_CONFIG`: 3 levels of 16/32/32 channels, cross-attention at the lowest resolution,
  77×32 text embeddings), end to end.

Sizes: SD latents 4×64×64 at B = 1, 4, 8 and 3×64×64 at B = 16. The flow rows
(:mod:`gradguide.bench.peers_flow`: ``flow-cheap`` and a tiny ``SD3Transformer2DModel``,
``flow-sd3``) race diffusers' SD3 loop, 28 flow-Euler steps on ``FlowMatchEulerDiscreteScheduler(shift=3.0)``
with CFG 7.0 (the SD3 pipeline's defaults), on 16×32×32 latents at B = 1 and 4. Per row: the per-step median
(pass time / steps, median over the timed passes) of each runner, the speed ratio
``diffusers time / gradguide time`` (> 1: gradguide is faster) and model calls per step. On a
shared CPU quote ratios, not times; ``OMP_WAIT_POLICY=PASSIVE`` keeps 2 threads usable when
the cores are contended. The command line runs on the CPU; ``run(device="cuda")`` (the GPU suite,
gradguide/bench/gpu.py) runs the same rows with every tensor, model and the scheduler's timesteps
on the GPU, each pass timed to a synchronize.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import gradguide
from gradguide.bench import meta
from gradguide.bench.peers_flow import (FLOW_GUIDANCE_SCALE, FLOW_MODELS, FLOW_SIZES, FLOW_STEPS,  # noqa: F401
                                        QUICK_FLOW_SIZES, FlowWorkload)
from gradguide.bench.peers_models import TEXT_DIM, TEXT_LEN, CheapModel  # noqa: F401  (the rows' models)

STEPS = 25
GUIDANCE_SCALE = 7.5
SIZES = {"sd-b1": (1, 4, 64), "sd-b4": (4, 4, 64), "sd-b8": (8, 4, 64), "px-b16": (16, 3, 64)}
QUICK_SIZES = {"sd-b1": (1, 4, 8), "px-b3": (3, 3, 8)}
MODELS = ("cheap", "unet") + FLOW_MODELS   # the flow models (gradguide/bench/peers_flow.py) have their own sizes
UNET_CONFIG = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                   cross_attention_dim=TEXT_DIM, attention_head_dim=8)
QUICK_UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=(8, 8, 8), norm_num_groups=4)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
UNET_TOLERANCE = 1e-4   # the issue's bound on max |gradguide − diffusers| for the U-Net rows


def tiny_unet(channels: int, size: int, seed: int, quick: bool = False):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    config = QUICK_UNET_CONFIG if quick else UNET_CONFIG
    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                **config).eval().requires_grad_(False)


class Workload:
    """One row: model, scheduler, noise and prompt embeddings shared by both runners."""

    def __init__(self, model_kind: str, size: str, cfg: bool, quick: bool, seed: int, device="cpu"):
        from diffusers import DDIMScheduler
        self.device = torch.device(device)
        b, c, hw = (QUICK_SIZES if quick else SIZES)[size]
        self.name = f"{model_kind}-{size}-{'cfg' if cfg else 'none'}"
        self.model_kind, self.size, self.cfg = model_kind, size, cfg
        self.shape = (b, c, hw, hw)
        self.steps = 3 if quick else STEPS
        self.model = CheapModel(c, seed) if model_kind == "cheap" else tiny_unet(c, hw, seed, quick)
        self.scheduler = DDIMScheduler(**SD_SCHEDULER)
        self._timesteps = None
        g = torch.Generator().manual_seed(seed + 1)
        self.x_T = torch.randn(self.shape, generator=g)
        self.pos = torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g)
        self.neg = torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g)
        self.params = sum(p.numel() for p in self.model.parameters())
        if self.device.type != "cpu":   # built on the CPU (same seeds, same values), then moved
            self.model.to(self.device)
            self.x_T, self.pos, self.neg = (v.to(self.device) for v in (self.x_T, self.pos, self.neg))

    def forward(self, x, t, embeddings):
        if self.model_kind == "unet":
            return self.model(x, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        return self.model(x, t, encoder_hidden_states=embeddings)

    # -- the two runners ----------------------------------------------------------------------
    def diffusers_pass(self) -> torch.Tensor:
        """The denoising loop of diffusers' pipelines (StableDiffusionPipeline.__call__, eta = 0)."""
        sched = self.scheduler
        with torch.no_grad():
            sched.set_timesteps(self.steps, device=self.device)
            latents = self.x_T * sched.init_noise_sigma
            embeddings = torch.cat([self.neg, self.pos]) if self.cfg else self.pos
            for t in sched.timesteps:
                latent_in = torch.cat([latents] * 2) if self.cfg else latents
                latent_in = sched.scale_model_input(latent_in, t)
                noise_pred = self.forward(latent_in, t, embeddings)
                if self.cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + GUIDANCE_SCALE * (noise_text - noise_uncond)
                latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    @property
    def timesteps(self) -> list:
        """The model-only runner's timesteps (its cost ignores t), for the current ``steps``."""
        if self._timesteps is None or len(self._timesteps) != self.steps:
            from diffusers import DDIMScheduler
            sched = DDIMScheduler(**SD_SCHEDULER)
            sched.set_timesteps(self.steps, device=self.device)
            self._timesteps = list(sched.timesteps)
        return self._timesteps

    def model_only_pass(self) -> torch.Tensor:
        """What every runner of this row pays per step and no sampler can avoid: the model input
        (the 2B ``cat`` with CFG) and the model call; no guidance line, no scheduler step.
        diffusers' time over this runner's is the most any sampler can be faster than diffusers
        here (the *ceiling*)."""
        with torch.no_grad():
            latents = self.x_T
            embeddings = torch.cat([self.neg, self.pos]) if self.cfg else self.pos
            for t in self.timesteps:
                latent_in = torch.cat([latents] * 2) if self.cfg else latents
                out = self.forward(latent_in, t, embeddings)
        return out

    def gradguide_runner(self) -> Callable[[], torch.Tensor]:
        """gradguide as a switching user writes it (set up once, like a pipeline; then a call per pass)."""
        from gradguide.integrations.diffusers import DiffusersSchedule
        if self.model_kind == "unet":
            model, schedule = gradguide.from_diffusers(self.model, self.scheduler)
        else:   # the scheduler's settings travel with the schedule either way
            model, schedule = self.model, DiffusersSchedule(self.scheduler)
        guidance = gradguide.CFG(GUIDANCE_SCALE, uncond={"encoder_hidden_states": self.neg}) if self.cfg else ()

        def one_pass():
            return gradguide.sample(model, self.shape, schedule=schedule, sampler="ddim", steps=self.steps,
                                    x_T=self.x_T, cond={"encoder_hidden_states": self.pos}, guidance=guidance)
        return one_pass

    def config(self) -> dict:
        return {"model": self.model_kind, "shape": list(self.shape[1:]), "batch": self.shape[0],
                "guidance": f"CFG {GUIDANCE_SCALE}" if self.cfg else "none", "steps": self.steps,
                "params": self.params}


def _count_calls(module: nn.Module, fn: Callable[[], torch.Tensor]):
    """``(output, calls)`` of ``fn()``, counting the module's forward calls."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, len(calls)


def _count_fused_steps(fn: Callable[[], torch.Tensor]):
    """``(output, steps)`` of ``fn()``, counting the steps gradguide ran as its fused step
    (:func:`gradguide.sampling._fused_step`; the others took the general LinComb path)."""
    from gradguide import sampling
    fused, counted = sampling._fused_step, []

    def counting(*args, **kwargs):
        counted.append(1)
        return fused(*args, **kwargs)
    sampling._fused_step = counting
    try:
        out = fn()
    finally:
        sampling._fused_step = fused
    return out, len(counted)


def _synchronized(fn: Callable[[], torch.Tensor], device) -> Callable[[], torch.Tensor]:
    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


def run_workload(w: Workload, reps: Optional[int] = None, budget_s: float = 3.0) -> dict:
    """Warm-up pass of each runner (outputs compared), then ``reps`` interleaved timed passes each
    (default: as many as fit ``budget_s`` per runner, 5 to 40)."""
    runners = {"gradguide": w.gradguide_runner(), "diffusers": w.diffusers_pass, "model only": w.model_only_pass}
    if w.device.type == "cuda":   # a pass ends when its work has run on the GPU
        runners = {name: _synchronized(fn, w.device) for name, fn in runners.items()}
    outputs, calls, first = {}, {}, {}
    fused_steps = 0
    for name, fn in runners.items():
        start = time.perf_counter()
        if name == "gradguide":
            (outputs[name], calls[name]), fused_steps = _count_fused_steps(lambda: _count_calls(w.model, fn))
        else:
            outputs[name], calls[name] = _count_calls(w.model, fn)
        first[name] = time.perf_counter() - start
    if calls["model only"] != calls["diffusers"]:
        raise RuntimeError(f"the model-only runner made {calls['model only']} model calls, diffusers "
                           f"{calls['diffusers']}: the ceiling would not be like with like")
    if reps is None:
        slowest = max(first.values())
        reps = int(min(40, max(5, budget_s // max(slowest, 1e-9))))
    times: Dict[str, List[float]] = {name: [] for name in runners}
    cpu: Dict[str, List[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(reps):   # interleaved, order reversed every repetition
        for name in (order if r % 2 == 0 else order[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    per_step = {name: statistics.median(ts) / w.steps for name, ts in times.items()}
    spreads = {name: meta.spread(ts) for name, ts in times.items()}
    cpu_step = {name: statistics.median(ts) / w.steps for name, ts in cpu.items()}
    diff = (outputs["gradguide"] - outputs["diffusers"]).abs().max().item()
    scale = outputs["diffusers"].abs().max().item()
    row = dict(workload=w.name, **w.config(), reps=reps,
               per_step_ms={name: v * 1e3 for name, v in per_step.items()},
               pass_s={name: statistics.median(ts) for name, ts in times.items()},
               pass_s_all=times, first_pass_s=first, calls_per_step={k: v / w.steps for k, v in calls.items()},
               speed_ratio=per_step["diffusers"] / per_step["gradguide"],
               ceiling=per_step["diffusers"] / per_step["model only"],
               cpu_per_step_ms={name: v * 1e3 for name, v in cpu_step.items()},
               cpu_speed_ratio=cpu_step["diffusers"] / cpu_step["gradguide"] if cpu_step["gradguide"] > 0 else None,
               paired_ratio_median=statistics.median(d / g for d, g in zip(times["diffusers"], times["gradguide"])),
               gradguide_step="fused" if fused_steps == w.steps else f"general ({w.steps - fused_steps} of {w.steps})",
               max_abs_diff=diff, output_scale=scale,
               # the speed ratio and the ceiling divide these timings: flag the row if any runner's spread
               spread_by_runner=spreads,
               spread=max((v for v in spreads.values() if v is not None), default=None),
               unstable=meta.unstable(*spreads.values()),
               finite=bool(torch.isfinite(outputs["gradguide"]).all()))
    if w.model_kind in ("unet", "flow-sd3"):
        row["within_tolerance"] = diff <= UNET_TOLERANCE
    return row


def size_table(model: str, quick: bool) -> dict:
    """The sizes of ``model``'s rows (the flow models have their own: 16 latent channels)."""
    if model in FLOW_MODELS:
        return QUICK_FLOW_SIZES if quick else FLOW_SIZES
    return QUICK_SIZES if quick else SIZES


def make_workload(model: str, size: str, cfg: bool, quick: bool, seed: int, device="cpu"):
    """The row's workload: :class:`Workload`, or :class:`gradguide.bench.peers_flow.FlowWorkload`."""
    if model in FLOW_MODELS:
        return FlowWorkload(model, size, cfg, quick, seed, device)
    return Workload(model, size, cfg, quick, seed, device)


def run(quick: bool = False, models=MODELS, sizes=None, reps: Optional[int] = None, seed: int = 0,
        progress: bool = True, command: str = "", device="cpu") -> dict:
    """Run the suite (on the CPU, or ``device``); returns the result dict (see :func:`write`)."""
    import diffusers  # noqa: F401  (the suite compares against it: fail before any work without it)
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"models: unknown {bad}; expected some of {', '.join(MODELS)}")
    known = {s for m in models for s in size_table(m, quick)}
    bad = [s for s in sizes or () if s not in known]
    if bad:
        raise ValueError(f"sizes: unknown {bad}; expected some of {', '.join(sorted(known))}")
    if reps is not None and reps < 1:
        raise ValueError(f"reps: expected a positive count, got {reps}")
    # each model runs the given sizes its own table has (all of them without sizes=)
    plan = [(m, s, cfg) for m in models for s in size_table(m, quick) if sizes is None or s in sizes
            for cfg in (False, True)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), desc="bench peers", unit="row", disable=None)  # None: off on a non-terminal
    rows = []
    for m, s, cfg in plan:
        w = make_workload(m, s, cfg, quick, seed, device)
        if bar is not None:
            bar.set_postfix_str(w.name)
        # the model-bound rows: a few passes are enough (the ratio tends to 1 there)
        row_reps = reps if reps is not None else (2 if m == "unet" and w.shape[0] >= 8 and not quick else None)
        rows.append(run_workload(w, row_reps, budget_s=0.5 if quick else 3.0))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"suite": "peers", "quick": quick, "models": list(models),
            "date": meta.now(), "commit": meta.git_commit(), "device": meta.device_name(torch.device(device)),
            "device_type": torch.device(device).type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_end": list(load) if load else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "versions": meta.versions("torch", "diffusers", "gradguide"),
            "command": command, "steps": STEPS if not quick else 3, "guidance_scale": GUIDANCE_SCALE,
            "scheduler": SD_SCHEDULER, "unet_config": QUICK_UNET_CONFIG if quick else UNET_CONFIG,
            **(_flow_facts(quick) if any(m in FLOW_MODELS for m in models) else {}),
            "unet_tolerance": UNET_TOLERANCE, "rows": rows, "spread_limit": meta.SPREAD_LIMIT,
            "unstable_rows": meta.count_unstable(rows), "timed_rows": len(rows)}


def _flow_facts(quick: bool) -> dict:
    from gradguide.bench import peers_flow
    return {"flow_steps": 3 if quick else FLOW_STEPS, "flow_guidance_scale": peers_flow.FLOW_GUIDANCE_SCALE,
            "flow_scheduler": {"class": "FlowMatchEulerDiscreteScheduler", **peers_flow.SD3_SCHEDULER},
            "flow_sd3_config": peers_flow.SD3_CONFIG}


def markdown(result: dict, note: str = "") -> str:
    v = result["versions"]
    lines = [f"# gradguide bench --suite peers ({'quick' if result['quick'] else 'full'})", "",
             f"- machine: {result['device']}, {result['cpu_count']} CPUs; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_at_end'] or [])}; "
             f"OMP_WAIT_POLICY={result['omp_wait_policy']}",
             f"- torch {v['torch']}, diffusers {v['diffusers']}, gradguide {v['gradguide']}; commit {result['commit']}; "
             f"{result['date']}",
             f"- command: `{result['command']}`" if result.get("command") else "- command: (library call)",
             f"- {result['steps']} DDIM steps, SD-1.5 scheduler configuration, CFG {result['guidance_scale']}; "
             "per-step = median pass time / steps over interleaved timed passes (order flipped every repetition) "
             "after one warm-up pass each; speed ratio = diffusers time / gradguide time (> 1: gradguide faster); "
             "paired ratio = median over repetitions of the two runners' adjacent passes; CPU ratio = the same "
             "from process CPU time (all threads; less sensitive to being descheduled on a shared machine); "
             "max |Δ| between the two runners' warm-up outputs",
             f"- {meta.spread_note(result.get('spread_limit', meta.SPREAD_LIMIT))} (the largest of the three "
             "runners')",
             "- diffusers runner: the pipelines' loop (cat latents, scale_model_input, one model call with "
             "[negative, positive] embeddings, u + w (c − u), DDIMScheduler.step); gradguide runner: "
             "gradguide.sample(sampler='ddim', guidance=CFG(w, uncond=...)) with every default; model-only "
             "runner: per step the cat and the model call alone, interleaved with the two: ceiling = "
             "diffusers time / model-only time, the most any sampler could be faster than diffusers on that row"]
    if "flow_steps" in result:
        lines.append(f"- flow rows (`flow-cheap`, `flow-sd3`): {result['flow_steps']} flow-Euler steps, "
                     f"FlowMatchEulerDiscreteScheduler(shift={result['flow_scheduler']['shift']}), CFG "
                     f"{result['flow_guidance_scale']} on the velocity; diffusers runner: StableDiffusion3Pipeline's "
                     "loop (cat latents, t.expand(2B), one transformer call with [negative, positive] "
                     "embeddings and pooled projections, u + w (c − u), FlowMatchEulerDiscreteScheduler.step); "
                     "gradguide runner: from_diffusers(transformer, scheduler) and gradguide.sample(guidance=CFG(w, "
                     "uncond=...)) with every default (flow-euler); same noise, same embeddings")
    if note:
        lines.append(f"- {note}")
    lines += ["- like with like: both runners hold float32 samples and run on the same torch threads in one "
              "process. gradguide's default also does what the plain loop skips: it validates its arguments and "
              "builds its step tables and fused-step plan on every call (per pass, in the per-step figures), "
              "checks x_T and the result for NaN/inf (check_finite='end'), and forms its step coefficients "
              "in float64 (the native CPU combine accumulates float32 operands in float64); diffusers' "
              "DDIMScheduler.step works in float32 throughout",
              "", "| model | shape | B | guidance | gradguide ms/step | diffusers ms/step | speed ratio | "
                  "paired ratio | ceiling | gradguide CPU ms/step | diffusers CPU ms/step | CPU ratio | "
                  "model calls/step (gg / diffusers) | gradguide step | max abs diff | reps | spread |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        ok = "" if r.get("within_tolerance", True) else " (> 1e-4)"
        cpu = r.get("cpu_per_step_ms", {})
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['shape']))} | {r['batch']} | {r['guidance']} | "
                     f"{r['per_step_ms']['gradguide']:.2f} | {r['per_step_ms']['diffusers']:.2f} | "
                     f"{r['speed_ratio']:.2f}x | {r['paired_ratio_median']:.2f}x | "
                     + (f"{r['ceiling']:.2f}x | " if "ceiling" in r else "- | ")
                     + "".join(f"{cpu[k]:.2f} | " if k in cpu else "- | " for k in ("gradguide", "diffusers"))
                     + (f"{r['cpu_speed_ratio']:.2f}x | " if r.get("cpu_speed_ratio") else "- | ") +
                     f"{r['calls_per_step']['gradguide']:g} / {r['calls_per_step']['diffusers']:g} | "
                     f"{r.get('gradguide_step', '-')} | {r['max_abs_diff']:.1e}{ok} | {r['reps']} | "
                     f"{meta.spread_cell(r)} |")
    params = {r["model"]: r["params"] for r in result["rows"]}
    lines += ["", "Models: " + "; ".join(f"`{m}` {p / 1e3:.1f} k parameters" for m, p in params.items())
              + (f". U-Net configuration: {result['unet_config']}." if "unet" in params else ".")
              + (f" SD3 transformer configuration (`flow-sd3`): {result['flow_sd3_config']}."
                 if "flow-sd3" in params and "flow_sd3_config" in result else "")]
    return "\n".join(lines) + "\n"


def stem(quick: bool, date: str, models=()) -> str:
    """The report's file name: ``peers-flow-cpu-…`` for the flow rows alone (the DDIM rows' file of the
    same day is another run's), else ``peers-cpu-…``."""
    kind = "peers-flow-cpu" if models and all(m in FLOW_MODELS for m in models) else "peers-cpu"
    return f"{kind}-{'quick-' if quick else ''}{date[:10]}"


def write(result: dict, out_dir: str, note: str = "") -> List[str]:
    """``peers-[flow-]cpu-[quick-]<date>.json`` and ``.md`` in ``out_dir`` (the command line refuses
    to overwrite them without ``--force``: :mod:`gradguide.tools.outputs`)."""
    return meta.write_report(out_dir, stem(result["quick"], result["date"], result.get("models", ())),
                             dict(result, note=note), markdown(result, note))


def run_cli(args) -> int:
    """``gradguide bench --suite peers`` (arguments from gradguide/cli.py)."""
    import sys
    if args.device not in (None, "cpu"):
        raise SystemExit("gradguide bench --suite peers: runs on the CPU (--device cpu)")
    models = args.workloads.split(",") if args.workloads else MODELS
    sizes = args.sizes.split(",") if getattr(args, "sizes", None) else None
    meta.claim_report(args.out, stem(args.quick, meta.today(), models))
    try:
        result = run(quick=args.quick, models=models, sizes=sizes, reps=args.reps, seed=args.seed,
                     command=" ".join(["gradguide"] + sys.argv[1:]), progress=not getattr(args, "no_progress", False))
    except ValueError as exc:
        raise SystemExit(f"gradguide bench: {exc}") from None
    status = meta.print_report(write(result, args.out, note=args.note), markdown(result, args.note))
    meta.warn_unstable("gradguide bench", result["unstable_rows"], result["timed_rows"])
    return status
