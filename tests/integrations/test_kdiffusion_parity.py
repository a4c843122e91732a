"""gradguide against k-diffusion's own ``sample_*`` functions (k-diffusion 0.1.1.post1).

As a k-diffusion user runs it: a discrete schedule (``Schedule.linear(1000)``; the model is
called at ``sigma_to_t(σ)``), σ's from k-diffusion's helpers (Karras, exponential,
polyexponential, VP) or the training table itself, the same exact Gaussian-mixture denoiser on
both sides, float64, and the same noise: k-diffusion gets a ``noise_sampler`` returning the
draws gradguide makes from its generator, in order. Outputs agree to ≤ 1e-6 (they agree to
~1e-12: the difference is σ → t → σ round-off). k-diffusion's ``sampling.py`` is loaded on
its own (see :func:`helpers.load_kdiffusion_sampling`).
"""
import inspect

import pytest
import torch

import gradguide as gg
from helpers import load_kdiffusion_sampling

SCHEDULE = gg.Schedule.linear(1000)
SHAPE = (3, 4)
TOL = 1e-6
W, MU, VAR = (0.3, 0.7), (-0.8, 0.6), (0.05, 0.1)


def denoise(x, sigma):
    """E[x_0 | x_σ] for a 1-D two-Gaussian mixture per coordinate (k-diffusion's model interface)."""
    s2 = sigma.to(torch.float64).view(-1, *([1] * (x.dim() - 1))) ** 2
    w, mu, var = (torch.tensor(v, dtype=torch.float64) for v in (W, MU, VAR))
    v = var + s2.unsqueeze(-1)
    logp = w.log() - 0.5 * (x.unsqueeze(-1) - mu) ** 2 / v - 0.5 * v.log()
    resp = torch.softmax(logp, -1)
    return (resp * (var * x.unsqueeze(-1) + s2.unsqueeze(-1) * mu) / v).sum(-1)


def sigma_of_t(t):
    """The inverse of ``Schedule.sigma_to_t``: log σ interpolated linearly between training steps."""
    log_sigmas = SCHEDULE.sigmas.log()
    t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def eps_model(x, t):
    """gradguide's side: the ε of the same denoiser, at the variance-preserving x = x_σ/√(1+σ²)."""
    sigma = sigma_of_t(t).view(-1, *([1] * (x.dim() - 1)))
    x_sigma = x * (1 + sigma ** 2).sqrt()
    return (x_sigma - denoise(x_sigma, sigma.view(-1))) / sigma


def kd_model(x, sigma):
    """k-diffusion's side, as its discrete-ε wrapper runs a model: ε at ``sigma_to_t(σ)`` (clamped to
    the training table, as k-diffusion's ``DiscreteSchedule`` does), ``D = x − σ ε``."""
    t = SCHEDULE.sigma_to_t(sigma.to(torch.float64))
    s = sigma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    return x - s * eps_model(x / (1 + s ** 2).sqrt(), t.reshape(-1))


def sigma_schedules(K):
    lo, hi = float(SCHEDULE.sigmas[0]), float(SCHEDULE.sigmas[-1])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # k-diffusion builds its σ's in the default dtype
    try:
        table = SCHEDULE.sigmas.flip(0)[torch.tensor([0, 150, 400, 650, 820, 930, 985, 999])]
        return {"karras": K.get_sigmas_karras(8, lo, hi), "exponential": K.get_sigmas_exponential(8, lo, hi),
                "polyexponential": K.get_sigmas_polyexponential(8, lo, hi, rho=2.0),
                "vp": K.get_sigmas_vp(8), "table": torch.cat([table, table.new_zeros(1)])}
    finally:
        torch.set_default_dtype(before)


# (gradguide sampler, its options, k-diffusion function, its keywords)
CASES = [
    ("euler", {}, "sample_euler", {}),
    ("euler_a", {}, "sample_euler_ancestral", {}),
    ("euler_a", {"eta": 0.5, "s_noise": 0.8}, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("heun", {}, "sample_heun", {}),
    ("lms", {}, "sample_lms", {}),
    ("dpmpp-2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp-2m-sde", {}, "sample_dpmpp_2m_sde", {}),
    ("dpmpp-2m-sde", {"solver_type": "heun"}, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp-2m-sde", {"eta": 0.5, "s_noise": 0.7}, "sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.7}),
    ("dpmpp-2m-sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp-3m-sde", {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp-3m-sde", {"eta": 0.5, "s_noise": 0.8}, "sample_dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.8}),
    ("dpm_2", {}, "sample_dpm_2", {}),
    ("dpm_2_ancestral", {}, "sample_dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 0.6, "s_noise": 0.9}, "sample_dpm_2_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.6, "s_noise": 0.9}, "sample_dpmpp_2s_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpmpp_sde", {}, "sample_dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.6, "s_noise": 0.9, "r": 0.4}, "sample_dpmpp_sde", {"eta": 0.6, "s_noise": 0.9, "r": 0.4}),
]
# Karras et al.'s churn: k-diffusion draws it from torch's global generator at every step
CHURN_CASES = [
    ("euler", {"s_churn": 1.0}, "sample_euler"),
    ("euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.003}, "sample_euler"),
    ("heun", {"s_churn": 1.0}, "sample_heun"),
    ("heun", {"s_churn": 4.0, "s_tmin": 0.3, "s_tmax": 10.0, "s_noise": 0.9}, "sample_heun"),
    ("dpm_2", {"s_churn": 1.0}, "sample_dpm_2"),
    ("dpm_2", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.003}, "sample_dpm_2"),
]


def _id(case):
    return case[2] + "".join(f"-{k}={v}" for k, v in case[3].items())


def nested_draws(gen):
    """What gradguide's dpmpp_sde does with its generator's draws: the second noise of a step (over
    [σ_{i+1}, σ_i]) is correlated with the first (over [σ_s, σ_i]) as one Brownian path's increments,
    ρ z_1 + √(1 − ρ²) ξ, ρ² = (σ_i − σ_s)/(σ_i − σ_{i+1})."""
    first = {}

    def sampler(sigma, sigma_next):
        xi = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        if first and float(first["sigma"]) == float(sigma):
            rho = float((sigma - first["next"]) / (sigma - sigma_next)) ** 0.5
            z = rho * first.pop("z") + (1 - rho * rho) ** 0.5 * xi
            first.clear()
            return z
        first.update(sigma=sigma, next=sigma_next, z=xi)
        return xi
    return sampler


def run_both(K, case, sigmas):
    name, options, fn, kwargs = case
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedule = gg.Schedule.linear(1000)
    got = gg.sample(eps_model, SHAPE, schedule=schedule, sampler=gg.Sampler(name, sigmas=sigmas, **options), x_T=z,
                    generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)   # the draws gradguide made, in its order
    kw = dict(kwargs)
    if "noise_sampler" in inspect.signature(getattr(K, fn)).parameters:
        kw["noise_sampler"] = nested_draws(gen) if name == "dpmpp_sde" else \
            (lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen, dtype=torch.float64))
    ref = getattr(K, fn)(kd_model, z * sigmas[0], sigmas, disable=True, **kw)
    return got, ref


@pytest.mark.parametrize("kind", ["karras", "exponential", "polyexponential", "vp", "table"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_kdiffusion(case, kind):
    K = load_kdiffusion_sampling()
    sigmas = sigma_schedules(K)[kind]
    got, ref = run_both(K, case, sigmas)
    err = (got - ref).abs().max().item()
    assert 0.05 < ref.abs().max().item() < 50
    assert err <= TOL, f"max difference {err:.3g}"


def test_sigma_helpers_match_kdiffusion():
    K = load_kdiffusion_sampling()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pairs = [(gg.sigmas_karras(9, 0.03, 14.6, rho=5.0), K.get_sigmas_karras(9, 0.03, 14.6, rho=5.0)),
                 (gg.sigmas_exponential(9, 0.03, 14.6), K.get_sigmas_exponential(9, 0.03, 14.6)),
                 (gg.sigmas_polyexponential(9, 0.03, 14.6, rho=2.5), K.get_sigmas_polyexponential(9, 0.03, 14.6, rho=2.5)),
                 (gg.sigmas_vp(9), K.get_sigmas_vp(9)),
                 (gg.sigmas_vp(6, beta_d=10.0, beta_min=0.5, eps_s=1e-2), K.get_sigmas_vp(6, 10.0, 0.5, 1e-2))]
    finally:
        torch.set_default_dtype(before)
    for ours, theirs in pairs:
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg.sigmas_polyexponential(9, 0.03, 14.6), gg.sigmas_exponential(9, 0.03, 14.6))
    with pytest.raises(ValueError, match="rho"):
        gg.sigmas_polyexponential(5, 0.1, 10.0, rho=0.0)
    with pytest.raises(ValueError, match="eps_s"):
        gg.sigmas_vp(5, eps_s=0.0)


def test_dpmpp_3m_sde_as_diffusers_computes_it_differs_from_kdiffusion():
    """diffusers 0.42's third-order SDE weight (kept only for from_diffusers) is not k-diffusion's."""
    K = load_kdiffusion_sampling()
    sigmas = sigma_schedules(K)["karras"]
    case = ("dpmpp-2m-sde", {"solver_order": 3, "solver_type": "heun", "lower_order_final": False,
                             "d2_weight": "diffusers"}, "sample_dpmpp_3m_sde", {})
    got, ref = run_both(K, case, sigmas)
    assert (got - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("seed", [42, [5, 6, 7]], ids=["one-path", "path-per-sample"])
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[7], CASES[11], CASES[15], CASES[17], CASES[18]], ids=_id)
def test_brownian_tree_noise_reproduces_a_kdiffusion_sde_sample(case, seed):
    """k-diffusion's SDE samplers default to Brownian-tree noise: the same tree (seed, σ range,
    shape) given to gradguide as its noise_sampler reproduces k-diffusion's sample."""
    from gradguide.samplers.noise import BrownianTreeNoiseSampler
    K = load_kdiffusion_sampling()
    name, options, fn, kwargs = case
    sigmas = sigma_schedules(K)["karras"]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    schedule = gg.Schedule.linear(1000)
    tree = BrownianTreeNoiseSampler(z, lo, hi, seed=seed)
    got = gg.sample(eps_model, SHAPE, schedule=schedule, sampler=gg.Sampler(name, sigmas=sigmas, noise_sampler=tree, **options),
                    x_T=z)
    ref = getattr(K, fn)(kd_model, z * sigmas[0], sigmas, disable=True,
                         noise_sampler=K.BrownianTreeNoiseSampler(z, lo, hi, seed=seed), **kwargs)
    assert (got - ref).abs().max().item() <= TOL
    # and it is the tree's noise that is used: another seed gives another sample
    other_tree = BrownianTreeNoiseSampler(z, lo, hi, seed=1234)
    other = gg.sample(eps_model, SHAPE, schedule=schedule,
                      sampler=gg.Sampler(name, sigmas=sigmas, noise_sampler=other_tree, **options), x_T=z)
    assert (other - ref).abs().max().item() > 1e-2


def test_noise_sampler_is_checked():
    schedule = gg.Schedule.linear(1000)
    with pytest.raises(TypeError, match="noise_sampler"):
        gg.sample(eps_model, SHAPE, schedule=schedule, sampler=gg.Sampler("euler_a", noise_sampler="brownian"), steps=4)
    with pytest.raises(ValueError, match="noise_sampler: expected a tensor of shape"):
        gg.sample(eps_model, SHAPE, schedule=schedule,
                  sampler=gg.Sampler("euler_a", noise_sampler=lambda s, sn: torch.zeros(2, 2)), steps=4)
    with pytest.raises(ValueError, match="draws no noise"):
        gg.sample(eps_model, SHAPE, schedule=schedule,
                  sampler=gg.Sampler("euler", noise_sampler=lambda s, sn: torch.zeros(SHAPE)), steps=4)


@pytest.mark.parametrize("kind", ["karras", "exponential", "vp"])
@pytest.mark.parametrize("case", CHURN_CASES, ids=[c[2] + "".join(f"-{k}={v}" for k, v in c[1].items()) for c in CHURN_CASES])
def test_churn_matches_kdiffusion(case, kind):
    """gradguide draws the churn noise of step i from its noise_sampler(σ_i, σ̂_i): given the draws
    k-diffusion makes with torch.randn_like (one per step, used or not), the samples agree."""
    K = load_kdiffusion_sampling()
    name, options, fn = case
    sigmas = sigma_schedules(K)[kind]
    n = len(sigmas) - 1
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(7)
        draws = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(n)]
        torch.manual_seed(7)
        ref = getattr(K, fn)(kd_model, z * sigmas[0], sigmas, disable=True, **options)
    finally:
        torch.set_rng_state(state)
    used = []

    def noise_sampler(sigma, sigma_hat):
        i = int((sigmas[:-1] - sigma).abs().argmin())
        assert abs(float(sigmas[i] - sigma)) <= 1e-9 * float(sigma) and sigma_hat > sigma
        used.append(i)
        return draws[i]
    schedule = gg.Schedule.linear(1000)
    got = gg.sample(eps_model, SHAPE, schedule=schedule,
                    sampler=gg.Sampler(name, sigmas=sigmas, noise_sampler=noise_sampler, **options), x_T=z)
    assert used and used == sorted(set(used))   # one draw per churned step, in order
    assert (got - ref).abs().max().item() <= TOL
    plain = gg.sample(eps_model, SHAPE, schedule=gg.Schedule.linear(1000), sampler=gg.Sampler(name, sigmas=sigmas),
                      x_T=z)
    assert (plain - ref).abs().max().item() > 1e-3   # the churn is really there


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8, 10, 12])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_dpm_fast_matches_kdiffusion(nfe, eta):
    """sample_dpm_fast(model, x, sigma_min, sigma_max, n) = sampler 'dpm_fast' with
    sigmas=[sigma_max, sigma_min] and nfe=n (k-diffusion run in float64: it builds its t grid in
    the default dtype)."""
    K = load_kdiffusion_sampling()
    lo, hi = 0.05, 60.0
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedule = gg.Schedule.linear(1000)
    options = {"nfe": nfe, "eta": eta, "s_noise": 0.9} if eta else {"nfe": nfe}
    got = gg.sample(eps_model, SHAPE, schedule=schedule, sampler=gg.Sampler("dpm_fast", sigmas=[hi, lo], **options), x_T=z,
                    generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # k-diffusion calls its noise sampler after every step, eta = 0 too (then with weight 0)
        ref = K.sample_dpm_fast(kd_model, z * hi, torch.tensor(lo), torch.tensor(hi), nfe, disable=True, eta=eta,
                                s_noise=0.9 if eta else 1.0,
                                noise_sampler=lambda s, sn: torch.randn(SHAPE, generator=gen, dtype=torch.float64)
                                if eta else torch.zeros(SHAPE, dtype=torch.float64))
    finally:
        torch.set_default_dtype(before)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("order,eta", [(3, 0.0), (2, 0.0), (3, 0.5)])
def test_dpm_adaptive_matches_kdiffusion(order, eta):
    """sample_dpm_adaptive: the same accepted and rejected steps, evaluations and output."""
    from gradguide.adaptive import sample_dpm_adaptive
    K = load_kdiffusion_sampling()
    lo, hi = 0.05, 60.0
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(order=order, rtol=0.02, atol=0.005, eta=eta, s_noise=0.9)
    got, info = sample_dpm_adaptive(eps_model, SHAPE, schedule=gg.Schedule.linear(1000), sigma_min=lo, sigma_max=hi,
                                    x_T=z, generator=torch.Generator().manual_seed(2), return_info=True, **kw)
    gen = torch.Generator().manual_seed(2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, ref_info = K.sample_dpm_adaptive(
            kd_model, z * hi, lo, hi, disable=True, return_info=True,
            noise_sampler=lambda s, sn: torch.randn(SHAPE, generator=gen, dtype=torch.float64) if eta else
            torch.zeros(SHAPE, dtype=torch.float64), **kw)
    finally:
        torch.set_default_dtype(before)
    assert info == ref_info and info["n_accept"] > 3
    assert (got - ref).abs().max().item() <= TOL
