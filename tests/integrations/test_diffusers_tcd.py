"""from_diffusers with diffusers' TCDScheduler reproduces its own loop (≤ 1e-4).

TCD's step from ``t`` to the next timestep ``t'`` lands on ``s = ⌊(1 − γ) t'⌋``, a training
timestep between the visited ones, with ``D_s = √ᾱ_s x̂_0 + √(1−ᾱ_s) ε̂``, and re-noises it to
``t'`` with fresh noise (γ > 0, not on the last step, which returns ``D_0``). Checked: ε / v /
x̂_0 models, γ = 0.3 (its step's default, used with no keyword), 0, 1 and between, the scheduler's
settings it reads (original_inference_steps, zero terminal SNR, custom timesteps) and those it
ignores (clip_sample, thresholding), the generator's noise, CFG and PixelAsParam policy C against
diffusers' loop with the same guidance written out, and γ = 0 as DDIM on the same timesteps.
"""
import pytest
import torch

import gradguide as gg
from gradguide.schedules import Timesteps
from helpers import pc_ref

diffusers = pytest.importorskip("diffusers")
from diffusers import TCDScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHAPE = (2, 3, 5, 5)
TOL = 1e-4


class Toy(torch.nn.Module):
    """The optimal denoiser of N(0, 0.25 I) data with a fixed conv mixed in, in ``ptype``; ``y`` (a
    per-sample conditional shift, partly against the denoiser) makes a conditional model."""

    def __init__(self, alphas_cumprod, ptype="epsilon"):
        super().__init__()
        self.ac, self.ptype = torch.as_tensor(alphas_cumprod, dtype=torch.float32), ptype
        self.w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05

    def forward(self, x, t, y=None, return_dict=False):
        abar = self.ac[torch.as_tensor(t).reshape(-1)[:1].long()].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = a * 0.25 / (abar * 0.25 + s * s) * (x + torch.nn.functional.conv2d(x, self.w, padding=1))
        if y is not None:
            x0 = x0 + y.view(-1, 1, 1, 1) * (0.3 * torch.tanh(x) - 0.5 * x0)
        eps = (x - a * x0) / s.clamp_min(1e-6)
        return ({"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.ptype],)


def diffusers_loop(model, sched, steps, noise, seed, eta=None, guide=None, timesteps=None):
    """diffusers' loop; ``eta``: TCD's γ as ``step(eta=...)`` (None: the step's default);
    ``guide(out_c, out_u, x, t) -> out`` for guidance."""
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    else:
        sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    kw = {} if eta is None else {"eta": eta}
    x = noise
    for t in sched.timesteps:
        b = x.shape[0]
        out = model(x, t)[0] if guide is None else guide(model(x, t, y=torch.ones(b))[0],
                                                         model(x, t, y=torch.zeros(b))[0], x, t)
        x = sched.step(out, t, x, generator=gen, **kw).prev_sample
    return x


def close(got, ref):
    return float((got - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max()))


NOISE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
CONFIGS = [
    {},
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.3, thresholding=True),   # TCD reads neither
    dict(original_inference_steps=20, beta_schedule="linear"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),   # ᾱ = 0 at t = 999: a v model
]


@pytest.mark.parametrize("config", CONFIGS, ids=["eps", "v", "x0-clip-threshold-ignored", "orig20-linear", "v-zsnr"])
@pytest.mark.parametrize("eta", [None, 0.0, 1.0, 0.55], ids=["default-0.3", "gamma0", "gamma1", "gamma0.55"])
def test_tcd_reproduces_diffusers(config, eta):
    """With no keyword, the step's own γ = 0.3; another γ is ``Sampler(eta=γ)`` (diffusers' ``step(eta=γ)``)."""
    sched = TCDScheduler(**config)
    model = Toy(sched.alphas_cumprod, sched.config.prediction_type)
    gmodel, schedule = gg.from_diffusers(model, TCDScheduler(**config))
    assert schedule.sampler_config.name == "tcd" and not schedule.sampler_config.clip
    sampler = None if eta is None else gg.Sampler(eta=eta)
    for n in (1, 2, 4, 8):
        with torch.no_grad():
            ref = diffusers_loop(model, TCDScheduler(**config), n, NOISE.clone(), 3, eta)
            got = gg.sample(gmodel, SHAPE, schedule=schedule, steps=n, x_T=NOISE.clone(), sampler=sampler,
                            generator=torch.Generator().manual_seed(3))
        assert close(got, ref), (n, float((got - ref).abs().max()))
        if n > 1 and eta != 0.0:   # the generator's noise enters as diffusers draws it: another seed, another sample
            with torch.no_grad():
                other = gg.sample(gmodel, SHAPE, schedule=schedule, steps=n, x_T=NOISE.clone(), sampler=sampler,
                                  generator=torch.Generator().manual_seed(4))
            assert not close(other, ref)


def test_tcd_lands_between_the_timesteps():
    """The tables read ᾱ at s = ⌊(1 − γ) t'⌋ from the schedule's table, a timestep the run does not visit:
    each step is x' = k (b_s/b x + (a_s − b_s a/b) x̂_0) + √(1 − k²) z with k = √(ᾱ_{t'}/ᾱ_s) (float64)."""
    from gradguide.samplers import build
    _, schedule = gg.from_diffusers(torch.nn.Identity(), TCDScheduler())
    ts = schedule.timesteps(4)
    table = schedule.alphas_cumprod
    tables = build("tcd", ts, eta=0.3)
    t = ts.t.tolist()
    for i, t_next in enumerate(t[1:] + [0]):
        s = int((1 - 0.3) * t_next)   # the product is not an integer here: floor is int()
        assert s not in t or t_next == 0
        a, b = table[t[i]].sqrt(), (1 - table[t[i]]).sqrt()
        a_s, b_s = table[s].sqrt(), (1 - table[s]).sqrt()
        k = (table[t_next] / table[s]).sqrt() if i < len(t) - 1 else torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(tables.tables["c_x"][i], k * b_s / b)
        torch.testing.assert_close(tables.tables["c_0"][i], k * (a_s - b_s * a / b))
        torch.testing.assert_close(tables.tables["sigma"][i], (1 - k * k).sqrt())
    assert tables.draws_noise == [True, True, True, False]


def test_tcd_custom_timesteps_match_diffusers():
    """diffusers' ``set_timesteps(timesteps=[...])`` (a pipeline's ``timesteps=`` list)."""
    sched = TCDScheduler()
    model = Toy(sched.alphas_cumprod)
    gmodel, schedule = gg.from_diffusers(model, TCDScheduler())
    steps = [999, 759, 499, 259]
    with torch.no_grad():
        ref = diffusers_loop(model, TCDScheduler(), None, NOISE.clone(), 3, timesteps=steps)
        got = gg.sample(gmodel, SHAPE, schedule=schedule, x_T=NOISE.clone(), generator=torch.Generator().manual_seed(3),
                        sampler=gg.Sampler(timesteps=schedule.custom_timesteps(timesteps=steps)))
    assert close(got, ref), float((got - ref).abs().max())


def test_tcd_gamma0_is_ddim_onto_the_next_timestep():
    """γ = 0: every step is DDIM(η = 0) onto the next visited timestep, the last onto ᾱ_0 (t' = 0)."""
    schedule = gg.Schedule.linear(1000)
    ts = schedule.timesteps(6)
    ddim_ts = Timesteps(ts.t, ts.abar, torch.cat([ts.abar[1:], schedule.alphas_cumprod[:1]]))
    toy = Toy(schedule.alphas_cumprod)

    def model(x, t):
        return toy(x, t)[0]
    with torch.no_grad():
        tcd = gg.sample(model, SHAPE, schedule=schedule, sampler=gg.Sampler("tcd", eta=0.0), steps=6, x_T=NOISE.clone())
        ddim = gg.sample(model, SHAPE, schedule=schedule, sampler=gg.Sampler("ddim", timesteps=ddim_ts), x_T=NOISE.clone())
    torch.testing.assert_close(tcd, ddim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_tcd_cfg_and_pixelasparam_match_diffusers_loop(ptype):
    """CFG on the model outputs and PixelAsParam policy C (on the branches' x̂_0, the step fed the output
    of the projected x̂_0) against diffusers' loop with the same guidance written out."""
    w = 3.0
    sched = TCDScheduler(prediction_type=ptype)
    ac = sched.alphas_cumprod.to(torch.float64)
    model = Toy(sched.alphas_cumprod, ptype)

    def x0_of(out, x, a, s):
        return (x - s * out) / a if ptype == "epsilon" else a * x - s * out

    def out_of(x0, x, a, s):
        eps = (x - a * x0) / s
        return eps if ptype == "epsilon" else a * eps - s * x0

    def cfg(out_c, out_u, x, t):
        return out_u + w * (out_c - out_u)

    def policy_c(out_c, out_u, x, t):
        a, s = ac[t].sqrt().float(), (1 - ac[t]).sqrt().float()
        x0_c, x0_u = x0_of(out_c, x, a, s), x0_of(out_u, x, a, s)
        delta = (w - 1) * (x0_c - x0_u)
        return out_of(pc_ref(x0_c, delta) + pc_ref(delta, x0_c), x, a, s)

    cond, uncond = {"y": torch.ones(SHAPE[0])}, {"y": torch.zeros(SHAPE[0])}
    outputs = {}
    for guide, projection in ((cfg, None), (policy_c, gg.PixelAsParam("C"))):
        with torch.no_grad():
            ref = diffusers_loop(model, TCDScheduler(prediction_type=ptype), 4, NOISE.clone(), 3, guide=guide)
            gmodel, schedule = gg.from_diffusers(model, TCDScheduler(prediction_type=ptype))
            got = gg.sample(gmodel, SHAPE, schedule=schedule, steps=4, x_T=NOISE.clone(), cond=cond,
                            guidance=gg.CFG(w, uncond=uncond), projection=projection,
                            generator=torch.Generator().manual_seed(3))
        assert close(got, ref), (guide.__name__, float((got - ref).abs().max()))
        outputs[guide.__name__] = got
    assert float((outputs["cfg"] - outputs["policy_c"]).abs().max()) > 1e-2   # the projections acted


def test_tcd_refusals_name_the_argument():
    schedule = gg.Schedule.linear(1000)

    def model(x, t):
        return x
    with pytest.raises(ValueError, match="TCD's γ"):
        gg.sample(model, SHAPE, schedule=schedule, sampler=gg.Sampler("tcd", eta=1.5), steps=4)
    with pytest.raises(ValueError, match="sampler 'tcd': needs integer training timesteps"):
        gg.sample(model, SHAPE, schedule=schedule, sampler=gg.Sampler("tcd", sigmas=[10.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="sampler 'tcd': unknown options"):
        gg.sample(model, SHAPE, schedule=schedule, sampler=gg.Sampler("tcd", timestep_scaling=10.0), steps=4)


def test_tcd_general_step_equals_the_fused_one():
    """The fused step (default) and the general one (fused=False) run the same TCD tables."""
    sched = TCDScheduler(prediction_type="v_prediction")
    model = Toy(sched.alphas_cumprod, "v_prediction")
    gmodel, schedule = gg.from_diffusers(model, sched)
    outs = []
    for fused in (True, False):
        with torch.no_grad():
            outs.append(gg.sample(gmodel, SHAPE, schedule=schedule, steps=4, x_T=NOISE.clone(),
                                  generator=torch.Generator().manual_seed(3), execution=gg.Execution(fused=fused)))
    assert gg.sampling.prepare_run(gmodel, SHAPE, schedule=schedule, steps=4).plan is not None
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
