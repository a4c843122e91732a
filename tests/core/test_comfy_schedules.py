"""ComfyUI's schedulers by name (gradguide.comfy_sigmas), against each scheduler's formula
re-derived here in float64 numpy. ComfyUI computes in float32 from a float32 σ table, so values
computed by a formula agree to float32 rounding (rtol 2e-6); schedulers that pick entries of the
table must pick the same entries exactly."""
import math

import numpy as np
import pytest
import torch

import gradguide as gg

T = 1000


@pytest.fixture(scope="module")
def schedule():
    # Stable Diffusion's ("scaled linear") betas, ComfyUI's default discrete schedule
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    return gg.Schedule.from_betas(betas)


def _table(schedule):
    a = schedule.alphas_cumprod.numpy()
    return np.sqrt((1 - a) / a)


def _f32(values):
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def _interp_sigma(table, t):
    """σ at a fractional training step: linear in log σ between the neighbouring steps."""
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - lo
    return np.exp((1 - w) * np.log(table[lo]) + w * np.log(table[hi]))


@pytest.mark.parametrize("steps", [1, 7, 20, 33])
def test_normal_and_sgm_uniform(schedule, steps):
    table = _table(schedule)
    # the training steps nearest σ_max and σ_min are T − 1 and 0
    t = np.linspace(T - 1, 0, steps)
    np.testing.assert_allclose(gg.comfy_sigmas(schedule, "normal", steps).numpy(),
                               np.append(_interp_sigma(table, t), 0.0), rtol=2e-6, atol=0)
    t = np.linspace(T - 1, 0, steps + 1)[:-1]
    np.testing.assert_allclose(gg.comfy_sigmas(schedule, "sgm_uniform", steps).numpy(),
                               np.append(_interp_sigma(table, t), 0.0), rtol=2e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 7, 20, 33, 1000])
def test_simple_picks_every_T_over_n_th_sigma(schedule, steps):
    table = _table(schedule)
    picks = [T - 1 - (k * T) // steps for k in range(steps)]   # ⌊k T/n⌋ from the top, exactly
    got = gg.comfy_sigmas(schedule, "simple", steps).numpy()
    assert np.array_equal(got, np.append(_f32(table[picks]), 0.0))


@pytest.mark.parametrize("steps,expected_len", [(10, 11), (7, 9), (20, 21), (3, 4)])
def test_ddim_uniform(schedule, steps, expected_len):
    table = _table(schedule)
    stride = T // steps
    picks = list(range(1, T, stride))[::-1]
    got = gg.comfy_sigmas(schedule, "ddim_uniform", steps).numpy()
    assert len(got) == expected_len == len(picks) + 1   # ⌈(T − 1)/⌊T/n⌋⌉ steps, not always n
    assert np.array_equal(got, np.append(_f32(table[picks]), 0.0))


@pytest.mark.parametrize("steps,alpha,beta", [(20, 0.6, 0.6), (9, 0.5, 0.7), (50, 0.6, 0.6)])
def test_beta_scheduler_picks_beta_quantiles(schedule, steps, alpha, beta):
    """Training steps at the Beta(α, β) quantiles of 1 − k/n, rounded; the quantiles here by
    bisection on the regularised incomplete beta function (not scipy's ppf)."""
    from scipy.special import betainc
    table = _table(schedule)
    picks = []
    for k in range(steps):
        p = 1 - k / steps
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if betainc(alpha, beta, mid) < p else (lo, mid)
        t = int(np.rint(0.5 * (lo + hi) * (T - 1)))
        if not picks or picks[-1] != t:
            picks.append(t)
    got = gg.comfy_sigmas(schedule, "beta", steps, alpha=alpha, beta=beta).numpy()
    assert np.array_equal(got, np.append(_f32(table[picks]), 0.0))


@pytest.mark.parametrize("steps,threshold,linear", [(1, 0.025, None), (10, 0.025, None), (25, 0.025, None),
                                                    (30, 0.1, 8)])
def test_linear_quadratic(schedule, steps, threshold, linear):
    """s_k linear from 0 to the threshold over the first L steps, then the quadratic continuing it
    with the same value and slope at k = L that reaches 1 at k = n; σ = σ_max (1 − s)."""
    smax = float(np.float32(_table(schedule)[-1]))
    if steps == 1:
        s = np.array([0.0, 1.0])
    else:
        L = steps // 2 if linear is None else linear
        # q(k) = A (k − L)² + B (k − L) + θ with B = θ/L (slope continuity) and q(n) = 1
        B = threshold / L
        A = (1 - threshold - B * (steps - L)) / (steps - L) ** 2
        k = np.arange(steps + 1, dtype=np.float64)
        s = np.where(k < L, k * threshold / L, A * (k - L) ** 2 + B * (k - L) + threshold)
        s[-1] = 1.0
    options = {} if linear is None else {"linear_steps": linear}
    got = gg.comfy_sigmas(schedule, "linear_quadratic", steps, threshold_noise=threshold, **options).numpy()
    np.testing.assert_allclose(got, smax * (1 - s), rtol=2e-6, atol=2e-6 * smax)


@pytest.mark.parametrize("steps", [2, 9, 30])
def test_kl_optimal_karras_exponential(schedule, steps):
    table = _f32(_table(schedule))
    smin, smax = table[0], table[-1]
    u = np.arange(steps) / (steps - 1)
    kl = np.tan((1 - u) * math.atan(smax) + u * math.atan(smin))
    np.testing.assert_allclose(gg.comfy_sigmas(schedule, "kl_optimal", steps).numpy(), np.append(kl, 0.0),
                               rtol=2e-6, atol=0)
    karras = (smax ** (1 / 7) + u * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(gg.comfy_sigmas(schedule, "karras", steps).numpy(), np.append(karras, 0.0),
                               rtol=4e-6, atol=0)
    expo = np.exp(np.log(smax) + u * (np.log(smin) - np.log(smax)))
    np.testing.assert_allclose(gg.comfy_sigmas(schedule, "exponential", steps).numpy(), np.append(expo, 0.0),
                               rtol=2e-6, atol=0)


def test_values_are_float32_values(schedule):
    for name in ("normal", "karras", "kl_optimal", "linear_quadratic"):
        got = gg.comfy_sigmas(schedule, name, 12)
        assert got.dtype == torch.float64 and torch.equal(got, got.to(torch.float32).to(torch.float64))


def test_errors(schedule):
    with pytest.raises(ValueError, match="scheduler: expected one of"):
        gg.comfy_sigmas(schedule, "cosine", 10)
    with pytest.raises(ValueError, match="steps"):
        gg.comfy_sigmas(schedule, "normal", 0)
    with pytest.raises(ValueError, match="steps: kl_optimal"):
        gg.comfy_sigmas(schedule, "kl_optimal", 1)
    with pytest.raises(TypeError, match="unknown options"):
        gg.comfy_sigmas(schedule, "normal", 10, alpha=0.5)
    with pytest.raises(ValueError, match="linear_steps"):
        gg.comfy_sigmas(schedule, "linear_quadratic", 10, linear_steps=10)
    with pytest.raises(ValueError, match="flow"):
        gg.comfy_sigmas(gg.FlowSchedule(), "simple", 10)
    with pytest.raises(TypeError, match="schedule"):
        gg.comfy_sigmas("sd15", "simple", 10)


def test_sigmas_drive_a_sampler(schedule):
    """The list is a σ list for any σ-space sampler (here Euler, 12 steps)."""
    sig = gg.comfy_sigmas(schedule, "normal", 12)
    sampler = gg.Sampler("euler", sigmas=sig)
    x = gg.sample(lambda x, t: torch.zeros_like(x), (2, 3), schedule=schedule, sampler=sampler,
                  x_T=torch.ones(2, 3, dtype=torch.float64))
    # ε = 0: x_σ stays σ_0 x_T through every Euler step of the σ ODE dx/dσ = ε
    assert torch.allclose(x, torch.full((2, 3), float(sig[0]), dtype=torch.float64), rtol=1e-6)


def test_comfy_schedule_calls_the_model_at_the_nearest_training_step(schedule):
    """ComfyUI's discrete models take the training step nearest σ in log σ (an integer); k-diffusion's
    and gradguide's default map interpolates a fractional one."""
    sig = gg.comfy_sigmas(schedule, "karras", 9)
    table = np.log(_table(schedule))
    nearest = [int(np.abs(table - np.log(s)).argmin()) for s in sig.numpy()[:-1]]
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)
    comfy = gg.comfy_schedule(schedule)
    gg.sample(model, (1, 2), schedule=comfy, sampler=gg.Sampler("euler", sigmas=sig))
    assert seen == nearest
    seen.clear()
    gg.sample(model, (1, 2), schedule=schedule, sampler=gg.Sampler("euler", sigmas=sig))
    assert any(t != round(t) for t in seen)      # the interpolated map: fractional timesteps
    with pytest.raises(ValueError, match="discrete"):
        gg.comfy_schedule(gg.FlowSchedule())


def test_comfy_percent_to_sigma(schedule):
    """σ at timestep (1 − p)·999, log σ interpolated between training steps."""
    table = _table(schedule)
    for p in (0.2, 0.5, 0.8, 0.0371):
        t = (1 - p) * 999.0
        lo = int(np.floor(t))
        w = t - lo
        want = math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[lo + 1]))
        assert gg.comfy_percent_to_sigma(schedule, p) == pytest.approx(want, rel=2e-6)
    assert gg.comfy_percent_to_sigma(schedule, 0.0) == 999999999.9 and gg.comfy_percent_to_sigma(schedule, 1.0) == 0.0
