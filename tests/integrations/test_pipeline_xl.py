"""GuidedXLPipeline on a tiny random Stable Diffusion XL built in code (a text_time U-Net, two
CLIP text encoders over the byte tokenizer of tests/integrations/test_pipeline.py): its images equal
diffusers' StableDiffusionXLPipeline's, with SDXL's added_cond_kwargs (pooled text embedding and
time ids) built as diffusers builds them."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from test_pipeline import _close, tiny_tokenizer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from gradguide.integrations.pipeline import GuidedPipeline  # noqa: E402
from gradguide.integrations.pipeline_xl import GuidedXLPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPTS = ["a cat", "dog"]
SIZE = 16


@pytest.fixture(scope="module")
def xl():
    torch.manual_seed(0)
    tokenizer, n_vocab = tiny_tokenizer()
    tokenizer_2, _ = tiny_tokenizer()
    text = dict(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                pad_token_id=n_vocab - 1, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2)


def xl_scheduler(cls=EulerDiscreteScheduler):
    """SDXL's scheduler configuration."""
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
               timestep_spacing="leading")


def _pipes(components, scheduler=None, **config):
    sd = StableDiffusionXLPipeline(**components, scheduler=scheduler or xl_scheduler(), add_watermarker=False,
                                   **config)
    sd.set_progress_bar_config(disable=True)
    return sd, GuidedPipeline.from_pipe(sd)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _both(sd, pipe, prompts=PROMPTS, **kw):
    kw = {"num_inference_steps": 3, "output_type": "pt", **kw}
    ref = sd(prompts, generator=_gen(), **kw)
    got = pipe(prompts, generator=_gen(), progress=False, **kw)
    ref_images = ref.images if hasattr(ref, "images") else ref[0]
    got_images = got.images if hasattr(got, "images") else got[0]
    _close(got_images, ref_images)
    assert ref_images.std() > 1e-3
    return got, ref


CASES = {
    "zeros-negative": dict(),   # force_zeros_for_empty_prompt: an all-zero negative embedding
    "negative-prompts-n2-rescale": dict(negative_prompt=["dog", "cat"], num_images_per_prompt=2, guidance_rescale=0.6,
                                        guidance_scale=6.0),
    "prompt-2-sizes": dict(prompt_2=["dog", "a cat"], original_size=(32, 24), crops_coords_top_left=(2, 4),
                           target_size=(16, 16)),
    "negative-sizes": dict(negative_original_size=(8, 8), negative_target_size=(12, 12)),
    "no-cfg": dict(guidance_scale=1.0),
    "clip-skip": dict(clip_skip=1, negative_prompt=""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_xl_equals_diffusers(xl, case):
    sd, pipe = _pipes(xl)
    assert isinstance(pipe, GuidedXLPipeline)
    got, ref = _both(sd, pipe, **CASES[case])
    lat_ref = sd(PROMPTS, generator=_gen(), num_inference_steps=3, output_type="latent", **CASES[case]).images
    _close(got.latents, lat_ref)


def test_xl_scheduler_swap_embeds_and_callbacks(xl):
    sd, pipe = _pipes(xl)
    sd.scheduler = EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config)   # followed at call time
    _both(sd, pipe)
    # precomputed embeddings, also without any text encoder (zeros negative needs none)
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, negative_prompt="dog")
    bare_sd, bare = _pipes({**xl, "text_encoder": None, "tokenizer": None, "text_encoder_2": None,
                            "tokenizer_2": None})
    _both(bare_sd, bare, prompts=None, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    _both(bare_sd, bare, prompts=None, prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
          negative_pooled_prompt_embeds=neg_pooled)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        bare(prompt_embeds=pe, progress=False)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        bare(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt="x", progress=False)
    # callback_on_step_end with SDXL's tensor inputs
    seen = {"ref": [], "got": []}

    def make(key):
        def fn(p, i, t, kwargs):
            seen[key].append((i, tuple(kwargs["add_time_ids"].shape), tuple(kwargs["add_text_embeds"].shape)))
            return {"latents": kwargs["latents"] * 0.9} if i == 0 else kwargs
        return fn
    inputs = ["latents", "add_time_ids", "add_text_embeds"]
    ref = sd(PROMPTS, generator=_gen(), num_inference_steps=3, output_type="pt", callback_on_step_end=make("ref"),
             callback_on_step_end_tensor_inputs=inputs).images
    got = pipe(PROMPTS, generator=_gen(), num_inference_steps=3, output_type="pt", callback_on_step_end=make("got"),
               callback_on_step_end_tensor_inputs=inputs, progress=False).images
    _close(got, ref)
    assert seen["got"] == seen["ref"] and len(seen["got"]) == 3
    # the tuple diffusers' SDXL pipeline returns
    out = pipe(PROMPTS, generator=_gen(), num_inference_steps=2, output_type="pt", return_dict=False, progress=False)
    assert isinstance(out, tuple) and len(out) == 1
    with pytest.raises(ValueError, match="denoising_end"):
        pipe(PROMPTS, denoising_end=0.8, progress=False)
    with pytest.raises(ValueError, match="GuidedXLPipeline"):
        GuidedPipeline(xl["unet"], xl_scheduler(), xl["vae"])
