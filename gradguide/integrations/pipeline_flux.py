"""A guided Flux pipeline: :class:`GuidedFluxPipeline`.

Built as diffusers' ``FluxPipeline`` builds its inputs: the CLIP encoder's pooled output
(``pooled_projections``) and the T5 sequence (``encoder_hidden_states``, ``txt_ids`` all zero);
latents packed in 2×2 patches, ``[B, (h/2)(w/2), 4C]`` with ``img_ids`` (0, row, column) per
patch; the σ's ``linspace(1, 1/N, N)`` shifted with ``mu`` from the image's token count
(dynamic shifting); the transformer called at ``timestep / 1000``. ``guidance_scale`` is the
*embedded* guidance of a guidance-distilled transformer (``guidance_embeds=True``, Flux dev) and
ignored otherwise, as diffusers does; classifier-free guidance is ``true_cfg_scale > 1`` with a
negative prompt (``u_n + s(u_c − u_n)``), both branches batched into one transformer call where
diffusers makes two. The shared flow-pipeline machinery is
:class:`~gradguide.integrations.pipeline_flow._FlowPipeline`.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ..guidance.base import GuidanceTerm
from ..projection import PixelAsParam
from .pipeline import GuidedPipelineOutput, _randn, _repeat
from .pipeline_call import _lora_scaled, _refuse_keywords
from .pipeline_flow import TransformerDenoiser, _FlowPipeline, per_prompt
from .pipeline_xl import _texts

FLUX_TENSOR_INPUTS = ("latents", "prompt_embeds")   # FluxPipeline's


class FluxDenoiser(TransformerDenoiser):
    """``FluxTransformer2DModel`` behind ``model(x, timestep=t, **cond)``: the timestep divided
    by 1000 in the latents' dtype (the pipeline's ``timestep / 1000``; the transformer multiplies
    it back), ``img_ids``/``txt_ids`` given per sample (``[B, N, 3]``, so that they stack with
    the branches) and passed as the transformer takes them (one row)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, pooled_projections=None, img_ids=None,
                txt_ids=None, guidance=None, joint_attention_kwargs=None, return_dict=False):
        t = timestep.expand(hidden_states.shape[0]).to(hidden_states.dtype) / 1000
        return self.transformer(hidden_states=hidden_states, timestep=t, guidance=guidance,
                                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                txt_ids=txt_ids[0] if txt_ids.dim() == 3 else txt_ids,
                                img_ids=img_ids[0] if img_ids.dim() == 3 else img_ids,
                                joint_attention_kwargs=joint_attention_kwargs, return_dict=False)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]`` (each 2×2 patch one token, channels then rows then columns)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a ``h × w`` latent image."""
    b, _, d = latents.shape
    return latents.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """``[(h/2)(w/2), 3]``: (0, row, column) of each packed patch, as FluxPipeline builds them."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class _PackedLatentPipeline(_FlowPipeline):
    """What Flux and Qwen-Image share: latents packed in 2×2 patches of the VAE's latent image,
    drawn unpacked and then packed (as their ``prepare_latents``), image sizes a multiple of twice
    the VAE's scale factor, σ's ``linspace(1, 1/N, N)`` shifted by the resolution's ``mu``, and an
    embedded guidance scale read during a call."""
    OWN_FLOW_SIGMAS = True   # a scheduler with use_flow_sigmas keeps its own σ's (FluxPipeline)

    def _denoiser(self):
        return self._adapter

    @property
    def guidance_scale(self):
        """The running call's ``guidance_scale`` (the embedded guidance, what diffusers' callbacks
        read; true CFG's scale is ``true_cfg_scale``)."""
        return self._embedded_scale

    _embedded_scale = None

    # -- sizes, latents, σ's -----------------------------------------------------------------------
    def _size(self, height, width):
        f = self.vae_scale_factor * 2   # a packed patch covers 2×2 latent pixels
        height = self.DEFAULT_SAMPLE_SIZE * self.vae_scale_factor if height is None else height
        width = self.DEFAULT_SAMPLE_SIZE * self.vae_scale_factor if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % f:
                # diffusers warns and rounds down; gradguide refuses instead of resizing silently
                raise ValueError(f"{name}: expected a positive multiple of 2 × the VAE's scale factor = {f}, "
                                 f"got {value!r}")
        return height, width

    def _latent_hw(self, height: int, width: int):
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _image_seq_len(self, height: int, width: int) -> int:
        h, w = self._latent_hw(height, width)
        return (h // 2) * (w // 2)

    def _latent_shape(self, rows: int, height: int, width: int) -> tuple:
        return (rows, self._image_seq_len(height, width), int(self.unet.config.in_channels))

    def _draw_latents(self, shape, generator, dtype) -> torch.Tensor:
        h, w = self._run_hw
        noise = _randn((shape[0], shape[2] // 4, h, w), generator, self.device, dtype)
        return pack_latents(noise)   # drawn unpacked, then packed, as FluxPipeline.prepare_latents

    def _timesteps(self, schedule, num_inference_steps, timesteps, sigmas, spacing, height=None, width=None):
        n = self._check_steps(num_inference_steps, timesteps)
        if spacing is not None:
            raise ValueError("sampler.spacing: a flow scheduler spaces its own σ's")
        self._run_hw = self._latent_hw(height, width)
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / n, n)
        if self.OWN_FLOW_SIGMAS and self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        return self._flow_timesteps(schedule, n, sigmas, self._mu(height, width))

    _run_hw = None


class GuidedFluxPipeline(_PackedLatentPipeline):
    """A Flux pipeline sampled with gradguide (see the module doc).

    ``transformer``: a ``FluxTransformer2DModel``; ``scheduler``: a flow scheduler
    (``FlowMatchEulerDiscreteScheduler`` with dynamic shifting, as Flux ships);
    ``text_encoder``/``tokenizer``: CLIP (the pooled embedding); ``text_encoder_2``/``tokenizer_2``:
    T5. The encoders are optional when you pass ``prompt_embeds`` and ``pooled_prompt_embeds``.
    """
    DEFAULT_SAMPLE_SIZE = 128   # FluxPipeline's default_sample_size

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, image_processor=None):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("GuidedFluxPipeline: text_encoder_2 and tokenizer_2: pass both or neither")
        if (text_encoder is None) != (text_encoder_2 is None):
            raise ValueError("GuidedFluxPipeline: text_encoder and text_encoder_2: pass both (CLIP and T5) or neither")
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self._adapter = FluxDenoiser(transformer)
        if image_processor is None:
            from diffusers.image_processor import VaeImageProcessor
            image_processor = VaeImageProcessor(vae_scale_factor=2 ** len(vae.config.block_out_channels))
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, image_processor)

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedFluxPipeline":
        """From a diffusers ``FluxPipeline``; without ``scheduler`` the pipeline's scheduler is
        followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        cls._require_components(pipe, ("transformer", "scheduler", "vae"))
        if getattr(pipe, "image_encoder", None) is not None:
            raise ValueError("GuidedFluxPipeline: image_encoder: IP-Adapter image conditioning is not supported")
        out = cls(pipe.transformer, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  *(getattr(pipe, name, None) for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                           "tokenizer_2")),
                  image_processor=getattr(pipe, "image_processor", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        if self._run_hw is None:
            raise ValueError("GuidedFluxPipeline: height, width: packed latents do not say the image size; pass "
                             "decode_latents(latents, height=..., width=...) (or run the pipeline first)")
        h, w = self._run_hw
        return unpack_latents(latents, h, w)

    def decode_latents(self, latents: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None):
        """Images in [−1, 1] from packed latents (of the last call's size unless ``height``/``width``
        are given), as FluxPipeline decodes them. :meth:`reward_guidance` decodes at the size of
        the call it runs in."""
        if height is not None or width is not None:
            self._run_hw = self._latent_hw(*self._size(height, width))
        return super().decode_latents(latents)

    # -- conditioning -------------------------------------------------------------------------------
    def encode_prompt(self, prompt, prompt_2=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length: int = 512, lora_scale: Optional[float] = None,
                      batch: Optional[int] = None):
        """``(prompt_embeds, pooled_prompt_embeds, text_ids)`` as diffusers' ``FluxPipeline.encode_prompt``
        computes them (``batch``: repeat a single string to that many prompts)."""
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds: required with prompt_embeds (the transformer's pooled_projections), "
                             "as diffusers requires")
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("prompt: this pipeline has no text encoders; pass prompt_embeds= and "
                                 "pooled_prompt_embeds= instead")
            prompts = _texts(prompt, "prompt", batch)
            prompts_2 = per_prompt(prompt_2 or prompts, "prompt_2", len(prompts))
            with contextlib.ExitStack() as stack:
                for encoder in (self.text_encoder, self.text_encoder_2):
                    stack.enter_context(_lora_scaled(encoder, lora_scale))
                ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
                with torch.no_grad():
                    pooled_prompt_embeds = self.text_encoder(ids.to(self.device), output_hidden_states=False)
                pooled_prompt_embeds = pooled_prompt_embeds.pooler_output.to(dtype=self.text_encoder.dtype)
                prompt_embeds = self._encode_t5(self.tokenizer_2, self.text_encoder_2, prompts_2, max_sequence_length)
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        n, device = num_images_per_prompt, self.device
        prompt_embeds = _repeat(prompt_embeds.to(device), n)
        pooled_prompt_embeds = _repeat(pooled_prompt_embeds.to(device), n)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        return prompt_embeds, pooled_prompt_embeds, torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, prompt_2=None, negative_prompt=None,
                 negative_prompt_2=None, true_cfg_scale: float = 1.0, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[Sequence[float]] = None, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                 generator=None, latents: Optional[torch.Tensor] = None, prompt_embeds=None,
                 pooled_prompt_embeds=None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                 negative_ip_adapter_image=None, negative_ip_adapter_image_embeds=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: Optional[dict] = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), max_sequence_length: int = 512,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, sampler=None, progress: bool = True, callback=None,
                 backend: str = "auto", **sample_kwargs):
        """Generate images; ``FluxPipeline.__call__``'s keywords with diffusers' meaning (default
        28 steps; ``guidance_scale`` 3.5, the embedded guidance of a ``guidance_embeds``
        transformer; true CFG when ``true_cfg_scale > 1`` and a negative prompt or negative
        embeddings are given), plus gradguide's as in :meth:`GuidedPipeline.__call__`. A
        branch-combining term in ``guidance`` (``gg.APG``, ``gg.CFGZeroStar``, ...) replaces
        true CFG and gets the negative prompt (``""`` when none is given) as its unconditional
        input. IP-Adapter inputs are refused; ``return_dict=False`` gives ``(images,)``."""
        _refuse_keywords(sample_kwargs)
        if negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None:
            raise ValueError("GuidedFluxPipeline: negative_ip_adapter_image: IP-Adapter image conditioning is not "
                             "supported")
        self._call_checks(output_type, return_dict, num_images_per_prompt, true_cfg_scale, joint_attention_kwargs,
                          ip_adapter_image, ip_adapter_image_embeds, max_sequence_length)
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds, as diffusers "
                             "requires")
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        lora_scale = None if joint_attention_kwargs is None else joint_attention_kwargs.get("scale")
        embedded = bool(getattr(self.unet.config, "guidance_embeds", False))

        def encode(do_cfg):
            pe, pooled, text_ids = self.encode_prompt(prompt, prompt_2, num_images_per_prompt, prompt_embeds,
                                                      pooled_prompt_embeds, max_sequence_length, lora_scale)
            rows = pe.shape[0]
            h, w = self._run_hw
            extra = {"img_ids": latent_image_ids(h, w, self.device, pe.dtype).expand(rows, -1, -1)}
            if embedded:   # Flux dev's distilled guidance: an input of the transformer, in both branches
                extra["guidance"] = torch.full((rows,), float(guidance_scale), device=self.device, dtype=torch.float32)
            if joint_attention_kwargs is not None:
                extra["joint_attention_kwargs"] = joint_attention_kwargs
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled,
                    "txt_ids": text_ids.expand(rows, -1, -1), **extra}
            if not do_cfg:
                return cond, None, {"prompt_embeds": pe}
            if negative_prompt_embeds is None and self.text_encoder is None:
                raise ValueError("negative_prompt_embeds: a branch-combining guidance term needs the unconditional "
                                 "embedding, and this pipeline has no text encoders to encode negative_prompt; pass "
                                 "negative_prompt_embeds= and negative_pooled_prompt_embeds=")
            batch = pe.shape[0] // num_images_per_prompt
            neg, neg_pooled, neg_ids = self.encode_prompt(
                "" if negative_prompt is None else negative_prompt, negative_prompt_2, num_images_per_prompt,
                negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length, lora_scale, batch=batch)
            if neg.shape != pe.shape:   # as diffusers requires of given embeddings; one call needs it too
                raise ValueError(f"negative_prompt_embeds: shape {tuple(neg.shape)}, but prompt_embeds is "
                                 f"{tuple(pe.shape)}: expected the same shape")
            uncond = {**cond, "encoder_hidden_states": neg, "pooled_projections": neg_pooled,
                      "txt_ids": neg_ids.expand(rows, -1, -1)}
            return cond, uncond, {"prompt_embeds": pe}

        self._embedded_scale = guidance_scale
        out = self._generate(encode, FLUX_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=None,
                             sigmas=sigmas, guidance_scale=true_cfg_scale if do_true_cfg else 1.0,
                             guidance_rescale=0.0, guidance=guidance, projection=projection, height=height,
                             width=width, eta=0.0, generator=generator, latents=latents, cross_attention_kwargs=None,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        images = self._images(out, output_type)
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput(images=images, latents=out)
