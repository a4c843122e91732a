"""Noise schedules (docs/mathematics.md#schedules) and the timesteps a sampler visits.

A :class:`Schedule` holds the training ``alphas_cumprod`` (``ᾱ_t`` for 0-based timesteps
``t = 0..T-1``, as in diffusers and ADM; the DDPM paper's ``ᾱ_{t+1}``). :meth:`Schedule.timesteps`
picks the steps a sampler visits and returns a :class:`Timesteps`: the kept timesteps in
sampling order and, for each, ``ᾱ`` there and ``ᾱ`` at the step it moves to. Every sampler
is written against a :class:`Timesteps`, so ADM respacing and diffusers' spacings are the
same code path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

SPACINGS = ("adm", "leading", "trailing", "linspace")


@dataclass(frozen=True)
class Timesteps:
    """The steps a sampler visits, in sampling order (noisiest first).

    ``t``: the timesteps passed to the model, ``[n]``: int64 training timesteps, or float64
    where a σ-space schedule falls between them (diffusers' Euler/Heun ``linspace`` or Karras
    timesteps, k-diffusion's ``sigma_to_t``).
    ``abar``: ``ᾱ`` at each step (float64 ``[n]``; for σ-space steps ``1/(1+σ²)``);
    ``abar_prev``: ``ᾱ`` at the step each one moves to (the next kept timestep; 1.0, i.e.
    clean data, after the last).
    ``init_scale``: the initial latent is ``init_scale · x_T`` (1 for variance-preserving
    samplers; a σ-space sampler starting from ``σ_max · z`` has ``σ_max √ᾱ_max``).
    ``final_scale``: the returned sample is ``final_scale · x`` (1, or ``1/√ᾱ`` to return
    the σ-space latent ``x_σ`` when the last σ is not 0, as diffusers and k-diffusion do).
    ``sigma_to_t``: ``σ -> t`` (float64 tensors) where the model may be called at σ's between
    the listed ones (``Schedule.sigma_to_t`` for σ-space timesteps; ``None`` otherwise).
    ``alphas_cumprod``: the schedule's ``ᾱ`` at every training timestep, for samplers whose step
    passes through a training timestep between the listed ones (TCD's ``floor((1 − γ) t_next)``);
    set for integer timesteps, ``None`` where the timesteps are σ's.
    """
    t: torch.Tensor
    abar: torch.Tensor
    abar_prev: torch.Tensor
    init_scale: float = 1.0
    final_scale: float = 1.0
    # σ -> model timestep, for samplers that call the model between the given σ's (k-diffusion's
    # churn, DPM-Solver-2's midpoint); set by Schedule.timesteps_from_sigmas
    sigma_to_t: Optional[Callable] = field(default=None, compare=False, repr=False)
    alphas_cumprod: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return int(self.t.shape[0])


class Schedule:
    """A discrete variance-preserving schedule, ``ᾱ_t`` for ``t = 0..T-1``.

    ``sampler_config``: the sampler configuration this schedule was learnt with (a
    :class:`gradguide.Sampler`, or ``None``: nothing learnt). :func:`gradguide.sample` fills
    what a call leaves unset from it (:func:`gradguide.from_diffusers` puts there the
    scheduler's sampler, prediction type, clipping, ...); a plain schedule has none, and you may
    set one, e.g. ``schedule.sampler_config = gradguide.Sampler("ddpm", final_noise="t>0")``.
    """
    sampler_config = None

    def __init__(self, alphas_cumprod):
        a = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64) if not isinstance(alphas_cumprod, torch.Tensor)
                            else alphas_cumprod.detach().cpu().to(torch.float64))
        if a.dim() != 1 or a.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D sequence of length >= 2, got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a[:-1] <= 0).any() or a[-1] < 0 or (a > 1).any():
            raise ValueError("alphas_cumprod: expected finite values in (0, 1] (ᾱ_T = 0, zero terminal SNR, is allowed "
                             "at the last timestep)")
        if (a[1:] > a[:-1]).any():
            raise ValueError("alphas_cumprod: expected a non-increasing sequence (noise grows with t)")
        self.alphas_cumprod = a

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "Schedule":
        """From a user's ``ᾱ`` (e.g. a diffusers scheduler's ``alphas_cumprod``)."""
        return cls(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas: expected values in (0, 1)")
        return cls(torch.cumprod(1.0 - b, 0))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """DDPM / ADM linear betas, scaled by 1000/T as ADM does (identical at T = 1000)."""
        _check_T(T)
        scale = 1000.0 / T
        if not 0 < scale * beta_start <= scale * beta_end < 1:
            smallest = math.floor(1000.0 * beta_end) + 1
            raise ValueError(f"T: Schedule.linear scales the betas by 1000/T (ADM), so T = {T} gives betas from "
                             f"{scale * beta_start:.4g} to {scale * beta_end:.4g}, outside (0, 1); use T >= {smallest} "
                             f"with beta_end = {beta_end}, or Schedule.from_betas for unscaled betas")
        return cls.from_betas(np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal's cosine schedule, betas clipped at ``max_beta``."""
        _check_T(T)
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
        return cls.from_betas(betas)

    def rescale_zero_terminal_snr(self) -> "Schedule":
        """The same schedule rescaled to zero terminal SNR (Lin et al. 2024, Alg. 1; diffusers'
        ``rescale_betas_zero_snr=True``): ``√ᾱ`` shifted and scaled so ``√ᾱ_0`` is kept and
        ``ᾱ_T = 0``. Only v- and x0-prediction models can be sampled from ᾱ_T = 0."""
        s = self.alphas_cumprod.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        return Schedule(s ** 2)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion's σ_t = √((1−ᾱ_t)/ᾱ_t) for t = 0..T−1 (float64; ∞ at zero terminal SNR)."""
        a = self.alphas_cumprod
        return ((1 - a) / a).sqrt()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Fractional timesteps of σ values (k-diffusion's ``DiscreteSchedule.sigma_to_t``,
        diffusers' ``_sigma_to_t``): linear interpolation of ``log σ`` between training steps."""
        log_sigmas = np.log(self.sigmas.numpy())
        sigma = np.asarray(sigma, dtype=np.float64)
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high = low + 1
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
        return torch.as_tensor((1 - w) * low + w * high, dtype=torch.float64).reshape(sigma.shape)

    def timesteps_from_sigmas(self, sigmas) -> Timesteps:
        """σ-space timesteps, k-diffusion style: a decreasing ``sigmas`` list (its last entry
        is where sampling ends, usually 0). The model is called at ``sigma_to_t(σ_i)`` on the
        variance-preserving ``x_σ/√(1+σ²)``; sampling starts from ``x_σ = σ_0 · x_T`` and
        returns ``x_σ`` at the last σ, as k-diffusion's samplers do."""
        sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64) if not isinstance(sigmas, torch.Tensor)
                              else sigmas.detach().cpu().to(torch.float64))
        if sig.dim() != 1 or sig.numel() < 2:
            raise ValueError(f"sigmas: expected a 1-D sequence of at least 2 σ values (the last is where sampling "
                             f"ends), got shape {tuple(sig.shape)}")
        if not torch.isfinite(sig).all() or (sig < 0).any() or (sig[:-1] <= 0).any() or (sig[1:] >= sig[:-1]).any():
            raise ValueError("sigmas: expected finite, strictly decreasing values, positive except possibly the last")
        abar_all = 1 / (1 + sig ** 2)
        t = self.sigma_to_t(sig[:-1].numpy())
        if torch.equal(t, t.round()):
            t = t.to(torch.int64)
        return Timesteps(t, abar_all[:-1], abar_all[1:], init_scale=float(sig[0] * abar_all[0].sqrt()),
                         sigma_to_t=self.sigma_to_t,
                         final_scale=float(1 / abar_all[-1].sqrt()))

    # -- properties ----------------------------------------------------------------------
    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def betas(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return 1.0 - a / torch.cat([a.new_ones(1), a[:-1]])

    def __repr__(self) -> str:
        return f"Schedule(T={self.T}, abar[0]={self.alphas_cumprod[0]:.6g}, abar[-1]={self.alphas_cumprod[-1]:.6g})"

    # -- timesteps -----------------------------------------------------------------------
    def timesteps(self, steps: Optional[Union[int, str, Sequence[int]]] = None, spacing: str = "adm",
                  steps_offset: int = 0) -> Timesteps:
        """The timesteps a sampler visits.

        ``steps``: ``None`` (all T), a count, an ADM section string (``"10,15,20"`` or
        ``"ddim50"``), or an explicit list of timesteps.
        ``spacing``: ``"adm"`` (ADM's ``space_timesteps``; the default), or diffusers'
        ``"leading"``, ``"trailing"``, ``"linspace"``. Each step moves to the next kept
        timestep (ADM respacing: ``β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}}``), the last one to ``ᾱ = 1``.
        """
        T = self.T
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
        if steps is None:
            kept = list(range(T))
        elif isinstance(steps, (torch.Tensor, np.ndarray)) and steps.ndim == 0:
            raise TypeError(f"steps: expected a count (int), a section string or a 1-D sequence of timesteps, "
                            f"got a 0-d {type(steps).__name__}; pass int(steps) for a count")
        elif isinstance(steps, (list, tuple, np.ndarray, torch.Tensor)):
            kept = sorted({_timestep(s) for s in (steps.tolist() if hasattr(steps, "tolist") else steps)})
            if not kept or kept[0] < 0 or kept[-1] >= T:
                raise ValueError(f"steps: explicit timesteps must lie in [0, {T - 1}]")
        elif isinstance(steps, str):
            if spacing != "adm":
                raise ValueError("steps: section strings are ADM respacing; use spacing='adm'")
            kept = space_timesteps(T, steps)
        else:
            n = _check_steps(steps, T)
            kept = _spaced(T, n, spacing, steps_offset)
        kept_t = torch.tensor(sorted(kept, reverse=True), dtype=torch.int64)
        abar = self.alphas_cumprod[kept_t]
        abar_prev = torch.cat([abar[1:], abar.new_ones(1)])
        return Timesteps(kept_t, abar, abar_prev, sigma_to_t=self.sigma_to_t, alphas_cumprod=self.alphas_cumprod)


def _timestep(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"steps: explicit timesteps must be integers, got {value!r}")
    return int(value)


def _check_T(T) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"T: expected an integer >= 2, got {T!r}")


def _check_steps(steps, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if steps > T:
        raise ValueError(f"steps: {steps} is more than the schedule's T = {T}")
    return int(steps)


def _spaced(T: int, n: int, spacing: str, steps_offset: int = 0):
    if spacing == "adm":
        return space_timesteps(T, str(n))
    if spacing == "linspace":  # diffusers: np.linspace(0, T-1, n).round()
        return np.linspace(0, T - 1, n).round().astype(np.int64).tolist()
    if spacing == "leading":  # diffusers: arange(n) * (T // n) + steps_offset
        return ((np.arange(0, n) * (T // n)).round().astype(np.int64) + steps_offset).tolist()
    # trailing: diffusers: round(arange(T, 0, -T/n)) - 1
    return (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1).tolist()


def space_timesteps(T: int, section_counts: str):
    """ADM's ``space_timesteps``: split [0, T) into equal sections and take evenly strided
    steps from each (``"10,15,20"``), or ``"ddimN"`` for DDIM's fixed stride."""
    if section_counts.startswith("ddim"):
        count = section_counts[len("ddim"):]
        if not count.isdigit():
            raise ValueError(f"steps: expected 'ddimN' with N a positive integer, got {section_counts!r}")
        n = _check_steps(int(count), T)
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"steps: cannot create exactly {n} DDIM steps with an integer stride from T = {T}")
    try:
        counts = [int(c) for c in section_counts.split(",")]
    except ValueError:
        raise ValueError(f"steps: expected a count, 'ddimN' or comma-separated counts, got {section_counts!r}") from None
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"steps: cannot take {count} steps from a section of {size} (T = {T})")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * frac_stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, append_zero: bool = True) -> torch.Tensor:
    """Karras et al. (2022) σ's: ``(σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, then 0
    (k-diffusion's ``get_sigmas_karras``; float64)."""
    n = _check_n_sigmas(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float, append_zero: bool = True) -> torch.Tensor:
    """σ's evenly spaced in log σ from σ_max to σ_min, then 0 (k-diffusion's ``get_sigmas_exponential``)."""
    n = _check_n_sigmas(n, sigma_min, sigma_max)
    sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                           append_zero: bool = True) -> torch.Tensor:
    """σ's whose log is a polynomial ramp: ``log σ_i = log σ_min + (1 − i/(n−1))^ρ (log σ_max − log σ_min)``,
    then 0 (k-diffusion's ``get_sigmas_polyexponential``; ρ = 1 is :func:`sigmas_exponential`; float64)."""
    n = _check_n_sigmas(n, sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
        raise ValueError(f"rho: expected a finite number > 0, got {rho!r}")
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sig = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


def sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3,
              append_zero: bool = True) -> torch.Tensor:
    """σ's of the continuous VP SDE (Song et al. 2021) at ``t`` evenly spaced from 1 to ``eps_s``:
    ``σ(t) = √(exp(β_d t²/2 + β_min t) − 1)``, then 0 (k-diffusion's ``get_sigmas_vp``; float64)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    for key, value in (("beta_d", beta_d), ("beta_min", beta_min), ("eps_s", eps_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
    if not 0 < eps_s < 1 or beta_min < 0 or beta_d <= 0:
        raise ValueError(f"sigmas_vp: expected beta_d > 0, beta_min >= 0 and 0 < eps_s < 1, got beta_d={beta_d!r}, "
                         f"beta_min={beta_min!r}, eps_s={eps_s!r}")
    t = torch.linspace(1, eps_s, int(n), dtype=torch.float64)
    sig = torch.expm1(beta_d * t ** 2 / 2 + beta_min * t).sqrt()
    return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


def _check_n_sigmas(n, sigma_min, sigma_max) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, {sigma_max!r}")
    return int(n)


# -- flow matching: σ ↔ ᾱ of the variance-preserving state (schedules in gradguide.flow_schedules) --

def flow_abar(sigma) -> torch.Tensor:
    """ᾱ of the variance-preserving state equivalent to flow σ: ``(1−σ)²/((1−σ)² + σ²)`` (float64)."""
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    return (1 - sig) ** 2 / ((1 - sig) ** 2 + sig ** 2)


def flow_sigma(abar) -> torch.Tensor:
    """Flow σ of a variance-preserving ᾱ: ``√(1−ᾱ)/(√ᾱ + √(1−ᾱ))`` (inverse of :func:`flow_abar`)."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return s / (a + s)
