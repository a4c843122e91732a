"""The latent consistency model step (Luo et al. 2023; diffusers' ``LCMScheduler``), as scalar tables.

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
