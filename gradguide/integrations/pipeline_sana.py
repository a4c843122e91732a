"""A guided Sana pipeline: :class:`GuidedSanaPipeline`.

Built as diffusers' ``SanaPipeline`` builds its inputs: the prompt lower-cased and stripped,
prefixed with the complex human instruction (diffusers' default list unless the call gives
another, or none), through the Gemma encoder with its attention mask, right-padded, and the
first token plus the last ``max_sequence_length − 1`` kept; the negative prompt without the
instruction; latents drawn and carried in float32; the transformer called at
``timestep · timestep_scale`` with ``encoder_attention_mask`` (``SanaDenoiser``); CFG
``u + w(c − u)`` with both branches in one call, negative rows first, as diffusers; decoding
``vae.decode(latents / scaling_factor)`` through the deep-compression autoencoder and the
pipeline's image processor. Refused by name: ``use_resolution_binning=True`` (diffusers'
default: pass ``use_resolution_binning=False``), ``clean_caption=True``, ``timesteps=`` lists.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Union

import torch

from ..guidance.base import GuidanceTerm
from ..projection import PixelAsParam
from .pipeline import GuidedPipelineOutput, _repeat
from .pipeline_call import _refuse_keywords
from .pipeline_flow import TransformerDenoiser, _FlowPipeline
from .pipeline_xl import _texts

SANA_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")   # SanaPipeline's
_DEFAULT = object()   # "diffusers' default complex human instruction"


class SanaDenoiser(TransformerDenoiser):
    """``SanaTransformer2DModel`` behind ``model(x, timestep=t, **cond)``: the timestep times the
    transformer's ``timestep_scale`` and the output in float32, as SanaPipeline calls it."""

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, encoder_attention_mask=None,
                attention_kwargs=None, return_dict=False):
        t = timestep.expand(hidden_states.shape[0]) * self.transformer.config.timestep_scale
        out = self.transformer(hidden_states.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                               encoder_attention_mask=encoder_attention_mask, timestep=t, return_dict=False,
                               attention_kwargs=attention_kwargs)[0]
        return (out.float(),)


class GuidedSanaPipeline(_FlowPipeline):
    """A Sana pipeline sampled with gradguide (see the module doc).

    ``transformer``: a ``SanaTransformer2DModel``; ``scheduler``: a flow scheduler (Sana ships
    DPM-Solver++ with flow σ's); ``vae``: an ``AutoencoderDC``; ``text_encoder``/``tokenizer``:
    Gemma (optional when you pass ``prompt_embeds`` and ``prompt_attention_mask``)."""
    DEFAULT_STEPS = 20

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, image_processor=None):
        self._adapter = SanaDenoiser(transformer)
        if image_processor is None:
            from diffusers.image_processor import PixArtImageProcessor
            image_processor = PixArtImageProcessor(vae_scale_factor=self._vae_scale(vae))
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, image_processor)

    @staticmethod
    def _vae_scale(vae) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(pipe).__name__ == "SanaPipeline"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedSanaPipeline":
        """From a diffusers ``SanaPipeline``; without ``scheduler`` the pipeline's scheduler is
        followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        cls._require_components(pipe, ("transformer", "scheduler", "vae"))
        out = cls(pipe.transformer, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                  getattr(pipe, "image_processor", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    def _denoiser(self):
        return self._adapter

    # -- sizes, latents, σ's ------------------------------------------------------------------------
    def _size(self, height, width):
        step = max(32, self.vae_scale_factor * int(self.unet.config.patch_size))
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % step:
                raise ValueError(f"{name}: expected a positive multiple of {step} (diffusers requires 32), "
                                 f"got {value!r}")
        return height, width

    def _latent_dtype(self, embeds: torch.Tensor) -> torch.dtype:
        return torch.float32   # SanaPipeline keeps its latents in float32

    def _timesteps(self, schedule, num_inference_steps, timesteps, sigmas, spacing, height=None, width=None):
        n = self._check_steps(num_inference_steps, timesteps)
        if spacing is not None:
            raise ValueError("sampler.spacing: a flow scheduler spaces its own σ's")
        if sigmas is not None and num_inference_steps is None:
            n = len(sigmas)
        return self._flow_timesteps(schedule, n, sigmas, None)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1]: ``vae.decode(latents / scaling_factor)``, as SanaPipeline decodes."""
        return self.vae_decode(latents / self.scaling_factor)

    # -- conditioning -------------------------------------------------------------------------------
    def _gemma(self, texts: List[str], max_sequence_length: int, instruction):
        """Gemma's last hidden state and attention mask, as SanaPipeline's ``_get_gemma_prompt_embeds``."""
        self.tokenizer.padding_side = "right"   # diffusers sets it on the tokenizer too
        texts = [t.lower().strip() for t in texts]
        length = max_sequence_length
        if instruction:
            prefix = "\n".join(instruction)
            texts = [prefix + t for t in texts]
            length = len(self.tokenizer.encode(prefix)) + max_sequence_length - 2
        tokens = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(dtype=self.text_encoder.dtype, device=self.device), mask

    def encode_prompt(self, prompt, negative_prompt="", num_images_per_prompt: int = 1, negative: bool = True,
                      prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_attention_mask=None, max_sequence_length: int = 300,
                      complex_human_instruction=_DEFAULT):
        """``(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_attention_mask)``
        (the negatives ``None`` without ``negative``), as diffusers' ``SanaPipeline.encode_prompt``
        computes them: embeddings repeated per image in a row, masks tiled (``mask.repeat(n, 1)``),
        as diffusers lays them out."""
        if complex_human_instruction is _DEFAULT:
            complex_human_instruction = _diffusers_instruction()
        n = num_images_per_prompt
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= and "
                                 "prompt_attention_mask= instead")
            prompt_embeds, prompt_attention_mask = self._gemma(_texts(prompt, "prompt"), max_sequence_length,
                                                               complex_human_instruction)
            keep = [0] + list(range(-max_sequence_length + 1, 0))   # the first token and the prompt's tail
            prompt_embeds, prompt_attention_mask = prompt_embeds[:, keep], prompt_attention_mask[:, keep]
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        elif prompt_attention_mask is None:
            raise ValueError("prompt_attention_mask: required with prompt_embeds, as diffusers requires")
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else prompt_embeds.dtype
        out = [_repeat(prompt_embeds.to(self.device), n),
               prompt_attention_mask.to(self.device).view(batch, -1).repeat(n, 1)]
        if not negative:
            return out[0], out[1], None, None
        if negative_prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("negative_prompt_embeds: classifier-free guidance (guidance_scale > 1) needs the "
                                 "unconditional embedding, and this pipeline has no text_encoder/tokenizer to encode "
                                 "negative_prompt; pass negative_prompt_embeds= and negative_prompt_attention_mask=")
            negative_prompt_embeds, negative_prompt_attention_mask = self._gemma(
                _texts(negative_prompt, "negative_prompt", batch), max_sequence_length, None)
        elif negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_attention_mask: required with negative_prompt_embeds, as diffusers "
                             "requires")
        neg = _repeat(negative_prompt_embeds.to(device=self.device, dtype=dtype), n)
        return out[0], out[1], neg, negative_prompt_attention_mask.to(self.device).view(batch, -1).repeat(n, 1)

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, negative_prompt="",
                 num_inference_steps: Optional[int] = None, timesteps=None, sigmas: Optional[Sequence[float]] = None,
                 guidance_scale: float = 4.5, num_images_per_prompt: int = 1, height: int = 1024, width: int = 1024,
                 eta: float = 0.0, generator=None, latents: Optional[torch.Tensor] = None, prompt_embeds=None,
                 prompt_attention_mask=None, negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                 output_type: str = "pil", return_dict: bool = True, clean_caption: bool = False,
                 use_resolution_binning: bool = True, attention_kwargs: Optional[dict] = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 max_sequence_length: int = 300, complex_human_instruction=_DEFAULT,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, sampler=None, progress: bool = True, callback=None,
                 backend: str = "auto", **sample_kwargs):
        """Generate images; ``SanaPipeline.__call__``'s keywords with diffusers' meaning (default
        20 steps, ``guidance_scale`` 4.5, 1024×1024), plus gradguide's as in
        :meth:`GuidedPipeline.__call__`. ``use_resolution_binning`` must be ``False`` (binning
        resizes the image to an aspect-ratio bin and back), ``clean_caption`` ``False``, and
        ``timesteps=`` is refused; ``return_dict=False`` gives ``(images,)``."""
        _refuse_keywords(sample_kwargs)
        if use_resolution_binning:
            raise ValueError("GuidedSanaPipeline: use_resolution_binning: not supported (the image is generated at an "
                             "aspect-ratio bin and resized); pass use_resolution_binning=False")
        if clean_caption:
            raise ValueError("GuidedSanaPipeline: clean_caption: caption cleaning (bs4 / ftfy) is not supported")
        self._call_checks(output_type, return_dict, num_images_per_prompt, guidance_scale, attention_kwargs, None,
                          None, 512)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected an integer >= 1, got {max_sequence_length!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")

        def encode(do_cfg):
            pe, mask, neg, neg_mask = self.encode_prompt(
                prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds, negative_prompt_embeds,
                prompt_attention_mask, negative_prompt_attention_mask, max_sequence_length, complex_human_instruction)
            extra = {} if attention_kwargs is None else {"attention_kwargs": attention_kwargs}
            cond = {"encoder_hidden_states": pe, "encoder_attention_mask": mask, **extra}
            if not do_cfg:
                return cond, None, {"prompt_embeds": pe, "negative_prompt_embeds": None}
            uncond = {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask, **extra}
            return cond, uncond, {"prompt_embeds": torch.cat([neg, pe]), "negative_prompt_embeds": neg}

        out = self._generate(encode, SANA_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=timesteps,
                             sigmas=sigmas, guidance_scale=guidance_scale, guidance_rescale=0.0, guidance=guidance,
                             projection=projection, height=height, width=width, eta=eta, generator=generator,
                             latents=latents, cross_attention_kwargs=None, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        images = self._images(out, output_type)
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput(images=images, latents=out)


def _diffusers_instruction():
    """diffusers' default ``complex_human_instruction`` (read from its ``SanaPipeline.__call__``)."""
    from diffusers import SanaPipeline
    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
