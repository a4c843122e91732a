"""The diffusers drop-in: tiny random UNets built offline from a config; gradguide.sample with
from_diffusers must match diffusers' own scheduler loops (DDIM η = 0 over spacings, clipping on
and off, ε and v prediction; DDPM from the same generator; CFG), and the gradguide guiders must
match diffusers' ClassifierFreeGuidance / AdaptiveProjectedGuidance."""
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance  # noqa: E402
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402

import gradguide  # noqa: E402
from gradguide import CFG, PixelAsParam  # noqa: E402
from helpers import tiny_unet  # noqa: E402
from gradguide.integrations.diffusers import GradguideAPG, GradguideCFG, GradguidePixelAsParam  # noqa: E402

SHAPE = (2, 3, 8, 8)
NULL = 3          # the class label used as "unconditional"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4, num_class_embeds=4)
    return net.eval().requires_grad_(False)


def _diffusers_loop(unet, sched, steps, x, y, generator=None, cfg=None, guider=None, **step_kw):
    """diffusers' own loop (as DDIMPipeline/DDPMPipeline write it, with class-label CFG)."""
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        if cfg is None and guider is None:
            out = unet(x, t, class_labels=y).sample
        else:
            both = unet(torch.cat([x, x]), t, class_labels=torch.cat([torch.full_like(y, NULL), y])).sample
            out_u, out_c = both.chunk(2)
            if guider is not None:
                guider.set_state(step=i, num_inference_steps=steps, timestep=t)
                if hasattr(guider, "set_sample"):
                    guider.set_sample(x)
                out = guider.forward(out_c, out_u).pred
            else:
                out = out_u + cfg * (out_c - out_u)
        x = sched.step(out, t, x, generator=generator, **step_kw).prev_sample
    return x


def _close(got, ref):
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 2e-5 * max(scale, 1.0), f"max error {err:.3g} for outputs of size {scale:.3g}"


Y = torch.tensor([0, 1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(unet, spacing, clip, prediction_type):
    sched = DDIMScheduler(clip_sample=clip, timestep_spacing=spacing, prediction_type=prediction_type,
                          set_alpha_to_one=spacing != "linspace", steps_offset=1 if spacing == "leading" else 0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _diffusers_loop(unet, sched, 7, x_T.clone(), Y)
    model, schedule = gradguide.from_diffusers(unet, sched)
    got = gradguide.sample(model, SHAPE, schedule=schedule, steps=7, x_T=x_T.clone(),
                           cond={"class_labels": Y})
    _close(got, ref)
    assert sched.num_inference_steps == 7  # set by the loop above; from_diffusers never touches it


def test_ddim_use_clipped_model_output(unet):
    sched = DDIMScheduler(clip_sample=True, timestep_spacing="trailing")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_clipped = _diffusers_loop(unet, sched, 6, x_T.clone(), Y, use_clipped_model_output=True)
        ref_default = _diffusers_loop(unet, sched, 6, x_T.clone(), Y)
    model, schedule = gradguide.from_diffusers(unet, sched, use_clipped_model_output=True)
    assert schedule.sampler_config.clip_eps is None   # gradguide's default: the clipped ε
    got = gradguide.sample(model, SHAPE, schedule=schedule, sampler="ddim", steps=6, x_T=x_T.clone(),
                           cond={"class_labels": Y})
    _close(got, ref_clipped)
    assert (got - ref_default).abs().max() > 1e-2  # the two conventions really differ on this model


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler])
def test_a_wrapped_model_keeps_the_schedulers_settings(unet, scheduler):
    """What from_diffusers learns (here clip_sample, and DDIM's unclipped re-noising ε) travels
    with the schedule: the model wrapped in a plain function of the user's samples as diffusers."""
    sched = scheduler(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")
    gen = torch.Generator().manual_seed(6)
    x_T = torch.randn(SHAPE, generator=gen)
    with torch.no_grad():
        ref = _diffusers_loop(unet, sched, 6, x_T.clone(), Y, generator=gen)
    model, schedule = gradguide.from_diffusers(unet, sched)
    assert not hasattr(model, "sample_defaults")
    assert schedule.sampler_config.clip == (-0.5, 0.5)
    kw = dict(schedule=schedule, steps=6, cond={"class_labels": Y})   # x_T: the generator's first draw
    plain = gradguide.sample(model, SHAPE, generator=torch.Generator().manual_seed(6), **kw)
    wrapped = gradguide.sample(lambda x, t, **cond: model(x, t, **cond), SHAPE,
                               generator=torch.Generator().manual_seed(6), **kw)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
    _close(wrapped, ref)
    unclipped = gradguide.sample(lambda x, t, **cond: model(x, t, **cond), SHAPE,
                                 generator=torch.Generator().manual_seed(6), sampler=gradguide.Sampler(clip=False),
                                 **kw)
    assert (unclipped - wrapped).abs().max() > 1e-2   # the clipping really acts on this model


def test_ddim_timesteps_follow_the_scheduler():
    sched = DDIMScheduler(timestep_spacing="linspace", set_alpha_to_one=False)
    ts = gradguide.from_diffusers(torch.nn.Identity(), sched)[1].timesteps(4)
    sched.set_timesteps(4)
    assert ts.t.tolist() == sched.timesteps.tolist() == [999, 666, 333, 0]
    ac = sched.alphas_cumprod.double()
    # DDIM steps to t − T // n (749, 416, 83), not to the next kept timestep, and ᾱ_0 after 0
    assert torch.allclose(ts.abar_prev, torch.stack([ac[749], ac[416], ac[83], ac[0]]))


def test_step_count_timesteps_are_computed_once_per_setting():
    # a step count's timesteps are remembered per (steps, spacing, steps_offset): sample() asks for them on
    # every call, and computing them copies the scheduler; each setting still gets its own
    schedule = gradguide.from_diffusers(torch.nn.Identity(), DDIMScheduler(set_alpha_to_one=False))[1]
    first = schedule.timesteps(4)
    assert schedule.timesteps(4) is first
    for other in (schedule.timesteps(5), schedule.timesteps(4, "trailing"), schedule.timesteps(4, steps_offset=1)):
        assert other is not first and not torch.equal(other.t, first.t)
    for spacing, offset in (("adm", 0), ("trailing", 0), ("adm", 1)):
        sched = DDIMScheduler(set_alpha_to_one=False, steps_offset=offset,
                              timestep_spacing="leading" if spacing == "adm" else spacing)
        sched.set_timesteps(4)
        assert schedule.timesteps(4, spacing, steps_offset=offset).t.tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_matches_diffusers_with_shared_generator(unet, spacing):
    sched = DDPMScheduler(clip_sample=True, timestep_spacing=spacing)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(SHAPE, generator=gen)
    with torch.no_grad():
        ref = _diffusers_loop(unet, sched, 10, x_T, Y, generator=gen)
    model, schedule = gradguide.from_diffusers(unet, sched)
    got = gradguide.sample(model, SHAPE, schedule=schedule, sampler="ddpm", steps=10,
                           generator=torch.Generator().manual_seed(3), cond={"class_labels": Y})
    _close(got, ref)


def test_cfg_matches_diffusers_cfg(unet):
    sched = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = _diffusers_loop(unet, sched, 6, x_T.clone(), Y, cfg=3.0)
    model, schedule = gradguide.from_diffusers(unet, sched)
    got = gradguide.sample(model, SHAPE, schedule=schedule, sampler="ddim", steps=6, x_T=x_T.clone(),
                           cond={"class_labels": Y},
                           guidance=CFG(3.0, uncond={"class_labels": torch.full_like(Y, NULL)}))
    _close(got, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pixelasparam_guider_in_a_diffusers_loop_equals_gradguide_sample(unet, prediction_type):
    sched = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    guider = GradguidePixelAsParam.from_scheduler(sched, guidance_scale=4.0)
    with torch.no_grad():
        ref = _diffusers_loop(unet, sched, 6, x_T.clone(), Y, guider=guider)
    model, schedule = gradguide.from_diffusers(unet, sched)
    got = gradguide.sample(model, SHAPE, schedule=schedule, sampler="ddim", steps=6, x_T=x_T.clone(),
                           cond={"class_labels": Y}, projection=PixelAsParam("C"),
                           guidance=CFG(4.0, uncond={"class_labels": torch.full_like(Y, NULL)}))
    _close(got, ref)


@pytest.mark.parametrize("convention", ["official", "paper"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pixelasparam_guider_formula(prediction_type, convention):
    """Policy C on random tensors (about half the samples conflict) against gradguide.project."""
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=prediction_type == "sample")
    t = 600
    a, s = sched.alphas_cumprod[t].double().sqrt().item(), (1 - sched.alphas_cumprod[t].double()).sqrt().item()
    g = torch.Generator().manual_seed(7)
    x, x0c, noise = (torch.randn(16, 3, 4, 4, generator=g) for _ in range(3))
    # x̂_0u ≈ 2 x̂_0c on half the samples: there <x̂_0c, Δ> < 0, a conflict
    x0u = x0c * (torch.arange(16) % 2 * 2.0).view(-1, 1, 1, 1) + 0.3 * noise
    from_x0 = {"epsilon": lambda z: (x - a * z) / s, "v_prediction": lambda z: (a * x - z) / s, "sample": lambda z: z}
    c, u = from_x0[prediction_type](x0c), from_x0[prediction_type](x0u)
    w = 3.0
    guider = GradguidePixelAsParam.from_scheduler(sched, guidance_scale=w, convention=convention)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(t))
    guider.set_sample(x)
    pred = guider.forward(c, u).pred
    to_x0 = {"epsilon": lambda o: (x - s * o) / a, "v_prediction": lambda o: a * x - s * o, "sample": lambda o: o}
    x0c, x0u = to_x0[prediction_type](c), to_x0[prediction_type](u)
    if sched.config.clip_sample and convention == "official":   # the authors' code clips the branches first
        x0c, x0u = x0c.clamp(-1, 1), x0u.clamp(-1, 1)
    delta = (w - 1) * (x0c - x0u)
    x0 = gradguide.project(x0c, delta) + gradguide.project(delta, x0c)
    if sched.config.clip_sample:
        x0 = x0.clamp(-1, 1)
    torch.testing.assert_close(pred, from_x0[prediction_type](x0), rtol=1e-4, atol=1e-4)
    conflicts = ((x0c * delta).flatten(1).sum(1) < 0).sum().item()
    assert 0 < conflicts < 16
    assert (to_x0[prediction_type](pred) - (x0c + delta)).abs().max() > 1e-2  # differs from plain CFG


def _pair(seed, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5 + 0.3


@pytest.mark.parametrize("kw", [dict(guidance_scale=5.0), dict(guidance_scale=5.0, guidance_rescale=0.7),
                                dict(guidance_scale=2.5, use_original_formulation=True)])
def test_cfg_guider_matches_diffusers(kw):
    c, u = _pair(0)
    ours, theirs = GradguideCFG(**kw), ClassifierFreeGuidance(**kw)
    torch.testing.assert_close(ours.forward(c, u).pred, theirs.forward(c, u).pred, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(guidance_scale=6.0), dict(guidance_scale=6.0, eta=0.0),
                                dict(guidance_scale=4.0, adaptive_projected_guidance_rescale=2.0, eta=0.3),
                                dict(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                     adaptive_projected_guidance_rescale=3.0, use_original_formulation=True)])
def test_apg_guider_matches_diffusers_over_steps(kw):
    ours, theirs = GradguideAPG(**kw), AdaptiveProjectedGuidance(**kw)
    m = kw.get("adaptive_projected_guidance_momentum")
    if m is not None:   # what prepare_inputs does at step 0
        ours.momentum_buffer, theirs.momentum_buffer = MomentumBuffer(m), MomentumBuffer(m)
    for step in range(3):
        c, u = _pair(10 + step)
        c[0] = 0.0   # a zero conditional prediction: no parallel part
        torch.testing.assert_close(ours.forward(c, u).pred, theirs.forward(c, u).pred, rtol=1e-5, atol=1e-5)
    if m is not None:
        torch.testing.assert_close(ours.momentum_buffer.running_average, theirs.momentum_buffer.running_average)


def test_errors_and_lazy_import():
    import subprocess
    code = "import sys, gradguide; assert 'diffusers' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    with pytest.raises(ValueError, match="thresholding"):   # diffusers' own step fails there
        gradguide.from_diffusers(torch.nn.Identity(), diffusers.DPMSolverSinglestepScheduler(
            algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min"))
    with pytest.raises(ValueError, match="steps: expected an integer"):
        gradguide.from_diffusers(torch.nn.Identity(), DDIMScheduler())[1].timesteps(0)
    with pytest.raises(ValueError, match="norm_dim"):
        GradguideAPG(adaptive_projected_guidance_norm_dim=1)
    guider = GradguidePixelAsParam.from_scheduler(DDIMScheduler(), guidance_scale=3.0)
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(10))
    with pytest.raises(ValueError, match="set_sample"):
        guider.forward(*_pair(0))


def test_the_wrapped_model_follows_a_later_cast_of_the_unet():
    """The adapter looks the U-Net's dtype up once, then again whenever its parameters are cast
    (``.double()``, ``.half()``, ``.to(...)`` convert them in place): the call after a cast runs the
    U-Net in its new dtype, as diffusers' own call would."""
    net = tiny_unet()
    model, _ = gradguide.from_diffusers(net, DDIMScheduler())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        before = model(x, t)
        net.double()
        after = model(x.double(), t)
        direct = net(x.double(), t).sample
    assert before.dtype == torch.float32 and after.dtype == torch.float64
    assert torch.equal(after, direct)
