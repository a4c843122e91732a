"""A guided diffusers pipeline: prompts in, images out, sampled by :func:`gradguide.sample`.

:class:`GuidedPipeline` wraps the components of a diffusers text-to-image latent pipeline
(Stable Diffusion 1.x/2.x or any pipeline with ``unet``, ``scheduler``, ``vae`` and a CLIP-style
``text_encoder`` + ``tokenizer``) and samples it with gradguide's samplers, guidance terms and
PixelAsParam — including G_loss reward guidance through the VAE decoder
(:meth:`GuidedPipeline.reward_guidance`, the gradient-guidance paper's SD experiment)::

    import torch, gradguide as gg
    from diffusers import StableDiffusionPipeline, DDIMScheduler
    from gradguide.integrations.pipeline import GuidedPipeline

    sd = StableDiffusionPipeline.from_pretrained(...)
    pipe = GuidedPipeline.from_pipe(sd)   # or scheduler=DDIMScheduler.from_config(sd.scheduler.config)
    images = pipe("a photo of a cat", num_inference_steps=50, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images          # PIL images
    reward = pipe.reward_guidance(grad, offset=b, target=10.0, beta=100.0)   # G_loss through the VAE
    images = pipe("a photo of a cat", guidance=[reward], projection=gg.PixelAsParam("C")).images

Each call does what diffusers' ``StableDiffusionPipeline.__call__`` does — encode the prompt and
the negative prompt (``""`` by default) as its ``encode_prompt`` does, draw the initial latents
with ``generator``, run the scheduler's timesteps with classifier-free guidance
``u + w(c − u)`` when ``guidance_scale > 1`` (both branches in one U-Net call of batch 2B where
:func:`gradguide.sample` batches branches), decode with ``vae.decode(latents / scaling_factor)``
and post-process with the pipeline's image processor — except that the denoising loop is
:func:`gradguide.sample` (``from_diffusers(unet, scheduler)``: the scheduler's own timesteps and
configuration), so every gradguide term applies. With plain CFG and the scheduler's own sampler
the images equal diffusers' (tested on a tiny random SD in tests/test_pipeline.py).

Refused, with an error naming the option: U-Nets that need ``added_cond_kwargs`` (SDXL's
``addition_embed_type``) or a guidance embedding (``time_cond_proj_dim``), ``clip_skip``; no
safety checker is run.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..config import Diagnostics, Execution, Sampler
from ..guidance.base import GuidanceTerm
from ..guidance.cfg import CFG
from ..guidance.gradient import DecodedLookAhead
from ..guidance.rescale import Rescale
from ..projection import PixelAsParam
from ..sampling import sample
from .diffusers import from_diffusers

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuidedPipelineOutput:
    """``images``: PIL images, a numpy array ``[B, H, W, C]`` or a tensor ``[B, C, H, W]`` in
    [0, 1] (``output_type``), or the latents for ``"latent"``; ``latents``: the final latents."""
    images: object
    latents: torch.Tensor


class GuidedPipeline:
    """A diffusers latent text-to-image pipeline sampled with gradguide (see the module doc).

    ``unet``: a ``UNet2DConditionModel`` (or any U-Net taking ``encoder_hidden_states``);
    ``scheduler``: a diffusers scheduler that :func:`gradguide.from_diffusers` supports (its
    timesteps, prediction type and clipping are used); ``vae``: an ``AutoencoderKL``;
    ``text_encoder`` / ``tokenizer``: CLIP-style (optional when you pass ``prompt_embeds``);
    ``image_processor``: a ``VaeImageProcessor`` (default: one for the VAE's scale factor).
    """

    def __init__(self, unet, scheduler, vae, text_encoder=None, tokenizer=None, image_processor=None):
        for name, value in (("unet", unet), ("vae", vae)):
            if not callable(value):
                raise TypeError(f"GuidedPipeline: {name}: expected a diffusers model, got {type(value).__name__}")
        config = getattr(unet, "config", None)
        if getattr(config, "addition_embed_type", None) is not None:
            raise ValueError(f"GuidedPipeline: unet: addition_embed_type={config.addition_embed_type!r} needs "
                             "added_cond_kwargs (SDXL-style conditioning), which this pipeline does not build")
        if getattr(config, "time_cond_proj_dim", None) is not None:
            raise ValueError("GuidedPipeline: unet: time_cond_proj_dim is set (a guidance-distilled U-Net, e.g. LCM); "
                             "its guidance embedding is not supported")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("GuidedPipeline: text_encoder and tokenizer: pass both or neither")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.model, self.schedule = from_diffusers(unet, scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_processor is None:
            from diffusers.image_processor import VaeImageProcessor
            image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.image_processor = image_processor

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedPipeline":
        """From a diffusers pipeline object (``StableDiffusionPipeline`` and the like);
        ``scheduler`` replaces the pipeline's own."""
        missing = [name for name in ("unet", "scheduler", "vae") if getattr(pipe, name, None) is None]
        if missing:
            raise TypeError(f"GuidedPipeline.from_pipe: pipe: {type(pipe).__name__} has no {', '.join(missing)}")
        return cls(pipe.unet, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                   getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                   getattr(pipe, "image_processor", None))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # -- pieces a user may want on their own -----------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, negative: bool = True,
                      prompt_embeds: Optional[torch.Tensor] = None,
                      negative_prompt_embeds: Optional[torch.Tensor] = None):
        """``(prompt_embeds, negative_prompt_embeds or None)``, each ``[B · n, L, D]``, as
        diffusers' ``StableDiffusionPipeline.encode_prompt`` computes them."""
        device = self.device
        if prompt_embeds is None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
            prompt_embeds = self._encode(list(prompt), self._max_length())
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = _repeat(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        if not negative:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                tokens = [""] * batch
            elif isinstance(negative_prompt, str):
                tokens = [negative_prompt] * batch
            elif isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) == batch:
                tokens = list(negative_prompt)
            else:
                raise ValueError(f"negative_prompt: expected a string or a list of {batch} strings (one per prompt), "
                                 f"got {negative_prompt!r}")
            negative_prompt_embeds = self._encode(tokens, prompt_embeds.shape[1])
        elif negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds: expected {batch} rows (one per prompt), "
                             f"got {negative_prompt_embeds.shape[0]}")
        negative_prompt_embeds = _repeat(negative_prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        return prompt_embeds, negative_prompt_embeds

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE decoder on *unscaled* latents (``z / scaling_factor``): images in about [−1, 1]."""
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] from sampled latents, as diffusers decodes them."""
        return self.vae_decode(latents / self.scaling_factor)

    def reward_guidance(self, grad: torch.Tensor, offset=0.0, target: float = 10.0, beta: float = 100.0,
                        official_batch_scaling: bool = False) -> DecodedLookAhead:
        """G_loss through the VAE decoder (the gradient-guidance paper's SD experiment): a reward
        linearised at an image, ``r(x) ≈ gᵀx + b`` (``grad`` = g in image space, ``offset`` = b),
        pulled towards ``target``; ``beta`` per sample (``official_batch_scaling=True``: the
        authors' code's β, which is B × this one). Pass it in ``guidance=``."""
        return DecodedLookAhead(self.vae_decode, grad, offset=offset, target=target, beta=beta,
                                scaling=self.scaling_factor, official_batch_scaling=official_batch_scaling)

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, negative_prompt=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (), projection: Optional[PixelAsParam] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_images_per_prompt: int = 1,
                 generator=None, latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None, output_type: str = "pil",
                 sampler: Union[str, Sampler, None] = None, eta: float = 0.0, progress: bool = True,
                 callback: Optional[Callable] = None, backend: str = "auto", **sample_kwargs) -> GuidedPipelineOutput:
        """Generate images.

        ``prompt`` (a string or a list) or ``prompt_embeds``; ``negative_prompt`` (default ``""``)
        or ``negative_prompt_embeds``; ``num_inference_steps`` (default 50); ``guidance_scale``
        (default 7.5, diffusers' w: classifier-free guidance ``u + w(c − u)`` when > 1, as
        diffusers); ``guidance_rescale`` φ (default 0: Lin et al.'s rescale when > 0);
        ``guidance``: further gradguide terms (e.g. :meth:`reward_guidance`); a branch-combining
        term there (``gg.APG``, ``gg.CFGZeroStar``, ...) replaces the CFG built from
        ``guidance_scale`` and gets the negative prompt as its unconditional input;
        ``projection``: a :class:`~gradguide.PixelAsParam`; ``height``/``width`` (default: the
        U-Net's sample size × the VAE's scale factor); ``generator``: a ``torch.Generator`` (or
        one per image) for the initial latents and any sampler noise; ``latents``: the initial
        noise instead; ``output_type``: ``"pil"`` (default), ``"np"``, ``"pt"`` or ``"latent"``;
        ``sampler``: gradguide's sampler, a name or a :class:`~gradguide.Sampler` (default: the
        scheduler's configuration; fields a ``Sampler`` leaves unset come from it); ``eta``:
        DDIM's η; ``progress``: a progress bar over the steps (default on); ``callback``: gets
        gradguide's :class:`~gradguide.sampling.StepRecord` after each step; ``backend``: the ops
        backend; ``execution=`` / ``diagnostics=`` (a :class:`~gradguide.Execution` /
        :class:`~gradguide.Diagnostics`) go to :func:`gradguide.sample` instead of
        ``backend`` / ``progress`` and ``callback``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if "clip_skip" in sample_kwargs:
            raise ValueError("clip_skip: not supported (the text encoder's last hidden state is used)")
        execution = sample_kwargs.pop("execution", None) or Execution(backend=backend)
        diagnostics = sample_kwargs.pop("diagnostics", None) or Diagnostics(progress=progress, callback=callback)
        if sample_kwargs:
            raise TypeError(f"GuidedPipeline: unexpected keyword arguments {sorted(sample_kwargs)}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected an integer >= 1, got {num_images_per_prompt!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        if prompt_embeds is None and self.text_encoder is None:
            raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= instead")
        terms = [guidance] if isinstance(guidance, GuidanceTerm) else list(guidance or ())
        for j, term in enumerate(terms):
            if not isinstance(term, GuidanceTerm):
                raise TypeError(f"guidance[{j}]: expected a gradguide guidance term, got {type(term).__name__}")
        user_branch = [t for t in terms if t.place == "branches"]
        do_cfg = guidance_scale > 1.0 or bool(user_branch)   # diffusers: CFG only when guidance_scale > 1

        cond_embeds, neg_embeds = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, do_cfg,
                                                     prompt_embeds, negative_prompt_embeds)
        uncond = {"encoder_hidden_states": neg_embeds} if do_cfg else None
        if user_branch:
            terms = [_with_uncond(t, uncond) if t.place == "branches" else t for t in terms]
        elif do_cfg:
            branch = Rescale(guidance_scale, guidance_rescale, uncond=uncond) if guidance_rescale > 0 \
                else CFG(guidance_scale, uncond=uncond)
            terms = [branch] + terms

        batch = cond_embeds.shape[0]
        height, width = self._size(height, width)
        shape = (batch, int(self.unet.config.in_channels), height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        dtype = cond_embeds.dtype
        if latents is None:
            latents = _randn(shape, generator, self.device, dtype)   # as diffusers' prepare_latents draws them
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        config = sampler if isinstance(sampler, Sampler) else Sampler(sampler)
        if eta:
            config = dataclasses.replace(config, eta=eta)
        out = sample(self.model, shape, schedule=self.schedule, sampler=config, steps=num_inference_steps,
                     guidance=terms, projection=projection, cond={"encoder_hidden_states": cond_embeds},
                     x_T=latents.to(self.device, dtype), generator=generator, execution=execution,
                     diagnostics=diagnostics)
        if output_type == "latent":
            return GuidedPipelineOutput(images=out, latents=out)
        with torch.no_grad():
            image = self.decode_latents(out)
        images = self.image_processor.postprocess(image, output_type=output_type,
                                                  do_denormalize=[True] * image.shape[0])
        return GuidedPipelineOutput(images=images, latents=out)

    # -- helpers ------------------------------------------------------------------------------------
    def _max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _encode(self, texts: List[str], max_length: int) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def _size(self, height, width):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        height = size[0] * self.vae_scale_factor if height is None else height
        width = size[1] * self.vae_scale_factor if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % self.vae_scale_factor:
                raise ValueError(f"{name}: expected a positive multiple of the VAE's scale factor "
                                 f"{self.vae_scale_factor}, got {value!r}")
        return height, width


def _repeat(embeds: torch.Tensor, n: int) -> torch.Tensor:
    """Each prompt's row ``n`` times in a row (diffusers' ``repeat(1, n, 1).view(B n, L, D)``)."""
    return embeds.repeat_interleave(n, dim=0)


def _with_uncond(term: GuidanceTerm, uncond: dict) -> GuidanceTerm:
    if getattr(term, "uncond", None) is not None:
        return term
    term = copy.copy(term)
    term.uncond = uncond
    return term


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list needs one generator per image ({shape[0]}), got {len(generator)}")
        return torch.cat([torch.randn((1,) + tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                          for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
