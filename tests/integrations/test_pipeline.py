"""The guided diffusers pipeline on a tiny randomly initialised Stable Diffusion built in code
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a CLIPTokenizer over a byte vocabulary
made here: no hub). With plain CFG and the scheduler's own sampler its images equal diffusers'
StableDiffusionPipeline's; G_loss through the VAE equals the authors' loop written out."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerAncestralDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline, TCDScheduler, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import gradguide as gg  # noqa: E402
from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402

PROMPTS = ["a cat", "dog"]
SIZE = 16          # image side; latents are 8×8 (VAE scale factor 2)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_tokenizer(max_length=8):
    """A CLIP BPE tokenizer over the 256 byte symbols (and their word-final forms) plus a few merges."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):   # GPT-2/CLIP's byte -> printable-character map
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length), len(vocab)


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def sd_scheduler(cls=DDIMScheduler, **kw):
    """Stable Diffusion v1's scheduler configuration."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  steps_offset=1)
    if cls in (DDIMScheduler, PNDMScheduler):
        config["set_alpha_to_one"] = False
    if cls is PNDMScheduler:   # SD 1.x's default scheduler (PLMS)
        config["skip_prk_steps"] = True
        del config["clip_sample"]
    if cls in (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler):
        del config["clip_sample"]
    config.update(kw)
    return cls(**config)


def vae_scaling(components):
    return components["vae"].config.scaling_factor


def _pipes(components, scheduler):
    sd = StableDiffusionPipeline(**components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd, GuidedPipeline.from_pipe(sd)


def _close(got, ref, tol=1e-4):
    got, ref = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(ref))
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


CASES = [
    dict(scheduler=lambda: sd_scheduler(), kw=dict(guidance_scale=7.5)),
    dict(scheduler=lambda: sd_scheduler(timestep_spacing="trailing"),
         kw=dict(guidance_scale=5.0, negative_prompt=["dog", "cat"], num_images_per_prompt=2)),
    dict(scheduler=lambda: sd_scheduler(prediction_type="v_prediction"), kw=dict(guidance_scale=6.0,
                                                                                 guidance_rescale=0.7)),
    dict(scheduler=lambda: sd_scheduler(DDPMScheduler), kw=dict(guidance_scale=7.5)),
    dict(scheduler=lambda: sd_scheduler(), kw=dict(guidance_scale=1.0)),   # no CFG, as diffusers
    dict(scheduler=lambda: sd_scheduler(PNDMScheduler), kw=dict(guidance_scale=7.5)),
    dict(scheduler=lambda: sd_scheduler(DPMSolverMultistepScheduler), kw=dict(guidance_scale=7.5)),
    dict(scheduler=lambda: sd_scheduler(EulerAncestralDiscreteScheduler), kw=dict(guidance_scale=7.5)),
    # diffusers' pipeline passes its eta (default 0.0) to TCD's step: γ = 0 unless eta= is given
    dict(scheduler=lambda: sd_scheduler(TCDScheduler), kw=dict(guidance_scale=1.5)),
    dict(scheduler=lambda: sd_scheduler(TCDScheduler), kw=dict(guidance_scale=1.5, eta=0.3)),
    dict(scheduler=lambda: EDMEulerScheduler(sigma_max=20.0), kw=dict(guidance_scale=7.5)),
    dict(scheduler=lambda: EDMDPMSolverMultistepScheduler(prediction_type="v_prediction", sigma_data=1.0),
         kw=dict(guidance_scale=5.0)),
]


@pytest.mark.parametrize("case", CASES, ids=["ddim-cfg", "trailing-negative-n2", "v-rescale", "ddpm-noise", "no-cfg",
                                             "pndm-sd-default", "dpmpp-2m", "euler-ancestral-sigma-space",
                                             "tcd-pipeline-eta0", "tcd-eta0.3", "edm-euler", "edm-dpmpp-v"])
def test_pipeline_equals_diffusers(components, case):
    sd, pipe = _pipes(components, case["scheduler"]())
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, **case["kw"])
    ref = sd(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    got = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False, **kw)
    assert got.images.shape == ref.shape == (2 * kw.get("num_images_per_prompt", 1), 3, SIZE, SIZE)
    _close(got.images, ref)
    ref_latents = sd(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    _close(got.latents, ref_latents)
    assert ref.std() > 1e-3 and ref_latents.std() > 1e-2   # a non-trivial image


def test_output_types_and_embeds(components):
    sd, pipe = _pipes(components, sd_scheduler())
    kw = dict(num_inference_steps=3, guidance_scale=4.0)
    pil = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), progress=False, **kw).images
    assert len(pil) == 2 and pil[0].size == (SIZE, SIZE)
    arr = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), output_type="np", progress=False, **kw).images
    ref = sd(PROMPTS, generator=torch.Generator().manual_seed(1), output_type="np", **kw).images
    assert arr.shape == (2, SIZE, SIZE, 3)
    _close(arr, ref)
    assert np.array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))
    # precomputed embeddings (pipelines without a text encoder) give the same images
    cond, neg = pipe.encode_prompt(PROMPTS)
    embeds_only = GuidedPipeline(pipe.unet, pipe.scheduler, pipe.vae)
    got = embeds_only(prompt_embeds=cond, negative_prompt_embeds=neg, generator=torch.Generator().manual_seed(1),
                      output_type="np", progress=False, **kw).images
    _close(got, arr, 1e-6)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _close(pipe(PROMPTS, latents=latents, output_type="np", progress=False, **kw).images, arr, 1e-6)


def test_reward_guidance_through_the_vae_equals_the_authors_loop(components):
    """G_loss through both CFG branches and the decoder (the gradient-guidance paper's SD loop,
    per-sample β): noise_pred += √(1−ᾱ) β ∇_latents ½(gᵀ decode(ẑ_0/sf) + b − y*)²."""
    sched = sd_scheduler()
    sd, pipe = _pipes(components, sched)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 3, SIZE, SIZE, generator=gen) / SIZE
    b = torch.tensor([0.3, -0.2])
    beta, target, w, steps = 50.0, 4.0, 7.5, 3
    got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, output_type="latent", progress=False,
               guidance=[pipe.reward_guidance(g, offset=b, target=target, beta=beta)],
               generator=torch.Generator().manual_seed(0)).latents

    unet, vae, sf = components["unet"], components["vae"], vae_scaling(components)
    cond, neg = pipe.encode_prompt(PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = sd_scheduler()
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        abar = sched.alphas_cumprod[t].item()
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        with torch.enable_grad():
            lat = latents.detach().requires_grad_(True)
            out = unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([neg, cond])).sample
            u, c = out.chunk(2)
            noise_pred = u + w * (c - u)
            image = vae.decode(((lat - s * noise_pred) / a) / sf).sample
            reward = torch.einsum("bijk,bijk->b", g, image) + b
            (grad,) = torch.autograd.grad((0.5 * (reward - target) ** 2).sum(), lat)
        noise_pred = noise_pred.detach() + s * beta * grad
        latents = sched.step(noise_pred, t, latents.detach()).prev_sample
    _close(got, latents)
    unguided = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, output_type="latent", progress=False,
                    generator=torch.Generator().manual_seed(0)).latents
    assert (got - unguided).abs().max() > 1e-3

    def reward_of(z):
        return torch.einsum("bijk,bijk->b", g, pipe.decode_latents(z)) + b
    with torch.no_grad():   # guidance moved the reward towards y*
        assert ((reward_of(got) - target).abs() < (reward_of(unguided) - target).abs()).all()


def test_pixelasparam_and_other_terms_in_the_pipeline(components):
    sd, pipe = _pipes(components, sd_scheduler())
    kw = dict(num_inference_steps=3, guidance_scale=6.0, output_type="latent", progress=False)
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), **kw).latents
    records = []
    pxp = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), projection=gg.PixelAsParam("C"),
               callback=records.append, **kw).latents
    assert records[0].telemetry["cond/cfg"]["conflict_share"] > 0   # seed 1: sample 0 conflicts at step 0
    assert torch.isfinite(pxp).all() and (pxp - plain).abs().max() > 1e-3
    # the same run through gradguide.sample directly
    cond, neg = pipe.encode_prompt(PROMPTS)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    direct = gg.sample(pipe.model, x_T.shape, schedule=pipe.schedule, sampler="ddim", steps=3, x_T=x_T,
                       cond={"encoder_hidden_states": cond}, projection=gg.PixelAsParam("C"),
                       guidance=gg.CFG(6.0, uncond={"encoder_hidden_states": neg}))
    _close(pxp, direct, 1e-6)
    # a branch term in guidance= replaces the CFG from guidance_scale and gets the negative prompt
    apg = pipe(PROMPTS, generator=torch.Generator().manual_seed(1),
               guidance=[gg.APG(6.0, convention="diffusers", norm_threshold=0.0)], **kw).latents
    _close(apg, plain, 1e-5)   # diffusers' APG with η = 1 and no clip is CFG


def test_pipeline_errors(components):
    sd, pipe = _pipes(components, sd_scheduler())
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="jpg")
    with pytest.raises(ValueError, match="height"):
        pipe("a cat", height=15, progress=False)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(PROMPTS, negative_prompt=["x"], progress=False)
    with pytest.raises(ValueError, match="prompt"):
        pipe(progress=False)
    with pytest.raises(ValueError, match="prompt_embeds"):
        GuidedPipeline(pipe.unet, pipe.scheduler, pipe.vae)("a cat", progress=False)
    with pytest.raises(TypeError, match="guidance\\[0\\]"):
        pipe("a cat", guidance=[object()], progress=False)
    with pytest.raises(ValueError, match="clip_skip"):
        pipe("a cat", clip_skip=1.5, progress=False)


def test_perturbed_guider_in_the_pipeline(components):
    """``GuidedPipeline(guidance=[gg.PAG(...)])``: the negative prompt becomes PAG's unconditional input,
    the hooks go on the pipeline's U-Net, and the run equals ``gradguide.sample`` with the same term."""
    from diffusers.hooks import LayerSkipConfig
    sd, pipe = _pipes(components, sd_scheduler())

    def pag():
        return gg.PAG(6.0, 3.0, config=LayerSkipConfig([0], fqn="mid_block.attentions.0.transformer_blocks"),
                      perturbed_start=0.0, perturbed_stop=1.0)
    kw = dict(num_inference_steps=4, output_type="latent", progress=False)
    got = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), guidance=[pag()], **kw).latents
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), guidance_scale=6.0, **kw).latents
    cond, neg = pipe.encode_prompt(PROMPTS)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    term = pag()
    term.uncond = {"encoder_hidden_states": neg}
    direct = gg.sample(pipe.model, x_T.shape, schedule=pipe.schedule, sampler="ddim", steps=4, x_T=x_T,
                       cond={"encoder_hidden_states": cond}, guidance=term)
    _close(got, direct, 1e-6)
    assert (got - plain).abs().max() > 1e-3   # the perturbed branch did something


def test_from_pipe_names_the_components_a_pipe_lacks():
    """Every guided pipeline's from_pipe refuses a pipe without its model, scheduler or VAE, naming them."""
    import types
    from gradguide.integrations.pipeline_sana import GuidedSanaPipeline
    with pytest.raises(TypeError, match=r"GuidedPipeline\.from_pipe: pipe: SimpleNamespace has no scheduler, vae"):
        GuidedPipeline.from_pipe(types.SimpleNamespace(unet=object()))
    with pytest.raises(TypeError, match=r"GuidedSanaPipeline\.from_pipe: pipe: SimpleNamespace has no transformer"):
        GuidedSanaPipeline.from_pipe(types.SimpleNamespace(scheduler=object(), vae=object()))
