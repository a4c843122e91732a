"""from_diffusers with diffusers' EDM schedulers reproduces their own loops (≤ 1e-4).

``EDMEulerScheduler`` (Euler in σ) and ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++ 2M/3M and
its SDE) drive a preconditioned network: it is called on ``c_in x_σ`` at ``c_noise = log(σ)/4``
and ``x̂_0 = c_skip x_σ + c_out F``. gradguide runs them as its own Euler / DPM-Solver++ with the
EDM prediction (``"edm"``, ``"edm-v"``, ``sigma_data``). Models: the exact EDM network of Gaussian
data mixed with a fixed conv (every σ grid, prediction type, σ_d and solver option), a tiny
random ``UNet2DModel``; classifier-free guidance and PixelAsParam policy C against diffusers'
loop with the same guidance written out; the settings diffusers cannot run are refused by name.
"""
import inspect

import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide import predictions
from helpers import pc_ref, tiny_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHAPE = (2, 3, 6, 6)
TOL = 1e-4
DATA_VAR = 0.3


class ExactEDM(torch.nn.Module):
    """The EDM network F of N(0, DATA_VAR) data with a fixed 3x3 conv mixed into its denoiser:
    reads σ from ``c_noise`` and x_σ from ``c_in x_σ``, as a preconditioned network must. ``y``
    (a per-sample shift of the denoiser) makes a conditional model for guidance."""

    def __init__(self, sigma_data=0.5, ptype="epsilon"):
        super().__init__()
        self.sd, self.sign = sigma_data, (-1.0 if ptype == "v_prediction" else 1.0)
        self.w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05

    def forward(self, x_in, t, y=None, return_dict=False):
        sigma = torch.exp(4 * torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1]).to(x_in.dtype).view(-1, 1, 1, 1)
        norm = (sigma ** 2 + self.sd ** 2).sqrt()
        x_sigma = x_in * norm
        denoised = DATA_VAR / (DATA_VAR + sigma ** 2) * (x_sigma + torch.nn.functional.conv2d(x_sigma, self.w, padding=1))
        if y is not None:   # a conditional shift partly against the denoiser: PixelAsParam's projections act
            denoised = denoised + y.view(-1, 1, 1, 1) * (0.2 * torch.tanh(x_sigma) - 0.5 * denoised)
        c_skip, c_out = self.sd ** 2 / norm ** 2, self.sign * sigma * self.sd / norm
        return ((denoised - c_skip * x_sigma) / c_out,)


def diffusers_loop(model, sched, steps, noise, seed, guide=None):
    """diffusers' loop as its pipelines write it; ``guide(out_c, out_u, x_in, sigma) -> out`` for guidance."""
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        if guide is None:
            out = model(x_in, t)[0]
        else:
            b = x.shape[0]
            out = guide(model(x_in, t, y=torch.ones(b))[0], model(x_in, t, y=torch.zeros(b))[0], x, sched.sigmas[i])
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def run_both(model, cls, config, steps, seed=5):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = diffusers_loop(model, cls(**config), steps, noise.clone(), seed)
        gmodel, schedule = gg.from_diffusers(model, cls(**config))
        got = gg.sample(gmodel, SHAPE, schedule=schedule, steps=steps, x_T=noise.clone(),
                        generator=torch.Generator().manual_seed(seed))
    return got, ref, schedule


def close(got, ref):
    return float((got - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max()))


CASES = [
    (EDMEulerScheduler, {}),
    (EDMEulerScheduler, dict(prediction_type="v_prediction", sigma_data=1.0)),
    (EDMEulerScheduler, dict(sigma_schedule="exponential", sigma_min=0.01, sigma_max=20.0)),
    (EDMEulerScheduler, dict(rho=5.0, final_sigmas_type="sigma_min", sigma_data=0.7)),
    (EDMDPMSolverMultistepScheduler, {}),
    (EDMDPMSolverMultistepScheduler, dict(prediction_type="v_prediction", sigma_data=0.8, solver_type="heun")),
    (EDMDPMSolverMultistepScheduler, dict(solver_order=1)),
    (EDMDPMSolverMultistepScheduler, dict(solver_order=3)),
    (EDMDPMSolverMultistepScheduler, dict(solver_order=3, lower_order_final=False)),
    (EDMDPMSolverMultistepScheduler, dict(euler_at_final=True, sigma_schedule="exponential")),
    (EDMDPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", rho=3.0)),
    (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                          prediction_type="v_prediction")),
]


def _id(case):
    cls, cfg = case
    return cls.__name__.replace("Scheduler", "") + ("-" + "-".join(f"{k}={v}" for k, v in cfg.items()) if cfg else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_edm_reproduces_diffusers(case):
    cls, config = case
    probe = cls(**config)
    model = ExactEDM(probe.config.sigma_data, probe.config.prediction_type)
    for steps in (1, 2, 5, 16):   # 16: past DPM-Solver's lower-order-final threshold (15)
        got, ref, schedule = run_both(model, cls, config, steps)
        assert close(got, ref), (steps, float((got - ref).abs().max()))
    cfg = schedule.sampler_config
    assert cfg.prediction == ("edm-v" if probe.config.prediction_type == "v_prediction" else "edm")
    assert cfg.options["sigma_data"] == probe.config.sigma_data
    assert cfg.name == {"EDMEulerScheduler": "euler"}.get(cls.__name__, cfg.name)
    if config.get("algorithm_type") == "sde-dpmsolver++":   # the noise is the generator's, drawn as diffusers draws it
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        gmodel, schedule = gg.from_diffusers(model, cls(**config))
        with torch.no_grad():
            other = gg.sample(gmodel, SHAPE, schedule=schedule, steps=5, x_T=noise, generator=torch.Generator().manual_seed(6))
        assert not close(other, run_both(model, cls, config, 5)[1])


def test_edm_preconditioning_is_needed():
    """The same network read as a plain ε model (no c_in, no c_skip/c_out) is far from diffusers."""
    model = ExactEDM()
    got, ref, schedule = run_both(model, EDMEulerScheduler, {}, 5)
    assert close(got, ref)
    gmodel, _ = gg.from_diffusers(model, EDMEulerScheduler())
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = gg.sample(gmodel, SHAPE, schedule=schedule, steps=5, x_T=noise, sampler=gg.Sampler(prediction="eps"))
    assert float((plain - ref).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("case", [(EDMEulerScheduler, {}),
                                  (EDMDPMSolverMultistepScheduler, dict(prediction_type="v_prediction")),
                                  (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"))],
                         ids=["euler", "dpm-v", "dpm-sde"])
def test_edm_unet_matches_diffusers(unet, case):
    """A real (random) U-Net: fractional, negative c_noise timesteps, the model's own dtype handling."""
    cls, config = case
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = diffusers_loop(unet, cls(**config), 6, noise.clone(), 5)
        gmodel, schedule = gg.from_diffusers(unet, cls(**config))
        got = gg.sample(gmodel, noise.shape, schedule=schedule, steps=6, x_T=noise.clone(),
                        generator=torch.Generator().manual_seed(5))
    assert close(got, ref), float((got - ref).abs().max())


@pytest.mark.parametrize("cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_edm_cfg_and_pixelasparam_match_diffusers_loop(cls, ptype):
    """CFG on the network outputs (diffusers' ``F_u + w (F_c − F_u)``: x̂_0 is affine in F, so it is
    CFG on ε too) and PixelAsParam policy C (on the two branches' x̂_0, the step fed the F of the
    projected x̂_0), against diffusers' loop with the same guidance written out."""
    w, sd = 3.0, 0.6
    config = dict(prediction_type=ptype, sigma_data=sd)
    model = ExactEDM(sd, ptype)
    sign = -1.0 if ptype == "v_prediction" else 1.0

    def coefficients(sigma):
        norm2 = sigma ** 2 + sd ** 2
        return sd ** 2 / norm2, sign * sigma * sd / norm2 ** 0.5

    def cfg(out_c, out_u, x, sigma):
        return out_u + w * (out_c - out_u)

    def policy_c(out_c, out_u, x, sigma):
        c_skip, c_out = coefficients(float(sigma))
        x0_c, x0_u = c_skip * x + c_out * out_c, c_skip * x + c_out * out_u
        delta = (w - 1) * (x0_c - x0_u)
        x0 = pc_ref(x0_c, delta) + pc_ref(delta, x0_c)
        return (x0 - c_skip * x) / c_out

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    cond, uncond = {"y": torch.ones(SHAPE[0])}, {"y": torch.zeros(SHAPE[0])}
    outputs = {}
    for guide, projection in ((cfg, None), (policy_c, gg.PixelAsParam("C"))):
        with torch.no_grad():
            ref = diffusers_loop(model, cls(**config), 6, noise.clone(), 5, guide=guide)
            gmodel, schedule = gg.from_diffusers(model, cls(**config))
            got = gg.sample(gmodel, SHAPE, schedule=schedule, steps=6, x_T=noise.clone(), cond=cond,
                            guidance=gg.CFG(w, uncond=uncond), projection=projection)
        assert close(got, ref), (guide.__name__, float((got - ref).abs().max()))
        outputs[guide.__name__] = got
    # the projections acted: policy C is not plain CFG here
    assert float((outputs["cfg"] - outputs["policy_c"]).abs().max()) > 1e-2


def test_edm_coefficients_are_diffusers_preconditioning():
    """x̂_0 = c_x x + c_F F and the model input c_in x on the variance-preserving x = x_σ/√(1+σ²) are
    diffusers' ``precondition_outputs`` / ``precondition_inputs`` on x_σ; with σ_d = 1, "edm-v" is "v"."""
    sched = EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x_sigma, out = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    for sigma in (0.002, 0.3, 1.0, 7.5, 80.0):
        abar = torch.tensor(1 / (1 + sigma ** 2), dtype=torch.float64)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x = x_sigma * a
        c_x, c_f, c_in = predictions.edm_coefficients(abar, 0.7, "edm-v")
        sig = torch.tensor(sigma, dtype=torch.float64)
        torch.testing.assert_close(predictions.x0_from("edm-v", out, x, a, s, (c_x, c_f)),
                                   sched.precondition_outputs(x_sigma, out, sig), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x * c_in, sched.precondition_inputs(x_sigma, sig), rtol=1e-12, atol=1e-12)
        eps = predictions.eps_from("edm-v", out, x, a, s, (c_x, c_f))   # and back: F of that ε
        torch.testing.assert_close(predictions.output_from_eps("edm-v", eps, x, a, s, (c_x, c_f)), out)
        c1 = predictions.edm_coefficients(abar, 1.0, "edm-v")[:2]
        torch.testing.assert_close(predictions.x0_from("edm-v", out, x, a, s, c1), predictions.x0_from("v", out, x, a, s))


def test_sigma_data_travels_with_the_prediction():
    """Another sampler on an EDM schedule keeps the model's σ_d (the model's, not the sampler's), so does
    naming an EDM prediction; another prediction drops it; σ_d without an EDM prediction is refused by name."""
    model = ExactEDM(1.0)
    gmodel, schedule = gg.from_diffusers(model, EDMEulerScheduler(sigma_data=1.0))
    run = gg.sampling.prepare_run(gmodel, SHAPE, schedule=schedule, sampler="heun", steps=4)
    assert run.sampler.prediction == "edm" and run.sampler.options["sigma_data"] == 1.0
    abar = run.tables.timesteps.abar
    torch.testing.assert_close(run.tables.tables["edm_in"], 1 / ((1 - abar) + abar).sqrt())   # σ_d = 1: q = 1
    run = gg.sampling.prepare_run(gmodel, SHAPE, schedule=schedule, sampler=gg.Sampler(prediction="edm-v"), steps=4)
    assert run.sampler.options["sigma_data"] == 1.0   # still the model's
    run = gg.sampling.prepare_run(gmodel, SHAPE, schedule=schedule, sampler=gg.Sampler("euler", prediction="v"), steps=4)
    assert "sigma_data" not in run.sampler.options and "edm_in" not in run.tables.tables
    with pytest.raises(ValueError, match="sampler.sigma_data"):
        gg.sample(gmodel, SHAPE, schedule=gg.Schedule.linear(1000), sampler=gg.Sampler("ddim", sigma_data=0.5), steps=3)


def test_samplers_between_sigmas_call_the_model_at_c_noise():
    """A sampler evaluating the model between the scheduler's σ's (DPM-Solver-2's log-midpoint) gives it
    c_noise = log(σ)/4 there: the midpoint of two consecutive c_noise values."""
    seen = []

    class Recording(ExactEDM):
        def forward(self, x_in, t, y=None, return_dict=False):
            seen.append(float(torch.as_tensor(t).reshape(-1)[0]))
            return super().forward(x_in, t, y, return_dict)

    sched = EDMEulerScheduler()
    gmodel, schedule = gg.from_diffusers(Recording(), sched)
    with torch.no_grad():
        x = gg.sample(gmodel, SHAPE, schedule=schedule, sampler="dpm_2", steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    sched.set_timesteps(4)
    c = sched.timesteps.tolist()
    expected = [c[0], (c[0] + c[1]) / 2, c[1], (c[1] + c[2]) / 2, c[2], (c[2] + c[3]) / 2, c[3]]
    assert seen == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("cls,config,named", [
    (EDMEulerScheduler, dict(prediction_type="sample"), "prediction_type"),
    (EDMDPMSolverMultistepScheduler, dict(prediction_type="sample"), "prediction_type"),
    (EDMDPMSolverMultistepScheduler, dict(thresholding=True), "thresholding"),
    (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3), "third-order SDE"),
], ids=["euler-sample", "dpm-sample", "dpm-thresholding", "dpm-sde-order3"])
def test_what_diffusers_cannot_run_is_refused_by_name(cls, config, named):
    """diffusers' precondition_outputs raises for 'sample'; its EDM DPM-Solver has no third-order SDE
    step (its step fails there); gradguide has no dynamic thresholding."""
    with pytest.raises(ValueError, match=named):
        gg.from_diffusers(ExactEDM(), cls(**config))


class GaussianEDM(torch.nn.Module):
    """The exact EDM network of N(MU, VAR) data in float64 (its probability-flow ODE has a closed form)."""
    MU, VAR = 0.5, 0.25

    def __init__(self, sigma_data, ptype):
        super().__init__()
        self.sd, self.sign = sigma_data, (-1.0 if ptype == "v_prediction" else 1.0)

    def forward(self, x_in, t, return_dict=False):
        s = torch.exp(4 * torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1]).view(-1, 1)
        norm = (s * s + self.sd ** 2).sqrt()
        x_sigma = x_in * norm
        d = (self.VAR * x_sigma + s * s * self.MU) / (self.VAR + s * s)
        return ((d - self.sd ** 2 / norm ** 2 * x_sigma) / (self.sign * s * self.sd / norm),)


ORDER_CASES = [
    (EDMEulerScheduler, {}, 1),
    (EDMDPMSolverMultistepScheduler, {}, 2),
    (EDMDPMSolverMultistepScheduler, dict(solver_type="heun", prediction_type="v_prediction", sigma_data=1.3), 2),
    # the published third-order weight is second order (tests/core/test_convergence_order.py); on σ's even in log σ
    (EDMDPMSolverMultistepScheduler, dict(solver_order=3, sigma_schedule="exponential"), 2),
]


@pytest.mark.parametrize("case", ORDER_CASES, ids=[_id(c[:2]) for c in ORDER_CASES])
def test_edm_solvers_converge_at_their_order(case):
    """from_diffusers + sample, end to end on the schedulers' own σ grids (σ_max = 80 to σ_min = 0.002,
    then the first-order last step to 0, which returns D(x, σ_min)): the error against the exact
    ODE solution falls as n^−order. The exact end point: x_σ − μ scales as √(VAR + σ²) along the
    ODE, then D(x, σ_min) = μ + VAR/(VAR + σ_min²)(x − μ)."""
    cls, config, order = case
    mu, var = GaussianEDM.MU, GaussianEDM.VAR
    z = torch.tensor([[-2.0], [-0.3], [0.4], [1.7]], dtype=torch.float64)
    ns, errors = (16, 32, 64, 128), []
    for n in ns:
        sched = cls(**config)
        model, schedule = gg.from_diffusers(GaussianEDM(sched.config.sigma_data, sched.config.prediction_type), sched)
        out = gg.sample(model, z.shape, schedule=schedule, steps=n, x_T=z.clone())
        sched.set_timesteps(n)
        sig = sched.sigmas.to(torch.float64)
        s_first, s_min = float(sig[0]), float(sig[-2])
        x_min = mu + (z * float(sched.init_noise_sigma) - mu) * ((var + s_min ** 2) / (var + s_first ** 2)) ** 0.5
        exact = mu + var / (var + s_min ** 2) * (x_min - mu)
        errors.append(float((out - exact).abs().max()))
    observed = -np.polyfit(np.log(ns[1:]), np.log(errors[1:]), 1)[0]
    assert abs(observed - order) <= 0.25, f"observed order {observed:.2f}, expected {order} (errors {errors})"


def test_diffusers_pixelasparam_guider_refuses_edm_by_name():
    from gradguide.integrations.diffusers import GradguidePixelAsParam
    with pytest.raises(ValueError, match="EDMEulerScheduler.*gradguide.PixelAsParam"):
        GradguidePixelAsParam.from_scheduler(EDMEulerScheduler())


@pytest.mark.parametrize("config", [dict(solver_type="heun", final_sigmas_type="sigma_min"),
                                    dict(solver_order=3, final_sigmas_type="sigma_min", sigma_schedule="exponential")],
                         ids=["heun", "order3-exponential"])
def test_zero_length_final_step_as_diffusers(config):
    """With final_sigmas_type="sigma_min" and 16 steps (past lower_order_final's 15), diffusers' last step
    goes from its grid's σ_min to the configured σ_min, a float32 ulp apart, where its float32 λ does
    not move: a higher-order step there is NaN in diffusers and refused here by its non-finite tables;
    the midpoint solver's (finite) is reproduced, as the identity step diffusers takes."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = diffusers_loop(ExactEDM(), EDMDPMSolverMultistepScheduler(**config), 16, noise.clone(), 0)
    assert not torch.isfinite(ref).all()
    gmodel, schedule = gg.from_diffusers(ExactEDM(), EDMDPMSolverMultistepScheduler(**config))
    with pytest.raises(ValueError, match="non-finite step coefficients"):
        gg.sample(gmodel, SHAPE, schedule=schedule, steps=16, x_T=noise.clone())
    midpoint = dict(config, solver_type="midpoint", solver_order=2)
    got, ref, _ = run_both(ExactEDM(), EDMDPMSolverMultistepScheduler, midpoint, 16)
    assert torch.isfinite(ref).all() and close(got, ref)
