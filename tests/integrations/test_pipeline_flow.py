"""The guided flow pipelines on tiny random SD3 and Flux models built in code (the transformers,
two CLIP encoders and a T5 encoder over the byte tokenizer of tests/integrations/test_pipeline.py, a one-level
AutoencoderKL with a shift factor): GuidedPipeline.from_pipe builds GuidedSD3Pipeline /
GuidedFluxPipeline, whose latents and images equal diffusers' StableDiffusion3Pipeline /
FluxPipeline's (same seed, float32, ≤ 1e-4): CFG batched as diffusers, dynamic shifting, Flux's
2×2 packing, img_ids / txt_ids, embedded guidance and true CFG. G_loss through the VAE on Flux's
packed latents equals the loop written out with an explicit unpack and decode."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FlowMatchHeunDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, UniPCMultistepScheduler)
from test_pipeline import _close, tiny_tokenizer  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel)

import gradguide as gg  # noqa: E402
from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402
from gradguide.integrations.pipeline_flow import GuidedSD3Pipeline  # noqa: E402
from gradguide.integrations.pipeline_flux import GuidedFluxPipeline, pack_latents, unpack_latents  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPTS = ["a cat", "dog"]
SIZE = 16          # image side; the VAE's scale factor is 2
T5_LEN = 12


def _text_config(n_vocab):
    return dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=8, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                pad_token_id=n_vocab - 1, hidden_act="gelu")


def _t5(n_vocab):
    return T5EncoderModel(T5Config(vocab_size=n_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8))


def _vae(latent_channels):
    return AutoencoderKL(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _frozen(d):
    for v in d.values():
        if isinstance(v, torch.nn.Module):
            v.eval().requires_grad_(False)
    return d


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer()
    text = _text_config(n_vocab)
    return _frozen(dict(
        transformer=SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=1, in_channels=4, num_layers=1,
                                          attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                          joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
        vae=_vae(4), text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
        tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
        tokenizer_2=tiny_tokenizer()[0], text_encoder_3=_t5(n_vocab), tokenizer_3=tiny_tokenizer(T5_LEN)[0]))


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer()

    def transformer(embeds):
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=embeds)
    return _frozen(dict(
        transformer=transformer(False), transformer_dev=transformer(True), vae=_vae(4),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config(n_vocab))), tokenizer=tokenizer,
        text_encoder_2=_t5(n_vocab), tokenizer_2=tiny_tokenizer(T5_LEN)[0]))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sd3_pipes(parts, scheduler=None):
    sd = StableDiffusion3Pipeline(**parts, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))
    sd.set_progress_bar_config(disable=True)
    return sd, GuidedPipeline.from_pipe(sd)


def flux_pipes(parts, dev=False, scheduler=None):
    parts = dict(parts)
    dev_transformer = parts.pop("transformer_dev")
    if dev:
        parts["transformer"] = dev_transformer
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                             base_image_seq_len=256, max_image_seq_len=4096)
    fp = FluxPipeline(**parts, scheduler=scheduler)
    fp.set_progress_bar_config(disable=True)
    return fp, GuidedPipeline.from_pipe(fp)


def _both(ref_pipe, pipe, prompts=PROMPTS, **kw):
    kw = {"num_inference_steps": 3, "height": SIZE, "width": SIZE, "max_sequence_length": T5_LEN, **kw}
    ref = ref_pipe(prompts, generator=_gen(), output_type="pt", **kw).images
    got = pipe(prompts, generator=_gen(), output_type="pt", progress=False, **kw)
    assert got.images.shape == ref.shape
    _close(got.images, ref)
    ref_latents = ref_pipe(prompts, generator=_gen(), output_type="latent", **kw).images
    _close(got.latents, ref_latents)
    assert ref.std() > 1e-3 and ref_latents.std() > 1e-2
    return got, ref_latents


SD3_CASES = {
    "cfg": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), dict(guidance_scale=7.0)),
    "negative-n2": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
                    dict(guidance_scale=5.0, negative_prompt=["dog", "cat"], num_images_per_prompt=2)),
    "no-cfg-prompt-2-3": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
                          dict(guidance_scale=1.0, prompt_2=["dog", "dog"], prompt_3=["a cat", "a"])),
    "clip-skip-sigmas": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
                         dict(clip_skip=1, sigmas=[1.0, 0.7, 0.3], num_inference_steps=None)),
    "dynamic-shift": (lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), dict(guidance_scale=4.0)),
    "heun": (lambda: FlowMatchHeunDiscreteScheduler(shift=3.0), dict(guidance_scale=4.0)),
    "unipc-flow": (lambda: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                   flow_shift=3.0), dict(guidance_scale=4.0, num_inference_steps=4)),
}


@pytest.mark.parametrize("case", list(SD3_CASES))
def test_sd3_equals_diffusers(sd3, case):
    scheduler, kw = SD3_CASES[case]
    sd, pipe = sd3_pipes(sd3, scheduler())
    assert isinstance(pipe, GuidedSD3Pipeline)
    _both(sd, pipe, **kw)


def test_sd3_embeds_without_encoders_and_t5_zeros(sd3):
    sd, pipe = sd3_pipes(sd3)
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, max_sequence_length=T5_LEN)
    ref = sd.encode_prompt(PROMPTS, None, None, max_sequence_length=T5_LEN)
    for a, b in zip((pe, neg, pooled, neg_pooled), ref):
        _close(a, b, 1e-6)
    bare = GuidedSD3Pipeline(pipe.transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), pipe.vae)
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent")
    got = bare(prompt_embeds=pe, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
               negative_pooled_prompt_embeds=neg_pooled, progress=False, generator=_gen(), **kw).latents
    _close(got, sd(PROMPTS, max_sequence_length=T5_LEN, generator=_gen(), **kw).images)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        bare(prompt_embeds=pe, pooled_prompt_embeds=pooled, progress=False, **kw)
    # no T5: zeros in its place, as diffusers
    parts = dict(sd3, text_encoder_3=None, tokenizer_3=None)
    sd_no_t5, pipe_no_t5 = sd3_pipes(parts)
    _both(sd_no_t5, pipe_no_t5, guidance_scale=3.0)


def test_sd3_callback_latents_are_diffusers(sd3):
    """callback_on_step_end sees x_σ (diffusers' latents), and latents it returns continue the run."""
    sd, pipe = sd3_pipes(sd3)
    seen = {"ref": [], "got": []}

    def make(key):
        def fn(p, i, t, kwargs):
            seen[key].append(kwargs["latents"].clone())
            return {"latents": kwargs["latents"] * 0.9 if i == 1 else kwargs["latents"]}
        return fn
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, max_sequence_length=T5_LEN, output_type="latent")
    ref = sd(PROMPTS, generator=_gen(), callback_on_step_end=make("ref"), **kw).images
    got = pipe(PROMPTS, generator=_gen(), callback_on_step_end=make("got"), progress=False, **kw).latents
    assert len(seen["got"]) == len(seen["ref"]) == 3
    for a, b in zip(seen["got"], seen["ref"]):
        _close(a, b)
    _close(got, ref)


FLUX_CASES = {
    "schnell-like": (False, dict()),
    "dev-embedded-guidance": (True, dict(guidance_scale=4.5)),
    "true-cfg-negatives": (False, dict(true_cfg_scale=3.0, negative_prompt=["dog", "a"])),
    "dev-true-cfg-n2": (True, dict(true_cfg_scale=2.0, negative_prompt=["x", "y"], num_images_per_prompt=2,
                                   guidance_scale=2.0)),
    "true-cfg-one-negative": (False, dict(true_cfg_scale=2.0, negative_prompt="dog")),   # diffusers: batch 1
    "negative-without-true-cfg": (False, dict(negative_prompt=["dog", "a"])),   # true_cfg_scale 1: ignored
    "wide-sigmas-prompt-2": (False, dict(width=2 * SIZE, sigmas=[1.0, 0.6, 0.2], num_inference_steps=None,
                                         prompt_2=["dog", "a cat"])),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_equals_diffusers(flux, case):
    dev, kw = FLUX_CASES[case]
    fp, pipe = flux_pipes(flux, dev)
    assert isinstance(pipe, GuidedFluxPipeline)
    got, _ = _both(fp, pipe, **kw)
    rows = 2 * kw.get("num_images_per_prompt", 1)
    assert got.latents.shape == (rows, (SIZE // 4) * (kw.get("width", SIZE) // 4), 16)   # packed 2×2


def test_flux_callback_sees_diffusers_latents_and_guidance_scale(flux):
    fp, pipe = flux_pipes(flux, dev=True)
    seen = {"ref": [], "got": []}

    def make(key):
        def fn(p, i, t, kwargs):
            seen[key].append((kwargs["latents"].clone(), p.guidance_scale))
            return {"latents": kwargs["latents"] * 0.9 if i == 0 else kwargs["latents"]}
        return fn
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, max_sequence_length=T5_LEN, output_type="latent",
              guidance_scale=4.0, true_cfg_scale=2.0, negative_prompt="dog")
    ref = fp(PROMPTS, generator=_gen(), callback_on_step_end=make("ref"), **kw).images
    got = pipe(PROMPTS, generator=_gen(), callback_on_step_end=make("got"), progress=False, **kw).latents
    assert len(seen["got"]) == len(seen["ref"]) == 3
    for (a, scale_a), (b, scale_b) in zip(seen["got"], seen["ref"]):
        _close(a, b)
        assert scale_a == scale_b == 4.0
    _close(got, ref)


def test_flux_with_a_flow_sigma_solver(flux):
    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True,
                                    flow_shift=1.0)
    fp, pipe = flux_pipes(flux, scheduler=sched)
    _both(fp, pipe, num_inference_steps=4)


def test_flux_packing_round_trip():
    z = torch.randn(2, 4, 6, 8)
    packed = pack_latents(z)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed[0, 1], z[0, :, 0:2, 2:4].reshape(-1))   # token 1: rows 0-1, columns 2-3
    assert torch.equal(unpack_latents(packed, 6, 8), z)
    assert torch.equal(pack_latents(z), FluxPipeline._pack_latents(z, 2, 4, 6, 8))


def test_flux_reward_guidance_through_unpack_and_decode(flux):
    """G_loss through true CFG, Flux's unpacking and the decoder: the pipeline's run equals the
    loop written out (ũ = u + β ∇_{x_σ} L, L = ½(gᵀ decode(unpack(x̂_0)/sf + shift) + b − y*)²,
    x̂_0 = x_σ − σ u, from the first step at σ = 1) with autograd through an explicit unpack and decode."""
    fp, pipe = flux_pipes(flux)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 3, SIZE, SIZE, generator=gen) / SIZE
    b = torch.tensor([0.3, -0.2])
    beta, target, w, steps = 2.0, 2.0, 2.5, 3
    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=T5_LEN, output_type="latent",
              true_cfg_scale=w, negative_prompt="dog", progress=False)
    reward = pipe.reward_guidance(g, offset=b, target=target, beta=beta)
    got = pipe(PROMPTS, generator=_gen(), guidance=[reward], **kw).latents

    transformer, vae = flux["transformer"], flux["vae"]
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    pe, pooled, text_ids = fp.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    neg, neg_pooled, _ = fp.encode_prompt(["dog", "dog"], None, max_sequence_length=T5_LEN)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    latents = pack_latents(torch.randn(2, 4, 8, 8, generator=_gen()))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=pipe._mu(SIZE, SIZE))
    sig = sched.sigmas.tolist()

    def velocity(lat, t):
        def call(e, p):
            return transformer(hidden_states=lat, timestep=t.expand(2) / 1000, pooled_projections=p,
                               encoder_hidden_states=e, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        u = call(neg, neg_pooled)
        return u + w * (call(pe, pooled) - u)

    def decode_packed(z):   # explicit: unpack 4×4 tokens of 16 channels to 4×8×8, scale, shift, decode
        z = z.view(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)
        return vae.decode(z / sf + shift).sample

    for i, t in enumerate(sched.timesteps):
        s, s_next = sig[i], sig[i + 1]
        with torch.enable_grad():
            lat = latents.detach().requires_grad_(True)
            u = velocity(lat, t)
            image = decode_packed(lat - s * u)
            loss = 0.5 * ((torch.einsum("bijk,bijk->b", g, image) + b - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, lat)
        latents = latents + (s_next - s) * (u.detach() + beta * grad)
    _close(got, latents)
    unguided = pipe(PROMPTS, generator=_gen(), **kw).latents
    assert (got - unguided).abs().max() > 1e-3

    def reward_of(z):
        with torch.no_grad():
            return torch.einsum("bijk,bijk->b", g, pipe.decode_latents(z)) + b
    assert ((reward_of(got) - target).abs() < (reward_of(unguided) - target).abs()).all()


def test_sd3_reward_guidance_moves_the_reward(sd3):
    sd, pipe = sd3_pipes(sd3)
    g = torch.randn(2, 3, SIZE, SIZE, generator=_gen(4)) / SIZE
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, max_sequence_length=T5_LEN, output_type="latent",
              progress=False)
    plain = pipe(PROMPTS, generator=_gen(), **kw).latents
    got = pipe(PROMPTS, generator=_gen(), guidance=[pipe.reward_guidance(g, target=2.0, beta=20.0)], **kw).latents

    def reward_of(z):   # decoded as diffusers decodes SD3 latents (scaled, then shifted)
        vae = sd3["vae"]
        with torch.no_grad():
            image = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        return torch.einsum("bijk,bijk->b", g, image)
    assert ((reward_of(got) - 2.0).abs() < (reward_of(plain) - 2.0).abs()).all()


def test_flux_branch_terms_and_pixelasparam(flux):
    fp, pipe = flux_pipes(flux)
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, max_sequence_length=T5_LEN, output_type="latent",
              progress=False, negative_prompt="dog")
    plain = pipe(PROMPTS, generator=_gen(), true_cfg_scale=3.0, **kw).latents
    apg = pipe(PROMPTS, generator=_gen(), guidance=[gg.APG(3.0, convention="diffusers", norm_threshold=0.0)],
               **kw).latents
    _close(apg, plain, 1e-5)   # diffusers' APG with η = 1 and no clip is CFG
    zero = pipe(PROMPTS, generator=_gen(), guidance=[gg.CFGZeroStar(3.0, zero_init_steps=1)], **kw).latents
    pxp = pipe(PROMPTS, generator=_gen(), true_cfg_scale=3.0, projection=gg.PixelAsParam("C"), **kw).latents
    for out in (zero, pxp):
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4


def test_flow_pipeline_errors(sd3, flux):
    sd, pipe = sd3_pipes(sd3)
    kw = dict(num_inference_steps=2, max_sequence_length=T5_LEN, progress=False)
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        pipe("a cat", skip_guidance_layers=[0], **kw)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        GuidedSD3Pipeline.from_pipe(sd, scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 4, 32), **kw)
    with pytest.raises(ValueError, match="prompt_3"):   # diffusers repeats no single prompt_3 either
        pipe(PROMPTS, prompt_3="dog", **kw)
    fp, fpipe = flux_pipes(flux)
    with pytest.raises(ValueError, match="height"):
        fpipe("a cat", height=SIZE + 2, width=SIZE, **kw)
    with pytest.raises(ValueError, match="sigmas"):   # FluxPipeline passes σ's; Heun's set_timesteps takes none
        flux_pipes(flux, scheduler=FlowMatchHeunDiscreteScheduler())[1]("a cat", height=SIZE, width=SIZE, **kw)
    with pytest.raises(ValueError, match="negative_ip_adapter_image"):
        fpipe("a cat", negative_ip_adapter_image=np.zeros((4, 4, 3)), **kw)
    fresh = GuidedFluxPipeline.from_pipe(fp)
    z = torch.randn(1, 16, 16)
    with pytest.raises(ValueError, match="height"):   # packed latents do not carry the image size
        fresh.decode_latents(z)
    assert fresh.decode_latents(z, height=SIZE, width=SIZE).shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="max_sequence_length"):
        fpipe("a cat", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=600, progress=False)
