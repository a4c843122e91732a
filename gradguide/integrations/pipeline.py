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
the images equal diffusers' (tested on a tiny random SD in tests/integrations/test_pipeline.py).

The scheduler is read at every call: one assigned to ``GuidedPipeline.scheduler`` (diffusers'
``pipe.scheduler = X.from_config(pipe.scheduler.config)``) or, after :meth:`GuidedPipeline.from_pipe`,
to the wrapped pipeline's ``scheduler`` is the one sampled with, or refused by name. diffusers'
call keywords have diffusers' meaning (``timesteps``/``sigmas`` lists, ``eta``, ``clip_skip``,
``cross_attention_kwargs``, ``callback_on_step_end``, ``return_dict``, generator lists, ...; see
docs/diffusers.md), and an unknown keyword is refused naming the pipeline.

``GuidedPipeline.from_pipe`` returns the variant built for the pipeline it is given: SDXL
(:mod:`.pipeline_xl`), SD3 (:mod:`.pipeline_flow`), Flux (:mod:`.pipeline_flux`), Wan
(:mod:`.pipeline_wan`), Qwen-Image (:mod:`.pipeline_qwenimage`), Sana (:mod:`.pipeline_sana`);
docs/diffusers.md has the table.

Refused, with an error naming the option: U-Nets that need ``added_cond_kwargs`` (SDXL's
``addition_embed_type``) or a guidance embedding (``time_cond_proj_dim``), IP-Adapter inputs;
no safety checker is run.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
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
from .pipeline_call import TENSOR_INPUTS, _lora_scaled, _refuse_keywords, _required_positional, _StepEnd

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
        self._check_addition_embed(getattr(config, "addition_embed_type", None))
        if getattr(config, "time_cond_proj_dim", None) is not None:
            raise ValueError("GuidedPipeline: unet: time_cond_proj_dim is set (a guidance-distilled U-Net, e.g. LCM); "
                             "its guidance embedding is not supported")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("GuidedPipeline: text_encoder and tokenizer: pass both or neither")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self._pipe = None            # from_pipe: the diffusers pipeline whose scheduler is followed
        self._scheduler = scheduler  # a scheduler of its own (given or assigned); None: the pipe's
        self._converted = None       # (scheduler, its config, model, schedule) of the last conversion
        self._conversion()           # now: an unsupported scheduler is refused at construction
        self.vae_scale_factor = self._vae_scale(vae)
        if image_processor is None:
            from diffusers.image_processor import VaeImageProcessor
            image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.image_processor = image_processor
        self._guidance_scale = self._run_guidance_scale = None
        self._num_timesteps = None

    @staticmethod
    def _vae_scale(vae) -> int:
        """The VAE's spatial downsampling factor (an image side over a latent side)."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @staticmethod
    def _check_addition_embed(kind) -> None:
        if kind == "text_time":
            raise ValueError("GuidedPipeline: unet: addition_embed_type='text_time' (SDXL) needs added_cond_kwargs "
                             "(text_embeds, time_ids): use gradguide.integrations.pipeline_xl.GuidedXLPipeline "
                             "(GuidedPipeline.from_pipe picks it for a StableDiffusionXLPipeline)")
        if kind is not None:
            raise ValueError(f"GuidedPipeline: unet: addition_embed_type={kind!r} needs added_cond_kwargs, "
                             "which this pipeline does not build")

    @classmethod
    def handles(cls, pipe) -> bool:
        """Whether ``from_pipe`` should build this class for ``pipe`` (a variant overrides it)."""
        return False

    @classmethod
    def _require_components(cls, pipe, names) -> None:
        """``from_pipe``'s check: ``pipe`` has each of ``names`` (TypeError naming those it lacks)."""
        missing = [name for name in names if getattr(pipe, name, None) is None]
        if missing:
            raise TypeError(f"{cls.__name__}.from_pipe: pipe: {type(pipe).__name__} has no {', '.join(missing)}")

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedPipeline":
        """From a diffusers pipeline object (``StableDiffusionPipeline`` and the like);
        ``scheduler`` replaces the pipeline's own. Without it the GuidedPipeline follows
        ``pipe.scheduler``: a scheduler assigned to the diffusers pipeline later is the one the
        next call samples with (until one is assigned to ``GuidedPipeline.scheduler``)."""
        if cls is GuidedPipeline:
            # variants (SDXL, SD3, Flux) are subclasses that claim the pipes they build for; the
            # package's __init__ imports them, so this module need not import its own subclasses
            for variant in _variants(GuidedPipeline):
                if variant.handles(pipe):
                    return variant.from_pipe(pipe, scheduler)
        cls._require_components(pipe, ("unet", "scheduler", "vae"))
        out = cls(pipe.unet, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                  getattr(pipe, "image_processor", None))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    # -- the scheduler the user holds, read at every call ------------------------------------------
    @property
    def scheduler(self):
        """The diffusers scheduler sampled with: the one assigned here (diffusers' idiom
        ``pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)``
        works), else the wrapped pipeline's current one. Each call converts it again when it is
        another object or its configuration changed; one gradguide cannot reproduce is refused
        by name."""
        return self._scheduler if self._scheduler is not None else self._pipe.scheduler

    @scheduler.setter
    def scheduler(self, scheduler):
        if scheduler is None:
            raise TypeError("GuidedPipeline: scheduler: expected a diffusers scheduler, got None")
        self._scheduler = scheduler

    def _conversion(self):
        sched = self.scheduler
        config = dict(getattr(sched, "config", {}) or {})
        done = self._converted
        if done is None or done[0] is not sched or not _same_config(done[1], config):
            try:
                model, schedule = from_diffusers(self._denoiser(), sched)
            except ValueError as exc:
                raise ValueError(f"GuidedPipeline: {exc}") from exc
            self._converted = done = (sched, config, model, schedule)
        return done

    def _denoiser(self):
        """The module ``from_diffusers`` wraps (a variant whose model needs an adapter returns it)."""
        return self.unet

    @property
    def model(self):
        """``from_diffusers(unet, scheduler)``'s model for the current scheduler."""
        return self._conversion()[2]

    @property
    def schedule(self):
        """``from_diffusers(unet, scheduler)``'s schedule for the current scheduler."""
        return self._conversion()[3]

    @property
    def guidance_scale(self):
        """The running call's ``guidance_scale`` (what diffusers' callbacks read)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running call uses CFG (``guidance_scale > 1``, as diffusers)."""
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def num_timesteps(self):
        """The running (or last) call's number of denoising steps (diffusers' ``num_timesteps``)."""
        return self._num_timesteps

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # -- pieces a user may want on their own -----------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, negative: bool = True,
                      prompt_embeds: Optional[torch.Tensor] = None,
                      negative_prompt_embeds: Optional[torch.Tensor] = None, clip_skip: Optional[int] = None,
                      lora_scale: Optional[float] = None):
        """``(prompt_embeds, negative_prompt_embeds or None)``, each ``[B · n, L, D]``, as
        diffusers' ``StableDiffusionPipeline.encode_prompt`` computes them: ``clip_skip`` takes
        the prompt's hidden state that many layers before the last (through the final layer
        norm; the negative prompt keeps the last one, as diffusers), ``lora_scale`` scales the
        text encoder's LoRA layers while encoding."""
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"clip_skip: expected an integer >= 0 or None, got {clip_skip!r}")
        with _lora_scaled(self.text_encoder, lora_scale):
            return self._encode_prompt(prompt, negative_prompt, num_images_per_prompt, negative, prompt_embeds,
                                       negative_prompt_embeds, clip_skip)

    def _encode_prompt(self, prompt, negative_prompt, num_images_per_prompt, negative, prompt_embeds,
                       negative_prompt_embeds, clip_skip):
        device = self.device
        if prompt_embeds is None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
            prompt_embeds = self._encode(list(prompt), self._max_length(), clip_skip)
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = _repeat(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        if not negative:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if self.text_encoder is None:   # diffusers would encode negative_prompt ("") with the text encoder
                raise ValueError("negative_prompt_embeds: classifier-free guidance (guidance_scale > 1) needs the "
                                 "unconditional embedding, and this pipeline has no text_encoder/tokenizer to encode "
                                 "negative_prompt; pass negative_prompt_embeds= with prompt_embeds= (or "
                                 "guidance_scale <= 1)")
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
                 num_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                 sigmas: Optional[Sequence[float]] = None, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 cross_attention_kwargs: Optional[dict] = None, clip_skip: Optional[int] = None,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 sampler: Union[str, Sampler, None] = None, progress: bool = True, callback: Optional[Callable] = None,
                 backend: str = "auto", **sample_kwargs):
        """Generate images; diffusers' ``StableDiffusionPipeline.__call__`` keywords have diffusers' meaning.

        ``prompt`` (a string or a list) or ``prompt_embeds``; ``negative_prompt`` (default ``""``)
        or ``negative_prompt_embeds`` (needed with ``prompt_embeds`` when the pipeline has no text
        encoder and ``guidance_scale > 1``); ``num_inference_steps`` (default 50), or diffusers'
        ``timesteps=[...]`` / ``sigmas=[...]`` lists (for a scheduler whose ``set_timesteps``
        takes them; the step count is then theirs); ``guidance_scale`` (default 7.5, diffusers'
        w: classifier-free guidance ``u + w(c − u)`` when > 1, as diffusers); ``guidance_rescale``
        φ (default 0: Lin et al.'s rescale when > 0); ``eta``: DDIM's η and TCD's γ (default 0.0,
        as diffusers' pipelines pass it; ignored by a scheduler whose ``step`` takes none, as
        diffusers ignores it); ``clip_skip``; ``cross_attention_kwargs``
        (passed to the U-Net; its ``scale`` also scales the text encoder's LoRA layers, as
        diffusers); ``callback_on_step_end(pipe, i, t, callback_kwargs)`` after each step with
        the tensors named in ``callback_on_step_end_tensor_inputs`` (``"latents"``,
        ``"prompt_embeds"``, ``"negative_prompt_embeds"``) in diffusers' convention, the
        ``latents`` it returns continuing the run; ``return_dict=False``: ``(images, None)``, as
        diffusers with no safety checker. IP-Adapter inputs are refused.

        gradguide's own: ``guidance``: further gradguide terms (e.g. :meth:`reward_guidance`); a
        branch-combining term there (``gg.APG``, ``gg.CFGZeroStar``, ...) replaces the CFG built
        from ``guidance_scale`` and gets the negative prompt as its unconditional input;
        ``projection``: a :class:`~gradguide.PixelAsParam`; ``height``/``width`` (default: the
        U-Net's sample size × the VAE's scale factor); ``generator``: a ``torch.Generator`` (or
        one per image) for the initial latents and any sampler noise; ``latents``: the initial
        noise instead; ``output_type``: ``"pil"`` (default), ``"np"``, ``"pt"`` or ``"latent"``;
        ``sampler``: gradguide's sampler, a name or a :class:`~gradguide.Sampler` (default: the
        scheduler's configuration; fields a ``Sampler`` leaves unset come from it, its
        ``spacing`` included); ``progress``: a progress bar over the steps (default on);
        ``callback``: gets gradguide's :class:`~gradguide.sampling.StepRecord` after each step;
        ``backend``: the ops backend; ``execution=`` / ``diagnostics=`` (a
        :class:`~gradguide.Execution` / :class:`~gradguide.Diagnostics`) go to
        :func:`gradguide.sample` instead of ``backend`` / ``progress``.
        """
        _refuse_keywords(sample_kwargs)
        self._check_call(ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict, num_images_per_prompt,
                         guidance_scale, cross_attention_kwargs)
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        if prompt_embeds is None and self.text_encoder is None:
            raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= instead")
        lora_scale = None if cross_attention_kwargs is None else cross_attention_kwargs.get("scale")

        def encode(do_cfg):
            cond_embeds, neg_embeds = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, do_cfg,
                                                         prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
                                                         lora_scale=lora_scale)
            cond = {"encoder_hidden_states": cond_embeds}
            uncond = {"encoder_hidden_states": neg_embeds} if do_cfg else None
            # what diffusers' callback_on_step_end sees: the CFG batch (negative rows first)
            tensors = {"prompt_embeds": cond_embeds if neg_embeds is None else torch.cat([neg_embeds, cond_embeds]),
                       "negative_prompt_embeds": neg_embeds}
            return cond, uncond, tensors

        out = self._generate(encode, TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=timesteps,
                             sigmas=sigmas, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                             guidance=guidance, projection=projection, height=height, width=width, eta=eta,
                             generator=generator, latents=latents, cross_attention_kwargs=cross_attention_kwargs,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        images = self._images(out, output_type)
        if not return_dict:
            return images, None   # diffusers' (images, nsfw_content_detected); no safety checker runs
        return GuidedPipelineOutput(images=images, latents=out)

    @staticmethod
    def _check_call(ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict, num_images_per_prompt,
                    guidance_scale, cross_attention_kwargs):
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            which = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
            raise ValueError(f"GuidedPipeline: {which}: IP-Adapter image conditioning is not supported")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict: expected True or False, got {return_dict!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected an integer >= 1, got {num_images_per_prompt!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise TypeError("cross_attention_kwargs: expected a dict or None, got "
                            f"{type(cross_attention_kwargs).__name__}")

    def _generate(self, encode, tensor_inputs, *, num_inference_steps, timesteps, sigmas, guidance_scale,
                  guidance_rescale, guidance, projection, height, width, eta, generator, latents,
                  cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, sampler,
                  progress, callback, backend, sample_kwargs) -> torch.Tensor:
        """The denoising loop shared by the pipelines: ``encode(do_cfg)`` gives the branches' model
        inputs ``(cond, uncond or None, tensors for callback_on_step_end)``; returns the latents."""
        step_end = _StepEnd.of(callback_on_step_end, callback_on_step_end_tensor_inputs, tensor_inputs)
        if _required_positional(callback) >= 3:
            raise ValueError("GuidedPipeline: callback: takes (step, timestep, latents) like diffusers' deprecated "
                             "callback; GuidedPipeline's callback= receives gradguide's StepRecord: use "
                             "callback_on_step_end= for diffusers' per-step callback")
        terms = [guidance] if isinstance(guidance, GuidanceTerm) else list(guidance or ())
        for j, term in enumerate(terms):
            if not isinstance(term, GuidanceTerm):
                raise TypeError(f"guidance[{j}]: expected a gradguide guidance term, got {type(term).__name__}")
        model, schedule = self.model, self.schedule    # the scheduler held now
        scheduler = self.scheduler
        config = sampler if isinstance(sampler, Sampler) else Sampler(sampler)
        if config.timesteps is not None or config.sigmas is not None:
            raise ValueError("sampler: a GuidedPipeline's steps come from num_inference_steps= or its timesteps=/sigmas= "
                             "lists (as diffusers), not from the Sampler's timesteps/sigmas")
        height, width = self._size(height, width)
        ts = self._timesteps(schedule, num_inference_steps, timesteps, sigmas, config.spacing, height, width)
        user_branch = [t for t in terms if t.place == "branches"]
        do_cfg = guidance_scale > 1.0 or bool(user_branch)   # diffusers: CFG only when guidance_scale > 1

        cond, uncond, tensors = encode(do_cfg)
        if cross_attention_kwargs is not None:   # the same dict in both branches: shared by the batched call
            cond["cross_attention_kwargs"] = cross_attention_kwargs
            if uncond is not None:
                uncond["cross_attention_kwargs"] = cross_attention_kwargs
        if user_branch:
            terms = [_with_uncond(t, uncond) if t.place == "branches" else t for t in terms]
        elif do_cfg:
            branch = Rescale(guidance_scale, guidance_rescale, uncond=uncond) if guidance_rescale > 0 \
                else CFG(guidance_scale, uncond=uncond)
            terms = [branch] + terms

        embeds = cond["encoder_hidden_states"]
        shape = self._latent_shape(embeds.shape[0], height, width)
        dtype = self._latent_dtype(embeds)
        if latents is None:
            latents = self._draw_latents(shape, generator, dtype)   # as diffusers' prepare_latents draws them
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        config = dataclasses.replace(config, timesteps=ts, spacing=None)
        takes_eta = "eta" in inspect.signature(scheduler.step).parameters
        if (sampler is None and takes_eta) or (eta and sampler is not None):
            # diffusers passes eta (0.0 unless given) to a scheduler whose step takes it: DDIM, and TCD, whose
            # step's own default γ = 0.3 a pipeline therefore never uses
            config = dataclasses.replace(config, eta=eta)
        self._guidance_scale = self._run_guidance_scale = guidance_scale
        self._num_timesteps = len(ts)
        on_step = callback
        if step_end is not None:
            on_step = step_end.hook(self, scheduler, ts, tensors, callback)
        execution = sample_kwargs.get("execution") or Execution(backend=backend)
        diagnostics = sample_kwargs.get("diagnostics") or Diagnostics(progress=progress)
        if on_step is not None:
            diagnostics = dataclasses.replace(diagnostics, callback=on_step)
        return sample(model, shape, schedule=schedule, sampler=config, guidance=terms, projection=projection,
                      cond=cond, x_T=latents.to(self.device, dtype), generator=generator, execution=execution,
                      diagnostics=diagnostics)

    def _images(self, out: torch.Tensor, output_type: str):
        """Decoded and post-processed as diffusers' pipeline does (``"latent"``: the latents)."""
        if output_type == "latent":
            return out
        with torch.no_grad():
            image = self.decode_latents(out)
        return self.image_processor.postprocess(image, output_type=output_type,
                                                do_denormalize=[True] * image.shape[0])

    def _latent_shape(self, rows: int, height: int, width: int) -> tuple:
        """The shape of the latents sampled (the state gradguide carries)."""
        return (rows, int(self.unet.config.in_channels), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def _latent_dtype(self, embeds: torch.Tensor) -> torch.dtype:
        """The dtype the latents are drawn and carried in (diffusers' pipelines: the embeddings')."""
        return embeds.dtype

    def _draw_latents(self, shape, generator, dtype) -> torch.Tensor:
        """The initial noise, drawn as the diffusers pipeline's ``prepare_latents`` draws it."""
        return _randn(shape, generator, self.device, dtype)

    def _timesteps(self, schedule, num_inference_steps, timesteps, sigmas, spacing, height=None, width=None):
        """The run's :class:`~gradguide.schedules.Timesteps`, as diffusers' ``retrieve_timesteps``
        picks them: a ``timesteps`` or ``sigmas`` list through the scheduler's ``set_timesteps``,
        else ``num_inference_steps`` (default 50). (``height``/``width``: for variants whose σ's
        depend on the image size.)"""
        if timesteps is not None and sigmas is not None:
            raise ValueError("timesteps, sigmas: pass one of them, not both (as diffusers)")
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps: expected an integer >= 1, got {num_inference_steps!r}")
        if timesteps is None and sigmas is None:
            n = 50 if num_inference_steps is None else num_inference_steps
            return schedule.timesteps(n, spacing or "adm")
        name = "timesteps" if timesteps is not None else "sigmas"
        if spacing is not None:
            raise ValueError(f"sampler.spacing: not with {name}= (the list fixes the steps)")
        if not hasattr(schedule, "custom_timesteps"):
            raise ValueError(f"GuidedPipeline: {name}: {type(schedule).__name__} takes no custom {name} list here")
        try:
            ts = schedule.custom_timesteps(timesteps=timesteps, sigmas=sigmas)
        except ValueError as exc:
            raise ValueError(f"GuidedPipeline: {exc}") from exc
        if num_inference_steps is not None and num_inference_steps != len(ts):
            raise ValueError(f"num_inference_steps: {num_inference_steps} steps, but {name}= gives {len(ts)}; "
                             f"leave num_inference_steps out with {name}=")
        return ts

    # -- helpers ------------------------------------------------------------------------------------
    def _max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _encode(self, texts: List[str], max_length: int, clip_skip: Optional[int] = None) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= instead")
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            ids = tokens.input_ids.to(self.device)
            if clip_skip is None:
                return self.text_encoder(ids, attention_mask=mask)[0]
            # CLIP's final layer norm: under .text_model before transformers 5, on the model itself since
            norm = getattr(getattr(self.text_encoder, "text_model", self.text_encoder), "final_layer_norm", None)
            if norm is None:
                raise ValueError(f"clip_skip: the text encoder ({type(self.text_encoder).__name__}) has no CLIP "
                                 "final_layer_norm to apply to an earlier hidden state")
            hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            return norm(hidden[-(clip_skip + 1)])

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


def _variants(cls) -> list:
    """Every subclass of ``cls``, depth first (a variant of a variant claims its pipes too)."""
    out = []
    for sub in cls.__subclasses__():
        out += [sub] + _variants(sub)
    return out


def _same_config(a: dict, b: dict) -> bool:
    try:
        return bool(a == b)
    except (ValueError, RuntimeError):   # array-valued entries (trained_betas) do not compare to one bool
        return False


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
