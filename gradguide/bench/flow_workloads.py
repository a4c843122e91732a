"""The bench harness's flow-matching workloads: SD3-medium and Flux at full size (the dry run's
``sd3m-cfg``, ``flux-dev-truecfg``, ``flux-schnell-truecfg``), built in code, no hub.

Each builds the transformer with the released model's architecture (random weights: cost does
not depend on them) and the sampling inputs as the guided pipeline builds them
(:mod:`gradguide.integrations.pipeline_flow`, :mod:`gradguide.integrations.pipeline_flux`), in
bfloat16 (the dtype both ship in; the latents are carried in the embeddings' dtype, as the
pipelines carry them), flow Euler on the model's scheduler configuration, CFG with both
branches in one transformer call:

- ``sd3m-cfg``: ``SD3Transformer2DModel`` with SD3-medium's configuration (24 joint blocks, 24
  heads of 64, patch 2, caption projection 1536, pooled 2048, position embeddings up to 192),
  1024² (16×128×128 latents), the text sequence of ``StableDiffusion3Pipeline`` (77 CLIP tokens
  padded to the T5 width + 256 T5 tokens of 4096, pooled 768 + 1280), ``FlowMatchEulerDiscreteScheduler(shift=3.0)``,
  28 steps, CFG 7.0 (the pipeline's defaults).
- ``flux-dev-truecfg`` / ``flux-schnell-truecfg``: ``FluxTransformer2DModel`` with Flux's
  configuration (19 double and 38 single blocks, 24 heads of 128, 64 packed channels, rotary
  axes 16/56/56; dev: the guidance embedder, embedded guidance 3.5), 1024²: latents packed in 2×2
  patches, ``[1, 4096, 64]`` with ``img_ids`` (0, row, column) and all-zero ``txt_ids``, 512 (dev) or
  256 (schnell) T5 tokens, CLIP-L pooled 768; Flux's scheduler (dynamic shifting, ``mu`` from the
  4096 tokens), σ's ``linspace(1, 1/N, N)``, 28 (dev) or 4 (schnell) steps; true CFG 4.0 with a
  negative prompt, both branches batched.

``quick``: tiny transformers of the same classes (the test fixtures' sizes) for CI.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

import gradguide

FLOW_WORKLOADS = ("sd3m-cfg", "flux-dev-truecfg", "flux-schnell-truecfg")

# SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_QUICK = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                 caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
# Flux.1's transformer (dev: guidance_embeds=True; schnell the same without the guidance embedder)
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
FLUX_QUICK = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
# the schedulers as the models ship them
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
SD3_CFG, FLUX_TRUE_CFG, FLUX_EMBEDDED = 7.0, 4.0, 3.5


def is_flow_workload(name: str) -> bool:
    return name in FLOW_WORKLOADS


def build(name: str, quick: bool, device, seed: int, dtype: Optional[torch.dtype], prepare: Callable) -> dict:
    """The parts of flow workload ``name``, as :class:`gradguide.bench.loop.Workload` takes them
    (``model, shape, steps, fixed, per_pass, config, params``); ``dtype`` (default bfloat16) is the
    transformer's and the latents'; ``prepare(module, device, dtype)`` readies the transformer
    (the harness's own: eval, no parameter gradients)."""
    if name not in FLOW_WORKLOADS:
        raise ValueError(f"workload: expected one of {', '.join(FLOW_WORKLOADS)}, got {name!r}")
    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    build_ = _sd3 if name.startswith("sd3") else _flux
    model, transformer, shape, steps, fixed, uncond, config = build_(name, quick, device, dtype, gen, prepare)
    scale = fixed.pop("cfg_scale")

    def per_pass(wrap, seed_):
        return {"guidance": gradguide.CFG(scale, uncond=uncond)}
    # the latents in the embeddings' dtype, as the pipelines carry them
    fixed["execution"] = gradguide.Execution(dtype=dtype)
    config["dtype"] = str(dtype).replace("torch.", "")
    return dict(model=model, shape=shape, steps=steps, fixed=fixed, per_pass=per_pass, config=config,
                params=sum(p.numel() for p in transformer.parameters()))


def _randn(gen, *shape, device, dtype):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _sd3(name, quick, device, dtype, gen, prepare):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    cfg = SD3_QUICK if quick else SD3_MEDIUM
    transformer = prepare(SD3Transformer2DModel(**cfg), device, dtype)
    model, schedule = gradguide.from_diffusers(transformer, FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    b, side = 1, cfg["sample_size"]
    steps = 2 if quick else 28
    # StableDiffusion3Pipeline's text: 77 CLIP tokens (two encoders side by side, zero-padded to the
    # T5 width) followed by max_sequence_length = 256 T5 tokens; pooled: the two CLIP projections
    tokens = 6 if quick else 77 + 256
    width, pooled = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    cond = {"encoder_hidden_states": _randn(gen, b, tokens, width, device=device, dtype=dtype),
            "pooled_projections": _randn(gen, b, pooled, device=device, dtype=dtype)}
    uncond = {"encoder_hidden_states": _randn(gen, b, tokens, width, device=device, dtype=dtype),
              "pooled_projections": _randn(gen, b, pooled, device=device, dtype=dtype)}
    fixed = {"schedule": schedule, "sampler": gradguide.Sampler("flow-euler", timesteps=schedule.flow_timesteps(steps)),
             "cond": cond, "cfg_scale": SD3_CFG}
    config = {"transformer": "SD3Transformer2DModel, " + ("tiny" if quick else "SD3-medium config"),
              "B": b, "latent": [cfg["in_channels"], side, side], "text tokens": tokens,
              "scheduler": f"FlowMatchEulerDiscreteScheduler({SD3_SCHEDULER})", "sampler": "flow-euler",
              "steps": steps, "guidance": f"CFG {SD3_CFG} (both branches in one call)"}
    return model, transformer, (b, cfg["in_channels"], side, side), steps, fixed, uncond, config


def _flux(name, quick, device, dtype, gen, prepare):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from gradguide.flow_schedules import calculate_shift
    from gradguide.integrations.pipeline_flux import FluxDenoiser, latent_image_ids
    dev = name.startswith("flux-dev")
    cfg = dict(FLUX_QUICK if quick else FLUX, guidance_embeds=dev)
    transformer = prepare(FluxTransformer2DModel(**cfg), device, dtype)
    model, schedule = gradguide.from_diffusers(FluxDenoiser(transformer),
                                               FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))
    b = 1
    h = w = 8 if quick else 128                        # the VAE's latent image (1024² / 8)
    tokens, channels = (h // 2) * (w // 2), cfg["in_channels"]   # packed 2×2: 4 × 16 latent channels
    text = 6 if quick else (512 if dev else 256)       # FluxPipeline's max_sequence_length (schnell: 256)
    steps = 2 if quick else (28 if dev else 4)
    mu = calculate_shift(tokens, FLUX_SCHEDULER["base_image_seq_len"], FLUX_SCHEDULER["max_image_seq_len"],
                         FLUX_SCHEDULER["base_shift"], FLUX_SCHEDULER["max_shift"])
    timesteps = schedule.flow_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    width, pooled = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    common = {"img_ids": latent_image_ids(h, w, device, dtype).expand(b, -1, -1),
              "txt_ids": torch.zeros(b, text, 3, device=device, dtype=dtype)}
    if dev:   # the distilled guidance: an input of the transformer in both branches
        common["guidance"] = torch.full((b,), FLUX_EMBEDDED, device=device, dtype=torch.float32)
    cond = {"encoder_hidden_states": _randn(gen, b, text, width, device=device, dtype=dtype),
            "pooled_projections": _randn(gen, b, pooled, device=device, dtype=dtype), **common}
    uncond = {**cond, "encoder_hidden_states": _randn(gen, b, text, width, device=device, dtype=dtype),
              "pooled_projections": _randn(gen, b, pooled, device=device, dtype=dtype)}
    fixed = {"schedule": schedule, "sampler": gradguide.Sampler("flow-euler", timesteps=timesteps), "cond": cond,
             "cfg_scale": FLUX_TRUE_CFG}
    config = {"transformer": "FluxTransformer2DModel, " + ("tiny" if quick else f"Flux.1-{'dev' if dev else 'schnell'} "
                                                                                  "config"),
              "B": b, "latent": [tokens, channels], "packed": f"2x2 patches of a {channels // 4}x{h}x{w} latent",
              "text tokens": text, "scheduler": f"FlowMatchEulerDiscreteScheduler({FLUX_SCHEDULER}), mu {mu:.4f}",
              "sampler": "flow-euler, sigmas linspace(1, 1/N, N)", "steps": steps,
              "guidance": f"true CFG {FLUX_TRUE_CFG} with a negative prompt (both branches in one call)"
                          + (f", embedded guidance {FLUX_EMBEDDED}" if dev else "")}
    return model, transformer, (b, tokens, channels), steps, fixed, uncond, config
