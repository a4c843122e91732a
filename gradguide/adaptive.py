"""DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, §4; k-diffusion's
``sample_dpm_adaptive``), driven from the host: a loop over :func:`gradguide.sample` calls (it sits above the sampling
loop, not in :mod:`gradguide.samplers`, whose tables the loop reads).

Each attempted step from ``t = −log σ`` to ``t + h`` is one :func:`gradguide.sample` call of the
``dpm_fast`` tables with a single step of order 3 (order 2 for ``order=2``): a LinComb step, so
guidance, projections and the model run exactly as in any other sampler. Its evaluations'
guided predictions (the callback's records) give the embedded lower-order solution (DPM-Solver-2
with ``r_1 = 1/3``, resp. DPM-Solver-1) at no extra model call; the error
``‖(x_low − x_high)/δ‖_RMS``, ``δ = max(atol, rtol · max(|x_low|, |x_prev|))`` over the whole
batch, drives k-diffusion's PID step-size controller, which accepts or rejects the step.

Not graph-capturable and not host-sync free: every attempt reads its error on the host, and the
number of steps is known only at the end. With ``eta > 0`` an accepted step goes to ``σ_down``
and adds ``s_noise σ_up z`` (``z`` from ``noise_sampler(σ_s, σ_t)`` or the generator).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch

from .samplers.kdiff import ancestral_step


class PIDStepSizeController:
    """k-diffusion's PID controller on the inverse error: the step is multiplied by
    ``1 + atan(f − 1)``, ``f = e_0^{b_1} e_1^{b_2} e_2^{b_3}`` (``e_k`` the last inverse errors),
    and accepted when that factor is at least ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model, shape, *, schedule, sigma_min: float, sigma_max: float, x_T: torch.Tensor,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0, noise_sampler: Optional[Callable] = None,
                        generator=None, return_info: bool = False, **sample_kwargs):
    """Sample from ``sigma_max`` (starting at ``sigma_max · x_T``) to ``sigma_min``, returning the
    σ-space sample (and with ``return_info`` k-diffusion's ``{'steps', 'nfe', 'n_accept',
    'n_reject'}``). ``sample_kwargs`` go to every :func:`gradguide.sample` call (``guidance``,
    ``cond``, ``projection``, ...); the schedule's own ``sampler_options`` are not modified."""
    if order not in (2, 3):
        raise ValueError(f"order: expected 2 or 3, got {order!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T: expected a tensor of shape {tuple(shape)}")
    for key in ("sigmas", "steps", "timesteps", "sampler", "x_T", "callback"):
        if key in sample_kwargs:
            raise TypeError(f"sample_dpm_adaptive: {key!r} is set by the adaptive driver")
    attempt_schedule = copy.copy(schedule)
    attempt_schedule.sampler_options = {"dpm_fast": {"orders": (order,)}}
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    sigma = lambda t: math.exp(-t)   # noqa: E731
    a = lambda s: 1 / math.sqrt(1 + s * s)   # noqa: E731
    x = x_T * sigma_max
    x_prev = x
    s = t_start
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        if eta:
            down, up = ancestral_step(sigma(s), sigma(t), eta)
            t_ = min(t_end, -math.log(down)) if down > 0 else t_end
            su = math.sqrt(max(sigma(t) ** 2 - sigma(t_) ** 2, 0.0))
        else:
            t_, su = t, 0.0
        records = []
        x_high = _attempt(model, shape, attempt_schedule, sigma(s), sigma(t_), x, records, sample_kwargs)
        x_low = _embedded(records, x, sigma(s), sigma(t_), order, a)
        delta = torch.maximum(torch.as_tensor(atol, dtype=x.dtype), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(float(error)):   # the host decision
            x_prev = x_low
            x = x_high
            if su:
                if noise_sampler is not None:
                    z = noise_sampler(*(torch.tensor(sigma(v), dtype=torch.float64) for v in (s, t)))
                else:
                    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + su * s_noise * z.to(x)
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
    return (x, info) if return_info else x


def _attempt(model, shape, schedule, s_from, s_to, x, records, sample_kwargs):
    """One DPM-Solver step of the schedule's order from σ-space ``x`` at ``s_from`` to ``s_to``."""
    from .sampling import sample
    return sample(model, shape, schedule=schedule, sampler="dpm_fast", sigmas=[s_from, s_to], x_T=x / s_from,
                  callback=records.append, **sample_kwargs)


def _embedded(records, x, s_from, s_to, order, a):
    """The lower-order solution from the attempt's evaluations: DPM-Solver-2 with ``r_1 = 1/3``
    (order 3; its stage point is DPM-Solver-3's first) or DPM-Solver-1 (order 2)."""
    h = math.log(s_from / s_to)
    eps0 = (x - records[0].x0) / s_from
    x_low = x - s_to * math.expm1(h) * eps0
    if order == 3:
        r1 = 1 / 3
        s1 = s_from * math.exp(-r1 * h)
        u1 = records[0].x / a(s1)   # the first evaluation's output: the sample at the stage point, σ-space
        eps1 = (u1 - records[1].x0) / s1
        x_low = x_low - s_to / (2 * r1) * math.expm1(h) * (eps1 - eps0)
    return x_low
