"""Model-output parametrisations and their conversions.

With ``a = √ᾱ_t`` and ``s = √(1−ᾱ_t)``: ``x_t = a x_0 + s ε`` and ``v = a ε − s x_0``, so
every conversion is affine in ``(x_t, output)``.

``"flow"`` is rectified-flow / flow-matching velocity (diffusers' ``flow_prediction``, SD3,
Flux, Wan): the model sees ``x_σ = (1 − σ) x_0 + σ ε`` and predicts ``u = ε − x_0``, so
``x̂_0 = x_σ − σ u`` and ``ε̂ = x_σ + (1 − σ) u``. A flow state is a rescaled
variance-preserving one: with ``r = √((1−σ)² + σ²)``, ``x = x_σ / r`` has ``√ᾱ = (1−σ)/r``,
``√(1−ᾱ) = σ/r``, hence ``r = 1/(a + s)``, ``σ = s/(a + s)``, and the conversions below are
the same formulas written in ``(x, a, s)``; the sampler hands the model ``x_σ = x/(a + s)``
(docs/flow.md). The functions work on tensors and on
:class:`~gradguide.linear.LinComb` values alike (the guided step uses the latter), with the
tensor-like argument first so both types' operators apply.
"""
from __future__ import annotations

PREDICTIONS = ("eps", "x0", "v", "flow")
VARIANCES = ("fixed-small", "fixed-large", "learned-range", "learned")
LEARNED_VARIANCES = ("learned-range", "learned")   # the model outputs twice the channels


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def eps_from(prediction: str, out, x, a, s):
    """ε̂ from a model output. ``a = √ᾱ``, ``s = √(1−ᾱ)``."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x - out * a) / s
    if prediction == "flow":   # ε = x_σ + (1 − σ) u = (x + a u)/(a + s)
        return (x + out * a) / (a + s)
    return x * s + out * a  # v: ε = √(1−ᾱ) x_t + √ᾱ v


def x0_from(prediction: str, out, x, a, s):
    """x̂_0 from a model output (Tweedie for ε: ``(x_t − √(1−ᾱ) ε̂)/√ᾱ``)."""
    if prediction == "eps":
        return (x - out * s) / a
    if prediction == "x0":
        return out
    if prediction == "flow":   # x_0 = x_σ − σ u = (x − s u)/(a + s)
        return (x - out * s) / (a + s)
    return x * a - out * s  # v: x_0 = √ᾱ x_t − √(1−ᾱ) v


def output_from_eps(prediction: str, eps, x, a, s):
    """The model output of parametrisation ``prediction`` whose ε̂ is ``eps`` (inverse of
    :func:`eps_from`; for v: ``v = (ε − √(1−ᾱ) x_t)/√ᾱ``)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0_from_eps(eps, x, a, s)
    if prediction == "flow":   # u = ε − x_0 = ((a + s) ε − x)/a
        return (eps * (a + s) - x) / a
    return (eps - x * s) / a


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


def learned_log_variance(variance: str, v_channels, log_var_min, log_var_max):
    """log Σ from a learned-variance model's extra channels: ``"learned-range"`` (ADM's
    interpolation, below) or ``"learned"`` (the channels are Σ itself, diffusers' DDPM
    ``variance_type="learned"``: log of a negative Σ is NaN, as diffusers' √Σ)."""
    if variance == "learned":
        return v_channels.log()
    return learned_range_log_variance(v_channels, log_var_min, log_var_max)


def learned_range_log_variance(v_channels, log_var_min, log_var_max):
    """ADM's learned-range variance: ``log Σ = f log β_t + (1−f) log β̃_t``, ``f = (v+1)/2``."""
    frac = (v_channels + 1) / 2
    return frac * log_var_max + (1 - frac) * log_var_min
