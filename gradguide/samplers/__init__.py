"""Samplers as per-step scalar tables.

Every sampler step of SPEC.md §2 is linear in its terms. Written against the denoiser's
prediction ``D = x̂_0`` (with ``ε`` re-derived from it), each one is

    x_next = c_x · x + c_0 · D + c_h · D_{−1} + c_h2 · D_{−2} + c_l · x_carry + σ · z

where ``D_{−1}``, ``D_{−2}`` are the (guided) predictions of the previous model evaluations
(multistep solvers, Heun's second stage) and ``x_carry`` is one carried sample (Heun's
``x_i`` before its Euler half-step, UniPC's corrected sample); after the step the carried
sample becomes ``u_x x + u_0 D + u_h D_{−1} + u_h2 D_{−2} + u_l x_carry``. Absent coefficients
are zero. One *step* here is one model evaluation (Heun has 2n − 1 of them for n steps).

A sampler is therefore a set of scalar tables over the evaluations (:class:`SamplerTables`),
built on the host in float64 from a :class:`~gradguide.schedules.Timesteps`; the step itself
reads them from a device tensor. ``x`` is always the variance-preserving latent
``√ᾱ x_0 + √(1−ᾱ) ε`` the model is called on; σ-space (k-diffusion) samplers are the same
steps with ``σ = √((1−ᾱ)/ᾱ)`` (``x_σ = x / √ᾱ``), see :mod:`gradguide.samplers.ksigma`.
The ``(x̂_0, ε)`` form of a step, ``a_0 x̂_0 + a_e ε``, has ``a_e = c_x √(1−ᾱ_t)``;
CFG++ uses it to re-noise with a different ε.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from ..schedules import Timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde", "euler", "euler_a", "heun", "unipc")
# coefficients of the step output on the carried operands, and of the carried-sample update
HISTORY_COEFS = {"x0_prev": "c_h", "x0_prev2": "c_h2", "x_carry": "c_l"}
CARRY_COEFS = {"x0_prev": "u_h", "x0_prev2": "u_h2", "x_carry": "u_l"}


@dataclass
class SamplerTables:
    """Scalar tables (float64, one entry per model evaluation) describing a sampler.

    ``timesteps``: the evaluations (the model's timestep and ᾱ at each; for Heun the
    expanded list). ``history``: how many previous predictions the step reads (0, 1 or 2);
    ``carries_x``: whether it carries a sample (``u_*`` tables).
    """
    name: str
    timesteps: Timesteps
    tables: Dict[str, torch.Tensor]
    history: int = 0
    carries_x: bool = False
    learned_variance: bool = False
    # which steps draw noise; known on the host, so no step ever branches on a tensor
    draws_noise: list = field(default_factory=list)

    def __post_init__(self):
        n = len(self.timesteps)
        needed = [HISTORY_COEFS[k] for k in self.state_names()] + \
            ([CARRY_COEFS[k] for k in self.state_names()] + ["u_x", "u_0"] if self.carries_x else [])
        for key in needed:   # absent coefficients are zero
            self.tables.setdefault(key, torch.zeros(n, dtype=torch.float64))
        bad = [k for k, v in self.tables.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"sampler {self.name!r}: non-finite step coefficients ({', '.join(sorted(bad))}) on these "
                             "timesteps (e.g. σ = ∞ at ᾱ = 0, or a second-order step landing on σ = 0)")

    @property
    def multistep(self) -> bool:
        """Whether a step reads carried state (previous predictions or a carried sample)."""
        return self.history > 0 or self.carries_x

    def state_names(self):
        names = ["x0_prev", "x0_prev2"][:self.history]
        return names + (["x_carry"] if self.carries_x else [])

    def stacked(self, device, dtype):
        """All tables as one ``[n_tables, n_steps]`` tensor and the row of each name."""
        names = sorted(self.tables)
        rows = torch.stack([self.tables[k] for k in names]).to(device=device, dtype=dtype)
        return rows, {k: j for j, k in enumerate(names)}


def common_tables(ts: Timesteps) -> Dict[str, torch.Tensor]:
    # ᾱ = 0 (zero terminal SNR) enters the x̂_0 ↔ ε conversions as 1e-16: x̂_0 = √ᾱ x − √(1−ᾱ) v
    # is then exact to 1e-8 |x| and no coefficient divides by zero (ε models are refused there)
    abar = ts.abar.clamp_min(1e-16)
    return {"sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt()}


def build(name: str, ts: Timesteps, *, eta: float = 0.0, variance: str = "fixed-small", **options) -> SamplerTables:
    """The tables of sampler ``name`` on ``ts``. ``options`` are the sampler's own settings
    (e.g. DPM-Solver's ``solver_type``, DDPM's ``final_noise``); unknown ones raise."""
    from . import ddim, ddpm, dpmpp, ksigma, unipc
    if name == "ddpm":
        return ddpm.tables(ts, variance, **options)
    if name == "ddim":
        return ddim.tables(ts, eta, **options)
    if name == "dpmpp-2m":
        return dpmpp.tables(ts, **options)
    if name == "dpmpp-2m-sde":
        return dpmpp.tables(ts, sde=True, **options)
    if name in ("euler", "euler_a", "heun"):
        return ksigma.tables(name, ts, **options)
    if name == "unipc":
        return unipc.tables(ts, **options)
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {name!r}")
