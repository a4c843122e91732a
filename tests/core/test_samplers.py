"""The σ-space and multistep samplers: closed-form identities, the k-diffusion-style
``sigmas=`` API against k-diffusion's algorithms written out here, zero terminal SNR, and every
guidance term and PixelAsParam policy on every new sampler with no host synchronisation."""
import math

import pytest
import torch

import gradguide as gg
from helpers import ChannelScale, guidance_cases
from gradguide.experiments.demo_mixture import default_mixture
from gradguide.samplers import build

SCHED = gg.Schedule.linear(200)
GM = default_mixture(SCHED)
Y = torch.full((8,), 2)
NEW = ["euler", "euler_a", "heun", "lms", "dpmpp-2m", "dpmpp-2m-sde", "unipc", "plms", "dpmpp-3m-sde", "dpm_2",
       "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
       # ComfyUI's own (gradguide.samplers.comfy)
       "ipndm", "ipndm_v", "deis", "gradient_estimation", "res_multistep", "res_multistep_ancestral", "lcm_comfy",
       "er_sde", "seeds_2", "seeds_3", "heunpp2"]


TERMS = guidance_cases(GM)


@pytest.mark.parametrize("sampler", NEW)
@pytest.mark.parametrize("name", list(TERMS))
def test_every_guidance_term_and_projection_runs_without_host_sync(name, sampler):
    terms, projection, model = TERMS[name]
    records = []
    x = gg.sample(model, (8, 2), schedule=SCHED, sampler=gg.Sampler(sampler, clip=(-5, 5)), steps=6, guidance=terms,
                  projection=projection, cond={"y": Y},
                  diagnostics=gg.Diagnostics(check_sync=True, telemetry=True, callback=records.append),
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    # Heun, DPM-2 and the two-stage samplers: two evaluations per step, one on the last; PLMS: the first step twice
    assert len(records) == {"heun": 11, "plms": 7, "dpm_2": 11, "dpm_2_ancestral": 11, "dpmpp_2s_ancestral": 11,
                            "dpmpp_sde": 11, "seeds_2": 11, "seeds_3": 16, "heunpp2": 15}.get(sampler, 6)


def test_euler_is_ddim_on_the_same_grid():
    """Euler in σ-space is DDIM(η = 0) in variance-preserving form (same step coefficients)."""
    ts = SCHED.timesteps(10)
    e, d = build("euler", ts), build("ddim", ts)
    for k in ("c_x", "c_0"):
        torch.testing.assert_close(e.tables[k], d.tables[k], rtol=1e-12, atol=1e-12)


def _eps_model(schedule):
    ac = schedule.alphas_cumprod

    def model(x, t):   # the exact ε of N(0, 0.25 I) data, at fractional t (linear in ᾱ)
        t = t.to(torch.float64).clamp(0, len(ac) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(ac) - 1)
        abar = ((1 - (t - lo)) * ac[lo] + (t - lo) * ac[hi]).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x * (1 - abar).sqrt() / (abar * 0.25 + 1 - abar)
    return model


def _kdiffusion(sampler, model, schedule, sigmas, x, gen):
    """k-diffusion's sample_euler / sample_euler_ancestral / sample_heun / sample_lms / sample_dpmpp_2m, written out."""
    from scipy import integrate
    sigmas = sigmas.tolist()
    ds = []

    def denoise(x, s):
        t = schedule.sigma_to_t(torch.tensor([s])).expand(x.shape[0])
        return x - s * model(x / math.sqrt(1 + s * s), t)
    old = None
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        if sampler == "euler":
            x = x + (x - d) / s * (s1 - s)
        elif sampler == "euler_a":
            up = min(s1, math.sqrt(s1 ** 2 * (s ** 2 - s1 ** 2) / s ** 2))
            down = math.sqrt(s1 ** 2 - up ** 2)
            x = x + (x - d) / s * (down - s)
            if s1 > 0:
                x = x + torch.randn(x.shape, generator=gen, dtype=x.dtype) * up
        elif sampler == "heun":
            dd = (x - d) / s
            if s1 == 0:
                x = x + dd * (s1 - s)
            else:
                x2 = x + dd * (s1 - s)
                x = x + (dd + (x2 - denoise(x2, s1)) / s1) / 2 * (s1 - s)
        elif sampler == "lms":   # order 4, coefficients by quadrature as k-diffusion's linear_multistep_coeff
            ds = (ds + [(x - d) / s])[-4:]
            order = len(ds)

            def coeff(j):
                def fn(tau):
                    p = 1.0
                    for k in range(order):
                        if k != j:
                            p *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                    return p
                return integrate.quad(fn, s, s1, epsrel=1e-10)[0]
            x = x + sum(coeff(j) * dj for j, dj in enumerate(reversed(ds)))
        else:   # dpmpp_2m
            t, t1 = -math.log(s), -math.log(s1) if s1 > 0 else math.inf
            h = t1 - t
            if old is None or s1 == 0:
                x = (s1 / s) * x - math.expm1(-h) * d
            else:
                r = (t - (-math.log(sigmas[i - 1]))) / h
                x = (s1 / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - old / (2 * r))
            old = d
    return x


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "lms", "dpmpp-2m"])
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_kdiffusion_style_sigmas_match_kdiffusion_algorithms(sampler, kind):
    schedule = gg.Schedule.linear(1000)
    s_min, s_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    sigmas = gg.sigmas_karras(7, s_min, s_max) if kind == "karras" else gg.sigmas_exponential(7, s_min, s_max)
    model = _eps_model(schedule)
    z = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _kdiffusion(sampler.replace("-", "_"), model, schedule, sigmas, z * sigmas[0].item(),
                      torch.Generator().manual_seed(2))
    got = gg.sample(model, (3, 2, 4), schedule=schedule, sampler=gg.Sampler(sampler, sigmas=sigmas), x_T=z,
                    generator=torch.Generator().manual_seed(2))
    assert (got - ref).abs().max() <= 1e-7 * max(1.0, ref.abs().max().item())   # float64 on both sides


def test_sigma_helpers_and_sigma_to_t():
    s = gg.sigmas_karras(5, 0.03, 14.6, rho=7.0)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    ref = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, torch.cat([ref, torch.zeros(1, dtype=torch.float64)]))
    e = gg.sigmas_exponential(4, 0.1, 10.0, append_zero=False)
    torch.testing.assert_close(e, torch.tensor([10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1], dtype=torch.float64))
    sched = gg.Schedule.linear(1000)
    torch.testing.assert_close(sched.sigma_to_t(sched.sigmas[[0, 500, 999]]),
                               torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min"):
        gg.sigmas_karras(5, 2.0, 1.0)
    with pytest.raises(ValueError, match="sigmas"):
        gg.sample(lambda x, t: x, (2, 2), schedule=sched, sampler=gg.Sampler("euler", sigmas=[1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="either sigmas"):
        gg.sample(lambda x, t: x, (2, 2), schedule=sched, sampler=gg.Sampler("euler", sigmas=[2.0, 0.0]), steps=3)
    with pytest.raises(ValueError, match="last σ must be 0"):
        gg.sample(lambda x, t: x, (2, 2), schedule=sched, sampler=gg.Sampler("heun", sigmas=[2.0, 1.0, 0.5]))


def test_zero_terminal_snr():
    z = gg.Schedule.linear(1000).rescale_zero_terminal_snr()
    assert z.zero_terminal_snr and float(z.alphas_cumprod[0]) == pytest.approx(float(gg.Schedule.linear(1000)
                                                                                     .alphas_cumprod[0]))
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(rescale_betas_zero_snr=True).alphas_cumprod.double()
    torch.testing.assert_close(z.alphas_cumprod, ref, rtol=1e-5, atol=1e-7)
    v_model = lambda x, t: -0.5 * x   # noqa: E731
    for sampler in ("ddim", "ddpm"):
        x = gg.sample(v_model, (2, 3), schedule=z, sampler=gg.Sampler(sampler, prediction="v", spacing="trailing"),
                      steps=5, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        gg.sample(v_model, (2, 3), schedule=z, sampler=gg.Sampler("ddim", spacing="trailing"), steps=5)   # an ε model
    with pytest.raises(ValueError, match="ᾱ > 0"):
        gg.sample(v_model, (2, 3), schedule=z, sampler=gg.Sampler("euler", prediction="v", spacing="trailing"), steps=5)


def test_ddpm_final_noise_rule():
    ts = SCHED.timesteps(5, spacing="trailing")   # last timestep 39 > 0, lands on ᾱ = 1
    never = build("ddpm", ts, variance="fixed-large")
    t_pos = build("ddpm", ts, variance="fixed-large", final_noise="t>0")
    assert never.draws_noise[-1] is False and t_pos.draws_noise[-1] is True
    assert float(t_pos.tables["sigma"][-1]) == pytest.approx(math.sqrt(1 - float(ts.abar[-1])))
    ts0 = SCHED.timesteps(5, spacing="leading")   # last timestep 0: no noise under either rule
    assert build("ddpm", ts0, final_noise="t>0").draws_noise[-1] is False
    with pytest.raises(ValueError, match="final_noise"):
        build("ddpm", ts, final_noise="always")


@pytest.mark.parametrize("sampler", NEW)
def test_graph_replay_equals_eager(sampler):
    """Captured-step replay (emulated without CUDA) carries the slots exactly as eager sampling:
    slots moved from x or from other slots must not alias the capture's static inputs."""
    from gradguide.graphs import GraphCache
    kw = dict(schedule=SCHED, sampler=sampler, steps=7, guidance=[gg.CFG(2.0)], cond={"y": Y},
              generator=torch.Generator().manual_seed(0))
    eager = gg.sample(GM, (8, 2), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    replayed = gg.sample(GM, (8, 2), execution=gg.Execution(graph=GraphCache(emulate=True)), **kw)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


def test_sampler_options_travel_with_a_plain_schedule():
    """diffusers' DDPM rule for your own schedule: schedule.sampler_config, used by sample()."""
    kw = dict(shape=(4, 3), steps=5, sampler=gg.Sampler(spacing="trailing", variance="fixed-large"))
    own = gg.Schedule.linear(200)
    rule = gg.Schedule.linear(200)
    rule.sampler_config = gg.Sampler("ddpm", final_noise="t>0")
    a = gg.sample(lambda x, t: 0.1 * x, schedule=own, generator=torch.Generator().manual_seed(0), **kw)
    b = gg.sample(lambda x, t: 0.1 * x, schedule=rule, generator=torch.Generator().manual_seed(0), **kw)
    assert (a - b).abs().max() > 1e-3     # the last step adds noise only under the t > 0 rule
    # the call's own option wins over the schedule's
    c = gg.sample(lambda x, t: 0.1 * x, schedule=rule, generator=torch.Generator().manual_seed(0), shape=(4, 3),
                  steps=5, sampler=gg.Sampler(spacing="trailing", variance="fixed-large", final_noise="never"))
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    # options learnt for another sampler do not travel to the one the call names
    d = gg.sample(lambda x, t: 0.1 * x, schedule=rule, generator=torch.Generator().manual_seed(0), shape=(4, 3),
                  steps=5, sampler=gg.Sampler("ddim", spacing="trailing"))
    e = gg.sample(lambda x, t: 0.1 * x, schedule=own, generator=torch.Generator().manual_seed(0), shape=(4, 3),
                  steps=5, sampler=gg.Sampler("ddim", spacing="trailing"))
    torch.testing.assert_close(d, e, rtol=0, atol=0)
    assert gg.Schedule.linear(200).sampler_config is None   # the class default is untouched


@pytest.mark.parametrize("sampler,options", [("dpm_fast", {"nfe": 5, "eta": 1.0}), ("euler", {"s_churn": 2.0}),
                                             ("heun", {"s_churn": 2.0, "s_tmax": 5.0}),
                                             ("sa_solver", {"sde_sigmas": (5.0, 0.5)}),
                                             ("sa_solver_pece", {"sde_sigmas": (5.0, 0.5)})])
@pytest.mark.parametrize("name", list(TERMS))
def test_every_guidance_term_runs_on_dpm_fast_and_churn(name, sampler, options):
    """DPM-Solver-fast (its own steps between two σ's) and churned Euler/Heun (noise before the
    model call) are LinComb steps too: every guidance term and projection, no host sync."""
    terms, projection, model = TERMS[name]
    schedule = gg.Schedule.linear(200)
    lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    sigmas = [hi, lo] if sampler == "dpm_fast" else gg.sigmas_karras(5, lo, hi)
    records = []
    x = gg.sample(model, (8, 2), schedule=schedule, sampler=gg.Sampler(sampler, sigmas=sigmas, clip=(-5, 5), **options),
                  guidance=terms, projection=projection, cond={"y": Y},
                  diagnostics=gg.Diagnostics(telemetry=True, callback=records.append, check_sync=True),
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    # SA-Solver PECE: a second evaluation after each corrector (not at the first step)
    assert len(records) == {"dpm_fast": 5, "euler": 5, "heun": 9, "sa_solver": 5, "sa_solver_pece": 9}[sampler]


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp-3m-sde"])
def test_new_samplers_dry_run_like_heun(sampler):
    """On the fake-CUDA dry run with graph capture, an evaluation of the new samplers is what one of
    Heun's is: one model launch and combines over (x, D, the carried tensor), plus the noise where
    that evaluation draws noise."""
    from gradguide.bench import dryrun
    schedule = gg.Schedule.linear(1000)
    r = dryrun.dry_run(ChannelScale().to("meta"), (2, 4, 8, 8), schedule=schedule, sampler=sampler, steps=5,
                       backend="reference", graph=True, steps_measured=[1, 2])
    tables = build(sampler, schedule.timesteps(5))
    for step in (1, 2):
        measured = r["steps_measured"][str(step)]
        noisy = int(tables.draws_noise[step])
        assert measured["forward"]["launches"] == 1
        assert measured["structure"]["combine_k"] == [3 + noisy, 3 + noisy]


@pytest.mark.parametrize("sampler,peer", [("ipndm", "lms"), ("ipndm_v", "lms"), ("deis", "lms"),
                                          ("gradient_estimation", "lms"), ("res_multistep", "dpmpp-2m"),
                                          ("res_multistep_ancestral", "dpmpp_sde"), ("seeds_2", "dpmpp_sde"),
                                          ("seeds_3", "dpmpp_sde"), ("er_sde", "dpmpp_sde"), ("heunpp2", "heun"),
                                          ("lcm_comfy", "euler_a")])
def test_comfy_samplers_dry_run_like_their_peers(sampler, peer):
    """ComfyUI's samplers on the fake-CUDA dry run with graph capture: a measured evaluation is what
    one of an existing sampler with the same carried state and noise is (one model launch; combines
    over x, D, the carried operand, the noise)."""
    from gradguide.bench import dryrun
    schedule = gg.Schedule.linear(1000)
    got, want = [dryrun.dry_run(ChannelScale().to("meta"), (2, 4, 8, 8), schedule=schedule, sampler=s, steps=6,
                                backend="reference", graph=True, steps_measured=[3])["steps_measured"]["3"]
                 for s in (sampler, peer)]
    assert got["forward"]["launches"] == want["forward"]["launches"] == 1
    assert got["structure"]["combine_k"] == want["structure"]["combine_k"]
