"""diffusers' call conventions for the guided pipelines: which keywords pass on to
:func:`gradguide.sample`, ``callback_on_step_end`` on gradguide's step callback, and the text
encoders' LoRA scale while encoding (used by :mod:`gradguide.integrations.pipeline` and its
variants)."""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

from ..sampling import sample
from .diffusers import sigma_latents
from .diffusers_flow import is_flow


def _required_positional(fn) -> int:
    """How many positional parameters without a default ``fn`` has (0 when unknown)."""
    if fn is None:
        return 0
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


# keywords of gradguide.sample the pipeline sets itself (their diffusers counterparts are its own keywords)
_OWN = frozenset({"model", "shape", "schedule", "steps", "timesteps", "sigmas", "cond", "x_T", "guidance",
                  "projection", "generator", "sampler", "eta", "backend", "progress", "callback"})


def _refuse_keywords(kwargs: dict) -> None:
    """A keyword neither diffusers' pipeline call (as GuidedPipeline takes it) nor gradguide.sample's
    is refused naming the pipeline, never passed on to fail inside sample()."""
    if "callback_steps" in kwargs:
        raise ValueError("GuidedPipeline: callback_steps: diffusers' deprecated callback(step, t, latents) is not "
                         "supported; use callback_on_step_end= (or gradguide's callback=, called with a StepRecord)")
    for name in ("steps",):
        if name in kwargs:
            raise TypeError(f"GuidedPipeline: {name}: use num_inference_steps= (or timesteps=/sigmas= lists)")
    allowed = set(inspect.signature(sample).parameters) - _OWN
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise TypeError(f"GuidedPipeline.__call__: unexpected keyword argument {unknown[0]!r}: neither a diffusers "
                        f"pipeline keyword GuidedPipeline takes nor a gradguide.sample option "
                        f"({', '.join(sorted(allowed))})")


TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")   # StableDiffusionPipeline's


class _StepEnd:
    """diffusers' ``callback_on_step_end(pipe, i, t, callback_kwargs)`` on gradguide's step callback.

    gradguide's loop holds the variance-preserving x; a σ-space scheduler's latents (Euler,
    Euler ancestral, LMS) are ``x/√ᾱ`` at the step's end, so they are scaled to diffusers'
    convention for the callback and back for the latents it returns."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs

    @classmethod
    def of(cls, fn, inputs, allowed=TENSOR_INPUTS) -> Optional["_StepEnd"]:
        if fn is None:
            return None
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
        except ImportError:   # pragma: no cover - older diffusers
            MultiPipelineCallbacks = PipelineCallback = ()
        if PipelineCallback and isinstance(fn, (PipelineCallback, MultiPipelineCallbacks)):
            inputs = fn.tensor_inputs   # as diffusers: the callback object names its inputs
        if not callable(fn):
            raise TypeError(f"callback_on_step_end: expected a callable(pipe, i, t, callback_kwargs), "
                            f"got {type(fn).__name__}")
        if isinstance(inputs, str) or not all(isinstance(k, str) for k in (inputs or ())):
            raise TypeError(f"callback_on_step_end_tensor_inputs: expected a list of names, got {inputs!r}")
        bad = [k for k in inputs or () if k not in allowed]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad[0]!r} is not one of {list(allowed)}")
        return cls(fn, tuple(inputs or ()))

    def hook(self, pipe, scheduler, ts, embeds: dict, callback):
        name = type(scheduler).__name__
        if name in ("HeunDiscreteScheduler", "PNDMScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                    "FlowMatchHeunDiscreteScheduler"):
            # diffusers' loop runs these schedulers' sub-steps as separate iterations (Heun's and KDPM2's 2n − 1,
            # PNDM's warm-up n + 1), each calling the callback; gradguide's step cannot stop between them
            raise ValueError(f"GuidedPipeline: callback_on_step_end: not supported with {name} (diffusers calls "
                             "it between sub-steps that gradguide runs as one step)")
        sigma_space = sigma_latents(scheduler)   # Euler, LMS, ..., EDM: latents are x_σ
        if is_flow(scheduler):   # a flow pipeline's latents are x_σ = x/(√ᾱ + √(1−ᾱ)) (docs/flow.md)
            scale = (1 / (ts.abar_prev.sqrt() + (1 - ts.abar_prev).sqrt())).tolist()
        else:
            scale = (1 / ts.abar_prev.sqrt()).tolist() if sigma_space else [1.0] * len(ts)
        t_list = ts.t.to(torch.float32) if ts.t.is_floating_point() else ts.t

        def on_step(record):
            if callback is not None:
                callback(record)
            i, k = record.index, scale[record.index]
            lat = record.x * k if k != 1.0 else record.x
            given = {"latents": lat, **embeds}
            kwargs = {key: given[key] for key in self.inputs}
            out = self.fn(pipe, i, t_list[i].to(lat.device), kwargs)
            if not isinstance(out, dict):
                raise TypeError(f"callback_on_step_end: returned {type(out).__name__}; expected a dict (diffusers "
                                "reads the latents from it)")
            for key in embeds:
                if key in out and out[key] is not given[key]:
                    raise ValueError(f"GuidedPipeline: callback_on_step_end: returned new {key}; changing the "
                                     "conditioning during sampling is not supported")
            if pipe.guidance_scale is not None and pipe._guidance_scale != pipe._run_guidance_scale:
                raise ValueError("GuidedPipeline: callback_on_step_end: changed the pipeline's guidance scale; "
                                 "changing it during sampling is not supported")
            if "latents" not in out and "latents" not in self.inputs:
                return None
            new = out.get("latents", lat)   # an in-place change of the given latents counts too, as in diffusers
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"callback_on_step_end: latents: expected a tensor, got {type(new).__name__}")
            return new / k if k != 1.0 else new

        return on_step


@contextlib.contextmanager
def _lora_scaled(text_encoder, scale):
    """The text encoder's LoRA layers scaled by ``scale`` while encoding, with diffusers' own helpers
    (PEFT layers, else its legacy patched projections), as its ``encode_prompt`` does."""
    if scale is None or text_encoder is None:
        yield
        return
    from diffusers.utils import USE_PEFT_BACKEND
    if USE_PEFT_BACKEND:
        from diffusers.utils import scale_lora_layers, unscale_lora_layers
        scale_lora_layers(text_encoder, scale)
        try:
            yield
        finally:
            unscale_lora_layers(text_encoder, scale)
    else:
        from diffusers.models.lora import PatchedLoraProjection, adjust_lora_scale_text_encoder
        if any(isinstance(m, PatchedLoraProjection) for m in text_encoder.modules()):
            adjust_lora_scale_text_encoder(text_encoder, scale)   # diffusers sets it and leaves it, too
        yield
