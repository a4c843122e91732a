"""A guided Stable Diffusion XL pipeline: :class:`GuidedXLPipeline`.

What differs from :class:`~gradguide.integrations.pipeline.GuidedPipeline` is SDXL's
conditioning, built as diffusers' ``StableDiffusionXLPipeline`` builds it: the prompt through
both text encoders (their penultimate hidden states side by side, the second one's pooled
projection), an all-zero negative embedding when no negative prompt is given
(``force_zeros_for_empty_prompt``), and the U-Net's ``added_cond_kwargs``: ``text_embeds`` (the
pooled embedding) and ``time_ids`` (original size, crop corner, target size). The denoising
loop, the scheduler held at call time, guidance terms and diffusers' call keywords are
GuidedPipeline's. ``GuidedPipeline.from_pipe`` returns one for a ``StableDiffusionXLPipeline``.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch

from ..guidance.base import GuidanceTerm
from ..projection import PixelAsParam
from .pipeline import GuidedPipeline, GuidedPipelineOutput, _repeat
from .pipeline_call import _lora_scaled, _refuse_keywords

# what StableDiffusionXLPipeline offers callback_on_step_end
XL_TENSOR_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


class GuidedXLPipeline(GuidedPipeline):
    """An SDXL pipeline sampled with gradguide (see the module doc).

    ``unet``: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``;
    ``text_encoder``/``tokenizer`` (CLIP, optional) and ``text_encoder_2``/``tokenizer_2``
    (CLIP with projection); both optional when you pass ``prompt_embeds`` and
    ``pooled_prompt_embeds``. ``force_zeros_for_empty_prompt``: the pipeline's setting
    (default ``True``, as diffusers); ``watermark``: the diffusers pipeline's watermarker, applied
    to decoded images as diffusers does (``None``: none).
    """

    def __init__(self, unet, scheduler, vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, image_processor=None, force_zeros_for_empty_prompt: bool = True, watermark=None):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("GuidedXLPipeline: text_encoder_2 and tokenizer_2: pass both or neither")
        if text_encoder is not None and text_encoder_2 is None:
            raise ValueError("GuidedXLPipeline: text_encoder_2: required with text_encoder (the pooled embedding "
                             "comes from the second encoder)")
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        super().__init__(unet, scheduler, vae, text_encoder, tokenizer, image_processor)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.watermark = watermark

    @staticmethod
    def _check_addition_embed(kind) -> None:
        if kind != "text_time":
            raise ValueError(f"GuidedXLPipeline: unet: expected addition_embed_type='text_time' (SDXL), got {kind!r}")

    @classmethod
    def handles(cls, pipe) -> bool:
        """An SDXL pipeline: a second text encoder and a U-Net conditioned on text and time ids."""
        unet = getattr(pipe, "unet", None)
        return hasattr(pipe, "text_encoder_2") and \
            getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedXLPipeline":
        """From a diffusers ``StableDiffusionXLPipeline``; without ``scheduler`` the pipeline's
        scheduler is followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        cls._require_components(pipe, ("unet", "scheduler", "vae"))
        config = getattr(pipe, "config", {}) or {}
        out = cls(pipe.unet, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                  getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None),
                  getattr(pipe, "image_processor", None),
                  force_zeros_for_empty_prompt=config.get("force_zeros_for_empty_prompt", True),
                  watermark=getattr(pipe, "watermark", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    # -- conditioning -------------------------------------------------------------------------------
    def _encoders(self):
        """(tokenizer, text encoder) pairs in diffusers' order: only the second when there is no first."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [p for p in pairs if p[1] is not None] if self.text_encoder is None else pairs

    def encode_prompt(self, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                      num_images_per_prompt: int = 1, negative: bool = True, prompt_embeds=None,
                      negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                      clip_skip: Optional[int] = None, lora_scale: Optional[float] = None):
        """``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)`` (the negatives
        ``None`` without ``negative``), each repeated ``num_images_per_prompt`` times, as
        diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes them."""
        _check_pooled(clip_skip, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                      negative_pooled_prompt_embeds, "the U-Net's text_embeds")
        with contextlib.ExitStack() as stack:
            for encoder in (self.text_encoder, self.text_encoder_2):
                stack.enter_context(_lora_scaled(encoder, lora_scale))
            return self._encode_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
                                   negative, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                   negative_pooled_prompt_embeds, clip_skip)

    def _encode_xl(self, prompt, prompt_2, negative_prompt, negative_prompt_2, n, negative, prompt_embeds,
                   negative_prompt_embeds, pooled, neg_pooled, clip_skip):
        prompts = _texts(prompt, "prompt") if prompt is not None else None
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            if not self._encoders():
                raise ValueError("prompt: this pipeline has no text encoders; pass prompt_embeds= and "
                                 "pooled_prompt_embeds= instead")
            prompts_2 = _texts(prompt_2 or prompt, "prompt_2")
            if len(prompts_2) != batch:   # diffusers does not repeat a single prompt_2 either
                raise ValueError(f"prompt_2: expected {batch} strings (one per prompt), got {len(prompts_2)}")
            # SDXL reads the penultimate hidden state (clip_skip more layers back) of each encoder
            prompt_embeds, pooled = self._run_encoders([prompts, prompts_2], None, pooled,
                                                       -2 if clip_skip is None else -(clip_skip + 2))
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        if negative and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds, neg_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
            else:
                if not self._encoders():
                    raise ValueError("negative_prompt_embeds: classifier-free guidance needs the unconditional "
                                     "embedding, and this pipeline has no text encoders to encode negative_prompt; "
                                     "pass negative_prompt_embeds= and negative_pooled_prompt_embeds= with "
                                     "prompt_embeds=")
                negative_prompt = negative_prompt or ""
                negative_prompt_2 = negative_prompt_2 or negative_prompt
                texts = [_texts(t, name, batch) for t, name in ((negative_prompt, "negative_prompt"),
                                                                 (negative_prompt_2, "negative_prompt_2"))]
                negative_prompt_embeds, neg_pooled = self._run_encoders(texts, prompt_embeds.shape[1], neg_pooled, -2)
        elif negative and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds: expected {batch} rows (one per prompt), "
                             f"got {negative_prompt_embeds.shape[0]}")
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        device = self.device
        prompt_embeds = _repeat(prompt_embeds.to(device=device, dtype=dtype), n)
        pooled = _repeat(pooled.to(device), n)   # diffusers keeps the pooled embedding's dtype
        if not negative:
            return prompt_embeds, None, pooled, None
        negative_prompt_embeds = _repeat(negative_prompt_embeds.to(device=device, dtype=dtype), n)
        return prompt_embeds, negative_prompt_embeds, pooled, _repeat(neg_pooled.to(device), n)

    def _run_encoders(self, texts: List[List[str]], max_length: Optional[int], pooled, layer: int):
        """Both encoders' ``hidden_states[layer]`` concatenated on the feature axis, and the first
        2-D output (the projection's pooled embedding) unless ``pooled`` is given."""
        parts = []
        with torch.no_grad():
            for batch_texts, (tokenizer, encoder) in zip(texts, self._encoders()):
                length = tokenizer.model_max_length if max_length is None else max_length
                ids = tokenizer(batch_texts, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt").input_ids
                out = encoder(ids.to(self.device), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                parts.append(out.hidden_states[layer])
        if pooled is None:
            raise ValueError("text_encoder_2: returned no pooled (2-D) embedding; expected a "
                             "CLIPTextModelWithProjection")
        return torch.cat(parts, dim=-1), pooled

    def _time_ids(self, original_size, crops_coords_top_left, target_size, dtype, projection_dim: int):
        """``[[original_size, crops_coords_top_left, target_size]]``, checked against the width of
        the U-Net's added embedding (time ids × ``addition_time_embed_dim`` + the pooled embedding)."""
        ids = [int(v) for v in tuple(original_size) + tuple(crops_coords_top_left) + tuple(target_size)]
        expected = int(self.unet.add_embedding.linear_1.in_features)
        passed = int(self.unet.config.addition_time_embed_dim) * len(ids) + int(projection_dim)
        if expected != passed:
            raise ValueError(f"original_size, crops_coords_top_left, target_size: the U-Net's added embedding takes "
                             f"{expected} features; {len(ids)} time ids and a {projection_dim}-wide pooled embedding "
                             f"give {passed}")
        return torch.tensor([ids], dtype=dtype)

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, prompt_2=None, negative_prompt=None,
                 negative_prompt_2=None, num_inference_steps: Optional[int] = None,
                 timesteps: Optional[Sequence[int]] = None, sigmas: Optional[Sequence[float]] = None,
                 denoising_end: Optional[float] = None, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 cross_attention_kwargs: Optional[dict] = None, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                 negative_target_size=None, clip_skip: Optional[int] = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), sampler=None,
                 progress: bool = True, callback=None, backend: str = "auto", **sample_kwargs):
        """Generate images; ``StableDiffusionXLPipeline.__call__``'s keywords with diffusers'
        meaning (default ``guidance_scale`` 5.0, as diffusers), plus gradguide's as in
        :meth:`GuidedPipeline.__call__`. ``callback_on_step_end`` can read ``latents``,
        ``prompt_embeds``, ``add_text_embeds`` and ``add_time_ids``. ``denoising_end`` is
        refused; ``return_dict=False`` gives ``(images,)`` as diffusers' SDXL pipeline."""
        _refuse_keywords(sample_kwargs)
        if denoising_end is not None:
            raise ValueError("GuidedXLPipeline: denoising_end: not supported (stopping early for a refiner)")
        self._check_call(ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict, num_images_per_prompt,
                         guidance_scale, cross_attention_kwargs)
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        height, width = self._size(height, width)
        lora_scale = None if cross_attention_kwargs is None else cross_attention_kwargs.get("scale")

        def encode(do_cfg):
            pe, neg, pooled, neg_pooled = self.encode_prompt(
                prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg, prompt_embeds,
                negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip=clip_skip,
                lora_scale=lora_scale)
            proj = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None \
                else int(pooled.shape[-1])
            ids = self._time_ids(original_size or (height, width), crops_coords_top_left,
                                 target_size or (height, width), pe.dtype, proj)
            neg_ids = ids
            if negative_original_size is not None and negative_target_size is not None:
                neg_ids = self._time_ids(negative_original_size, negative_crops_coords_top_left,
                                         negative_target_size, pe.dtype, proj)
            rows = pe.shape[0]
            if not do_cfg:
                ids = ids.to(self.device).repeat(rows, 1)
                cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
                return cond, None, {"prompt_embeds": pe, "add_text_embeds": pooled, "add_time_ids": ids}
            # diffusers repeats the (negative, positive) pair of time-id rows over the doubled batch, so the
            # unconditional half gets the first B rows of that sequence (both are equal unless negative_* sizes
            # differ): the same rows here, split into the two branches
            full = torch.cat([neg_ids, ids]).to(self.device).repeat(rows, 1)
            cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": full[rows:]}}
            uncond = {"encoder_hidden_states": neg,
                      "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": full[:rows]}}
            tensors = {"prompt_embeds": torch.cat([neg, pe]), "add_text_embeds": torch.cat([neg_pooled, pooled]),
                       "add_time_ids": full}
            return cond, uncond, tensors

        out = self._generate(encode, XL_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=timesteps,
                             sigmas=sigmas, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                             guidance=guidance, projection=projection, height=height, width=width, eta=eta,
                             generator=generator, latents=latents, cross_attention_kwargs=cross_attention_kwargs,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        images = self._images(out, output_type)
        if not return_dict:
            return (images,)   # diffusers' SDXL tuple
        return GuidedPipelineOutput(images=images, latents=out)

    # -- decoding -----------------------------------------------------------------------------------
    def _latent_stats(self):
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] from sampled latents, as diffusers' SDXL pipeline decodes them (a VAE with
        ``latents_mean``/``latents_std`` de-normalises with them)."""
        stats = self._latent_stats()
        if stats is None:
            return self.vae_decode(latents / self.scaling_factor)
        mean, std = (v.to(latents.device, latents.dtype) for v in stats)
        return self.vae_decode(latents * std / self.scaling_factor + mean)

    def reward_guidance(self, *args, **kwargs):
        if self._latent_stats() is not None:
            raise ValueError("GuidedXLPipeline.reward_guidance: the VAE normalises latents with latents_mean/"
                             "latents_std, which the decoded look-ahead does not apply")
        return super().reward_guidance(*args, **kwargs)

    def _images(self, out: torch.Tensor, output_type: str):
        if output_type == "latent":
            return out
        with torch.no_grad():
            image = self.decode_latents(out)
        if self.watermark is not None:   # as diffusers, before post-processing
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)


def _texts(value, name: str, batch: Optional[int] = None) -> List[str]:
    """A prompt argument as a list of strings (a string is repeated ``batch`` times where given)."""
    if isinstance(value, str):
        return [value] * (batch or 1)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name}: expected a string or a non-empty list of strings, got {value!r}")
    if batch is not None and len(value) != batch:
        raise ValueError(f"{name}: expected {batch} strings (one per prompt), got {len(value)}")
    return list(value)


def _check_pooled(clip_skip, prompt_embeds, pooled, negative_embeds, negative_pooled, pooled_use: str) -> None:
    """The argument rules of diffusers' two-encoder ``encode_prompt`` (SDXL, SD3): ``clip_skip`` an
    integer >= 0, and pooled embeddings wherever embeddings are given (``pooled_use``: what the
    model reads them as)."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip: expected an integer >= 0 or None, got {clip_skip!r}")
    if prompt_embeds is not None and pooled is None:
        raise ValueError(f"pooled_prompt_embeds: required with prompt_embeds ({pooled_use}), as diffusers requires")
    if negative_embeds is not None and negative_pooled is None:
        raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds, as diffusers requires")
