"""Samplers as per-step scalar tables.

Every sampler step of SPEC.md §2 is linear in its terms. Written against the denoiser's
prediction ``x̂_0`` (with ``ε`` re-derived from it), each one is

    x_{t−1} = c_x · x_t + c_0 · x̂_0 + c_h · x̂_0^{prev} + σ · z

(``c_h`` only for multistep solvers). A sampler is therefore a set of scalar tables over the
steps (:class:`SamplerTables`), built on the host in float64 from a
:class:`~gradguide.schedules.Timesteps`; the step itself reads them from a device tensor.
The ``(x̂_0, ε)`` form of the same step, ``a_0 x̂_0 + a_e ε``, has ``a_e = c_x √(1−ᾱ_t)``;
CFG++ uses it to re-noise with a different ε.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from ..schedules import Timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")


@dataclass
class SamplerTables:
    """Scalar tables (float64, one entry per step) describing a sampler on given timesteps."""
    name: str
    timesteps: Timesteps
    tables: Dict[str, torch.Tensor]
    multistep: bool = False
    learned_variance: bool = False
    # which steps draw noise; known on the host, so no step ever branches on a tensor
    draws_noise: list = field(default_factory=list)

    def stacked(self, device, dtype):
        """All tables as one ``[n_tables, n_steps]`` tensor and the row of each name."""
        names = sorted(self.tables)
        rows = torch.stack([self.tables[k] for k in names]).to(device=device, dtype=dtype)
        return rows, {k: j for j, k in enumerate(names)}


def common_tables(ts: Timesteps) -> Dict[str, torch.Tensor]:
    return {"sqrt_abar": ts.abar.sqrt(), "sqrt_1m_abar": (1 - ts.abar).sqrt()}


def build(name: str, ts: Timesteps, *, eta: float = 0.0, variance: str = "fixed-small") -> SamplerTables:
    from . import ddim, ddpm, dpmpp
    if name == "ddpm":
        return ddpm.tables(ts, variance)
    if name == "ddim":
        return ddim.tables(ts, eta)
    if name == "dpmpp-2m":
        return dpmpp.tables(ts)
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {name!r}")
