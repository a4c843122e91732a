"""GuidedPipeline as a drop-in for diffusers' call: the scheduler the user holds at call time
(assigned to the GuidedPipeline or to the wrapped diffusers pipeline), and diffusers' call
keywords with diffusers' meaning (each checked against StableDiffusionPipeline on the tiny
random SD of tests/integrations/test_pipeline.py) or refused by name."""
import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       EDMDPMSolverMultistepScheduler, LMSDiscreteScheduler, DPMSolverSDEScheduler, TCDScheduler,
                       UniPCMultistepScheduler)
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from test_pipeline import PROMPTS, SIZE, _close, _pipes, components, sd_scheduler  # noqa: E402,F401

from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _both(sd, pipe, tol=1e-4, **kw):
    """diffusers' images and the GuidedPipeline's for the same call; asserts they agree."""
    kw = {**KW, **kw}
    ref = sd(PROMPTS if "prompt_embeds" not in kw else None, generator=_gen(), **kw).images
    got = pipe(PROMPTS if "prompt_embeds" not in kw else None, generator=_gen(), progress=False, **kw).images
    _close(got, ref, tol)
    return got, ref


# -- the scheduler held at call time ------------------------------------------------------------

def test_scheduler_assigned_to_the_guided_pipeline_is_followed(components):
    sd, pipe = _pipes(components, sd_scheduler())
    before = pipe(PROMPTS, generator=_gen(), progress=False, **KW).images
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)   # diffusers' idiom
    sd_ea, _ = _pipes(components, EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config))
    got, ref = _both(sd_ea, pipe)
    assert (got - before).abs().max() > 1e-2   # the swap changed the images
    assert sd.scheduler.__class__ is DDIMScheduler   # the wrapped pipeline keeps its own
    # a GuidedPipeline built from components follows assignment too
    direct = GuidedPipeline(components["unet"], sd_scheduler(), components["vae"], components["text_encoder"],
                            components["tokenizer"])
    direct.scheduler = DPMSolverMultistepScheduler.from_config(direct.scheduler.config)
    sd_dpm, _ = _pipes(components, DPMSolverMultistepScheduler.from_config(sd.scheduler.config))
    _both(sd_dpm, direct)


def test_scheduler_assigned_to_the_wrapped_pipe_is_followed(components):
    sd, pipe = _pipes(components, sd_scheduler())
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    _both(sd, pipe)
    assert type(pipe.schedule.scheduler) is DPMSolverMultistepScheduler
    sd.scheduler = EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config)
    _both(sd, pipe)
    # a scheduler of the GuidedPipeline's own wins over the pipe's from then on
    pipe.scheduler = sd_scheduler()
    sd_ddim, _ = _pipes(components, sd_scheduler())
    _both(sd_ddim, pipe)


def test_scheduler_config_change_is_followed(components):
    sd, pipe = _pipes(components, sd_scheduler())
    pipe(PROMPTS, generator=_gen(), progress=False, **KW)
    sd.scheduler.register_to_config(timestep_spacing="trailing")   # same object, new configuration
    _both(sd, pipe)


def test_unsupported_scheduler_is_refused_by_name(components):
    sd, pipe = _pipes(components, sd_scheduler())
    pipe.scheduler = DPMSolverSDEScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="GuidedPipeline: scheduler: DPMSolverSDEScheduler"):
        pipe(PROMPTS, progress=False, **KW)
    sd2, pipe2 = _pipes(components, sd_scheduler())
    sd2.scheduler = DPMSolverSDEScheduler.from_config(sd2.scheduler.config)
    with pytest.raises(ValueError, match="DPMSolverSDEScheduler"):
        pipe2(PROMPTS, progress=False, **KW)


# -- diffusers' call keywords -----------------------------------------------------------------------

def _nudge(seen):
    """A callback_on_step_end that records its calls and changes the latents after step 1."""
    def fn(pipe, i, t, kwargs):
        assert pipe.num_timesteps == 3 and pipe.do_classifier_free_guidance and pipe.guidance_scale == 5.0
        seen.append((i, float(t), tuple(kwargs["prompt_embeds"].shape), float(kwargs["latents"].abs().mean())))
        if i == 1:
            kwargs["latents"] = kwargs["latents"] * 0.8 + 0.1
        return kwargs
    return fn


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
                                 UniPCMultistepScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler,
                                 DDPMScheduler, EDMDPMSolverMultistepScheduler, TCDScheduler],
                         ids=["ddim", "euler-a-sigma-space", "dpmpp-2m", "unipc", "euler", "lms", "ddpm",
                              "edm-dpmpp-sigma-space", "tcd"])
def test_callback_on_step_end_as_diffusers(components, cls):
    sd, pipe = _pipes(components, cls.from_config(sd_scheduler().config))
    seen_ref, seen = [], []
    inputs = ["latents", "prompt_embeds"]
    ref = sd(PROMPTS, generator=_gen(), callback_on_step_end=_nudge(seen_ref),
             callback_on_step_end_tensor_inputs=inputs, **KW).images
    got = pipe(PROMPTS, generator=_gen(), progress=False, callback_on_step_end=_nudge(seen),
               callback_on_step_end_tensor_inputs=inputs, **KW).images
    _close(got, ref)
    assert len(seen) == len(seen_ref) == 3
    for a, b in zip(seen, seen_ref):
        assert a[:3] == b[:3] and abs(a[3] - b[3]) <= 1e-4 * max(1.0, b[3])   # same i, t, shapes and latents
    plain = pipe(PROMPTS, generator=_gen(), progress=False, **KW).images
    assert (got - plain).abs().max() > 1e-3   # the returned latents were used


def test_callback_on_step_end_refusals(components):
    sd, pipe = _pipes(components, sd_scheduler())

    def new_embeds(p, i, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"][-1:]}
    with pytest.raises(ValueError, match="callback_on_step_end: returned new prompt_embeds"):
        pipe(PROMPTS, progress=False, callback_on_step_end=new_embeds,
             callback_on_step_end_tensor_inputs=["prompt_embeds"], **KW)

    from diffusers.callbacks import SDCFGCutoffCallback   # a PipelineCallback: names its own tensor inputs
    with pytest.raises(ValueError, match="callback_on_step_end: returned new prompt_embeds"):
        pipe(PROMPTS, progress=False, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), **KW)

    def cfg_off(p, i, t, kwargs):
        p._guidance_scale = 0.0
        return kwargs
    with pytest.raises(ValueError, match="guidance scale"):
        pipe(PROMPTS, progress=False, callback_on_step_end=cfg_off, **KW)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs: 'noise'"):
        pipe(PROMPTS, progress=False, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"],
             **KW)
    with pytest.raises(TypeError, match="callback_on_step_end: returned NoneType"):
        pipe(PROMPTS, progress=False, callback_on_step_end=lambda *a: None, **KW)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="callback_on_step_end: not supported with HeunDiscreteScheduler"):
        pipe(PROMPTS, progress=False, callback_on_step_end=lambda p, i, t, k: k, **KW)


def test_return_dict_false_is_diffusers_tuple(components):
    sd, pipe = _pipes(components, sd_scheduler())
    ref = sd(PROMPTS, generator=_gen(), return_dict=False, **KW)
    got = pipe(PROMPTS, generator=_gen(), return_dict=False, progress=False, **KW)
    assert isinstance(got, tuple) and len(got) == 2 and got[1] is None and ref[1] is None
    _close(got[0], ref[0])


class _Gain(AttnProcessor):
    """Attention output times ``gain``: a cross_attention_kwargs entry the model must receive."""
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def test_cross_attention_kwargs_reach_the_unet(components):
    sd, pipe = _pipes(components, sd_scheduler())
    unet = components["unet"]
    saved = unet.attn_processors
    try:
        unet.set_attn_processor(_Gain())
        plain = pipe(PROMPTS, generator=_gen(), progress=False, **KW).images
        got, _ = _both(sd, pipe, cross_attention_kwargs={"gain": 0.5})
        assert (got - plain).abs().max() > 1e-3
    finally:
        unet.set_attn_processor(saved)
    # scale (LoRA) as diffusers: without LoRA layers it changes nothing, in either pipeline
    with _text_model(components["text_encoder"]):
        _both(sd, pipe, cross_attention_kwargs={"scale": 0.5})


@contextlib.contextmanager
def _text_model(te):
    """diffusers 0.42 reads ``text_encoder.text_model`` (clip_skip, LoRA scale), which transformers 5's
    CLIPTextModel no longer has: an alias for the reference run (outside the module tree)."""
    alias = not hasattr(te, "text_model")
    if alias:
        object.__setattr__(te, "text_model", te)
    try:
        yield
    finally:
        if alias:
            te.__dict__.pop("text_model", None)


def test_clip_skip_as_diffusers(components):
    sd, pipe = _pipes(components, sd_scheduler())
    plain = pipe(PROMPTS, generator=_gen(), progress=False, **KW).images
    with _text_model(components["text_encoder"]):
        got, _ = _both(sd, pipe, clip_skip=1)
    assert (got - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip"):
        pipe(PROMPTS, clip_skip=-1, progress=False, **KW)


def test_eta_and_generator_lists_as_diffusers(components):
    sd, pipe = _pipes(components, sd_scheduler())
    got, _ = _both(sd, pipe, eta=0.7)   # DDIM: η draws noise from the generator
    plain = pipe(PROMPTS, generator=_gen(), progress=False, **KW).images
    assert (got - plain).abs().max() > 1e-3
    # a scheduler whose step takes no eta ignores it, as diffusers does
    sd_ea, pipe_ea = _pipes(components, sd_scheduler(EulerAncestralDiscreteScheduler))
    _both(sd_ea, pipe_ea, eta=0.7)
    # one generator per image, for the initial latents and DDPM's per-step noise
    sd_ddpm, pipe_ddpm = _pipes(components, sd_scheduler(DDPMScheduler))
    kw = {**KW, "num_images_per_prompt": 2}
    ref = sd_ddpm(PROMPTS, generator=[_gen(s) for s in range(4)], **kw).images
    got = pipe_ddpm(PROMPTS, generator=[_gen(s) for s in range(4)], progress=False, **kw).images
    _close(got, ref)


def test_timesteps_and_sigmas_lists_as_diffusers(components):
    sd, pipe = _pipes(components, sd_scheduler(DDPMScheduler))
    _both(sd, pipe, num_inference_steps=None, timesteps=[901, 600, 350, 120])
    sd_e, pipe_e = _pipes(components, EulerDiscreteScheduler.from_config(sd.scheduler.config))
    kw = {k: v for k, v in KW.items() if k != "num_inference_steps"}
    ref = sd_e(PROMPTS, generator=_gen(), sigmas=[12.0, 4.0, 1.2, 0.3], **kw).images   # num_inference_steps default
    got = pipe_e(PROMPTS, generator=_gen(), sigmas=[12.0, 4.0, 1.2, 0.3], progress=False, **kw).images
    _close(got, ref)
    dpm_sd, dpm = _pipes(components, sd_scheduler(DPMSolverMultistepScheduler))
    ref = dpm_sd(PROMPTS, generator=_gen(), timesteps=[999, 700, 300, 50], **kw).images
    _close(dpm(PROMPTS, generator=_gen(), timesteps=[999, 700, 300, 50], progress=False, **kw).images, ref)
    heun_sd, heun = _pipes(components, HeunDiscreteScheduler.from_config(sd.scheduler.config))
    ref = heun_sd(PROMPTS, generator=_gen(), timesteps=[999, 600, 250, 40], **kw).images
    _close(heun(PROMPTS, generator=_gen(), timesteps=[999, 600, 250, 40], progress=False, **kw).images, ref)
    # a list the scheduler itself rejects (UniPC takes sigmas only for flow models): its own error, as diffusers
    _, unipc = _pipes(components, UniPCMultistepScheduler.from_config(sd.scheduler.config))
    with pytest.raises(ValueError, match="GuidedPipeline: .*use_flow_sigmas"):
        unipc(PROMPTS, sigmas=[10.0, 3.0, 0.9, 0.2], progress=False, **kw)
    ddim_sd, ddim = _pipes(components, sd_scheduler())
    with pytest.raises(ValueError, match="timesteps: DDIMScheduler.set_timesteps takes no custom timesteps"):
        ddim(PROMPTS, timesteps=[900, 500, 100], progress=False, **kw)
    with pytest.raises(ValueError, match="timesteps, sigmas"):
        pipe_e(PROMPTS, timesteps=[900, 500], sigmas=[3.0, 1.0], progress=False, **kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe_e(PROMPTS, sigmas=[12.0, 4.0, 1.2], num_inference_steps=5, progress=False, **kw)


def test_prompt_embeds_without_negative_and_text_encoder(components):
    sd, pipe = _pipes(components, sd_scheduler())
    cond, _ = pipe.encode_prompt(PROMPTS)
    bare = GuidedPipeline(pipe.unet, sd_scheduler(), pipe.vae)
    # diffusers encodes the negative prompt with its text encoder here: refused, naming both arguments
    with pytest.raises(ValueError, match="negative_prompt_embeds.*prompt_embeds"):
        bare(prompt_embeds=cond, progress=False, **KW)
    # without CFG no negative embedding is needed, as in diffusers
    bare_sd, _ = _pipes({**components, "text_encoder": None, "tokenizer": None}, sd_scheduler())
    _both(bare_sd, bare, prompt_embeds=cond, guidance_scale=1.0)
    # with a text encoder, the negative prompt ("") is encoded, as diffusers does
    _both(sd, pipe, prompt_embeds=cond)


def test_unknown_and_unsupported_keywords_name_the_pipeline(components):
    sd, pipe = _pipes(components, sd_scheduler())
    with pytest.raises(TypeError, match="GuidedPipeline.__call__: unexpected keyword argument 'not_a_keyword'"):
        pipe(PROMPTS, not_a_keyword=1, progress=False, **KW)
    with pytest.raises(ValueError, match="GuidedPipeline: ip_adapter_image"):
        pipe(PROMPTS, ip_adapter_image=np.zeros((8, 8, 3)), progress=False, **KW)
    with pytest.raises(ValueError, match="GuidedPipeline: ip_adapter_image_embeds"):
        pipe(PROMPTS, ip_adapter_image_embeds=[torch.zeros(2, 1, 8)], progress=False, **KW)
    with pytest.raises(ValueError, match="GuidedPipeline: callback: takes \\(step, timestep, latents\\)"):
        pipe(PROMPTS, callback=lambda step, t, latents: None, progress=False, **KW)
    with pytest.raises(ValueError, match="callback_steps"):
        pipe(PROMPTS, callback_steps=1, progress=False, **KW)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(PROMPTS, num_inference_steps=2.5, guidance_scale=5.0, progress=False)
    with pytest.raises(TypeError, match="return_dict"):
        pipe(PROMPTS, return_dict="no", progress=False, **KW)


def test_sample_callback_tensor_replaces_x():
    """gradguide.sample's side of callback_on_step_end: a tensor the callback returns is the
    x_(t-1) the next step starts from (here: one DDIM run split at step 2 equals two runs)."""
    import gradguide as gg
    schedule = gg.Schedule.linear(1000)
    ts = schedule.timesteps(5)

    def model(x, t):
        return 0.3 * x + 0.01 * t.to(x.dtype).view(-1, 1)
    x_T = torch.randn(2, 6, generator=_gen(2))
    nudged = gg.sample(model, (2, 6), schedule=schedule, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x_T,
                       diagnostics=gg.Diagnostics(callback=lambda r: r.x + 0.5 if r.index == 2 else None))
    first = gg.sample(model, (2, 6), schedule=schedule,
                      sampler=gg.Sampler("ddim", timesteps=type(ts)(ts.t[:3], ts.abar[:3], ts.abar_prev[:3])), x_T=x_T)
    second = gg.sample(model, (2, 6), schedule=schedule,
                       sampler=gg.Sampler("ddim", timesteps=type(ts)(ts.t[3:], ts.abar[3:], ts.abar_prev[3:])),
                       x_T=first + 0.5)
    _close(nudged, second, 1e-6)
    plain = gg.sample(model, (2, 6), schedule=schedule, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x_T)
    assert (nudged - plain).abs().max() > 1e-3
    with pytest.raises(TypeError, match="callback: returned int"):
        gg.sample(model, (2, 6), schedule=schedule, sampler=gg.Sampler("ddim", timesteps=ts), x_T=x_T,
                  diagnostics=gg.Diagnostics(callback=lambda r: 1))
