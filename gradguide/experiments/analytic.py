"""Models with exact scores, for tests and the demo (docs/mathematics.md#generative-optimisation, analytic scores).

- :class:`GaussianMixture` — isotropic Gaussian components; exact unconditional and
  class-conditional ε-predictions at every noise level, and the exact noisy classifier
  ``log p(y | x_t)``. Classifier guidance at scale 1 (or CFG at w = 1) must reproduce the
  class-conditional law.
- :class:`SubspaceGaussian` — ``x_0 = A u``, ``u ~ N(0, I_d)``, ``A`` orthonormal; with
  ``P = AAᵀ`` the exact score is ``−(1/h)(I − P)x_t − P x_t`` and ``x̂_0 = α P x_t``, so
  ``∇(gᵀx̂_0) = α P g ∈ span(A)`` (Theorem 1 of the gradient-guidance paper).

Both take ``model(x_t, t, **cond)`` with integer training timesteps ``t`` of a
:class:`~gradguide.Schedule` (or fractional ones, read as ``Schedule.sigma_to_t`` maps σ's
between them) and return ε-predictions.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..schedules import Schedule


def _abar(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():   # between training steps (σ-space samplers): log σ interpolated, as sigma_to_t
        log_sigmas = schedule.sigmas.log().to(device=like.device, dtype=like.dtype)
        t = t.to(device=like.device, dtype=like.dtype).clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low
        log_sigma = (1 - w) * log_sigmas.index_select(0, low) + w * log_sigmas.index_select(0, low + 1)
        return torch.sigmoid(-2 * log_sigma).reshape(-1, *([1] * (like.dim() - 1)))   # 1/(1+σ²)
    a = schedule.alphas_cumprod.to(device=like.device, dtype=like.dtype)
    return a.index_select(0, t.to(like.device)).reshape(-1, *([1] * (like.dim() - 1)))


class GaussianMixture:
    """A mixture of isotropic Gaussians ``Σ_k π_k N(m_k, v_k I)`` in D dimensions."""

    def __init__(self, schedule: Schedule, weights: Sequence[float], means, variances: Sequence[float]):
        self.schedule = schedule
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)
        if self.means.dim() != 2 or self.means.shape[0] != self.weights.numel() != self.variances.numel():
            raise ValueError("GaussianMixture: expected weights [K], means [K, D], variances [K]")
        if abs(float(self.weights.sum()) - 1) > 1e-9 or (self.weights <= 0).any() or (self.variances <= 0).any():
            raise ValueError("GaussianMixture: weights must be positive and sum to 1; variances positive")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def _noisy(self, x: torch.Tensor, t: torch.Tensor):
        """Per component: mean ``a m_k`` and variance ``a² v_k + 1 − ᾱ`` of ``x_t``."""
        abar = _abar(self.schedule, t, x)                     # [B, 1]
        a = abar.sqrt()
        means = a.unsqueeze(1) * self.means.to(x).unsqueeze(0)            # [B, K, D]
        var = abar * self.variances.to(x).unsqueeze(0) + (1 - abar)       # [B, K]
        return means, var, (1 - abar).sqrt()

    def log_joint(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log π_k + log N(x_t; a m_k, var_k I)``, ``[B, K]``."""
        means, var, _ = self._noisy(x, t)
        d = x.shape[1]
        sq = ((x.unsqueeze(1) - means) ** 2).sum(-1)
        return self.weights.to(x).log() - 0.5 * sq / var - 0.5 * d * torch.log(2 * torch.pi * var)

    def log_prob_class(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
        """The exact noisy classifier ``log p(y | x_t)``, ``[B]``."""
        return torch.log_softmax(self.log_joint(x, t), dim=1).gather(1, y.view(-1, 1)).squeeze(1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact ε-prediction: unconditional, or of class ``y`` (``[B]`` int) when given."""
        means, var, s = self._noisy(x, t)
        per_component = -(x.unsqueeze(1) - means) / var.unsqueeze(-1)    # component scores [B, K, D]
        if y is None:
            resp = torch.softmax(self.log_joint(x, t), dim=1)
            score = (resp.unsqueeze(-1) * per_component).sum(1)
        else:
            score = per_component.gather(1, y.view(-1, 1, 1).expand(-1, 1, x.shape[1])).squeeze(1)
        return -s * score

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of clean samples (t = 0 of the data law)."""
        var = self.variances.to(x)
        sq = ((x.unsqueeze(1) - self.means.to(x).unsqueeze(0)) ** 2).sum(-1)
        log_joint = self.weights.to(x).log() - 0.5 * sq / var - 0.5 * x.shape[1] * var.log()
        return log_joint.argmax(1)

    def sample_data(self, n: int, y: Optional[int] = None, generator=None) -> torch.Tensor:
        """Exact draws from the mixture (or from component ``y``)."""
        return _mixture_draws(self, n, y, generator)


class SubspaceGaussian:
    """``x_0 = A u`` with ``A`` ``[D, d]`` orthonormal and ``u ~ N(0, I_d)``; exact ε-prediction."""

    def __init__(self, schedule: Schedule, basis: torch.Tensor):
        if basis.dim() != 2 or basis.shape[0] < basis.shape[1]:
            raise ValueError(f"SubspaceGaussian: basis: expected [D, d] with D >= d, got {tuple(basis.shape)}")
        eye = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device)
        if not torch.allclose(basis.T @ basis, eye, atol=1e-5):
            raise ValueError("SubspaceGaussian: basis: columns must be orthonormal")
        self.schedule = schedule
        self.basis = basis

    @classmethod
    def random(cls, schedule: Schedule, D: int = 64, d: int = 16, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        return cls(schedule, q.to(dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        A = self.basis.to(x)
        return (x @ A) @ A.T

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        abar = _abar(self.schedule, t, x)
        h = 1 - abar
        px = self.project(x)
        score = -(x - px) / h - px
        return -h.sqrt() * score


# -- flow matching --------------------------------------------------------------------------

def _flow_sigma(t: torch.Tensor, like: torch.Tensor, timestep_scale: float) -> torch.Tensor:
    return (t.to(device=like.device, dtype=like.dtype) / timestep_scale).reshape(-1, *([1] * (like.dim() - 1)))


class FlowGaussianMixture:
    """``Σ_k π_k N(m_k, v_k I)`` under flow matching, ``x_σ = (1 − σ) x_0 + σ ε``, with the exact
    velocity ``u(x_σ) = E[ε − x_0 | x_σ]``.

    Given component k, ``x_σ ~ N((1−σ) m_k, c_k I)`` with ``c_k = (1−σ)² v_k + σ²``, and
    (x_0, ε, x_σ) are jointly Gaussian, so with ``r = x_σ − (1−σ) m_k``:
    ``E[x_0 | x_σ, k] = m_k + (1−σ) v_k r / c_k`` and ``E[ε | x_σ, k] = σ r / c_k``; the mixture's
    velocity weighs these by the posterior ``p(k | x_σ)``. ``model(x_σ, t, y=None)`` takes
    ``t = σ · timestep_scale`` (diffusers' convention: 1000) and returns the unconditional
    velocity, or component ``y``'s (``[B]`` int). For one component the probability-flow ODE
    ``dx/dσ = u`` is affine: ``x_{σ'} = (1−σ') m + √(c(σ')/c(σ)) (x_σ − (1−σ) m)``
    (:meth:`ode_map`), since ``u = (σ − (1−σ) v)/c · r − m`` and ``dc/dσ = 2(σ − (1−σ) v)``.
    """

    def __init__(self, weights: Sequence[float], means, variances, timestep_scale: float = 1000.0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)
        if self.means.dim() != 2 or self.means.shape[0] != self.weights.numel() != self.variances.numel():
            raise ValueError("FlowGaussianMixture: expected weights [K], means [K, D], variances [K]")
        if abs(float(self.weights.sum()) - 1) > 1e-9 or (self.weights <= 0).any() or (self.variances <= 0).any():
            raise ValueError("FlowGaussianMixture: weights must be positive and sum to 1; variances positive")
        self.timestep_scale = float(timestep_scale)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _components(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per component: ``r = x − (1−σ) m_k`` ``[B, K, D]`` and ``c_k`` ``[B, K]``."""
        m = self.means.to(x).unsqueeze(0)
        r = x.unsqueeze(1) - (1 - sigma).unsqueeze(1) * m
        c = (1 - sigma) ** 2 * self.variances.to(x).unsqueeze(0) + sigma ** 2
        return r, c

    def log_joint(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``log π_k + log N(x_σ; (1−σ) m_k, c_k I)``, ``[B, K]``."""
        r, c = self._components(x, sigma)
        d = x.shape[1]
        return self.weights.to(x).log() - 0.5 * (r ** 2).sum(-1) / c - 0.5 * d * torch.log(2 * torch.pi * c)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        r, c = self._components(x, sigma)
        v = self.variances.to(x).unsqueeze(0)
        x0 = self.means.to(x).unsqueeze(0) + ((1 - sigma) * v / c).unsqueeze(-1) * r
        eps = (sigma / c).unsqueeze(-1) * r
        u = eps - x0                                                          # [B, K, D]
        if y is not None:
            return u.gather(1, y.view(-1, 1, 1).expand(-1, 1, x.shape[1])).squeeze(1)
        resp = torch.softmax(self.log_joint(x, sigma), dim=1)
        return (resp.unsqueeze(-1) * u).sum(1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.velocity(x, _flow_sigma(t, x, self.timestep_scale), y)

    def log_prob_class(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
        """The exact noisy classifier ``log p(y | x_σ)``, ``[B]``."""
        lj = self.log_joint(x, _flow_sigma(t, x, self.timestep_scale))
        return torch.log_softmax(lj, dim=1).gather(1, y.view(-1, 1)).squeeze(1)

    def ode_map(self, x: torch.Tensor, sigma_from: float, sigma_to: float, k: int = 0) -> torch.Tensor:
        """The exact probability-flow ODE map of component ``k`` alone from σ to σ'."""
        m, v = self.means[k].to(x), float(self.variances[k])
        c = lambda s: (1 - s) ** 2 * v + s ** 2
        return (1 - sigma_to) * m + (c(sigma_to) / c(sigma_from)) ** 0.5 * (x - (1 - sigma_from) * m)

    def sample_data(self, n: int, y: Optional[int] = None, generator=None) -> torch.Tensor:
        """Exact draws from the mixture (or from component ``y``): the data law is the VP mixture's."""
        return _mixture_draws(self, n, y, generator)


class FlowSubspaceGaussian:
    """``x_0 = A u``, ``u ~ N(0, I_d)``, ``A`` ``[D, d]`` orthonormal, under flow matching: with
    ``P = AAᵀ``, ``E[x_0 | x_σ] = (1−σ)/((1−σ)² + σ²) P x_σ``, ``E[ε | x_σ] = (x_σ − (1−σ) E[x_0|x_σ])/σ``,
    and the velocity is their difference. ``∇(gᵀx̂_0) ∝ P g ∈ span(A)``: the look-ahead gradient
    stays in the subspace (Theorem 1 of the gradient-guidance paper, under flow matching)."""

    def __init__(self, basis: torch.Tensor, timestep_scale: float = 1000.0):
        if basis.dim() != 2 or basis.shape[0] < basis.shape[1]:
            raise ValueError(f"FlowSubspaceGaussian: basis: expected [D, d] with D >= d, got {tuple(basis.shape)}")
        self.basis = basis
        self.timestep_scale = float(timestep_scale)

    @classmethod
    def random(cls, D: int = 64, d: int = 16, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        return cls(q.to(dtype))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        sigma = _flow_sigma(t, x, self.timestep_scale)
        A = self.basis.to(x)
        x0 = (1 - sigma) / ((1 - sigma) ** 2 + sigma ** 2) * ((x @ A) @ A.T)
        eps = (x - (1 - sigma) * x0) / sigma
        return eps - x0


def _mixture_draws(mixture, n: int, y: Optional[int], generator) -> torch.Tensor:
    """``n`` exact draws of an isotropic Gaussian mixture (``weights``, ``means``, ``variances``,
    ``dim``), or of its component ``y``."""
    if y is None:
        ks = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    else:
        ks = torch.full((n,), y, dtype=torch.int64)
    z = torch.randn(n, mixture.dim, dtype=torch.float64, generator=generator)
    return mixture.means[ks] + mixture.variances[ks].sqrt().unsqueeze(1) * z
