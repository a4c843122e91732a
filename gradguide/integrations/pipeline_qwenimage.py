"""A guided Qwen-Image pipeline: :class:`GuidedQwenImagePipeline`.

Built as diffusers' ``QwenImagePipeline`` builds its inputs: each prompt in the pipeline's chat
template through the Qwen2.5-VL encoder, its last hidden state's valid tokens with the
template's first 34 dropped, zero-padded to the batch's longest with a mask (``None`` when no
row is padded); latents packed in 2×2 patches as Flux's (:mod:`~gradguide.integrations.pipeline_flux`),
``img_shapes`` for the rotary embedding; σ's ``linspace(1, 1/N, N)`` shifted with ``mu`` from
the token count; the transformer called at ``timestep / 1000``.

True CFG (``true_cfg_scale > 1`` with a negative prompt) is Qwen-Image's own: ``c̃ = n + s(c − n)``
rescaled token by token to the conditional velocity's norm, ``c̃ · ‖c‖/‖c̃‖`` (norms over the
packed channels). That per-token rescale is not one of gradguide's branch terms, so it is
evaluated inside the model call (:class:`QwenImageDenoiser`, both branches as diffusers calls
them): the pipeline's images are diffusers' exactly, and gradguide's samplers, non-branch
terms (reward guidance, DPS, ...) and PixelAsParam policies A/B apply on top. A branch-combining
term in ``guidance=`` (``gg.CFG``, ``gg.APG``, ``gg.CFGZeroStar``, ...) replaces it and gets
the negative prompt as its unconditional input.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ..guidance.base import GuidanceTerm
from ..projection import PixelAsParam
from .pipeline import GuidedPipelineOutput, _repeat
from .pipeline_call import _refuse_keywords
from .pipeline_flow import TransformerDenoiser
from .pipeline_flux import _PackedLatentPipeline, unpack_latents
from .pipeline_xl import _texts

QWEN_TENSOR_INPUTS = ("latents", "prompt_embeds")   # QwenImagePipeline's


class QwenImageDenoiser(TransformerDenoiser):
    """``QwenImageTransformer2DModel`` behind ``model(x, timestep=t, **cond)``: ``timestep / 1000``
    in the latents' dtype, ``img_shapes`` rebuilt for the call's batch from ``img_shape``
    (``[B, 3]``, so that it stacks with the branches), and, when ``cond`` carries the negative
    prompt's inputs and ``true_cfg_scale``, Qwen-Image's norm-rescaled true CFG."""

    def _call(self, x, t, embeds, mask, shapes, guidance, attention_kwargs):
        return self.transformer(hidden_states=x, timestep=t, guidance=guidance, encoder_hidden_states_mask=mask,
                                encoder_hidden_states=embeds, img_shapes=shapes, attention_kwargs=attention_kwargs,
                                return_dict=False)[0]

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                img_shape=None, guidance=None, attention_kwargs=None, negative_encoder_hidden_states=None,
                negative_encoder_hidden_states_mask=None, true_cfg_scale=None, return_dict=False):
        t = timestep.expand(hidden_states.shape[0]).to(hidden_states.dtype) / 1000
        shapes = [[tuple(int(v) for v in img_shape[0].tolist())]] * hidden_states.shape[0]
        cond = self._call(hidden_states, t, encoder_hidden_states, encoder_hidden_states_mask, shapes, guidance,
                          attention_kwargs)
        if true_cfg_scale is None:
            return (cond,)
        neg = self._call(hidden_states, t, negative_encoder_hidden_states, negative_encoder_hidden_states_mask, shapes,
                         guidance, attention_kwargs)
        comb = neg + true_cfg_scale * (cond - neg)
        return (comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)),)


class GuidedQwenImagePipeline(_PackedLatentPipeline):
    """A Qwen-Image pipeline sampled with gradguide (see the module doc).

    ``transformer``: a ``QwenImageTransformer2DModel``; ``scheduler``: a flow scheduler;
    ``vae``: an ``AutoencoderKLQwenImage``; ``text_encoder``/``tokenizer``: Qwen2.5-VL (optional
    when you pass ``prompt_embeds`` and ``prompt_embeds_mask``)."""
    DEFAULT_STEPS = 50
    OWN_FLOW_SIGMAS = False   # QwenImagePipeline passes its σ list to any scheduler
    DEFAULT_SAMPLE_SIZE = 128
    TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
    TEMPLATE_TOKENS = 34   # the template's tokens before the prompt, dropped from the embedding
    TOKENIZER_MAX_LENGTH = 1024

    def __init__(self, transformer, scheduler, vae, text_encoder=None, tokenizer=None, image_processor=None):
        self._adapter = QwenImageDenoiser(transformer)
        if image_processor is None:
            from diffusers.image_processor import VaeImageProcessor
            image_processor = VaeImageProcessor(vae_scale_factor=self._vae_scale(vae) * 2)
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, image_processor)

    @staticmethod
    def _vae_scale(vae) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(pipe).__name__ == "QwenImagePipeline"

    @classmethod
    def from_pipe(cls, pipe, scheduler=None) -> "GuidedQwenImagePipeline":
        """From a diffusers ``QwenImagePipeline``; without ``scheduler`` the pipeline's scheduler
        is followed at every call, as :meth:`GuidedPipeline.from_pipe`."""
        cls._require_components(pipe, ("transformer", "scheduler", "vae"))
        out = cls(pipe.transformer, scheduler if scheduler is not None else pipe.scheduler, pipe.vae,
                  getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                  getattr(pipe, "image_processor", None))
        # the pipeline object's own chat template and lengths, where it has them
        for ours, theirs in (("TEMPLATE", "prompt_template_encode"), ("TEMPLATE_TOKENS", "prompt_template_encode_start_idx"),
                             ("TOKENIZER_MAX_LENGTH", "tokenizer_max_length")):
            if hasattr(pipe, theirs):
                setattr(out, ours, getattr(pipe, theirs))
        if scheduler is None:
            out._pipe, out._scheduler = pipe, None
        return out

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] from packed latents of the last call's size, as QwenImagePipeline
        decodes them: unpacked to one frame, ``/ (1/latents_std) + latents_mean``, the VAE."""
        if self._run_hw is None:
            raise ValueError("GuidedQwenImagePipeline: height, width: packed latents do not say the image size; run "
                             "the pipeline first")
        h, w = self._run_hw
        z = unpack_latents(latents, h, w).unsqueeze(2).to(self.vae.dtype)
        config = self.vae.config
        shape = (1, int(config.z_dim), 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
        return self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

    # -- conditioning -------------------------------------------------------------------------------
    def _qwen(self, texts: List[str]):
        drop = self.TEMPLATE_TOKENS
        tokens = self.tokenizer([self.TEMPLATE.format(t) for t in texts], max_length=self.TOKENIZER_MAX_LENGTH + drop,
                                padding=True, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                       output_hidden_states=True).hidden_states[-1]
        rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask)]   # each prompt's valid tokens after the template
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        valid = torch.stack([torch.arange(length, device=self.device) < r.shape[0] for r in rows]).long()
        return embeds.to(dtype=self.text_encoder.dtype), valid

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, prompt_embeds=None, prompt_embeds_mask=None,
                      max_sequence_length: int = 512, batch: Optional[int] = None):
        """``(prompt_embeds, prompt_embeds_mask or None)`` as diffusers' ``QwenImagePipeline.encode_prompt``
        computes them, masks tiled as it tiles them (``batch``: repeat a single string to that many prompts)."""
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("prompt: this pipeline has no text_encoder/tokenizer; pass prompt_embeds= instead")
            prompt_embeds, prompt_embeds_mask = self._qwen(_texts(prompt, "prompt", batch))
        elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise TypeError("prompt_embeds: expected a [B, L, D] tensor")
        n = num_images_per_prompt
        prompt_embeds = _repeat(prompt_embeds[:, :max_sequence_length].to(self.device), n)
        if prompt_embeds_mask is not None:
            # diffusers tiles the masks (prompt 0, 1, ..., 0, 1, ...) while it repeats each embedding in a row, so
            # with several prompts and images per prompt a row meets another prompt's mask: reproduced as it is
            prompt_embeds_mask = prompt_embeds_mask[:, :max_sequence_length].to(self.device).repeat(n, 1)
            if prompt_embeds_mask.all():   # as diffusers: no padding, no mask
                prompt_embeds_mask = None
        return prompt_embeds, prompt_embeds_mask

    # -- sampling -----------------------------------------------------------------------------------
    def __call__(self, prompt: Union[str, List[str], None] = None, *, negative_prompt=None,
                 true_cfg_scale: float = 4.0, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, sigmas: Optional[Sequence[float]] = None,
                 guidance_scale: Optional[float] = None, num_images_per_prompt: int = 1, generator=None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, output_type: str = "pil",
                 return_dict: bool = True, attention_kwargs: Optional[dict] = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), max_sequence_length: int = 512,
                 guidance: Union[GuidanceTerm, Sequence[GuidanceTerm]] = (),
                 projection: Optional[PixelAsParam] = None, sampler=None, progress: bool = True, callback=None,
                 backend: str = "auto", **sample_kwargs):
        """Generate images; ``QwenImagePipeline.__call__``'s keywords with diffusers' meaning
        (default 50 steps, ``true_cfg_scale`` 4.0 with a negative prompt, ``guidance_scale`` only
        for a guidance-distilled transformer), plus gradguide's as in :meth:`GuidedPipeline.__call__`;
        ``return_dict=False`` gives ``(images,)``."""
        _refuse_keywords(sample_kwargs)
        self._call_checks(output_type, return_dict, num_images_per_prompt, true_cfg_scale, attention_kwargs, None,
                          None, max_sequence_length)
        embedded = bool(getattr(self.unet.config, "guidance_embeds", False))
        if embedded and guidance_scale is None:
            raise ValueError("guidance_scale: required for a guidance-distilled transformer (guidance_embeds), as "
                             "diffusers requires")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompt= (a string or a list of strings) or prompt_embeds=")
        terms = [guidance] if isinstance(guidance, GuidanceTerm) else list(guidance or ())
        user_branch = any(getattr(t, "place", None) == "branches" for t in terms)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        in_model_cfg = true_cfg_scale > 1 and has_negative and not user_branch

        def encode(do_cfg):
            pe, mask = self.encode_prompt(prompt, num_images_per_prompt, prompt_embeds, prompt_embeds_mask,
                                          max_sequence_length)
            rows = pe.shape[0]
            h, w = self._run_hw
            base = {"img_shape": torch.tensor([[1, h // 2, w // 2]], device=self.device).expand(rows, -1)}
            if embedded:
                base["guidance"] = torch.full((rows,), float(guidance_scale), device=self.device, dtype=torch.float32)
            if attention_kwargs is not None:
                base["attention_kwargs"] = attention_kwargs
            cond = {"encoder_hidden_states": pe, "encoder_hidden_states_mask": mask, **base}
            if not (do_cfg or in_model_cfg):
                return cond, None, {"prompt_embeds": pe}
            if negative_prompt_embeds is None and self.text_encoder is None:
                raise ValueError("negative_prompt_embeds: this pipeline has no text encoder to encode negative_prompt; "
                                 "pass negative_prompt_embeds= (and negative_prompt_embeds_mask=)")
            neg, neg_mask = self.encode_prompt("" if negative_prompt is None else negative_prompt,
                                               num_images_per_prompt, negative_prompt_embeds,
                                               negative_prompt_embeds_mask, max_sequence_length,
                                               batch=rows // num_images_per_prompt)
            if in_model_cfg:   # Qwen-Image's norm-rescaled true CFG, inside the model call
                cond.update(negative_encoder_hidden_states=neg, negative_encoder_hidden_states_mask=neg_mask,
                            true_cfg_scale=float(true_cfg_scale))
                return cond, None, {"prompt_embeds": pe}
            # a gradguide branch term needs both branches shaped alike: the shorter one is padded with masked zeros
            (pe, mask), (neg, neg_mask) = _same_length((pe, mask), (neg, neg_mask))
            cond.update(encoder_hidden_states=pe, encoder_hidden_states_mask=mask)
            return cond, {**base, "encoder_hidden_states": neg, "encoder_hidden_states_mask": neg_mask}, \
                {"prompt_embeds": pe}

        self._embedded_scale = guidance_scale
        out = self._generate(encode, QWEN_TENSOR_INPUTS, num_inference_steps=num_inference_steps, timesteps=None,
                             sigmas=sigmas, guidance_scale=1.0, guidance_rescale=0.0, guidance=terms,
                             projection=projection, height=height, width=width, eta=0.0, generator=generator,
                             latents=latents, cross_attention_kwargs=None, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, sampler=sampler,
                             progress=progress, callback=callback, backend=backend, sample_kwargs=sample_kwargs)
        images = self._images(out, output_type)
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput(images=images, latents=out)


def _same_length(*pairs):
    """``(embeds, mask or None)`` pairs padded with zeros (masked out) to the longest sequence."""
    length = max(e.shape[1] for e, _ in pairs)
    out = []
    for embeds, mask in pairs:
        pad = length - embeds.shape[1]
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out.append((torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))))
    return out
