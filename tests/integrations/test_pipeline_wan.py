"""GuidedWanPipeline on a tiny random Wan 2.1 built in code (WanTransformer3DModel, a UMT5
encoder over the byte tokenizer of tests/integrations/test_pipeline.py, AutoencoderKLWan): its latents and
videos equal diffusers' WanPipeline's (same seed, float32, ≤ 1e-4) with UniPC on flow σ's
(Wan's scheduler) and flow Euler, CFG batched into one call, negative prompts, two videos per
prompt, and precomputed embeddings; Wan 2.2's options are refused by name."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,  # noqa: E402
                       WanPipeline, WanTransformer3DModel)
from test_pipeline import _close, tiny_tokenizer  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

import gradguide as gg  # noqa: E402
from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402
from gradguide.integrations.pipeline_wan import GuidedWanPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPTS = ["a cat", "dog"]
KW = dict(height=16, width=32, num_frames=5, num_inference_steps=3, max_sequence_length=10)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer(max_length=10)
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(vocab_size=n_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                 num_heads=4, relative_attention_num_buckets=8)),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]),
        transformer=WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                          num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32))
    for v in parts.values():
        if isinstance(v, torch.nn.Module):
            v.eval().requires_grad_(False)
    return parts


def unipc():
    return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


def _pipes(parts, scheduler=None, **config):
    ref = WanPipeline(**parts, scheduler=scheduler or unipc(), **config)
    ref.set_progress_bar_config(disable=True)
    return ref, GuidedPipeline.from_pipe(ref)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


CASES = {
    "unipc-cfg": (unipc, dict()),
    "negative-n2": (unipc, dict(negative_prompt=["dog", "a"], num_videos_per_prompt=2, guidance_scale=3.0)),
    "no-cfg": (unipc, dict(guidance_scale=1.0)),
    "flow-euler": (lambda: FlowMatchEulerDiscreteScheduler(shift=5.0), dict(guidance_scale=4.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wan_equals_diffusers(wan, case):
    scheduler, kw = CASES[case]
    ref_pipe, pipe = _pipes(wan, scheduler())
    assert isinstance(pipe, GuidedWanPipeline)
    kw = {**KW, **kw}
    ref = ref_pipe(PROMPTS, generator=_gen(), output_type="pt", **kw).frames
    got = pipe(PROMPTS, generator=_gen(), output_type="pt", progress=False, **kw)
    rows = 2 * kw.get("num_videos_per_prompt", 1)
    assert got.frames.shape == ref.shape == (rows, 5, 3, 16, 32)
    _close(got.frames, ref)
    ref_latents = ref_pipe(PROMPTS, generator=_gen(), output_type="latent", **kw).frames
    assert got.latents.shape == ref_latents.shape == (rows, 16, 2, 2, 4)   # 5-D video latents
    _close(got.latents, ref_latents)
    assert ref.std() > 1e-3 and ref_latents.std() > 1e-2


def test_wan_embeds_terms_and_refusals(wan):
    ref_pipe, pipe = _pipes(wan)
    pe, neg = pipe.encode_prompt(PROMPTS, max_sequence_length=10)
    ref_pe, ref_neg = ref_pipe.encode_prompt(PROMPTS, max_sequence_length=10)
    _close(pe, ref_pe, 1e-6)
    _close(neg, ref_neg, 1e-6)
    assert (pe[0, -1] == 0).all()   # padding zeroed, as diffusers
    bare = GuidedWanPipeline(pipe.transformer, unipc(), pipe.vae)
    kw = dict(KW, output_type="latent", progress=False)
    got = bare(prompt_embeds=pe, negative_prompt_embeds=neg, generator=_gen(), **kw).latents
    _close(got, pipe(PROMPTS, generator=_gen(), **kw).latents, 1e-6)
    apg = pipe(PROMPTS, generator=_gen(), guidance=[gg.APG(5.0, convention="diffusers", norm_threshold=0.0)],
               **kw).latents
    _close(apg, got, 1e-5)   # diffusers' APG with η = 1 and no clip is CFG
    with pytest.raises(ValueError, match="num_frames"):
        pipe(PROMPTS, **dict(kw, num_frames=6))
    with pytest.raises(ValueError, match="guidance_scale_2"):
        pipe(PROMPTS, guidance_scale_2=2.0, **kw)
    with pytest.raises(ValueError, match="height"):
        pipe(PROMPTS, **dict(kw, height=24))
    with pytest.raises(ValueError, match="boundary_ratio"):
        _pipes(dict(wan, transformer_2=wan["transformer"]), boundary_ratio=0.5)


def test_wan_reward_guidance_through_the_video_decoder(wan):
    """G_loss through AutoencoderKLWan on 5-D latents: the pipeline's run equals the flow-Euler
    loop written out (ũ = u + β ∇_{x_σ} L with the CFG velocity, L = ½(gᵀ decode(x̂_0 · std + mean)
    − y*)², autograd through the transformer's two branches and the video decoder)."""
    ref_pipe, pipe = _pipes(wan, FlowMatchEulerDiscreteScheduler(shift=5.0))
    g = torch.randn(2, 3, 5, 16, 32, generator=_gen(4)) / 40
    beta, target, w = 50.0, 1.0, 4.0
    kw = dict(KW, output_type="latent", progress=False, guidance_scale=w)
    got = pipe(PROMPTS, generator=_gen(), guidance=[pipe.reward_guidance(g, target=target, beta=beta)], **kw).latents
    plain = pipe(PROMPTS, generator=_gen(), **kw).latents
    assert (got - plain).abs().max() > 1e-4

    pe, neg = ref_pipe.encode_prompt(PROMPTS, max_sequence_length=10)
    vae, transformer = wan["vae"], wan["transformer"]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(KW["num_inference_steps"])
    sig = sched.sigmas.tolist()
    latents = torch.randn(2, 16, 2, 2, 4, generator=_gen())
    for i, t in enumerate(sched.timesteps):
        with torch.enable_grad():
            lat = latents.detach().requires_grad_(True)
            u_c = transformer(lat, timestep=t.expand(2), encoder_hidden_states=pe, return_dict=False)[0]
            u_n = transformer(lat, timestep=t.expand(2), encoder_hidden_states=neg, return_dict=False)[0]
            u = u_n + w * (u_c - u_n)
            video = vae.decode((lat - sig[i] * u) / inv_std + mean).sample
            loss = 0.5 * ((torch.einsum("bcfhw,bcfhw->b", g, video) - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, lat)
        latents = latents + (sig[i + 1] - sig[i]) * (u.detach() + beta * grad)
    _close(got, latents)
