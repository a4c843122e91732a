"""DDPM ancestral sampling (Ho et al. 2020; ADM's variants), as scalar tables.

Posterior mean ``μ = c1 x̂_0 + c2 x_t`` with ``c1 = β_t √ᾱ_{t−1}/(1−ᾱ_t)`` and
``c2 = √α_t (1−ᾱ_{t−1})/(1−ᾱ_t)``; on respaced steps ``β_t = 1 − ᾱ_t/ᾱ_{t−1}`` (ADM).
Variance: fixed-small ``β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t)``, fixed-large ``β_t``, or ADM's
learned range between ``log β̃_t`` (clipped at the last step as ADM does) and ``log β_t``.
Final-step noise (``final_noise``): ``"never"`` (default) draws none on the step that lands on
clean data (ᾱ_{t−1} = 1); ``"t>0"`` is diffusers' ``DDPMScheduler`` rule (and ADM's
``nonzero_mask``): noise whenever the model's timestep is > 0, so with trailing spacing or
``steps_offset=1`` the last step adds noise too, with diffusers' variances there (β̃ clamped
at 1e-20, β for fixed-large, ``log 1e-20``..``log β`` for learned-range).
``var_mean`` is the Σ_t of ADM's ``condition_mean``.
"""
from __future__ import annotations

import torch

from ..predictions import LEARNED_VARIANCES, VARIANCES, learned_range_line
from . import SamplerTables, common_tables


FINAL_NOISE = ("never", "t>0")


def tables(ts, variance: str = "fixed-small", final_noise: str = "never", **options) -> SamplerTables:
    if options:
        raise ValueError(f"sampler 'ddpm': unknown options {sorted(options)} (DDPM takes variance, final_noise)")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if final_noise not in FINAL_NOISE:
        raise ValueError(f"final_noise: expected one of {FINAL_NOISE}, got {final_noise!r}")
    if final_noise == "t>0":
        return _diffusers_tables(ts, variance)
    abar, abar_prev = ts.abar, ts.abar_prev
    alpha = abar / abar_prev
    beta = 1 - alpha
    c1 = beta * abar_prev.sqrt() / (1 - abar)
    c2 = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    # ADM clips β̃ at t = 0 (where it is 0) to its value one step earlier
    beta_tilde_clipped = beta_tilde.clone()
    last = abar_prev == 1.0
    if len(ts) > 1:
        beta_tilde_clipped[last] = beta_tilde[-2]
    else:
        beta_tilde_clipped[last] = beta[last]
    t = common_tables(ts)
    t.update(c_x=c2, c_0=c1)
    if variance == "fixed-small":
        t.update(sigma=beta_tilde.sqrt(), var_mean=beta_tilde)
    elif variance == "fixed-large":
        var = torch.where(last, beta_tilde_clipped, beta)
        t.update(sigma=torch.where(last, 0.0, var.sqrt()), var_mean=var)
    else:
        # σ multiplies exp(½ log Σ) ⊙ z elementwise; it only switches the noise off at the end
        slope, offset = learned_range_line(beta_tilde_clipped.log(), beta.log())
        t.update(sigma=torch.where(last, 0.0, 1.0).to(torch.float64), var_mean=torch.ones_like(beta),
                 log_var_slope=slope, log_var_offset=offset)
    sigma = t["sigma"]
    return SamplerTables("ddpm", ts, t, learned_variance=variance in LEARNED_VARIANCES,
                         draws_noise=(sigma > 0).tolist())


def _diffusers_tables(ts, variance: str) -> SamplerTables:
    """diffusers' ``DDPMScheduler.step``: noise iff t > 0, variance clamped at 1e-20."""
    abar, abar_prev = ts.abar, ts.abar_prev
    alpha = abar / abar_prev
    beta = 1 - alpha
    c1 = beta * abar_prev.sqrt() / (1 - abar)
    c2 = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    beta_tilde = (beta * (1 - abar_prev) / (1 - abar)).clamp_min(1e-20)
    noisy = (ts.t > 0).to(torch.float64)
    t = common_tables(ts)
    t.update(c_x=c2, c_0=c1)
    if variance == "fixed-small":
        t.update(sigma=noisy * beta_tilde.sqrt(), var_mean=beta_tilde)
    elif variance == "fixed-large":
        t.update(sigma=noisy * beta.sqrt(), var_mean=beta)
    else:
        slope, offset = learned_range_line(beta_tilde.log(), beta.log())
        t.update(sigma=noisy, var_mean=torch.ones_like(beta), log_var_slope=slope, log_var_offset=offset)
    return SamplerTables("ddpm", ts, t, learned_variance=variance in LEARNED_VARIANCES,
                         draws_noise=(t["sigma"] > 0).tolist())
