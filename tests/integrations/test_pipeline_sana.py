"""GuidedSanaPipeline on a tiny random Sana built in code (SanaTransformer2DModel, a Gemma 2
encoder over the byte tokenizer of tests/integrations/test_pipeline.py, AutoencoderDC): its latents and
images equal diffusers' SanaPipeline's (same seed, float32, ≤ 1e-4) with DPM-Solver++ on flow
σ's (Sana's scheduler) and flow Euler, the complex human instruction (diffusers' default, one
of the call's, none), CFG batched as diffusers, negative prompts and two images per prompt.
Guidance through the pipeline: G_loss through the deep-compression decoder equals the flow-Euler
loop written out, and G_loss (latent and decoded), DPS and classifier guidance each move their
objective towards its target against the unguided run, on Sana's own DPM-Solver++ too."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       SanaPipeline, SanaTransformer2DModel)
from helpers import GUIDANCE_OBJECTIVES, assert_decoded_reward_closer, guidance_objectives  # noqa: E402
from test_pipeline import _close, tiny_tokenizer  # noqa: E402
from transformers import Gemma2Config, Gemma2Model  # noqa: E402

from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402
from gradguide.integrations.pipeline_sana import GuidedSanaPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPTS = ["a cat", "dog"]
KW = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=8, use_resolution_binning=False)


@pytest.fixture(scope="module")
def sana():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer(max_length=64)
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16,
                                              max_position_embeddings=128, num_attention_heads=2, num_hidden_layers=1,
                                              num_key_value_heads=2, vocab_size=n_vocab, attn_implementation="eager",
                                              pad_token_id=n_vocab - 1)),
        vae=AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                          encoder_block_types=("ResBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                          decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                          decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                          decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                          upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                          scaling_factor=0.41407),
        transformer=SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                           num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                           cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                           sample_size=16))
    for v in parts.values():
        if isinstance(v, torch.nn.Module):
            v.eval().requires_grad_(False)
    return parts


def dpm():
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


CASES = {
    "dpm-cfg-default-instruction": (dpm, dict()),
    "no-instruction-negatives-n2": (dpm, dict(complex_human_instruction=None, negative_prompt=["dog", "a"],
                                              num_images_per_prompt=2, guidance_scale=3.0)),
    "own-instruction-no-cfg": (dpm, dict(complex_human_instruction=["describe:", "well"], guidance_scale=1.0)),
    "flow-euler": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sana_equals_diffusers(sana, case):
    scheduler, kw = CASES[case]
    ref_pipe = SanaPipeline(**sana, scheduler=scheduler())
    ref_pipe.set_progress_bar_config(disable=True)
    pipe = GuidedPipeline.from_pipe(ref_pipe)
    assert isinstance(pipe, GuidedSanaPipeline)
    kw = {**KW, **kw}
    ref = ref_pipe(PROMPTS, generator=_gen(), output_type="pt", **kw).images
    got = pipe(PROMPTS, generator=_gen(), output_type="pt", progress=False, **kw)
    assert got.images.shape == ref.shape == (2 * kw.get("num_images_per_prompt", 1), 3, 32, 32)
    _close(got.images, ref)
    ref_latents = ref_pipe(PROMPTS, generator=_gen(), output_type="latent", **kw).images
    _close(got.latents, ref_latents)
    assert ref.std() > 1e-3 and ref_latents.std() > 1e-2


def test_sana_refusals(sana):
    pipe = GuidedPipeline.from_pipe(SanaPipeline(**sana, scheduler=dpm()))
    kw = dict(KW, progress=False)
    for name, value in (("use_resolution_binning", True), ("clean_caption", True), ("timesteps", [999, 500])):
        with pytest.raises(ValueError, match=name):
            pipe("a cat", **dict(kw, **{name: value}))
    with pytest.raises(ValueError, match="height"):
        pipe("a cat", **dict(kw, height=48))


def test_sana_reward_guidance_through_the_decoder_equals_the_loop(sana):
    """G_loss through the deep-compression autoencoder: the pipeline's run (flow Euler, CFG
    batched) equals the loop written out with autograd, ũ = u + β ∇_{x_σ} L, L = ½(gᵀ decode(x̂_0 / sf)
    + b − y*)² on x̂_0 = x_σ − σ u, the CFG velocity u taken through both branches; and it moves
    the decoded reward towards y* against the unguided run."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Euler
    pipe = GuidedPipeline.from_pipe(SanaPipeline(**sana, scheduler=Euler(shift=3.0)))
    g = torch.randn(2, 3, 32, 32, generator=_gen(4)) / 32
    b = torch.tensor([0.2, -0.1])
    beta, target, w = 20.0, 1.0, 3.0
    latents = torch.randn(2, 4, 16, 16, generator=_gen(5))
    kw = dict(KW, output_type="latent", progress=False, guidance_scale=w, latents=latents)
    reward = pipe.reward_guidance(g, offset=b, target=target, beta=beta)
    got = pipe(PROMPTS, guidance=[reward], **kw).latents
    plain = pipe(PROMPTS, **kw).latents

    pe, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, max_sequence_length=KW["max_sequence_length"])
    transformer, vae = sana["transformer"], sana["vae"]
    sched = Euler(shift=3.0)
    sched.set_timesteps(KW["num_inference_steps"])
    sig = sched.sigmas.tolist()
    x = latents.clone()
    for i, t in enumerate(sched.timesteps):
        with torch.enable_grad():
            lat = x.detach().requires_grad_(True)

            def velocity(e, m):
                return transformer(lat, encoder_hidden_states=e, encoder_attention_mask=m,
                                   timestep=t.expand(2) * transformer.config.timestep_scale, return_dict=False)[0]
            u_n = velocity(neg, neg_mask)
            u = u_n + w * (velocity(pe, mask) - u_n)
            image = vae.decode((lat - sig[i] * u) / vae.config.scaling_factor).sample
            loss = 0.5 * ((torch.einsum("bchw,bchw->b", g, image) + b - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, lat)
        x = x + (sig[i + 1] - sig[i]) * (u.detach() + beta * grad)
    _close(got, x)
    assert (got - plain).abs().max() > 1e-3
    assert_decoded_reward_closer(pipe, g, b, target, got, plain)


@pytest.mark.parametrize("name", GUIDANCE_OBJECTIVES)
def test_sana_guidance_moves_its_objective(sana, name):
    """Each gradient term through GuidedSanaPipeline on Sana's DPM-Solver++ (flow σ's), with CFG:
    the guided run ends closer to the term's target than the unguided run from the same noise."""
    pipe = GuidedPipeline.from_pipe(SanaPipeline(**sana, scheduler=dpm()))
    kw = dict(KW, output_type="latent", progress=False, latents=torch.randn(2, 4, 16, 16, generator=_gen(5)))
    plain = pipe(PROMPTS, **kw).latents
    term, objective = guidance_objectives(pipe, (2, 4, 16, 16), (2, 3, 32, 32))[name]
    got = pipe(PROMPTS, guidance=[term], **kw).latents
    assert torch.isfinite(got).all()
    with torch.no_grad():
        before, after = objective(plain), objective(got)
    assert (after < before).all(), (name, before, after)
