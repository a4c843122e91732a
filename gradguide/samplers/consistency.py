"""The latent consistency model step (Luo et al. 2023; diffusers' ``LCMScheduler``) and TCD's
(Zheng et al. 2024; ``TCDScheduler``, :func:`tcd_tables`), as scalar tables.

A consistency model's prediction is ``D = c_out(t) x̂_0 + c_skip(t) x_t`` with the boundary
scalings of the discrete-time parametrisation, ``c_skip = σ_d²/((s t)² + σ_d²)`` and
``c_out = s t/√((s t)² + σ_d²)`` (``s`` = ``timestep_scaling``, ``σ_d`` = 0.5: ``c_skip → 1``,
``c_out → 0`` as ``t → 0``, so ``D(x_0, 0) = x_0``). Each step re-noises ``D`` to the next
timestep with fresh noise, ``x' = √ᾱ' D + √(1−ᾱ') z``; the last step returns ``D`` itself. So
``c_x = √ᾱ' c_skip``, ``c_0 = √ᾱ' c_out``, ``σ = √(1−ᾱ')`` (``ᾱ' = 1``, no noise, at the last step).
"""
from __future__ import annotations

import math

import torch

from . import SamplerTables, common_tables

SIGMA_DATA = 0.5   # the consistency parametrisation's data scale (fixed in diffusers' LCMScheduler too)


def tables(ts, timestep_scaling: float = 10.0, **options) -> SamplerTables:
    if options:
        raise ValueError(f"sampler 'lcm': unknown options {sorted(options)} (lcm takes timestep_scaling)")
    if isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, (int, float)) \
            or not math.isfinite(timestep_scaling) or timestep_scaling <= 0:
        raise ValueError(f"sampler 'lcm': timestep_scaling: expected a positive number, got {timestep_scaling!r}")
    scaled = ts.t.to(torch.float64) * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()
    abar_next = ts.abar_prev.clone()
    abar_next[-1] = 1.0   # the last step returns D (whatever ᾱ the timesteps end at)
    keep = abar_next.sqrt()
    sigma = (1 - abar_next).clamp_min(0).sqrt()
    t = common_tables(ts)
    t.update(c_x=keep * c_skip, c_0=keep * c_out, sigma=sigma, var_mean=sigma ** 2)
    return SamplerTables("lcm", ts, t, draws_noise=(sigma > 0).tolist())


# -- TCD ------------------------------------------------------------------------------------
TCD_ETA = 0.3   # diffusers' TCDScheduler.step default γ


def tcd_tables(ts, eta=None, **options) -> SamplerTables:
    """Trajectory consistency distillation's strategic stochastic step (Zheng et al. 2024;
    diffusers' ``TCDScheduler``), γ = ``eta`` (default 0.3, diffusers' ``step`` default).

    From timestep ``t`` to the next one ``t'`` (``0`` after the last), the step first lands on
    the training timestep ``s = ⌊(1 − γ) t'⌋`` with the consistency prediction
    ``D_s = √ᾱ_s x̂_0 + √(1−ᾱ_s) ε̂`` (``ε̂ = (x − √ᾱ_t x̂_0)/√(1−ᾱ_t)``), then, γ > 0 and not the
    last step, re-noises forwards to ``t'``: ``x' = √(ᾱ'/ᾱ_s) D_s + √(1 − ᾱ'/ᾱ_s) z``. The last
    step returns ``D_0`` (γ = 0: every step is ``D_{t'}``, deterministic). ``ᾱ_s`` comes from the
    schedule's table (``ts.alphas_cumprod``), as ``s`` is in general not a visited timestep.
    """
    if options:
        raise ValueError(f"sampler 'tcd': unknown options {sorted(options)} (tcd takes eta, its γ)")
    gamma = TCD_ETA if eta is None else eta
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"sampler.eta: TCD's γ must lie in [0, 1], got {gamma!r}")
    table = ts.alphas_cumprod
    if table is None or ts.t.is_floating_point():
        raise ValueError("sampler 'tcd': needs integer training timesteps and the schedule's ᾱ table (its step lands "
                         "on ⌊(1 − γ) t'⌋, between the visited timesteps); σ-space timesteps have neither")
    n = len(ts)
    t_next = torch.cat([ts.t[1:], ts.t.new_zeros(1)])
    # diffusers computes s = floor((1 − γ) t') on a long tensor: in torch's default float dtype
    s = torch.floor((1 - gamma) * t_next.to(torch.int64)).to(torch.int64)
    abar_s = table[s].to(torch.float64)
    abar_next = table[t_next].to(torch.float64)
    a, b = ts.abar.sqrt(), (1 - ts.abar).sqrt()
    a_s, b_s = abar_s.sqrt(), (1 - abar_s).clamp_min(0).sqrt()
    noisy = torch.tensor([gamma > 0 and i < n - 1 for i in range(n)])
    ratio = torch.where(noisy, abar_next / abar_s, torch.ones_like(abar_s))
    keep = ratio.sqrt()
    t = common_tables(ts)
    # x' = keep · (b_s/b x + (a_s − b_s a/b) x̂_0) + σ z
    t.update(c_x=keep * b_s / b, c_0=keep * (a_s - b_s * a / b), sigma=(1 - ratio).clamp_min(0).sqrt())
    t["var_mean"] = t["sigma"] ** 2
    return SamplerTables("tcd", ts, t, draws_noise=noisy.tolist())
