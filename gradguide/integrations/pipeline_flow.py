"""Guided flow-matching pipelines: Stable Diffusion 3 (:class:`GuidedSD3Pipeline`) and the base
the Flux pipeline (:mod:`gradguide.integrations.pipeline_flux`) shares with it.

What differs from :class:`~gradguide.integrations.pipeline.GuidedPipeline`: the denoiser is a
transformer predicting the flow velocity, driven by a flow scheduler (``FlowMatchEuler``,
``FlowMatchHeun``, ``FlowMatchLCM``, UniPC / DPM-Solver++ with flow σ's; any other is refused);
the latents are ``x_σ`` and the σ's depend on the image size where the scheduler shifts them
dynamically (``mu`` from the image's token count, as each diffusers pipeline computes it);
decoding adds the VAE's ``shift_factor``; and the reward guidance through the decoder is the
flow form of :class:`~gradguide.guidance.gradient.DecodedLookAhead` (:class:`FlowDecodedLookAhead`).

SD3's conditioning is built as diffusers' ``StableDiffusion3Pipeline`` builds it: two CLIP
encoders' penultimate hidden states side by side, zero-padded to the T5 width and followed by
the T5 sequence (zeros without a third encoder), the two pooled projections concatenated
(``pooled_projections``); CFG batches both branches in one transformer call, negative rows
first, as diffusers does. docs/flow.md and docs/diffusers.md list what is refused.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ..flow_schedules import calculate_shift
from ..guidance.base import GuidanceTerm, StepContext
from ..guidance.gradient import DecodedLookAhead
from ..linear import LinComb
from ..projection import PixelAsParam
from .diffusers_flow import is_flow
from .pipeline import GuidedPipeline, GuidedPipelineOutput, _repeat
from .pipeline_call import _lora_scaled, _refuse_keywords
from .pipeline_xl import _check_pooled, _texts

SD3_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


def per_prompt(value, name: str, batch: int) -> List[str]:
    """A second/third prompt: one string per prompt (diffusers repeats no single string here either)."""
    texts = _texts(value, name)
    if len(texts) != batch:
        raise ValueError(f"{name}: expected {batch} strings (one per prompt), got {len(texts)}")
    return texts


class TransformerDenoiser(torch.nn.Module):
    """A diffusers transformer behind ``model(x, timestep=t, **cond)``: each pipeline's subclass
    writes ``forward`` as that pipeline calls its transformer."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

class FlowDecodedLookAhead(DecodedLookAhead):
    """G_loss through the decoder on a flow model: the look-ahead gradient of
    ``L = ½(gᵀ decode(x̂_0) + b − y*)²`` (``x̂_0 = x_σ − σ u``, through the transformer and the
    decoder) moves the velocity, ``ũ = u + β ∇_{x_σ} L``, so ``x̂_0`` moves by ``−σβ ∇L`` and a
    flow-Euler step descends ``L`` by ``(σ − σ')β``. (:class:`DecodedLookAhead`'s weight for
    ε / v models, ``ε̃ = ε̂ + √(1−ᾱ) β ∇L``, would move ``x̂_0`` by ``σ²β/(1−σ) ∇L`` on a flow
    model: unbounded as σ → 1, where every flow schedule starts. In the variance-preserving
    state gradguide carries this is that shift with β scaled by ``√ᾱ/√(1−ᾱ)``; docs/flow.md.)"""
    name = "G_loss(decoded, flow)"

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        return super().score(ctx, x0) * (ctx.a / ctx.s)


class _FlowPipeline(GuidedPipeline):
    """What the flow-matching pipelines share (see the module doc); not built by ``from_pipe``."""

    DEFAULT_STEPS = 28
    MAX_SHIFT_DEFAULT = 1.15   # the pipeline's default when the scheduler's config has no max_shift

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, image_processor=None):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, image_processor)

    @property
    def transformer(self):
        """The denoising transformer (held as ``unet``, the name the shared loop reads)."""
        return self.unet

    @staticmethod
    def _check_addition_embed(kind) -> None:
        return None

    def _conversion(self):
        sched = self.scheduler
        if not is_flow(sched):
            raise ValueError(f"{type(self).__name__}: scheduler: {type(sched).__name__} is not a flow-matching "
                             "scheduler; the transformer predicts a flow velocity (use FlowMatchEulerDiscreteScheduler, "
                             "FlowMatchHeun/LCM, or UniPC / DPM-Solver with use_flow_sigmas=True and "
                             "prediction_type='flow_prediction')")
        return super()._conversion()

    # -- the σ's ------------------------------------------------------------------------------------
    def _image_seq_len(self, height: int, width: int) -> int:
        raise NotImplementedError(f"{type(self).__name__}: a pipeline with dynamic shifting defines its token count")

    def _mu(self, height: int, width: int):
        """``calculate_shift`` of the image's token count with the scheduler's settings (each
        pipeline's own defaults where its config has none)."""
        config = self.scheduler.config
        return calculate_shift(self._image_seq_len(height, width), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", self.MAX_SHIFT_DEFAULT))

    def _flow_timesteps(self, schedule, n, sigmas, mu):
        if sigmas is not None and "sigmas" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            # as diffusers' retrieve_timesteps
            raise ValueError(f"{type(self).__name__}: sigmas: {type(self.scheduler).__name__}.set_timesteps takes no "
                             "custom sigmas")
        if mu is not None and not schedule.use_dynamic_shifting:
            mu = None   # a fixed-shift scheduler ignores mu, as diffusers' set_timesteps does
        try:
            if sigmas is not None:
                return schedule.flow_timesteps(sigmas=np.asarray(sigmas, dtype=np.float64), mu=mu)
            return schedule.flow_timesteps(n, mu=mu)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from exc

    def _check_steps(self, num_inference_steps, timesteps):
        if timesteps is not None:
            raise ValueError(f"{type(self).__name__}: timesteps: the diffusers pipeline takes num_inference_steps= "
                             "or sigmas=, not a timesteps list")
        if num_inference_steps is None:
            return self.DEFAULT_STEPS
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an integer >= 1, got {num_inference_steps!r}")
        return num_inference_steps

    # -- decoding -----------------------------------------------------------------------------------
    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latent layout of sampled latents (the identity unless a variant packs them)."""
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] from sampled latents, as the diffusers pipeline decodes them:
        ``vae.decode(latents / scaling_factor + shift_factor)`` (unpacked first where packed)."""
        return self.vae_decode(self._unpack(latents) / self.scaling_factor + self.shift_factor)

    def reward_guidance(self, grad: torch.Tensor, offset=0.0, target: float = 10.0, beta: float = 100.0,
                        official_batch_scaling: bool = False) -> FlowDecodedLookAhead:
        """G_loss through the VAE decoder (see :meth:`GuidedPipeline.reward_guidance`), on the
        flow model: :class:`FlowDecodedLookAhead`, decoding ``x̂_0`` as :meth:`decode_latents`
        does (unpacked, scaled, shifted)."""
        # decode_latents holds every pipeline's own un-scaling, so the term divides by nothing more
        return FlowDecodedLookAhead(self.decode_latents, grad, offset=offset, target=target, beta=beta, scaling=1.0,
                                    official_batch_scaling=official_batch_scaling)

    def _images(self, out: torch.Tensor, output_type: str):
        if output_type == "latent":
            return out
        with torch.no_grad():
            image = self.decode_latents(out)
        return self.image_processor.postprocess(image, output_type=output_type)

    def _call_checks(self, output_type, return_dict, num_images_per_prompt, guidance_scale, joint_attention_kwargs,
                     ip_adapter_image, ip_adapter_image_embeds, max_sequence_length):
        self._check_call(ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict, num_images_per_prompt,
                         guidance_scale, None)
        if joint_attention_kwargs is not None and not isinstance(joint_attention_kwargs, dict):
            raise TypeError("joint_attention_kwargs: expected a dict or None, got "
                            f"{type(joint_attention_kwargs).__name__}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length: expected an integer in [1, 512] (as diffusers), "
                             f"got {max_sequence_length!r}")

    def _encode_t5(self, tokenizer, encoder, texts: List[str], max_sequence_length: int, **kwargs):
        ids = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                        return_tensors="pt", **kwargs).input_ids
        with torch.no_grad():
            return encoder(ids.to(self.device))[0].to(dtype=encoder.dtype, device=self.device)


class GuidedSD3Pipeline(_FlowPipeline):
    """A Stable Diffusion 3 pipeline sampled with gradguide (see the module doc).

    ``transformer``: an ``SD3Transformer2DModel``; ``scheduler``: a flow scheduler;
    ``text_encoder``/``tokenizer`` and ``text_encoder_2``/``tokenizer_2``: CLIP with projection;
    ``text_encoder_3``/``tokenizer_3``: T5 (optional: zeros in its place, as diffusers). The
    encoders are optional when you pass ``prompt_embeds`` and ``pooled_prompt_embeds``.
    """
    MAX_SHIFT_DEFAULT = 1.16   # StableDiffusion3Pipeline's default

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, image_processor=None):
        for a, b, name in ((text_encoder_2, tokenizer_2, "text_encoder_2 and tokenizer_2"),
                           (text_encoder_3, tokenizer_3, "text_encoder_3 and tokenizer_3")):
            if (a is None) != (b is None):
                raise ValueError(f"GuidedSD3Pipeline: {name}: pass both or neither")
        if (text_encoder is None) != (text_encoder_2 is None):
            raise ValueError("GuidedSD3Pipeline: text_encoder and text_encoder_2: pass both CLIP encoders or neither")
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, image_processor)

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedSD3Pipeline":
        """From a diffusers ``StableDiffusion3Pipeline``; without ``scheduler`` the pipeline's
        scheduler is followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        cls._require_components(pipe, ("transformer", "scheduler", "vae"))
        if getattr(pipe, "image_encoder", None) is not None:
            raise ValueError("GuidedSD3Pipeline: image_encoder: IP-Adapter image conditioning is not supported")
        out = cls(pipe.transformer, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  *(getattr(pipe, name, None) for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                           "tokenizer_2", "text_encoder_3", "tokenizer_3")),
                  image_processor=getattr(pipe, "image_processor", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    # -- sizes and σ's ------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.unet.config.patch_size)

    def _size(self, height, width):
        height, width = super()._size(height, width)
        step = self.vae_scale_factor * self.patch_size
        for name, value in (("height", height), ("width", width)):
            if value % step:   # as diffusers' check_inputs
                raise ValueError(f"{name}: expected a multiple of the VAE's scale factor × the patch size = {step}, "
                                 f"got {value!r}")
        return height, width

    def _image_seq_len(self, height: int, width: int) -> int:
        p = self.patch_size
        return (height // self.vae_scale_factor // p) * (width // self.vae_scale_factor // p)

    def _timesteps(self, schedule, num_inference_steps, timesteps, sigmas, spacing, height=None, width=None):
        n = self._check_steps(num_inference_steps, timesteps)
        if spacing is not None:
            raise ValueError("sampler.spacing: a flow scheduler spaces its own σ's")
        mu = self._call_mu
        if mu is None and self.scheduler.config.get("use_dynamic_shifting", False):
            mu = self._mu(height, width)   # StableDiffusion3Pipeline computes it only for dynamic shifting
        return self._flow_timesteps(schedule, n, sigmas, mu)

    # -- conditioning -------------------------------------------------------------------------------
    def _clip(self, texts: List[str], index: int, clip_skip: Optional[int]):
        """One CLIP encoder's penultimate (``clip_skip`` more layers back) hidden state and pooled projection."""
        tokenizer, encoder = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))[index]
        # diffusers pads both CLIP prompts to the first tokenizer's length
        ids = tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        return hidden.to(dtype=self.text_encoder.dtype, device=self.device), out[0]

    def _embed(self, prompts, prompts_2, prompts_3, clip_skip, max_sequence_length):
        if self.text_encoder is None:
            raise ValueError("prompt: this pipeline has no text encoders; pass prompt_embeds= and pooled_prompt_embeds= "
                             "instead")
        e1, p1 = self._clip(prompts, 0, clip_skip)
        e2, p2 = self._clip(prompts_2, 1, clip_skip)
        clip = torch.cat([e1, e2], dim=-1)
        if self.text_encoder_3 is None:   # diffusers puts zeros where the T5 sequence would be
            t5 = torch.zeros(len(prompts_3), max_sequence_length, int(self.unet.config.joint_attention_dim),
                             device=self.device, dtype=self.text_encoder.dtype)
        else:
            t5 = self._encode_t5(self.tokenizer_3, self.text_encoder_3, prompts_3, max_sequence_length,
                                 add_special_tokens=True)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, negative_prompt=None, negative_prompt_2=None,
                      negative_prompt_3=None, num_images_per_prompt: int = 1, negative: bool = True,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, clip_skip: Optional[int] = None,
                      max_sequence_length: int = 256, lora_scale: Optional[float] = None):
        """``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)`` (the negatives
        ``None`` without ``negative``), each repeated ``num_images_per_prompt`` times, as
        diffusers' ``StableDiffusion3Pipeline.encode_prompt`` computes them."""
        _check_pooled(clip_skip, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                      negative_pooled_prompt_embeds, "the transformer's pooled_projections")
        with contextlib.ExitStack() as stack:
            for encoder in (self.text_encoder, self.text_encoder_2):
                stack.enter_context(_lora_scaled(encoder, lora_scale))
            if prompt_embeds is None:
                prompts = _texts(prompt, "prompt")
                prompt_embeds, pooled_prompt_embeds = self._embed(
                    prompts, per_prompt(prompt_2 or prompts, "prompt_2", len(prompts)),
                    per_prompt(prompt_3 or prompts, "prompt_3", len(prompts)), clip_skip, max_sequence_length)
            elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
            batch = prompt_embeds.shape[0]
            if negative and negative_prompt_embeds is None:
                neg = negative_prompt or ""
                texts = [_texts(t, name, batch) for t, name in ((neg, "negative_prompt"),
                                                                 (negative_prompt_2 or neg, "negative_prompt_2"),
                                                                 (negative_prompt_3 or neg, "negative_prompt_3"))]
                if self.text_encoder is None:
                    raise ValueError("negative_prompt_embeds: classifier-free guidance needs the unconditional embedding, "
                                     "and this pipeline has no text encoders to encode negative_prompt; pass "
                                     "negative_prompt_embeds= and negative_pooled_prompt_embeds= with prompt_embeds=")
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(*texts, None, max_sequence_length)
            elif negative and negative_prompt_embeds.shape[0] != batch:
                raise ValueError(f"negative_prompt_embeds: expected {batch} rows (one per prompt), "
                                 f"got {negative_prompt_embeds.shape[0]}")
        n, device = num_images_per_prompt, self.device
        out = [_repeat(prompt_embeds.to(device), n), _repeat(pooled_prompt_embeds.to(device), n)]
        if not negative:
            return out[0], None, out[1], None
        return (out[0], _repeat(negative_prompt_embeds.to(device), n), out[1],
                _repeat(negative_pooled_prompt_embeds.to(device), n))

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, prompt_2=None, prompt_3=None,
                 height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[Sequence[float]] = None, guidance_scale: float = 7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt: int = 1, generator=None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: Optional[dict] = None, clip_skip: Optional[int] = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 max_sequence_length: int = 256, skip_guidance_layers=None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_stop: float = 0.2, skip_layer_guidance_start: float = 0.01, mu=None,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, sampler=None, progress: bool = True, callback=None,
                 backend: str = "auto", **sample_kwargs):
        """Generate images; ``StableDiffusion3Pipeline.__call__``'s keywords with diffusers'
        meaning (default 28 steps, ``guidance_scale`` 7.0: CFG ``u + w(c − u)`` on the velocity
        when > 1, both branches in one call; ``mu`` overrides dynamic shifting's), plus gradguide's
        as in :meth:`GuidedPipeline.__call__` (``guidance``, ``projection``, ``sampler``,
        ``progress``, ``callback``, ``backend``, ``execution=``, ``diagnostics=``).
        ``skip_guidance_layers`` (skip-layer guidance) and IP-Adapter inputs are refused;
        ``return_dict=False`` gives ``(images,)``."""
        _refuse_keywords(sample_kwargs)
        if skip_guidance_layers is not None:
            raise ValueError("GuidedSD3Pipeline: skip_guidance_layers: skip-layer guidance is not supported")
        self._call_checks(output_type, return_dict, num_images_per_prompt, guidance_scale, joint_attention_kwargs,
                          ip_adapter_image, ip_adapter_image_embeds, max_sequence_length)
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        lora_scale = None if joint_attention_kwargs is None else joint_attention_kwargs.get("scale")

        def encode(do_cfg):
            pe, neg, pooled, neg_pooled = self.encode_prompt(
                prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2, negative_prompt_3,
                num_images_per_prompt, do_cfg, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                negative_pooled_prompt_embeds, clip_skip=clip_skip, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
            extra = {} if joint_attention_kwargs is None else {"joint_attention_kwargs": joint_attention_kwargs}
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled, **extra}
            if not do_cfg:
                return cond, None, {"prompt_embeds": pe, "negative_prompt_embeds": None,
                                    "negative_pooled_prompt_embeds": None}
            uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled, **extra}
            # what diffusers' callback sees: the CFG batch, negative rows first
            return cond, uncond, {"prompt_embeds": torch.cat([neg, pe]), "negative_prompt_embeds": neg,
                                  "negative_pooled_prompt_embeds": neg_pooled}

        self._call_mu = mu
        try:
            out = self._generate(encode, SD3_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=None,
                                 sigmas=sigmas, guidance_scale=guidance_scale, guidance_rescale=0.0,
                                 guidance=guidance, projection=projection, height=height, width=width, eta=0.0,
                                 generator=generator, latents=latents, cross_attention_kwargs=None,
                                 callback_on_step_end=callback_on_step_end,
                                 callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                                 sampler=sampler, progress=progress, callback=callback, backend=backend,
                                 sample_kwargs=sample_kwargs)
        finally:
            self._call_mu = None
        images = self._images(out, output_type)
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput(images=images, latents=out)

    _call_mu = None
