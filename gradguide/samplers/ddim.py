"""DDIM(η) (Song et al. 2021, eq. 12), as scalar tables.

``σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})`` and
``x_{t−1} = √ᾱ_{t−1} x̂_0 + d ε̂ + σ_t z`` with ``d = √(1−ᾱ_{t−1}−σ_t²)``. Substituting
``ε̂ = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t)`` gives ``c_x = d/√(1−ᾱ_t)``, ``c_0 = √ᾱ_{t−1} − c_x √ᾱ_t``.
At η = 1 with respaced betas this is DDPM's fixed-small step exactly.
"""
from __future__ import annotations

import math

from . import SamplerTables, common_tables


def tables(ts, eta=None, **options) -> SamplerTables:
    if options:
        raise ValueError(f"sampler 'ddim': unknown options {sorted(options)} (DDIM takes only eta)")
    eta = 0.0 if eta is None else eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
    abar, abar_prev = ts.abar, ts.abar_prev
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    d = (1 - abar_prev - sigma ** 2).clamp_min(0).sqrt()
    c_x = d / (1 - abar).sqrt()
    c_0 = abar_prev.sqrt() - c_x * abar.sqrt()
    t = common_tables(ts)
    t.update(c_x=c_x, c_0=c_0, sigma=sigma, var_mean=sigma ** 2)
    return SamplerTables("ddim", ts, t, draws_noise=(sigma > 0).tolist())
