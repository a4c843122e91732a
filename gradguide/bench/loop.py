"""``gradguide bench --suite loop | paper``: whole guided sampling passes, eager vs fused vs graph.

Each workload runs side by side in one process, in up to four variants (docs/architecture.md "Benchmarks
and results"):

- ``eager``        — ``backend="reference"``, ``graph=False``: the plain-torch step;
- ``fused``        — ``backend="auto"``: Triton on CUDA, the native C++ ops on CPU;
- ``fused+graph``  — ``backend="auto"``, ``graph=GraphCache()``: each step variant captured once
  as a CUDA graph and replayed (on a CPU ``graph=True`` samples eagerly with a notice: the row
  says so and is not a graph measurement);
- ``compile``      — ``backend="auto"`` with the denoiser wrapped in ``torch.compile``; a
  failure becomes the row's note, never a crash.

Workloads (``--suite paper``; docs/mathematics.md,  the papers' runtime settings):

- ``sim-lookahead`` / ``sim-unguided`` — the gradient-guidance paper's simulation pass (Guo et al.,
  NeurIPS 2024, §5 and Table 1): its 1-D U-Net (:class:`gradguide.experiments.nets.UNet1D`, ≈14.9 M
  parameters, random weights: cost does not depend on them), D = 64, B = 32, cosine schedule
  T = 200, 200 DDPM steps, look-ahead guidance G_loss (Definition 1); and the same pass unguided.
  These rows carry the ratio to the paper's ≈4.6 s per pass and ≈76 min per 1000-round run
  (one A100; one guided pass per round of Algorithm 1, so a run ≈ 1000 passes).
- ``sd-cfg-lookahead`` — the paper's image experiment at SD-1.5 cost: diffusers
  ``UNet2DConditionModel`` with SD-1.5's configuration and the SD VAE (``AutoencoderKL``), random
  weights, 512² (64² latents), 50 DDIM steps on SD's scaled-linear schedule ("leading" spacing,
  offset 1; the paper used PNDM, also one U-Net pair per step), CFG 7.5, and G_loss through the
  U-Net (both CFG branches) and the VAE decoder: per step ``x̂_0 = VAE.decode(ẑ_0/0.18215)``,
  ``L = ½(gᵀx̂_0 + b − y*)²``, ``ε ← ε_cfg + √(1−ᾱ_t) β ∇_{z_t}L`` (β = 100, y* = 10). Each pass
  first linearises the reward — a torchvision-free ResNet-18 with a random Linear(512 → 1) head on
  the image resized to 224 — at the previous image (``g = ∇r(x)``, ``b = r(x) − gᵀx``), as each
  round of Algorithm 1 does; that one reward VJP is inside the timed pass.
- ``adm{64,128,256}-cls-pxpA`` — PixelAsParam's protocol (Dinh et al., ICML 2023): an ADM-like
  class-conditional diffusers ``UNet2DModel`` (ADM's widths, depths, channel multipliers,
  attention at 32/16/8, scale-shift norm, residual up/down-sampling, learned Σ: 6 output
  channels), linear schedule, DDPM with 250 respaced steps, classifier guidance (mean form) from a
  noisy classifier, PixelAsParam policy A. The classifier is ADM's encoder-half design: the same
  diffusers down blocks and middle block at the classifier's width/depth, then GroupNorm-SiLU,
  global mean pooling and a linear head to 1000 classes (ADM pools with attention; the cost
  difference is one small attention layer).

``--suite loop`` isolates the sampling loop itself: a cheap model (one 3×3 convolution) on SD
latent batches, so that each step's time is mostly the loop — guidance terms, reduce/combine,
launches — for unguided DDIM, CFG, CFG + PixelAsParam C, APG, classifier + PixelAsParam A, and
G_loss.

Per row: the median per-pass time over ``reps`` timed passes (CUDA events on a GPU,
``time.perf_counter`` on a CPU), samples/s = B / pass, the per-step median from one further pass
timed at every step by a callback (which also materialises the step's x̂_0 record), peak memory
over the timed passes (CUDA: ``max_memory_allocated``; CPU: peak process RSS polled by
:class:`gradguide.bench.profiling.MemorySampler`), and the speedup over ``eager``. ``--quick`` runs the
same code paths on tiny configurations (small widths and sizes, few steps): they are for CI, not
comparable with the paper. On a shared CPU quote ratios, not times.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gradguide
from gradguide import ops
from gradguide.graphs import GraphCache
from gradguide.bench import meta, ops as bench_ops  # run metadata, result writing
from gradguide.bench.profiling import MemorySampler
from gradguide.tools import guidance_spec
from gradguide.tools.guidance_spec import guidance_terms

PAPER_PASS_S = 4.6        # Guo et al. 2024, Table 1: one guided sampling pass, 200 steps, B = 32, one A100
PAPER_RUN_MIN = 76.0      # one simulation run (Algorithm 1, 1000 rounds)
PAPER_ROUNDS = 1000

VARIANTS = ("eager", "fused", "fused+graph", "compile")
PAPER_WORKLOADS = ("sim-lookahead", "sim-unguided", "sd-cfg-lookahead", "adm64-cls-pxpA", "adm128-cls-pxpA",
                   "adm256-cls-pxpA")
LOOP_WORKLOADS = ("loop-unguided", "loop-cfg", "loop-cfg-pxpC", "loop-apg", "loop-cls-pxpA", "loop-lookahead")
ALL_WORKLOADS = PAPER_WORKLOADS + LOOP_WORKLOADS
SUITES = {"paper": PAPER_WORKLOADS, "loop": LOOP_WORKLOADS}
QUICK_SUITES = {"paper": PAPER_WORKLOADS[:4], "loop": LOOP_WORKLOADS}
QUICK_VARIANTS = ("eager", "fused", "fused+graph")


# -- models ---------------------------------------------------------------------------------------

class _BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet18Reward(nn.Module):
    """ResNet-18 (He et al. 2016: 7×7 stem, four stages of two basic blocks, widths 64-512)
    with a random Linear(512 → 1) head: the gradient-guidance paper's image reward. Input: an
    image batch in [−1, 1], resized to ``size`` (224). ``width`` scales the stages (64: the real
    network). Eval mode (BatchNorm uses its running statistics)."""

    def __init__(self, width: int = 64, size: int = 224):
        super().__init__()
        self.size = size
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c = [], w[0]
        for i, c_out in enumerate(w):
            layers += [_BasicBlock(c, c_out, 1 if i == 0 else 2), _BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)
        self.eval()

    def forward(self, image):
        x = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = self.layers(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))[:, 0]


class _UNetEps(nn.Module):
    """``model(x_t, t, **cond)`` over a diffusers U-Net; casts to the U-Net's dtype and back."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, **cond):
        out = self.unet(x.to(self.unet.dtype), t, **cond, return_dict=False)[0]
        return out.to(x.dtype)


class NoisyClassifier(nn.Module):
    """An ADM-style noisy classifier: the encoder half of a diffusers ``UNet2DModel`` (time
    embedding, down blocks, middle block) + GroupNorm, SiLU, global mean pooling, Linear head.
    ``log_prob(x_t, t, class_labels)`` returns ``log p_φ(y | x_t)`` per sample."""

    def __init__(self, resolution: int, width: int, mults, depth: int, attn=(32, 16, 8), num_classes: int = 1000,
                 head_dim: int = 64, groups: int = 32):
        super().__init__()
        from diffusers import UNet2DModel
        down, up = _adm_block_types(resolution, mults, attn)
        enc = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=_chans(width, mults),
                          layers_per_block=depth, down_block_types=down, up_block_types=up,
                          attention_head_dim=min(head_dim, width), norm_num_groups=groups,
                          resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet")
        # keep only the encoder half (the classifier never runs the decoder)
        self.time_proj, self.time_embedding = enc.time_proj, enc.time_embedding
        self.conv_in, self.down_blocks, self.mid_block = enc.conv_in, enc.down_blocks, enc.mid_block
        c = _chans(width, mults)[-1]
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x, t):
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb)
        return self.head(self.out(h).mean(dim=(2, 3)))

    def log_prob(self, x, t, class_labels):
        logits = self(x.to(self.head.weight.dtype), t).float()
        return logits.log_softmax(-1).gather(1, class_labels[:, None])[:, 0].to(x.dtype)


class CheapEps(nn.Module):
    """A model that costs almost nothing (one 3×3 convolution, a timestep scale and, when
    conditional, a class embedding), so the loop's own cost shows (also the dry run's small
    model; ``out_channels=2 * channels`` for a learned-variance output)."""

    def __init__(self, channels: int, num_classes: int = 10, out_channels: Optional[int] = None):
        super().__init__()
        out = out_channels or channels
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        self.embed = nn.Embedding(num_classes, out)

    def forward(self, x, t, class_labels=None):
        h = self.conv(x) * (1.0 + 1e-3 * t.to(x.dtype)).view(-1, 1, 1, 1)
        if class_labels is not None:
            h = h + self.embed(class_labels)[:, :, None, None]
        return h


def _chans(width, mults):
    return tuple(int(width * m) for m in mults)


def _adm_block_types(resolution, mults, attn):
    down = []
    for i in range(len(mults)):
        res = resolution // 2 ** i
        down.append("AttnDownBlock2D" if res in attn else "DownBlock2D")
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    return tuple(down), tuple(up)


# ADM's published configurations (Dhariwal & Nichol 2021, the guided-diffusion model cards):
# resolution -> (model width, channel multipliers, res blocks, classifier width, classifier depth)
ADM = {64: (192, (1, 2, 3, 4), 3, 128, 4), 128: (256, (1, 1, 2, 3, 4), 2, 128, 2),
       256: (256, (1, 1, 2, 2, 4, 4), 2, 128, 2)}


def adm_unet(resolution: int, width: int, mults, depth: int, num_classes: int = 1000, head_dim: int = 64,
             attn=(32, 16, 8), groups: int = 32):
    """An ADM-like class-conditional ``UNet2DModel`` with learned Σ (6 output channels)."""
    from diffusers import UNet2DModel
    down, up = _adm_block_types(resolution, mults, attn)
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=6, block_out_channels=_chans(width, mults),
                       layers_per_block=depth, down_block_types=down, up_block_types=up,
                       attention_head_dim=min(head_dim, width), norm_num_groups=groups, num_class_embeds=num_classes,
                       resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet")


def sd15_unet(quick: bool):
    """UNet2DConditionModel with Stable Diffusion 1.5's configuration (``quick``: a tiny one)."""
    from diffusers import UNet2DConditionModel
    if quick:
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                                layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd_vae(quick: bool):
    """The SD VAE (``AutoencoderKL``, 8× downsampling, 4 latent channels; ``quick``: 2×, tiny)."""
    from diffusers import AutoencoderKL
    n = 2 if quick else 4
    chans = (32, 64) if quick else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=chans,
                         layers_per_block=1 if quick else 2, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, sample_size=16 if quick else 512)


# -- workloads ----------------------------------------------------------------------------------------

class Workload:
    """One benchmark workload: the model, how to build a pass's ``gradguide.sample`` arguments,
    and the facts its rows report. ``fixed``: schedule, sampler, steps, cond, ... for
    ``sample``; ``per_pass(wrap, seed)``: the guidance etc., built inside the timed pass."""

    # a plain class, not a dataclass: this file is loaded by path (gradguide bench/profile)
    def __init__(self, name: str, model: nn.Module, shape: tuple, steps: int, fixed: dict,
                 per_pass: Callable[[Callable, int], dict], config: dict, params: int, paper_ratio: bool = False):
        self.name, self.model, self.shape, self.steps = name, model, tuple(shape), steps
        self.fixed, self.per_pass, self.config, self.params = fixed, per_pass, config, params
        self.paper_ratio = paper_ratio
        self._compiled: Optional[nn.Module] = None

    @property
    def batch(self) -> int:
        return self.shape[0]

    def compiled(self) -> nn.Module:
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def sample_kwargs(self, wrap: Optional[Callable] = None, seed: int = 0, compiled: bool = False) -> dict:
        """Keyword arguments of ``gradguide.sample`` for one pass (``model`` and ``shape``
        included). ``wrap`` is applied to the model and any classifier (the profiler marks phases
        with it)."""
        wrap = wrap or (lambda fn: fn)
        model = self.compiled() if compiled else self.model
        kwargs = dict(self.fixed)
        kwargs.update(self.per_pass(wrap, seed))
        device = next(self.model.parameters()).device
        kwargs.update(model=wrap(model), shape=self.shape,
                      generator=torch.Generator(device=device).manual_seed(seed))
        return kwargs


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _prepare(module: nn.Module, device, dtype=torch.float32) -> nn.Module:
    # (a dtype-less .to() for float32: diffusers warns on any dtype cast of a model)
    module = module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)   # VJPs are w.r.t. x_t only: no parameter gradients to store
    return module


def _sim(name, quick, device, seed):
    from gradguide.experiments.nets import UNet1D
    torch.manual_seed(seed)
    width, mults = (8, (1, 2)) if quick else (64, (1, 2, 4, 8))
    b, steps = (4, 4) if quick else (32, 200)
    net = _prepare(UNet1D(dim=64, width=width, mults=mults), device)
    schedule = gradguide.Schedule.cosine(200)
    gen = torch.Generator().manual_seed(seed + 1)
    theta = torch.randn(64, generator=gen)
    theta = (theta / theta.norm()).to(device)
    guided = name == "sim-lookahead"

    def per_pass(wrap, seed_):
        if not guided:
            return {}
        # f1(x) = 10 − (θᵀx − 3)²: gradient at the batch, target y = gᵀx + δ (Algorithm 1, δ = 0.2)
        grad = theta.expand(b, 64).contiguous()
        return {"guidance": guidance_terms("G_loss", gradient=grad, target=torch.full((b,), 0.2, device=device))}
    config = {"model": f"UNet1D(dim=64, width={width}, mults={mults})", "D": 64, "B": b,
              "schedule": "cosine T=200", "sampler": "ddpm", "steps": steps,
              "guidance": "G_loss (per-sample beta, sigma 0.1)" if guided else "none"}
    return Workload(name, net, (b, 64), steps, {"schedule": schedule, "sampler": "ddpm", "steps": steps},
                    per_pass, config, _count(net), paper_ratio=not quick)


def _sd(name, quick, device, seed, dtype):
    torch.manual_seed(seed)
    unet = _prepare(sd15_unet(quick), device, dtype)
    vae = _prepare(sd_vae(quick), device, dtype)
    reward = _prepare(ResNet18Reward(width=8 if quick else 64, size=32 if quick else 224), device, dtype)
    b = 1
    latent = 8 if quick else 64
    image = latent * (2 if quick else 8)
    steps = 4 if quick else 50
    ctx_len, ctx_dim = (4, 32) if quick else (77, 768)
    gen = torch.Generator().manual_seed(seed + 1)
    text = torch.randn(b, ctx_len, ctx_dim, generator=gen).to(device, dtype)
    empty = torch.zeros_like(text)   # stand-in for the empty prompt's embedding
    # SD-1.5's scheduler: scaled-linear betas 0.00085 -> 0.012, T = 1000
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    schedule = gradguide.Schedule.from_betas(betas)
    timesteps = schedule.timesteps(steps, spacing="leading", steps_offset=1)
    previous = torch.rand(b, 3, image, image, generator=gen).to(device) * 2 - 1   # the last round's image

    def decode(z):
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    def per_pass(wrap, seed_):
        # linearise the reward at the previous image: g = ∇r(x), b = r(x) − gᵀx
        with torch.enable_grad():
            x = previous.detach().to(dtype).requires_grad_(True)
            r = reward(x)
            (g,) = torch.autograd.grad(r.sum(), x)
        # g stays in the decoder's dtype (the reward's): the step's gᵀx̂_0 then needs no cast of g
        offset = r.detach().float() - (g.float() * previous).flatten(1).sum(1)
        return {"guidance": guidance_terms([("cfg", 7.5), "G_loss-decoded"], uncond={"encoder_hidden_states": empty},
                                           decode=wrap(decode), gradient=g, offset=offset,
                                           options={"G_loss-decoded": {"target": 10.0, "beta": 100.0}})}
    config = {"unet": "UNet2DConditionModel, SD-1.5 config" if not quick else "tiny UNet2DConditionModel",
              "vae": "AutoencoderKL, SD config" if not quick else "tiny AutoencoderKL",
              "reward": f"ResNet-18 (width {8 if quick else 64}) + Linear(->1), input {32 if quick else 224}^2",
              "B": b, "latent": [4, latent, latent], "image": image, "sampler": "ddim (eta 0), leading+1",
              "steps": steps, "guidance": "CFG 7.5 + G_loss through U-Net and VAE decoder (beta 100, y* 10)",
              "dtype": str(dtype).replace("torch.", "")}
    fixed = {"schedule": schedule, "sampler": gradguide.Sampler("ddim", timesteps=timesteps),
             "cond": {"encoder_hidden_states": text}}
    return Workload(name, _UNetEps(unet), (b, 4, latent, latent), steps, fixed, per_pass, config,
                    _count(unet, vae, reward))


def _adm(name, quick, device, seed, dtype):
    torch.manual_seed(seed)
    resolution = int(name[3:].split("-")[0])
    if quick:
        res, width, mults, depth, cw, cd, groups, b, steps = 16, 32, (1, 2), 1, 32, 1, 8, 2, 4
        attn, classes = (8,), 10
    else:
        width, mults, depth, cw, cd = ADM[resolution][:5]
        res, groups, b, steps, attn, classes = resolution, 32, 8, 250, (32, 16, 8), 1000
    unet = _prepare(adm_unet(res, width, mults, depth, classes, attn=attn, groups=groups), device, dtype)
    cls = _prepare(NoisyClassifier(res, cw, mults, cd, attn=attn, num_classes=classes, groups=groups), device, dtype)
    labels = torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    schedule = gradguide.Schedule.linear(1000)
    log_prob = cls.log_prob   # one bound method: graph captures key callables by identity

    def per_pass(wrap, seed_):
        return {"guidance": guidance_terms(("classifier", 1.0), classifier=wrap(log_prob),
                                           options={"classifier": {"form": "mean"}})}
    config = {"unet": f"UNet2DModel ADM-like, width {width}, mults {list(mults)}, {depth} res blocks, "
                      f"attention at {list(attn)}, learned sigma", "classifier": f"encoder half, width {cw}, depth {cd}",
              "resolution": res, "B": b, "sampler": "ddpm, learned-range variance", "steps": steps,
              "guidance": "classifier (mean form, scale 1) + PixelAsParam A", "dtype": str(dtype).replace("torch.", "")}
    fixed = {"schedule": schedule, "sampler": gradguide.Sampler("ddpm", variance="learned-range", clip=True),
             "steps": steps, "cond": {"class_labels": labels}, "projection": guidance_spec.projection("A")}
    return Workload(name, _UNetEps(unet), (b, 3, res, res), steps, fixed, per_pass, config, _count(unet, cls))


def _loop(name, quick, device, seed):
    torch.manual_seed(seed)
    shape = (2, 4, 16, 16) if quick else (8, 4, 64, 64)
    steps = 6 if quick else 50
    net = _prepare(CheapEps(shape[1]), device)
    b = shape[0]
    labels = torch.arange(b, device=device) % 10
    gen = torch.Generator().manual_seed(seed + 1)
    direction = torch.randn(shape, generator=gen).to(device)
    sampler = "ddpm" if name == "loop-cls-pxpA" else "ddim"
    fixed = {"schedule": gradguide.Schedule.linear(1000), "sampler": sampler, "steps": steps}
    kind = name[len("loop-"):]
    if kind != "unguided" and kind != "lookahead":
        fixed["cond"] = {"class_labels": labels}

    def log_prob(x, t, class_labels):   # a cheap differentiable "classifier"
        return -0.5 * ((x - direction) ** 2).flatten(1).mean(1)

    # the workload's (guidance, projection) spec for the harness's guidance factory
    spec = {"unguided": (None, None), "cfg": (("cfg", 4.0), None), "cfg-pxpC": (("cfg", 4.0), "C"),
            "apg": (("apg", 4.0), None), "cls-pxpA": (("classifier", 1.0), "A"), "lookahead": ("G_loss", None)}[kind]

    def per_pass(wrap, seed_):
        if kind == "unguided":
            return {}
        terms, projection = guidance_spec.build(*spec, classifier=wrap(log_prob), gradient=direction,
                                                target=torch.zeros(b, device=device))
        return {"guidance": terms, **({"projection": projection} if projection is not None else {})}
    config = {"model": "one 3x3 conv (cheap: the loop's own cost shows)", "shape": list(shape),
              "sampler": sampler, "steps": steps, "guidance": kind}
    return Workload(name, net, shape, steps, fixed, per_pass, config, _count(net))


def needs_diffusers(name: str) -> bool:
    """Whether workload ``name`` builds diffusers modules (the SD and ADM U-Nets, the VAE)."""
    return name.startswith(("sd", "adm"))


def build_workload(name: str, quick: bool = False, device="cpu", seed: int = 0,
                   dtype: Optional[torch.dtype] = None) -> Workload:
    """Build workload ``name`` (see the module doc). ``dtype``: the U-Nets' weights for the SD
    and ADM workloads (default float16 on CUDA, float32 on CPU); sampling runs in float32."""
    if name not in ALL_WORKLOADS:
        raise ValueError(f"workload: expected one of {', '.join(ALL_WORKLOADS)}, got {name!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name.startswith("sim"):
        return _sim(name, quick, device, seed)
    if name.startswith("sd"):
        return _sd(name, quick, device, seed, dtype)
    if name.startswith("adm"):
        return _adm(name, quick, device, seed, dtype)
    return _loop(name, quick, device, seed)


# -- timing -------------------------------------------------------------------------------------------

def timed_passes(fn: Callable, dev, reps: int) -> List[float]:
    """Seconds of ``reps`` calls of ``fn``: CUDA events around each on CUDA, ``perf_counter`` on CPU."""
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _variant_execution(variant: str, cache: Optional[GraphCache] = None) -> gradguide.Execution:
    """The variant's :class:`gradguide.Execution` (``cache``: fused+graph's GraphCache)."""
    if variant == "eager":
        return gradguide.Execution(backend="reference")
    if variant in ("fused", "compile"):
        return gradguide.Execution(backend="auto")
    if variant == "fused+graph":
        return gradguide.Execution(backend="auto", graph=cache)
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def make_pass(w: Workload, variant: str, seed: int = 0, cache: Optional[GraphCache] = None) -> Callable:
    """``one_pass(callback=None)``: one ``gradguide.sample`` pass of ``w`` in ``variant``
    (``cache``: the GraphCache of a ``fused+graph`` variant, kept across passes)."""
    if variant == "fused+graph" and cache is None:
        cache = GraphCache()
    execution = _variant_execution(variant, cache)

    def one_pass(callback=None):
        kw = w.sample_kwargs(seed=seed, compiled=variant == "compile")
        model, shape = kw.pop("model"), kw.pop("shape")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA graphs need a CUDA device.*")
            return gradguide.sample(model, shape, execution=execution,
                                    diagnostics=gradguide.Diagnostics(callback=callback), **kw)
    return one_pass


def _run_variant(w: Workload, variant: str, dev, reps: int, seed: int, progress: bool) -> dict:
    """Time one workload in one variant; returns the row (``status`` 'ok' or 'failed')."""
    cache = GraphCache() if variant == "fused+graph" else None
    notes: List[str] = []
    if variant == "fused+graph" and dev.type != "cuda":
        notes.append("CPU: graph=True samples eagerly (no CUDA graph); not a graph measurement")
    one_pass = make_pass(w, variant, seed, cache)

    row = {"workload": w.name, "variant": variant, "batch": w.batch, "shape": list(w.shape), "steps": w.steps,
           "params": w.params, "config": w.config}
    try:
        # warm-up pass: torch.compile compiles here, CUDA graphs capture here, kernels autotune here
        t0 = time.perf_counter()
        out = one_pass()
        sync(dev)
        row["first_pass_s"] = time.perf_counter() - t0
        row["finite"] = bool(torch.isfinite(out).all())
        if cache is not None and dev.type == "cuda":
            one_pass(lambda record: None)   # a step with a record is its own capture: make it now, untimed
        if cache is not None:
            row["graph_captures"] = cache.captures
        peak = None
        sampler = MemorySampler(dev, interval=0.01, nvml=False) if dev.type != "cuda" else None
        if sampler is not None:
            sampler.start()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = timed_passes(one_pass, dev, reps)
        if dev.type == "cuda":
            peak, source = torch.cuda.max_memory_allocated(dev), "cuda max_memory_allocated"
        else:
            sampler.stop()
            peak, source = sampler.peak("rss"), f"process RSS ({sampler.rss.method})"
        # one more pass timed step by step
        stamps, backend = [], []
        if dev.type == "cuda":
            first = torch.cuda.Event(enable_timing=True)
            first.record()

            def cb(record):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                stamps.append(e)
                backend.append(record.backend)
            one_pass(cb)
            torch.cuda.synchronize(dev)
            marks = [first] + stamps
            step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(marks[:-1], marks[1:])]
        else:
            first = time.perf_counter()

            def cb(record):
                stamps.append(time.perf_counter())
                backend.append(record.backend)
            one_pass(cb)
            marks = [first] + stamps
            step_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
        # the first step includes the pass's setup (and the reward VJP of sd-cfg-lookahead): leave it out
        per_step = statistics.median(step_s[1:] if len(step_s) > 1 else step_s)
        pass_s = statistics.median(times)
        row.update(status="ok", backend=backend[-1] if backend else None, pass_s=pass_s, pass_s_all=times,
                   per_step_ms=per_step * 1e3, samples_per_s=w.batch / pass_s, peak_memory_bytes=peak,
                   memory_source=source)
        if w.paper_ratio:
            row["ratio_to_paper_pass"] = pass_s / PAPER_PASS_S
            row["projected_run_min"] = PAPER_ROUNDS * pass_s / 60
            row["ratio_to_paper_run"] = row["projected_run_min"] / PAPER_RUN_MIN
    except Exception as exc:   # a variant that does not work here is a row note, not a crashed run
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        notes.append(f"failed: {row['error']}")
    if variant == "compile" and row.get("status") == "ok":
        notes.append(f"first pass (compile) {row['first_pass_s']:.1f} s")
    row["note"] = "; ".join(notes)
    return row


def run_header(dev) -> dict:
    return {"date": meta.now(), "commit": meta.git_commit(), "device": meta.device_name(dev), "device_type": dev.type,
            "threads": torch.get_num_threads(),
            "versions": meta.versions("torch", "cuda", "gradguide", "triton", "diffusers"),
            "available_backends": {k: (v is True) for k, v in ops.available_backends(dev).items()}}


def run(suite: str = "paper", quick: bool = False, device: Optional[str] = None,
        workloads: Optional[List[str]] = None, variants: Optional[List[str]] = None, reps: Optional[int] = None,
        seed: int = 0, dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict:
    """Run ``suite`` (``"loop"`` or ``"paper"``); returns the result dict (see :func:`write`)."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected 'loop' or 'paper', got {suite!r}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # quick: adm128/adm256 would repeat adm64's tiny configuration, and torch.compile's first
    # pass alone takes minutes on a small CPU: both only when asked for
    names = list(workloads or (QUICK_SUITES if quick else SUITES)[suite])
    bad = [n for n in names if n not in ALL_WORKLOADS]
    if bad:
        raise ValueError(f"workloads: unknown {bad}; expected some of {', '.join(ALL_WORKLOADS)}")
    variants = list(variants or (QUICK_VARIANTS if quick else VARIANTS))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants: unknown {bad}; expected some of {', '.join(VARIANTS)}")
    reps = reps if reps is not None else (1 if quick else 5)
    if reps < 1:
        raise ValueError(f"reps: expected a positive count, got {reps}")
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(names) * len(variants), desc=f"bench {suite}", unit="row",
                   disable=None)  # None: off when stderr is not a terminal
    for name in names:
        w = build_workload(name, quick=quick, device=dev, seed=seed, dtype=dtype)
        eager = eager_spread = None
        for variant in variants:
            if bar is not None:
                bar.set_postfix_str(f"{name} {variant}")
            row = _run_variant(w, variant, dev, reps, seed, progress)
            if row["status"] == "ok":
                row["spread"] = meta.spread(row["pass_s_all"])
                if variant == "eager":
                    eager, eager_spread = row["pass_s"], row["spread"]
                row["unstable"] = meta.unstable(row["spread"], eager_spread if eager else None)
            row["speedup_vs_eager"] = eager / row["pass_s"] if eager and row["status"] == "ok" else None
            rows.append(row)
            if bar is not None:
                bar.update(1)
        del w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return dict(run_header(dev), suite=suite, quick=quick, reps=reps, seed=seed,
                timer="CUDA events" if dev.type == "cuda" else "time.perf_counter",
                paper={"pass_s": PAPER_PASS_S, "run_min": PAPER_RUN_MIN, "rounds": PAPER_ROUNDS},
                variants=variants, rows=rows, spread_limit=meta.SPREAD_LIMIT, unstable_rows=meta.count_unstable(rows),
                timed_rows=sum(1 for r in rows if r["status"] == "ok"))


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.0f} MiB"


def markdown(result: dict, note: str = "") -> str:
    v = result["versions"]
    lines = [f"# gradguide bench --suite {result['suite']} ({'quick' if result['quick'] else 'full'})", "",
             f"- device: {result['device']}; torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
             f"diffusers {v['diffusers']}",
             f"- commit {result['commit']}, {result['date']}; per-pass median of {result['reps']} timed passes "
             f"({result['timer']}) after one warm-up pass; per-step median from one pass timed by a callback "
             "(first step left out)",
             "- variants: eager = backend 'reference'; fused = backend 'auto' (Triton on CUDA, native on CPU); "
             "fused+graph = 'auto' + graph=GraphCache(); compile = 'auto' + torch.compile(denoiser)",
             f"- {meta.spread_note(result.get('spread_limit', meta.SPREAD_LIMIT))} (one timed pass: no spread, '-')"]
    if result["device_type"] != "cuda":
        lines.append("- CPU run: fused+graph falls back to eager sampling (no CUDA graph on a CPU); the full "
                     "paper sizes (SD-1.5 at 512², ADM at 64-256²) are GPU workloads and are not run on this CPU"
                     if result["quick"] and result["suite"] == "paper" else
                     "- CPU run: fused+graph falls back to eager sampling (no CUDA graph on a CPU); quote ratios")
    if result["quick"]:
        lines.append("- quick mode: tiny configurations through the same code paths; times are not comparable "
                     "with the paper's figures")
    if note:
        lines.append(f"- {note}")
    for name, why in (result.get("skipped_workloads") or {}).items():
        lines.append(f"- skipped workload `{name}`: {why}")
    if result["suite"] == "paper":
        lines.append(f"- paper (Guo et al. 2024, Table 1, one A100): ≈{result['paper']['pass_s']} s per guided pass "
                     f"(200 steps, B = 32), ≈{result['paper']['run_min']:.0f} min per {result['paper']['rounds']}-round "
                     "run; 'vs paper' = this pass / 4.6 s, 'run' = 1000 passes projected / 76 min")
    lines += ["", "| workload | variant | backend | B | steps | per-step ms | per-pass s | samples/s | peak memory | "
                  "speedup vs eager | vs paper pass | 1000-round run (min, vs paper) | spread | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['workload']} | {r['variant']} | - | {r['batch']} | {r['steps']} | - | - | - | - | - | "
                         f"- | - | - | {r['note']} |")
            continue
        speed = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        paper = f"{r['ratio_to_paper_pass']:.2f}x" if "ratio_to_paper_pass" in r else "-"
        run_ = f"{r['projected_run_min']:.1f} ({r['ratio_to_paper_run']:.2f}x)" if "projected_run_min" in r else "-"
        note = r["note"] + ("" if r.get("finite", True) else "; output not finite")
        lines.append(f"| {r['workload']} | {r['variant']} | {r['backend']} | {r['batch']} | {r['steps']} | "
                     f"{r['per_step_ms']:.2f} | {r['pass_s']:.3f} | {r['samples_per_s']:.2f} | "
                     f"{_mb(r['peak_memory_bytes'])} | {speed} | {paper} | {run_} | {meta.spread_cell(r)} | {note} |")
    lines += ["", "Workload configurations:", ""]
    seen = set()
    for r in result["rows"]:
        if r["workload"] not in seen:
            seen.add(r["workload"])
            cfg = ", ".join(f"{k}: {val}" for k, val in r["config"].items())
            lines.append(f"- `{r['workload']}` ({r['params'] / 1e6:.2f} M parameters): {cfg}")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str, note: str = "") -> List[str]:
    return bench_ops.write(result, out_dir, note, render=markdown)

def default_workloads(suite: str, quick: bool, log=None):
    """``(workloads, skipped)``: the suite's workloads, less those that build diffusers modules
    where diffusers does not import (``skipped``: name -> reason; ``log`` gets one line naming
    them and the extra to install)."""
    from gradguide.tools import extras
    names = list((QUICK_SUITES if quick else SUITES)[suite])
    needs = [n for n in names if needs_diffusers(n)]
    why = extras.unavailable("diffusers") if needs else None
    if why is None:
        return names, {}
    if log is not None:
        log(f"gradguide bench: skipping {', '.join(needs)} (they build diffusers modules): {why}")
    return [n for n in names if n not in needs], {n: f"it builds diffusers modules, and {why}" for n in needs}


def run_cli(args) -> int:
    """``gradguide bench --suite loop|paper`` (arguments from gradguide/cli.py)."""
    import sys
    dtype = getattr(torch, args.model_dtype) if getattr(args, "model_dtype", None) else None
    workloads, skipped = (args.workloads.split(","), {}) if args.workloads else \
        default_workloads(args.suite, args.quick, log=lambda line: print(line, file=sys.stderr))
    if not workloads:
        raise SystemExit("gradguide bench: no workload left to run")
    meta.claim_report(args.out, bench_ops.stem(args.suite, meta.device_type(args.device), args.quick, meta.today()))
    try:
        result = run(suite=args.suite, quick=args.quick, device=args.device, workloads=workloads,
                     variants=args.variants.split(",") if args.variants else None, reps=args.reps,
                     seed=args.seed, dtype=dtype, progress=not getattr(args, "no_progress", False))
    except ValueError as exc:
        raise SystemExit(f"gradguide bench: {exc}") from None
    result["skipped_workloads"] = skipped
    status = meta.print_report(write(result, args.out, note=args.note), markdown(result, args.note))
    meta.warn_unstable("gradguide bench", result["unstable_rows"], result["timed_rows"])
    return status
