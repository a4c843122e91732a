"""Classifier guidance (Dhariwal & Nichol 2021, ADM's ``condition_mean`` / ``condition_score``).

With a noisy classifier ``log p_φ(y | x_t)`` and scale ``s``:

- mean form (DDPM): ``μ ← μ + s Σ_t ∇_{x_t} log p_φ(y | x_t)``;
- score form (DDIM and other deterministic samplers): ``ε̂ ← ε̂ − s √(1−ᾱ_t) ∇ log p_φ``.

``form="auto"`` picks the mean form for DDPM and the score form otherwise, as ADM does.
``log_prob(x_t, t, **cond)`` returns ``[B]`` log-probabilities of the target classes; it is
called on the model's own input (for flow models ``x_σ``, see docs/flow.md).
"""
from __future__ import annotations

import copy

import torch

from ..linear import LinComb
from .base import GuidanceTerm, StepContext, check_number

FORMS = ("auto", "mean", "score")


class Classifier(GuidanceTerm):
    needs_input_grad = True
    name = "classifier"

    def __init__(self, log_prob, scale: float = 1.0, form: str = "auto"):
        if not callable(log_prob):
            raise TypeError(f"Classifier: log_prob: expected a callable (x_t, t, **cond) -> [B], "
                            f"got {type(log_prob).__name__}")
        if form not in FORMS:
            raise ValueError(f"Classifier: form: expected one of {FORMS}, got {form!r}")
        self.log_prob = log_prob
        self.scale = check_number("scale", scale, owner="Classifier")
        self.form = form
        self.place = "mean" if form == "mean" else "score"

    def bind(self, shape, device, dtype, sampler: str) -> "Classifier":
        form = self.form
        if form == "auto":
            form = "mean" if sampler == "ddpm" else "score"
        if form == "mean" and sampler != "ddpm":
            raise ValueError(f"Classifier: form='mean' shifts the DDPM posterior mean; sampler={sampler!r} "
                             "needs form='score' (or 'auto')")
        bound = copy.copy(self)
        bound.form, bound.place = form, form
        return bound

    def gradient(self, ctx: StepContext) -> torch.Tensor:
        """∇_{x_t} log p_φ(y | x_t), per sample."""
        with torch.enable_grad():
            # the classifier sees what the model sees (x_σ for flow models); the gradient is w.r.t. x_t
            log_p = self.log_prob(ctx.model_view(), ctx.t, **ctx.cond)
            if not isinstance(log_p, torch.Tensor) or log_p.shape != (ctx.ops.batch,):
                got = tuple(log_p.shape) if isinstance(log_p, torch.Tensor) else type(log_p).__name__
                raise ValueError(f"Classifier: log_prob must return a [B] = [{ctx.ops.batch}] tensor, got {got}")
            return ctx.grad_wrt_input(log_p, "Classifier: log_prob")

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        return ctx.operand("classifier_grad", self.gradient) * self.scale

    def mean(self, ctx: StepContext) -> LinComb:
        grad = ctx.operand("classifier_grad", self.gradient)
        if ctx.log_variance is not None:  # ADM's learned range: Σ is elementwise
            return ctx.variance_scaled("classifier_shift", grad) * self.scale
        return grad * (ctx.scalars["var_mean"] * self.scale)

    def __repr__(self) -> str:
        return f"Classifier(scale={self.scale}, form={self.form!r})"
