"""Flow-matching (rectified-flow) σ schedules, as diffusers' flow schedulers build them.

A flow model sees ``x_σ = (1 − σ) x_0 + σ ε``; gradguide carries the variance-preserving state
``x_σ / √((1−σ)² + σ²)`` with ``ᾱ = (1−σ)²/((1−σ)² + σ²)``, so a :class:`FlowSchedule` is a
:class:`~gradguide.schedules.Schedule` whose ᾱ come from σ's, and every sampler and guidance
term applies (docs/flow.md). It lives apart from :mod:`gradguide.schedules` because it carries
the sampler configuration flow models are sampled with (:class:`gradguide.Sampler`).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch

from .config import Sampler
from .schedules import Schedule, Timesteps, _check_steps, _check_T, flow_abar

TIME_SHIFTS = ("exponential", "linear")
SIGMA_SPACINGS = ("linear", "karras", "exponential", "beta")


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The dynamic-shifting ``mu`` of the Flux / SD3 / Qwen-Image pipelines: linear in the image's
    token count, ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowSchedule(Schedule):
    """A flow-matching σ schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` (its
    ``set_timesteps``, value for value, float32 rounding included).

    ``x_σ = (1 − σ) x_0 + σ ε``; the model (prediction ``"flow"``) is called on ``x_σ`` at
    timestep ``σ · timestep_scale`` (default ``num_train_timesteps``: diffusers' timesteps;
    ``timestep_scale=1.0`` for models that take σ itself). Training σ's are
    ``(1..T)/T``; inference σ's ``linspace`` in timestep from the first to the last training σ,
    then shifted: ``shift σ/(1 + (shift − 1) σ)``, or with ``use_dynamic_shifting`` the
    resolution-dependent ``e^mu/(e^mu + (1/σ − 1))`` (``time_shift_type="linear"``:
    ``mu/(mu + (1/σ − 1))``; ``mu`` is required then: :func:`calculate_shift` or
    :meth:`mu_for`), then ``shift_terminal`` stretching and the optional ``sigma_spacing``
    (``"karras"``, ``"exponential"``, ``"beta"``) as diffusers' ``use_*_sigmas``. A final
    σ = 0 is appended. The state gradguide carries is ``x_σ/√((1−σ)² + σ²)`` (variance
    preserving, ``ᾱ = (1−σ)²/((1−σ)² + σ²)``), so every sampler and guidance term applies
    (docs/flow.md). ``stochastic_sampling``: the default sampler ``flow-euler`` re-noises
    (diffusers' option of that name).
    """
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, *, use_dynamic_shifting: bool = False,
                 mu: Optional[float] = None, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, shift_terminal: Optional[float] = None,
                 time_shift_type: str = "exponential", sigma_spacing: str = "linear",
                 timestep_scale: Optional[float] = None, stochastic_sampling: bool = False):
        _check_T(num_train_timesteps)
        for name, value in (("shift", shift), ("base_shift", base_shift), ("max_shift", max_shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if shift <= 0:
            raise ValueError(f"shift: expected a positive number, got {shift!r}")
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type: expected one of {TIME_SHIFTS}, got {time_shift_type!r}")
        if sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"sigma_spacing: expected one of {SIGMA_SPACINGS}, got {sigma_spacing!r}")
        if shift_terminal is not None and not (isinstance(shift_terminal, (int, float)) and 0 <= shift_terminal < 1):
            raise ValueError(f"shift_terminal: expected None or a number in [0, 1), got {shift_terminal!r}")
        if timestep_scale is not None and (isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float))
                                           or not 0 < timestep_scale < math.inf):
            raise ValueError(f"timestep_scale: expected None or a positive number, got {timestep_scale!r}")
        T = num_train_timesteps
        self.num_train_timesteps, self.shift = T, float(shift)
        self.use_dynamic_shifting, self.time_shift_type = bool(use_dynamic_shifting), time_shift_type
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.shift_terminal, self.sigma_spacing = shift_terminal, sigma_spacing
        self.timestep_scale = float(T if timestep_scale is None else timestep_scale)
        self.mu = None if mu is None else _check_mu(mu, time_shift_type)
        self.stochastic_sampling = bool(stochastic_sampling)
        # what a flow model is sampled with unless the call says otherwise: flow Euler on the velocity
        self.sampler_config = Sampler("flow-euler", prediction="flow",
                                      options={"stochastic": True} if stochastic_sampling else None)
        # the training σ's as diffusers computes them (float32), shifted unless the shift is dynamic
        train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()).to(torch.float32) / T
        if not use_dynamic_shifting:
            train = shift * train / (1 + (shift - 1) * train)
        self.train_sigmas = train.to(torch.float64)      # σ_max first, as diffusers' scheduler.sigmas
        self.sigma_max, self.sigma_min = train[0].item(), train[-1].item()
        super().__init__(flow_abar(self.train_sigmas.flip(0)))   # ᾱ for t = 0..T−1 (σ growing with t)
        self._cache: dict = {}

    def __repr__(self) -> str:
        shift = f"dynamic, mu={self.mu}" if self.use_dynamic_shifting else f"shift={self.shift}"
        return f"FlowSchedule(T={self.num_train_timesteps}, {shift}, timestep_scale={self.timestep_scale})"

    # -- mu -----------------------------------------------------------------------------------
    def mu_for(self, image_seq_len: int) -> float:
        """``mu`` for an image of ``image_seq_len`` tokens with this schedule's base/max shift and
        sequence lengths (what the Flux pipeline passes to ``set_timesteps``)."""
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                               self.max_shift)

    def with_mu(self, mu: float) -> "FlowSchedule":
        """A copy with ``mu`` set (dynamic shifting)."""
        if not self.use_dynamic_shifting:
            raise ValueError("mu: this schedule has no dynamic shifting (use_dynamic_shifting=False); it uses "
                             f"shift={self.shift}")
        out = copy.copy(self)
        out.mu, out._cache = _check_mu(mu, self.time_shift_type), {}
        return out

    # -- timesteps ----------------------------------------------------------------------------
    def timesteps(self, steps=None, spacing: str = "adm", steps_offset: int = 0) -> Timesteps:
        """The timesteps of ``steps`` inference steps (``None``: all T), as ``set_timesteps(steps,
        mu=self.mu)``; a 1-D sequence is diffusers' ``timesteps=`` (model timesteps in units of
        ``num_train_timesteps``; σ = t/T, then shifted). ``spacing`` must stay ``"adm"``."""
        if spacing != "adm" or steps_offset:
            raise ValueError(f"spacing: a FlowSchedule spaces σ itself (linear in t, then shifted); got "
                             f"spacing={spacing!r}, steps_offset={steps_offset!r}")
        if isinstance(steps, str):
            raise ValueError(f"steps: a FlowSchedule takes a step count or a list of timesteps, got {steps!r}")
        if steps is None:
            return self.flow_timesteps(self.num_train_timesteps)
        if isinstance(steps, (list, tuple, np.ndarray, torch.Tensor)):
            return self.flow_timesteps(timesteps=steps)
        return self.flow_timesteps(_check_steps(steps, 10 ** 9))

    def timesteps_from_sigmas(self, sigmas) -> Timesteps:
        """diffusers' ``set_timesteps(sigmas=...)``: the σ of each step (shifted like the
        schedule's own, then a final 0 appended)."""
        return self.flow_timesteps(sigmas=sigmas)

    def flow_timesteps(self, n: Optional[int] = None, *, sigmas=None, timesteps=None, mu=None) -> Timesteps:
        """``set_timesteps(n, sigmas=, mu=, timesteps=)`` of diffusers' FlowMatchEulerDiscreteScheduler
        as :class:`Timesteps` (``mu`` defaults to the schedule's)."""
        mu = self.mu if mu is None else _check_mu(mu, self.time_shift_type)
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu: this schedule uses dynamic shifting (use_dynamic_shifting=True), so mu is required, "
                             "as diffusers' set_timesteps requires it: schedule.with_mu(schedule.mu_for(image_seq_len)) "
                             "or gradguide.calculate_shift")
        key = None
        if sigmas is None and timesteps is None:
            key = (n, mu)
            if key in self._cache:
                return self._cache[key]
        sig, t = self._sigmas_and_timesteps(n, sigmas, timesteps, mu)
        out = self.make_timesteps(sig, t)
        if key is not None:
            self._cache[key] = out
        return out

    def make_timesteps(self, sigmas_with_final, t) -> Timesteps:
        """:class:`Timesteps` of flow σ's (``n + 1`` values, the last where sampling ends) and the
        ``n`` timesteps in units of ``num_train_timesteps`` (rescaled by ``timestep_scale``).
        Sampling starts from ``x_σ = x_T`` (as diffusers' flow pipelines do, whatever σ_0) and
        returns ``x_σ`` at the last σ."""
        sig = torch.as_tensor(sigmas_with_final, dtype=torch.float64)
        t = torch.as_tensor(t)
        if sig.dim() != 1 or sig.numel() != t.numel() + 1:
            raise ValueError(f"sigmas: expected {t.numel() + 1} σ's for {t.numel()} timesteps, got {sig.numel()}")
        if not torch.isfinite(sig).all() or (sig < 0).any() or (sig > 1).any() or (sig[:-1] <= 0).any() \
                or (sig[1:] >= sig[:-1]).any():
            raise ValueError("sigmas: expected flow σ's in (0, 1], strictly decreasing, the last (where sampling ends) "
                             f"in [0, 1); got {sig.tolist()}")
        if self.timestep_scale != self.num_train_timesteps:
            t = t.to(torch.float64) * (self.timestep_scale / self.num_train_timesteps)
        elif t.is_floating_point():
            t = t.to(torch.float64)
        abar = flow_abar(sig)
        radius = ((1 - sig) ** 2 + sig ** 2).sqrt()
        return Timesteps(t, abar[:-1], abar[1:], init_scale=float(1 / radius[0]), final_scale=float(radius[-1]))

    def _sigmas_and_timesteps(self, n, sigmas, timesteps, mu):
        """diffusers 0.42's FlowMatchEulerDiscreteScheduler.set_timesteps, operation for operation."""
        T = self.num_train_timesteps
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas, timesteps: expected the same length")
        if n is not None:
            if (sigmas is not None and len(sigmas) != n) or (timesteps is not None and len(timesteps) != n):
                raise ValueError("steps: sigmas/timesteps must have one entry per step")
            n = _check_steps(n, 10 ** 9)
        else:
            seq = sigmas if sigmas is not None else timesteps
            if seq is None:
                raise ValueError("steps: expected a step count, sigmas or timesteps")
            n = len(seq)
        user_t = timesteps is not None
        if user_t:
            timesteps = _as_array("timesteps", timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self.sigma_max * T, self.sigma_min * T, n)
            sigmas = timesteps / T
        else:
            sigmas = _as_array("sigmas", sigmas).astype(np.float32)
            if sigmas.size and sigmas[-1] == 0:
                raise ValueError("sigmas: the σ of each step, without a final 0 (it is appended, as diffusers does; a "
                                 "step at σ = 0 would be a zero-length step)")
        if sigmas.size == 0 or not np.all(np.isfinite(sigmas)) or (sigmas <= 0).any() or (sigmas > 1).any():
            raise ValueError("sigmas: expected finite σ's in (0, 1]")
        with np.errstate(divide="ignore"):
            if self.use_dynamic_shifting:
                e = math.exp(mu) if self.time_shift_type == "exponential" else mu
                sigmas = e / (e + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.shift_terminal:
            one_minus_z = 1 - sigmas
            sigmas = 1 - one_minus_z / (one_minus_z[-1] / (1 - self.shift_terminal))
        if self.sigma_spacing != "linear":
            sigmas = _respace(self.sigma_spacing, float(sigmas[0]), float(sigmas[-1]), n)
        sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        t = torch.from_numpy(timesteps).to(torch.float32) if user_t else sig * T
        return torch.cat([sig, sig.new_zeros(1)]), t


def _check_mu(mu, time_shift_type: str) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating)) or not math.isfinite(mu):
        raise ValueError(f"mu: expected a finite number, got {mu!r}")
    if time_shift_type == "linear" and mu <= 0:
        raise ValueError(f"mu: the linear time shift mu/(mu + 1/σ − 1) needs mu > 0, got {mu!r}")
    return float(mu)


def _as_array(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got {values!r}")
    return arr


def _respace(kind: str, sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """diffusers' ``_convert_to_karras`` / ``_convert_to_exponential`` / ``_convert_to_beta`` on
    flow σ's (between the shifted schedule's first and last σ)."""
    if kind == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    try:
        import scipy.stats
    except ImportError:   # pragma: no cover - scipy is a diffusers extra
        raise ValueError("sigma_spacing: 'beta' needs scipy (as diffusers' use_beta_sigmas does)") from None
    return np.array([sigma_min + ppf * (sigma_max - sigma_min)
                     for ppf in [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]])
