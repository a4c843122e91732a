"""GuidedQwenImagePipeline on a tiny random Qwen-Image built in code (QwenImageTransformer2DModel,
a Qwen2.5-VL encoder over the byte tokenizer of tests/integrations/test_pipeline.py, AutoencoderKLQwenImage):
its latents and images equal diffusers' QwenImagePipeline's (same seed, float32, ≤ 1e-4) with
Qwen-Image's norm-rescaled true CFG (with two images per prompt), no
CFG, and precomputed embeddings with masks; a branch term replaces the true CFG. Guidance through
the pipeline on the packed latents: G_loss through the unpacking and the 5-D VAE decoder equals
the loop written out (through the norm-rescaled true CFG), and G_loss (latent and decoded), DPS
and classifier guidance each move their objective towards its target against the unguided run."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,  # noqa: E402
                       QwenImageTransformer2DModel)
from helpers import GUIDANCE_OBJECTIVES, assert_decoded_reward_closer, guidance_objectives  # noqa: E402
from test_pipeline import _close, tiny_tokenizer  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

import gradguide as gg  # noqa: E402
from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402
from gradguide.integrations.pipeline_qwenimage import GuidedQwenImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPTS = ["a cat", "dog"]
KW = dict(height=32, width=32, num_inference_steps=3)


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    tokenizer, n = tiny_tokenizer(max_length=2048)
    special = dict(vision_end_token_id=n + 1, vision_start_token_id=n + 2, vision_token_id=n + 3, image_token_id=n + 4,
                   video_token_id=n + 5)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": n, "bos_token_id": n - 2,
                     "eos_token_id": n - 1, "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                                             "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=n, **special)
    parts = dict(
        tokenizer=tokenizer, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                                guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        vae=AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                   latents_std=[1.0, 1.5, 0.8, 1.2]))
    for v in parts.values():
        if isinstance(v, torch.nn.Module):
            v.eval().requires_grad_(False)
    return parts


def _pipes(parts):
    ref = QwenImagePipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    ref.set_progress_bar_config(disable=True)
    return ref, GuidedPipeline.from_pipe(ref)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


CASES = {
    "true-cfg": dict(negative_prompt=["x", "a dog"]),
    "true-cfg-n2": dict(negative_prompt=["dog", "x"], num_images_per_prompt=2, true_cfg_scale=2.5),
    "no-negative-no-cfg": dict(),
    "sigmas": dict(sigmas=[1.0, 0.5, 0.25], num_inference_steps=None, negative_prompt=["x", "y"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qwenimage_equals_diffusers(qwen, case):
    ref_pipe, pipe = _pipes(qwen)
    assert isinstance(pipe, GuidedQwenImagePipeline)
    assert (pipe.TEMPLATE, pipe.TEMPLATE_TOKENS) == (ref_pipe.prompt_template_encode,
                                                     ref_pipe.prompt_template_encode_start_idx)
    kw = {**KW, **CASES[case]}
    ref = ref_pipe(PROMPTS, generator=_gen(), output_type="pt", **kw).images
    got = pipe(PROMPTS, generator=_gen(), output_type="pt", progress=False, **kw)
    rows = 2 * kw.get("num_images_per_prompt", 1)
    assert got.images.shape == ref.shape == (rows, 3, 32, 32)
    _close(got.images, ref)
    ref_latents = ref_pipe(PROMPTS, generator=_gen(), output_type="latent", **kw).images
    assert got.latents.shape == ref_latents.shape == (rows, 16, 16)   # packed 2×2
    _close(got.latents, ref_latents)
    assert ref.std() > 1e-3 and ref_latents.std() > 1e-2


def test_qwenimage_embeds_and_branch_terms(qwen):
    ref_pipe, pipe = _pipes(qwen)
    pe, mask = pipe.encode_prompt(PROMPTS)
    ref_pe, ref_mask = ref_pipe.encode_prompt(PROMPTS)
    _close(pe, ref_pe, 1e-6)
    assert mask is not None and torch.equal(mask, ref_mask)   # "a cat" and "dog" differ in length: padded
    neg, neg_mask = pipe.encode_prompt(["x", "y"])
    kw = dict(KW, output_type="latent", progress=False)
    bare = GuidedQwenImagePipeline(pipe.transformer, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                                   pipe.vae)
    got = bare(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
               negative_prompt_embeds_mask=neg_mask, generator=_gen(), **kw).latents
    _close(got, pipe(PROMPTS, negative_prompt=["x", "y"], generator=_gen(), **kw).latents, 1e-6)
    # a branch term replaces the norm-rescaled true CFG: gg.CFG is plain n + s(c − n), the shorter embedding padded
    # with masked zeros; equal to that loop written out on the unpadded embeddings
    cfg = pipe(PROMPTS, negative_prompt=["x", "y"], guidance=[gg.CFG(4.0)], generator=_gen(), **kw).latents
    assert (cfg - got).abs().max() > 1e-4
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=pipe._mu(32, 32))
    latents = ref_pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", _gen())
    shapes = [[(1, 4, 4)]] * 2
    with torch.no_grad():
        for t in sched.timesteps:
            def velocity(e, m):
                return qwen["transformer"](hidden_states=latents, timestep=t.expand(2) / 1000, encoder_hidden_states=e,
                                           encoder_hidden_states_mask=m, img_shapes=shapes, return_dict=False)[0]
            u = velocity(neg, neg_mask)
            latents = sched.step(u + 4.0 * (velocity(pe, mask) - u), t, latents, return_dict=False)[0]
    _close(cfg, latents)


def test_qwenimage_reward_guidance_through_unpack_and_decode(qwen):
    """G_loss through Qwen-Image's norm-rescaled true CFG (both branches inside the model call),
    the 2×2 unpacking and AutoencoderKLQwenImage: the pipeline's run equals the flow-Euler loop
    written out with autograd (ũ = u + β ∇_{x_σ} L, L = ½(gᵀ decode(unpack(x̂_0) · std + mean) + b − y*)²,
    x̂_0 = x_σ − σ u), and moves the decoded reward towards y* against the unguided run."""
    ref_pipe, pipe = _pipes(qwen)
    g = torch.randn(2, 3, 32, 32, generator=_gen(4)) / 32
    b = torch.tensor([0.2, -0.1])
    beta, target, s = 20.0, 1.0, 3.0
    latents = torch.randn(2, 16, 16, generator=_gen(5))
    kw = dict(KW, output_type="latent", progress=False, negative_prompt=["x", "a dog"], true_cfg_scale=s,
              latents=latents)
    got = pipe(PROMPTS, guidance=[pipe.reward_guidance(g, offset=b, target=target, beta=beta)], **kw).latents
    plain = pipe(PROMPTS, **kw).latents

    pe, mask = pipe.encode_prompt(PROMPTS)
    neg, neg_mask = pipe.encode_prompt(["x", "a dog"])
    transformer, vae = qwen["transformer"], qwen["vae"]
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=pipe._mu(32, 32))
    sig = sched.sigmas.tolist()
    shapes = [[(1, 4, 4)]] * 2
    x = latents.clone()
    for i, t in enumerate(sched.timesteps):
        with torch.enable_grad():
            lat = x.detach().requires_grad_(True)

            def velocity(e, m):
                return transformer(hidden_states=lat, timestep=t.expand(2) / 1000, encoder_hidden_states=e,
                                   encoder_hidden_states_mask=m, img_shapes=shapes, return_dict=False)[0]
            c, n = velocity(pe, mask), velocity(neg, neg_mask)
            comb = n + s * (c - n)
            u = comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            z = (lat - sig[i] * u).view(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)
            image = vae.decode(z.unsqueeze(2) * std + mean).sample[:, :, 0]
            loss = 0.5 * ((torch.einsum("bchw,bchw->b", g, image) + b - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, lat)
        x = x + (sig[i + 1] - sig[i]) * (u.detach() + beta * grad)
    _close(got, x)
    assert (got - plain).abs().max() > 1e-3
    assert_decoded_reward_closer(pipe, g, b, target, got, plain)


@pytest.mark.parametrize("name", GUIDANCE_OBJECTIVES)
def test_qwenimage_guidance_moves_its_objective(qwen, name):
    """Each gradient term through GuidedQwenImagePipeline on packed latents, on top of the
    in-model true CFG: the guided run ends closer to the term's target than the unguided run
    from the same noise."""
    _, pipe = _pipes(qwen)
    kw = dict(KW, output_type="latent", progress=False, negative_prompt=["x", "a dog"],
              latents=torch.randn(2, 16, 16, generator=_gen(5)))
    plain = pipe(PROMPTS, **kw).latents
    term, objective = guidance_objectives(pipe, (2, 16, 16), (2, 3, 32, 32))[name]
    got = pipe(PROMPTS, guidance=[term], **kw).latents
    assert torch.isfinite(got).all()
    with torch.no_grad():
        before, after = objective(plain), objective(got)
    assert (after < before).all(), (name, before, after)
