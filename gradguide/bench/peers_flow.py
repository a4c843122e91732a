"""The flow rows of ``gradguide bench --suite peers`` (see :mod:`gradguide.bench.peers`).

The peer is the denoising loop of diffusers' ``StableDiffusion3Pipeline``:
``FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(n)``; per step ``cat([latents] * 2)``
with CFG, ``t.expand(2B)``, one transformer call with the negative and positive embeddings
stacked (``hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=``), the CFG
line ``u + w (c − u)`` on the velocity and ``scheduler.step``. gradguide runs it as a user
switching over would: ``gradguide.from_diffusers(transformer, scheduler)`` and
``gradguide.sample(..., guidance=CFG(w, uncond=...))`` with every default (the schedule's
flow-Euler sampler, backend ``"auto"``, both branches in one call).

Models (random weights, built in code, called as SD3's transformer is called):

- ``flow-cheap``: the peers' cheap model (:class:`gradguide.bench.peers_models.CheapModel`: a fixed 1×1
  convolution plus a bias from the text embedding) behind a transformer's signature, so the
  time is the samplers' own per-step cost;
- ``flow-sd3``: a tiny ``SD3Transformer2DModel`` (:data:`SD3_CONFIG`: 2 joint blocks, 2 heads of
  16, patch 2, 16 latent channels), end to end.
"""
from __future__ import annotations

from typing import Callable

import torch

import gradguide
from gradguide.bench.peers_models import TEXT_DIM, TEXT_LEN, CheapModel

FLOW_MODELS = ("flow-cheap", "flow-sd3")
FLOW_SIZES = {"sd3-b1": (1, 16, 32), "sd3-b4": (4, 16, 32)}   # (B, latent channels, side)
QUICK_FLOW_SIZES = {"sd3-b1": (1, 16, 8)}
FLOW_STEPS, FLOW_GUIDANCE_SCALE = 28, 7.0   # StableDiffusion3Pipeline's defaults

SD3_CONFIG = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
                  pooled_projection_dim=TEXT_DIM, pos_embed_max_size=64)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)   # SD3's FlowMatchEulerDiscreteScheduler


class FlowCheapModel(CheapModel):
    """:class:`~gradguide.bench.peers_models.CheapModel` as a velocity model behind a diffusers
    transformer's signature (``hidden_states=``, ``timestep=``, ... ``return_dict=False``: a tuple)
    and with its ``dtype`` attribute (a diffusers ``ModelMixin`` has one; ``from_diffusers``'
    wrapper reads it, and without it would look it up again on every call)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections=None, return_dict=False):
        return (super().forward(hidden_states, timestep, encoder_hidden_states),)


def tiny_sd3(channels: int, size: int, seed: int):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    config = dict(SD3_CONFIG, in_channels=channels, out_channels=channels)
    return SD3Transformer2DModel(sample_size=size, **config).eval().requires_grad_(False)


class FlowWorkload:
    """One flow row: transformer, scheduler, noise and prompt embeddings shared by both runners
    (the interface of :class:`gradguide.bench.peers.Workload`)."""

    def __init__(self, model_kind: str, size: str, cfg: bool, quick: bool, seed: int, device="cpu"):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.device = torch.device(device)
        b, c, hw = (QUICK_FLOW_SIZES if quick else FLOW_SIZES)[size]
        self.name = f"{model_kind}-{size}-{'cfg' if cfg else 'none'}"
        self.model_kind, self.size, self.cfg = model_kind, size, cfg
        self.shape = (b, c, hw, hw)
        self.steps = 3 if quick else FLOW_STEPS
        self.model = FlowCheapModel(c, seed) if model_kind == "flow-cheap" else tiny_sd3(c, hw, seed)
        self.scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
        g = torch.Generator().manual_seed(seed + 1)
        self.x_T = torch.randn(self.shape, generator=g)
        self.pos = torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g)
        self.neg = torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g)
        self.pos_pooled = torch.randn(b, TEXT_DIM, generator=g)
        self.neg_pooled = torch.randn(b, TEXT_DIM, generator=g)
        self.params = sum(p.numel() for p in self.model.parameters())
        self._timesteps = None
        if self.device.type != "cpu":   # built on the CPU (same seeds, same values), then moved
            self.model.to(self.device)
            for name in ("x_T", "pos", "neg", "pos_pooled", "neg_pooled"):
                setattr(self, name, getattr(self, name).to(self.device))

    def _embeddings(self):
        if self.cfg:   # negative rows first, as the pipeline stacks them
            return torch.cat([self.neg, self.pos]), torch.cat([self.neg_pooled, self.pos_pooled])
        return self.pos, self.pos_pooled

    def _velocity(self, latent_in, t, embeddings, pooled):
        return self.model(hidden_states=latent_in, timestep=t.expand(latent_in.shape[0]),
                          encoder_hidden_states=embeddings, pooled_projections=pooled, return_dict=False)[0]

    # -- the runners ------------------------------------------------------------------------------
    def diffusers_pass(self) -> torch.Tensor:
        """The denoising loop of diffusers' StableDiffusion3Pipeline.__call__ (flow Euler, CFG on the velocity)."""
        sched = self.scheduler
        with torch.no_grad():
            sched.set_timesteps(self.steps, device=self.device)
            latents = self.x_T
            embeddings, pooled = self._embeddings()
            for t in sched.timesteps:
                latent_in = torch.cat([latents] * 2) if self.cfg else latents
                u = self._velocity(latent_in, t, embeddings, pooled)
                if self.cfg:
                    u_uncond, u_text = u.chunk(2)
                    u = u_uncond + FLOW_GUIDANCE_SCALE * (u_text - u_uncond)
                latents = sched.step(u, t, latents, return_dict=False)[0]
        return latents

    @property
    def timesteps(self) -> list:
        if self._timesteps is None or len(self._timesteps) != self.steps:
            from diffusers import FlowMatchEulerDiscreteScheduler
            sched = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
            sched.set_timesteps(self.steps, device=self.device)
            self._timesteps = list(sched.timesteps)
        return self._timesteps

    def model_only_pass(self) -> torch.Tensor:
        """Per step the 2B ``cat`` (with CFG) and the transformer call alone: the ceiling's runner."""
        with torch.no_grad():
            latents = self.x_T
            embeddings, pooled = self._embeddings()
            for t in self.timesteps:
                latent_in = torch.cat([latents] * 2) if self.cfg else latents
                out = self._velocity(latent_in, t, embeddings, pooled)
        return out

    def gradguide_runner(self) -> Callable[[], torch.Tensor]:
        """gradguide as a switching user writes it: from_diffusers once, then one sample() per pass."""
        model, schedule = gradguide.from_diffusers(self.model, self.scheduler)
        cond = {"encoder_hidden_states": self.pos, "pooled_projections": self.pos_pooled}
        uncond = {"encoder_hidden_states": self.neg, "pooled_projections": self.neg_pooled}
        guidance = gradguide.CFG(FLOW_GUIDANCE_SCALE, uncond=uncond) if self.cfg else ()

        def one_pass():
            return gradguide.sample(model, self.shape, schedule=schedule, steps=self.steps, x_T=self.x_T, cond=cond,
                                    guidance=guidance)
        return one_pass

    def config(self) -> dict:
        return {"model": self.model_kind, "shape": list(self.shape[1:]), "batch": self.shape[0],
                "guidance": f"CFG {FLOW_GUIDANCE_SCALE}" if self.cfg else "none", "steps": self.steps,
                "params": self.params, "sampler": "flow-euler, FlowMatchEulerDiscreteScheduler(shift=3.0)"}
