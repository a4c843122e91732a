"""A guided Wan text-to-video pipeline: :class:`GuidedWanPipeline`.

Built as diffusers' ``WanPipeline`` (Wan 2.1 text-to-video) builds its inputs: the prompt
cleaned as diffusers cleans it, through the UMT5 encoder with its attention mask, the padded
positions zeroed; 5-D latents ``[B, C, (F − 1)/4 + 1, H/8, W/8]`` drawn and carried in float32
(the transformer runs in its own dtype); the scheduler's own σ's and timesteps (Wan ships
UniPC with flow σ's); CFG ``u + w(c − u)`` when ``guidance_scale > 1``, both branches in one
transformer call where diffusers makes two; decoding ``latents · latents_std + latents_mean``
through ``AutoencoderKLWan`` and the pipeline's video processor. Wan 2.2's two experts
(``transformer_2``, ``boundary_ratio``, ``guidance_scale_2``) and ``expand_timesteps`` are refused
by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from ..guidance.base import GuidanceTerm
from ..projection import PixelAsParam
from .pipeline import _repeat
from .pipeline_call import _refuse_keywords
from .pipeline_flow import _FlowPipeline
from .pipeline_xl import _texts

WAN_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")   # WanPipeline's


@dataclass
class GuidedVideoOutput:
    """``frames``: the videos (``output_type``: numpy ``[B, F, H, W, C]``, a tensor
    ``[B, F, C, H, W]``, lists of PIL images, or the latents for ``"latent"``); ``latents``."""
    frames: object
    latents: torch.Tensor


class GuidedWanPipeline(_FlowPipeline):
    """A Wan 2.1 text-to-video pipeline sampled with gradguide (see the module doc).

    ``transformer``: a ``WanTransformer3DModel``; ``scheduler``: a flow scheduler; ``vae``: an
    ``AutoencoderKLWan``; ``text_encoder``/``tokenizer``: UMT5 (optional when you pass
    ``prompt_embeds``); ``video_processor``: the pipeline's (default: one for the VAE's scale)."""
    DEFAULT_STEPS = 50

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, video_processor=None):
        if video_processor is None:
            from diffusers.video_processor import VideoProcessor
            video_processor = VideoProcessor(vae_scale_factor=self._vae_scale(vae))
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, video_processor)
        self.vae_scale_factor_temporal = int(vae.config.scale_factor_temporal)

    @staticmethod
    def _vae_scale(vae) -> int:
        return int(vae.config.scale_factor_spatial)

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(pipe).__name__ == "WanPipeline"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedWanPipeline":
        """From a diffusers ``WanPipeline``; without ``scheduler`` the pipeline's scheduler is
        followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        config = getattr(pipe, "config", {}) or {}
        if getattr(pipe, "transformer_2", None) is not None or config.get("boundary_ratio") is not None:
            raise ValueError("GuidedWanPipeline: transformer_2 / boundary_ratio: Wan 2.2's two-expert denoising is not "
                             "supported")
        if config.get("expand_timesteps", False):
            raise ValueError("GuidedWanPipeline: expand_timesteps: per-token timesteps (Wan 2.2 TI2V) are not supported")
        cls._require_components(pipe, ("transformer", "scheduler", "vae"))
        out = cls(pipe.transformer, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                  getattr(pipe, "video_processor", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    # -- sizes, latents, σ's ------------------------------------------------------------------------
    def _size(self, height, width):
        patch = tuple(self.unet.config.patch_size)
        for name, value, p in (("height", height, patch[1]), ("width", width, patch[2])):
            step = self.vae_scale_factor * p
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 16 or value % step:
                # diffusers requires multiples of 16 and rounds down to the patch grid with a warning
                raise ValueError(f"{name}: expected a positive multiple of 16 and of the VAE's scale factor × the "
                                 f"patch size = {step}, got {value!r}")
        return height, width

    def _latent_shape(self, rows: int, height: int, width: int) -> tuple:
        frames = (self._run_frames - 1) // self.vae_scale_factor_temporal + 1
        return (rows, int(self.unet.config.in_channels), frames, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def _latent_dtype(self, embeds: torch.Tensor) -> torch.dtype:
        return torch.float32   # WanPipeline keeps its latents in float32 whatever the transformer's dtype

    def _timesteps(self, schedule, num_inference_steps, timesteps, sigmas, spacing, height=None, width=None):
        n = self._check_steps(num_inference_steps, timesteps)
        if spacing is not None:
            raise ValueError("sampler.spacing: a flow scheduler spaces its own σ's")
        return self._flow_timesteps(schedule, n, None, None)   # WanPipeline: set_timesteps(n), nothing else

    _run_frames = 81

    # -- decoding -----------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos in [−1, 1] ``[B, 3, F, H, W]``, as WanPipeline decodes: ``latents / (1/latents_std)
        + latents_mean`` per channel, then the VAE."""
        config = self.vae.config
        shape = (1, int(config.z_dim), 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return self.vae_decode(latents / inv_std + mean)

    def _images(self, out: torch.Tensor, output_type: str):
        if output_type == "latent":
            return out
        with torch.no_grad():
            video = self.decode_latents(out.to(self.vae.dtype))
        return self.image_processor.postprocess_video(video, output_type=output_type)

    # -- conditioning -------------------------------------------------------------------------------
    def _encode(self, texts: List[str], max_length: int, clip_skip=None) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean   # diffusers' own text cleaning
        tokens = self.tokenizer([prompt_clean(t) for t in texts], padding="max_length", max_length=max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        hidden = hidden.to(dtype=self.text_encoder.dtype)
        keep = torch.arange(max_length, device=self.device)[None, :] < mask.gt(0).sum(1)[:, None]
        return torch.where(keep[..., None], hidden, torch.zeros_like(hidden))   # the padding zeroed, as diffusers

    def encode_prompt(self, prompt, negative_prompt=None, num_videos_per_prompt: int = 1, negative: bool = True,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = 512):
        """``(prompt_embeds, negative_prompt_embeds or None)``, each repeated
        ``num_videos_per_prompt`` times and in the transformer's dtype, as diffusers'
        ``WanPipeline`` computes them."""
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= instead")
            prompt_embeds = self._encode(_texts(prompt, "prompt"), max_sequence_length)
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        batch = prompt_embeds.shape[0]
        dtype, n = self.unet.dtype, num_videos_per_prompt
        prompt_embeds = _repeat(prompt_embeds.to(self.device), n).to(dtype)
        if not negative:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("negative_prompt_embeds: classifier-free guidance (guidance_scale > 1) needs the "
                                 "unconditional embedding, and this pipeline has no text_encoder/tokenizer to encode "
                                 "negative_prompt; pass negative_prompt_embeds= with prompt_embeds=")
            negative_prompt_embeds = self._encode(_texts(negative_prompt or "", "negative_prompt", batch),
                                                  max_sequence_length)
        elif negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds: expected {batch} rows (one per prompt), "
                             f"got {negative_prompt_embeds.shape[0]}")
        return prompt_embeds, _repeat(negative_prompt_embeds.to(self.device), n).to(dtype)

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, negative_prompt=None, height: int = 480,
                 width: int = 832, num_frames: int = 81, num_inference_steps: Optional[int] = None,
                 guidance_scale: float = 5.0, guidance_scale_2=None, num_videos_per_prompt: int = 1, generator=None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds=None, negative_prompt_embeds=None,
                 output_type: str = "np", return_dict: bool = True, attention_kwargs: Optional[dict] = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 max_sequence_length: int = 512, guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, sampler=None, progress: bool = True, callback=None,
                 backend: str = "auto", **sample_kwargs):
        """Generate videos; ``WanPipeline.__call__``'s keywords with diffusers' meaning (default
        480×832, 81 frames, 50 steps, ``guidance_scale`` 5.0, ``output_type="np"``), plus
        gradguide's as in :meth:`GuidedPipeline.__call__`. ``num_frames − 1`` must be a multiple
        of the VAE's temporal factor (diffusers rounds it with a warning); ``guidance_scale_2`` is
        refused (Wan 2.2); ``return_dict=False`` gives ``(frames,)``."""
        _refuse_keywords(sample_kwargs)
        if guidance_scale_2 is not None:
            raise ValueError("GuidedWanPipeline: guidance_scale_2: Wan 2.2's low-noise expert is not supported")
        self._call_checks(output_type, return_dict, num_videos_per_prompt, guidance_scale, attention_kwargs, None,
                          None, max_sequence_length)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
                or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"num_frames: expected 1 + a multiple of the VAE's temporal factor "
                             f"{self.vae_scale_factor_temporal}, got {num_frames!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")

        def encode(do_cfg):
            pe, neg = self.encode_prompt(prompt, negative_prompt, num_videos_per_prompt, do_cfg, prompt_embeds,
                                         negative_prompt_embeds, max_sequence_length)
            extra = {} if attention_kwargs is None else {"attention_kwargs": attention_kwargs}
            cond = {"encoder_hidden_states": pe, **extra}
            uncond = {"encoder_hidden_states": neg, **extra} if do_cfg else None
            return cond, uncond, {"prompt_embeds": pe, "negative_prompt_embeds": neg}

        self._run_frames = num_frames
        out = self._generate(encode, WAN_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=None,
                             sigmas=None, guidance_scale=guidance_scale, guidance_rescale=0.0, guidance=guidance,
                             projection=projection, height=height, width=width, eta=0.0, generator=generator,
                             latents=latents, cross_attention_kwargs=None, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        frames = self._images(out, output_type)
        if not return_dict:
            return (frames,)
        return GuidedVideoOutput(frames=frames, latents=out)
