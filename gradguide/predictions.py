"""Model-output parametrisations and their conversions.

With ``a = √ᾱ_t`` and ``s = √(1−ᾱ_t)``: ``x_t = a x_0 + s ε`` and ``v = a ε − s x_0``, so
every conversion is affine in ``(x_t, output)``.

``"flow"`` is rectified-flow / flow-matching velocity (diffusers' ``flow_prediction``, SD3,
Flux, Wan): the model sees ``x_σ = (1 − σ) x_0 + σ ε`` and predicts ``u = ε − x_0``, so
``x̂_0 = x_σ − σ u`` and ``ε̂ = x_σ + (1 − σ) u``. A flow state is a rescaled
variance-preserving one: with ``r = √((1−σ)² + σ²)``, ``x = x_σ / r`` has ``√ᾱ = (1−σ)/r``,
``√(1−ᾱ) = σ/r``, hence ``r = 1/(a + s)``, ``σ = s/(a + s)``, and the conversions below are
the same formulas written in ``(x, a, s)``; the sampler hands the model ``x_σ = x/(a + s)``
(docs/flow.md).

``"edm"`` / ``"edm-v"`` are Karras et al.'s (2022) preconditioned networks (diffusers'
``EDM*Scheduler`` with ``prediction_type`` ``"epsilon"`` / ``"v_prediction"``): with
``σ = s/a`` and the data scale ``σ_d``, the model sees ``c_in x_σ`` (``x_σ = x/a``,
``c_in = 1/√(σ² + σ_d²)``) and ``x̂_0 = c_skip x_σ + c_out F``, ``c_skip = σ_d²/(σ² + σ_d²)``,
``c_out = ±σ σ_d/√(σ² + σ_d²)`` (``−`` for ``"edm-v"``). In ``(x, a, s)``, with
``q = √(s² + σ_d² a²)``: input ``x/q``, ``x̂_0 = (σ_d² a/q²) x ± (σ_d s/q) F``; so x̂_0 is
linear in ``(x, F)`` with two per-step coefficients, ``pre = (c_x, c_F)`` (:func:`edm_coefficients`;
the sampler tables' ``edm_skip``, ``edm_out``, ``edm_in``). With ``σ_d = 1``, ``"edm-v"`` is
``"v"``. The functions work on tensors and on
:class:`~gradguide.linear.LinComb` values alike (the guided step uses the latter), with the
tensor-like argument first so both types' operators apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTIONS = ("eps", "x0", "v", "flow", "edm", "edm-v")
EDM = ("edm", "edm-v")
# the per-step table a model's input is scaled by (None: the model sees x itself)
INPUT_SCALE = {"flow": "flow_in", "edm": "edm_in", "edm-v": "edm_in"}
VARIANCES = ("fixed-small", "fixed-large", "learned-range", "learned")
LEARNED_VARIANCES = ("learned-range", "learned")   # the model outputs twice the channels


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def eps_from(prediction: str, out, x, a, s, pre=None):
    """ε̂ from a model output. ``a = √ᾱ``, ``s = √(1−ᾱ)``; ``pre``: an EDM model's ``(c_x, c_F)``."""
    if prediction in EDM:
        return eps_from_x0(x0_from(prediction, out, x, a, s, pre), x, a, s)
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x - out * a) / s
    if prediction == "flow":   # ε = x_σ + (1 − σ) u = (x + a u)/(a + s)
        return (x + out * a) / (a + s)
    return x * s + out * a  # v: ε = √(1−ᾱ) x_t + √ᾱ v


def x0_from(prediction: str, out, x, a, s, pre=None):
    """x̂_0 from a model output (Tweedie for ε: ``(x_t − √(1−ᾱ) ε̂)/√ᾱ``)."""
    if prediction in EDM:
        c_x, c_f = _pre(prediction, pre)
        return x * c_x + out * c_f
    if prediction == "eps":
        return (x - out * s) / a
    if prediction == "x0":
        return out
    if prediction == "flow":   # x_0 = x_σ − σ u = (x − s u)/(a + s)
        return (x - out * s) / (a + s)
    return x * a - out * s  # v: x_0 = √ᾱ x_t − √(1−ᾱ) v


def output_from_eps(prediction: str, eps, x, a, s, pre=None):
    """The model output of parametrisation ``prediction`` whose ε̂ is ``eps`` (inverse of
    :func:`eps_from`; for v: ``v = (ε − √(1−ᾱ) x_t)/√ᾱ``)."""
    if prediction in EDM:   # F = (x̂_0 − c_x x)/c_F
        c_x, c_f = _pre(prediction, pre)
        return (x0_from_eps(eps, x, a, s) - x * c_x) / c_f
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0_from_eps(eps, x, a, s)
    if prediction == "flow":   # u = ε − x_0 = ((a + s) ε − x)/a
        return (eps * (a + s) - x) / a
    return (eps - x * s) / a


def _pre(prediction: str, pre):
    if pre is None:
        raise ValueError(f"prediction {prediction!r}: the EDM coefficients (c_x, c_F) of the step are needed")
    return pre


def edm_coefficients(abar, sigma_data: float, prediction: str = "edm"):
    """``(c_x, c_F, c_in)`` of an EDM model at ``ᾱ`` (float64 tensors): ``x̂_0 = c_x x + c_F F``
    for the variance-preserving ``x``, and the model is called on ``c_in x`` (``= c_in^EDM x_σ``)."""
    abar = abar.to(torch.float64)
    a, s = abar.sqrt(), (1 - abar).clamp_min(0).sqrt()
    q = (s * s + sigma_data ** 2 * abar).sqrt()
    sign = -1.0 if prediction == "edm-v" else 1.0
    return sigma_data ** 2 * a / q ** 2, sign * sigma_data * s / q, 1 / q


def flow_input_scale(a, s):
    """``r = 1/(a + s)``: a flow model is called on ``x_σ = r x`` (``x`` the variance-preserving state)."""
    return 1 / (a + s)


def x0_from_eps(eps, x, a, s):
    return (x - eps * s) / a


def eps_from_x0(x0, x, a, s):
    return (x - x0 * a) / s


def v_from(eps, x0, a, s):
    """``v = √ᾱ ε − √(1−ᾱ) x_0``."""
    return eps * a - x0 * s


def learned_range_line(log_var_min, log_var_max):
    """ADM's learned-range variance ``log Σ = f log β_t + (1−f) log β̃_t``, ``f = (v+1)/2``, as a
    line in the model's variance channels v: ``log Σ = slope · v + offset`` with ``slope =
    (log β_t − log β̃_t)/2`` and ``offset = (log β_t + log β̃_t)/2`` (expand f). Returns
    ``(slope, offset)``; ``log_var_min``/``log_var_max`` are log β̃_t (clipped) and log β_t."""
    return (log_var_max - log_var_min) / 2, (log_var_max + log_var_min) / 2


@dataclass(frozen=True)
class DynamicThreshold:
    """Dynamic thresholding of x̂_0 (Saharia et al. 2022, Imagen; diffusers' ``thresholding=True``
    with ``dynamic_thresholding_ratio`` and ``sample_max_value``): a clip mode of
    :class:`gradguide.Sampler` (``clip=gradguide.DynamicThreshold(ratio, max_value)``).

    Per sample, over all its elements: ``s = clamp(quantile(|x̂_0|, ratio), 1, max_value)``, then
    ``x̂_0 ← clamp(x̂_0, −s, s) / s``. With ``s = 1`` this is the clip to [−1, 1]; above it,
    saturated values are pulled in and the sample rescaled into [−1, 1]. The quantile reads the
    whole sample, so the step is neither linear nor elementwise: it runs on the general path (the
    fused combine has no quantile). float16/bfloat16 x̂_0 is thresholded in float32, as diffusers does.
    """
    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        for name, value, low in (("ratio", self.ratio, 0.0), ("max_value", self.max_value, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value < 0 or value > 1 if low is not None else value <= 0):
                want = "a number in [0, 1]" if low is not None else "a finite number > 0"
                raise ValueError(f"DynamicThreshold: {name}: expected {want}, got {value!r}")
            object.__setattr__(self, name, float(value))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample ``s`` (float32 or float64), shaped to broadcast against ``x``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        # torch.quantile's linear interpolation, from a sort (torch.quantile refuses more than 2**24 elements)
        n = flat.shape[1]
        pos = self.ratio * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        ranked = flat.abs().sort(dim=1).values
        q = torch.lerp(ranked[:, lo], ranked[:, hi], pos - lo)
        return q.clamp(min=1, max=self.max_value).view(-1, *([1] * (x.dim() - 1)))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        s = self.scale(x0)
        y = x0.to(s.dtype)
        return (torch.clamp(y, -s, s) / s).to(x0.dtype)

    def shift(self, p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``thr(p + d) − thr(p)``: where neither side clips it is ``d/s' + p (1/s' − 1/s)``, formed
        from ``d`` itself so that a small guidance shift keeps its relative precision (as
        :func:`gradguide.ops.clip_shift`; docs/architecture.md#precision)."""
        q = p + d
        sp, sq = self.scale(p), self.scale(q)
        pp, dd, qq = p.to(sp.dtype), d.to(sp.dtype), q.to(sp.dtype)
        inside = (pp.abs() <= sp) & (qq.abs() <= sq)
        exact = dd / sq + pp * (1 / sq - 1 / sp)
        clipped = torch.clamp(qq, -sq, sq) / sq - torch.clamp(pp, -sp, sp) / sp
        return torch.where(inside, exact, clipped).to(p.dtype)
