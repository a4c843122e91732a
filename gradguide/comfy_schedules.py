"""ComfyUI's schedulers by name: the σ list its ``KSampler`` builds for a discrete schedule.

ComfyUI keeps a discrete model's training σ's (``σ_t = √((1−ᾱ_t)/ᾱ_t)``, t = 0..T−1) as a float32
table, and its schedulers work from that table in float32: :func:`comfy_sigmas` does the same
from a :class:`~gradguide.schedules.Schedule`'s ᾱ, so the values are ComfyUI's float32 values
exactly (returned as float64). Pass the result as ``sigmas=`` to a sampler (docs/samplers.md,
"ComfyUI"). The schedulers:

- ``normal``: timesteps evenly spaced from the training step nearest σ_max to the one nearest
  σ_min (``steps`` of them), σ by linear interpolation of ``log σ`` between training steps, then 0.
- ``sgm_uniform``: the same with ``steps + 1`` points, the last dropped, then 0.
- ``simple``: every ``T/steps``-th training σ from the top, ``σ[−(1 + ⌊k T/steps⌋)]``, then 0.
- ``ddim_uniform``: training σ's ``1, 1 + s, 1 + 2s, ...`` with stride ``s = ⌊T/steps⌋``, reversed,
  then 0 (it may return one step more or fewer than asked, as ComfyUI's does).
- ``beta``: training steps at the Beta(α, β) quantiles ``rint(F⁻¹(1 − k/steps) (T − 1))`` (Lee et
  al. 2024), repeated ones dropped, then 0 (needs scipy).
- ``linear_quadratic``: Mochi's schedule, ``σ_max (1 − s_k)``: ``s`` linear up to
  ``threshold_noise`` over the first ``linear_steps`` (default ``steps // 2``), quadratic after, 0 at the end.
- ``kl_optimal``: ``tan((1 − k/(n−1)) atan σ_max + k/(n−1) atan σ_min)``, then 0.
- ``karras``, ``exponential``: :func:`~gradguide.schedules.sigmas_karras` /
  :func:`~gradguide.schedules.sigmas_exponential` between the table's σ_min and σ_max, in float32.

ComfyUI calls a discrete model at the training step *nearest* each σ (an integer), where
k-diffusion and gradguide interpolate a fractional timestep: :func:`comfy_schedule` gives the
schedule with ComfyUI's rule.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import Schedule

COMFY_SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                    "linear_quadratic", "kl_optimal")
_OPTIONS = {"beta": ("alpha", "beta"), "linear_quadratic": ("threshold_noise", "linear_steps")}


def comfy_sigmas(schedule: Schedule, scheduler: str, steps: int, **options) -> torch.Tensor:
    """ComfyUI's ``calculate_sigmas(model_sampling, scheduler, steps)`` for ``schedule`` (a discrete
    ε/v schedule). ``options``: ``beta``'s ``alpha``, ``beta`` (0.6, 0.6) and
    ``linear_quadratic``'s ``threshold_noise`` (0.025), ``linear_steps`` (``steps // 2``), as
    ComfyUI's functions take them. Returns float64 holding ComfyUI's float32 values."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a gradguide.Schedule, got {type(schedule).__name__}")
    config = schedule.sampler_config
    if config is not None and getattr(config, "prediction", None) == "flow":   # a FlowSchedule
        raise ValueError("schedule: ComfyUI's schedulers for flow models use its flow model sampling (σ from shifted "
                         "timesteps), which comfy_sigmas does not reproduce; it takes discrete ε/v schedules")
    if scheduler not in COMFY_SCHEDULERS:
        raise ValueError(f"scheduler: expected one of {COMFY_SCHEDULERS}, got {scheduler!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    unknown = sorted(set(options) - set(_OPTIONS.get(scheduler, ())))
    if unknown:
        raise TypeError(f"comfy_sigmas: unknown options {unknown} for scheduler {scheduler!r} "
                        f"(it takes {', '.join(_OPTIONS.get(scheduler, ())) or 'none'})")
    if schedule.zero_terminal_snr:
        raise ValueError("schedule: σ = ∞ at ᾱ_T = 0 (zero terminal SNR); ComfyUI's σ table needs a finite σ_max")
    steps = int(steps)
    sig64 = schedule.sigmas
    table = sig64.to(torch.float32)              # ComfyUI's σ buffer
    log_table = sig64.log().to(torch.float32)    # and its log σ buffer (the log taken before the cast)
    smin, smax = float(table[0]), float(table[-1])
    if scheduler == "karras":
        out = _karras32(steps, smin, smax)
    elif scheduler == "exponential":
        out = torch.linspace(math.log(smax), math.log(smin), steps, dtype=torch.float32).exp()
        out = torch.cat([out, out.new_zeros(1)])
    elif scheduler in ("normal", "sgm_uniform"):
        out = _normal(table, log_table, steps, sgm=scheduler == "sgm_uniform")
    elif scheduler == "simple":
        stride = len(table) / steps
        out = torch.tensor([float(table[-(1 + int(k * stride))]) for k in range(steps)] + [0.0], dtype=torch.float32)
    elif scheduler == "ddim_uniform":
        out = _ddim_uniform(table, steps)
    elif scheduler == "beta":
        out = _beta(table, steps, options.get("alpha", 0.6), options.get("beta", 0.6))
    elif scheduler == "linear_quadratic":
        out = _linear_quadratic(steps, table[-1], options.get("threshold_noise", 0.025), options.get("linear_steps"))
    else:
        if steps < 2:   # ComfyUI divides by steps − 1 (NaN at 1 step)
            raise ValueError("steps: kl_optimal needs at least 2 steps")
        ramp = torch.arange(steps, dtype=torch.float32) / (steps - 1)
        out = torch.zeros(steps + 1, dtype=torch.float32)
        out[:-1] = (ramp * math.atan(smin) + (1 - ramp) * math.atan(smax)).tan()
    return out.to(torch.float64)


class ComfySchedule(Schedule):
    """A discrete schedule whose σ → timestep map is ComfyUI's: the training step whose float32
    ``log σ`` is nearest (``ModelSamplingDiscrete.timestep``), an integer."""

    def sigma_to_t(self, sigma) -> torch.Tensor:
        log_table = self.sigmas.log().to(torch.float32)
        sig = torch.as_tensor(np.asarray(sigma, dtype=np.float64)).to(torch.float32)
        dist = (sig.reshape(-1).log()[None, :] - log_table[:, None]).abs()
        return dist.argmin(dim=0).to(torch.float64).reshape(sig.shape)


def comfy_schedule(schedule: Schedule) -> ComfySchedule:
    """``schedule`` with ComfyUI's σ → timestep rule (the nearest training step), for sampling with
    a σ list as ComfyUI does; its sampler configuration travels with it."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a gradguide.Schedule, got {type(schedule).__name__}")
    config = schedule.sampler_config
    if config is not None and getattr(config, "prediction", None) == "flow":
        raise ValueError("schedule: comfy_schedule takes discrete ε/v schedules (ComfyUI's flow models map σ to "
                         "timesteps by their own rule)")
    out = ComfySchedule(schedule.alphas_cumprod)
    out.sampler_config = config
    return out


def comfy_percent_to_sigma(schedule: Schedule, percent: float) -> float:
    """ComfyUI's ``percent_to_sigma`` of a discrete model: σ at timestep ``(1 − percent) · 999``
    (log σ interpolated, float32; 999 whatever T is, as ComfyUI), ``999999999.9`` at ``percent ≤ 0``,
    0 at ``percent ≥ 1``. ``sa_solver``'s noise window is ``(percent_to_sigma(0.2), percent_to_sigma(0.8))``."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a gradguide.Schedule, got {type(schedule).__name__}")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or math.isnan(percent):
        raise ValueError(f"percent: expected a number, got {percent!r}")
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    log_table = schedule.sigmas.log().to(torch.float32)
    return float(_sigma_at(log_table, torch.tensor((1.0 - percent) * 999.0, dtype=torch.float32)))


def _karras32(n: int, smin: float, smax: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    out = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([out, out.new_zeros(1)])


def _sigma_at(log_table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """σ at fractional training steps: linear in log σ between neighbours (float32, as ComfyUI)."""
    t = t.to(torch.float32).clamp(0, len(log_table) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def _nearest_step(log_table: torch.Tensor, sigma: torch.Tensor) -> int:
    return int((sigma.log() - log_table).abs().argmin())


def _normal(table, log_table, steps: int, sgm: bool) -> torch.Tensor:
    start = _nearest_step(log_table, table[-1])
    end = _nearest_step(log_table, table[0])
    append_zero = True
    if sgm:
        t = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    else:
        if math.isclose(float(_sigma_at(log_table, torch.tensor(float(end)))), 0, abs_tol=1e-5):
            steps, append_zero = steps + 1, False   # a table reaching σ = 0 ends there itself
        t = torch.linspace(start, end, steps, dtype=torch.float32)
    out = _sigma_at(log_table, t)
    return torch.cat([out, out.new_zeros(1)]) if append_zero else out


def _ddim_uniform(table, steps: int) -> torch.Tensor:
    k = 1
    if math.isclose(float(table[k]), 0, abs_tol=1e-5):
        steps, out = steps + 1, []
    else:
        out = [0.0]
    stride = max(len(table) // steps, 1)
    while k < len(table):
        out.append(float(table[k]))
        k += stride
    return torch.tensor(out[::-1], dtype=torch.float32)


def _beta(table, steps: int, alpha, beta) -> torch.Tensor:
    for key, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{key}: expected a finite number > 0, got {value!r}")
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as exc:   # pragma: no cover - scipy is a test dependency
        raise ImportError("the 'beta' scheduler needs scipy (its Beta quantile function)") from exc
    total = len(table) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    picked = np.rint(beta_dist.ppf(quantiles, alpha, beta) * total)
    out, last = [], -1
    for t in picked:
        if t != last:   # repeated training steps are dropped (fewer steps than asked, as ComfyUI)
            out.append(float(table[int(t)]))
        last = t
    return torch.tensor(out + [0.0], dtype=torch.float32)


def _linear_quadratic(steps: int, sigma_max: torch.Tensor, threshold_noise, linear_steps) -> torch.Tensor:
    if isinstance(threshold_noise, bool) or not isinstance(threshold_noise, (int, float)) or \
            not 0 <= threshold_noise <= 1:
        raise ValueError(f"threshold_noise: expected a number in [0, 1], got {threshold_noise!r}")
    if steps == 1:
        ramp = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        if isinstance(linear_steps, bool) or not isinstance(linear_steps, (int, np.integer)) or \
                not 1 <= linear_steps < steps:
            raise ValueError(f"linear_steps: expected an integer in [1, steps), got {linear_steps!r}")
        quad_steps = steps - linear_steps
        # s_k = k θ/L for k < L; after, the quadratic through s_L = θ... that reaches 1 at k = steps
        # with the linear part's slope at k = L
        diff = linear_steps - threshold_noise * steps
        qa = diff / (linear_steps * quad_steps ** 2)
        qb = threshold_noise / linear_steps - 2 * diff / quad_steps ** 2
        qc = qa * linear_steps ** 2
        s = [k * threshold_noise / linear_steps for k in range(linear_steps)]
        s += [qa * k * k + qb * k + qc for k in range(linear_steps, steps)]
        ramp = [1.0 - v for v in s + [1.0]]
    return torch.tensor(ramp, dtype=torch.float32) * sigma_max
