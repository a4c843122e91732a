"""Transformer-style diffusers models through ``from_diffusers`` with no user wrapper: a tiny
random DiT (class labels, learned-σ channels, DDIM with clip_sample) and a tiny random PixArt-α
(encoder_hidden_states second in its forward, attention masks, learned σ), built in code as
diffusers' own tests build them. ``gradguide.sample`` with the model and schedule
``from_diffusers`` returns reproduces diffusers' ``DiTPipeline`` and ``PixArtAlphaPipeline``."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel)

import gradguide as gg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).eval().requires_grad_(False)


def _decode(vae, latents):
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def _close(got, ref, tol=1e-4):
    got, ref = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(ref))
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    return transformer.eval().requires_grad_(False), _vae()


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler], ids=["ddim-clip", "dpmpp-2m"])
def test_dit_equals_diffusers(dit, scheduler):
    transformer, vae = dit
    sched = scheduler()   # DDIMScheduler() clips x̂_0 to [-1, 1]: lost by a user wrapper before
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels, w, steps = [1, 7], 4.0, 5
    ref = pipe(labels, guidance_scale=w, num_inference_steps=steps, output_type="np",
               generator=torch.Generator().manual_seed(0)).images

    model, schedule = gg.from_diffusers(transformer, sched)   # no wrapper: the adapter reads the signature
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null = torch.full((2,), 1000)   # DiTPipeline's null class
    out = gg.sample(model, x_T.shape, schedule=schedule, steps=steps, x_T=x_T,
                    cond={"class_labels": torch.tensor(labels)}, guidance=gg.CFG(w, uncond={"class_labels": null}))
    got = _decode(vae, out)
    assert got.shape == ref.shape == (2, 8, 8, 3)
    _close(got, ref)
    assert ref.std() > 1e-3


@pytest.fixture(scope="module")
def pixart():
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return transformer.eval().requires_grad_(False), _vae()


def test_pixart_equals_diffusers(pixart):
    transformer, vae = pixart
    sched = DDIMScheduler()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    embeds, neg = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    neg_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    w, steps = 4.5, 4
    ref = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=neg,
               negative_prompt_attention_mask=neg_mask, guidance_scale=w, num_inference_steps=steps,
               height=8, width=8, use_resolution_binning=False, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images

    model, schedule = gg.from_diffusers(transformer, sched)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = gg.sample(model, x_T.shape, schedule=schedule, steps=steps, x_T=x_T,
                    cond={"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
                    guidance=gg.CFG(w, uncond={"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask}))
    assert out.shape == ref.shape
    _close(out, ref)
    _close(_decode(vae, out), _decode(vae, ref))
    assert ref.std() > 1e-2


def test_pixart_1024_needs_resolution_conditioning():
    """A 1024-px PixArt (sample_size 128) conditions on the image size: without
    cond['added_cond_kwargs'] the adapter refuses, naming it (before calling the model)."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=128, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=1, caption_channels=8,
        in_channels=4, cross_attention_dim=8, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    assert transformer.use_additional_conditions
    model, _ = gg.from_diffusers(transformer, DDIMScheduler())
    with pytest.raises(ValueError, match=r"cond\['added_cond_kwargs'\]"):
        model(torch.zeros(1, 4, 128, 128), torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 3, 8))
