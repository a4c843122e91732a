"""Reward guidance: naive gradient G, look-ahead G_loss (Guo et al., NeurIPS 2024), and DPS.

For a reward linearised with gradient ``g`` and target ``y`` (``α = √ᾱ_t``, ``h = 1 − ᾱ_t``):

- **G** (naive, the authors' "v1"): ``G = β (y − gᵀx̂_0) g``, ``β = α / (σ² + h ‖g‖²)``.
  G points along ``g``, so any part of ``g`` off the data manifold enters the sample.
- **G_loss** (look-ahead, the paper's Definition 1, "v2"):
  ``G_loss = 2 β (y − gᵀx̂_0) ∇_{x_t}(gᵀx̂_0)`` with the per-sample
  ``β = (α²/2) / (α² σ² + h ‖∇_{x_t}(gᵀx̂_0)‖²)``; ``∇_{x_t}(gᵀx̂_0)`` is one
  vector-Jacobian product through the denoiser. Theorem 1: on a linear-subspace data model
  G_loss stays in the subspace.

Both enter as a score shift, ``ε̃ = ε̂ − √(1−ᾱ_t) G``. ``x̂_0`` is the prediction after any
CFG-family combination; in the VJP, data-dependent combination weights (APG, rescale,
CFG-Zero*) are held constant.

- **Decoded G_loss** (the paper's Stable Diffusion experiment, docs/mathematics.md#guidance-terms): for latent models,
  ``x̂_0 = decode(ẑ_0 / scaling)`` with Tweedie's latent ``ẑ_0``, ``L = ½(gᵀx̂_0 + b − y*)²`` with
  a reward linearised at the last image (``g = ∇r``, ``b = r − gᵀx``), and the score shift
  ``G = −β ∇_{z_t} L`` (``ε̃ = ε̂ + √(1−ᾱ_t) β ∇L``), the gradient flowing through the
  denoiser (both CFG branches) and the decoder. β is per sample, as the paper writes it.
  The authors' Stable Diffusion code computes ``0.5 * MSELoss()(out, target)`` with ``out``
  ``[B]`` and ``target`` ``[B, 1]``: the loss broadcasts to a B×B mean, which scales each
  sample's gradient by 1/B, so its ``--guidance β`` is ``β/B`` per sample here (``--guidance
  100`` at batch 5 is ``beta=20``). ``official_batch_scaling=True`` reproduces that scaling.

- **DPS** (Chung et al., ICLR 2023): after the sampler step,
  ``x_{t−1} ← x_{t−1} − ζ ∇_{x_t} ‖y − 𝒜(x̂_0(x_t))‖`` per sample. (The paper's
  ``ζ_t = ζ'/‖y − 𝒜(x̂_0)‖`` on the squared norm is the same update with ``ζ = 2ζ'``.)
"""
from __future__ import annotations

import copy

import torch

from ..linear import LinComb
from .base import GuidanceTerm, StepContext, batch_tensor, check_number, sample_like


class _RewardGradient(GuidanceTerm):
    place = "score"
    runtime_attributes = ("grad", "target")   # a running step reads them (new values each call, e.g. per round)

    def __init__(self, grad: torch.Tensor, target, sigma: float = 0.1):
        owner = type(self).__name__
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"{owner}: grad: expected a tensor shaped like a sample batch (or broadcastable "
                            f"to it), got {type(grad).__name__}")
        if not isinstance(target, (int, float, torch.Tensor)) or isinstance(target, bool):
            raise TypeError(f"{owner}: target: expected a [B] tensor or a number, got {type(target).__name__}")
        self.grad = grad
        self.target = target
        self.sigma = check_number("sigma", sigma, 0.0, owner=owner)

    def bind(self, shape, device, dtype, sampler: str):
        owner = type(self).__name__
        bound = copy.copy(self)
        bound.grad = sample_like("grad", self.grad, shape, device, owner).to(dtype)
        bound.target = batch_tensor("target", self.target, shape, device, dtype, owner)
        return bound


class NaiveGradient(_RewardGradient):
    """Naive gradient guidance G (the gradient-guidance paper's baseline, code "v1")."""
    name = "G"

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        ops = ctx.ops
        g = ops.add("reward_grad", self.grad)
        beta = ctx.a / (self.sigma ** 2 + ctx.h * ops.norm2(g))
        return g * (beta * (self.target - ops.dot(g, x0)))


class LookAhead(_RewardGradient):
    """Look-ahead gradient guidance G_loss (the paper's Definition 1, code "v2").

    ``beta=None`` uses the per-sample β(t) above; a number uses that constant instead (as the
    authors' code offers); ``multiplier`` scales either.
    """
    name = "G_loss"
    needs_model_grad = True

    def __init__(self, grad: torch.Tensor, target, sigma: float = 0.1, beta=None, multiplier: float = 1.0):
        super().__init__(grad, target, sigma)
        self.beta = None if beta is None else check_number("beta", beta, owner="LookAhead")
        self.multiplier = check_number("multiplier", multiplier, owner="LookAhead")

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        g = ctx.operand("reward_grad", self.reward_grad)
        vjp = ctx.vjp_of_x0(x0, g, "LookAhead: model (the VJP runs through its output)")
        per_sample_beta = self.beta is None
        return ctx.ops.policy("lookahead", x0=x0, vjp=vjp, reward=g, a=ctx.a, h=ctx.h, sigma=self.sigma,
                              target=ctx.per_sample(self, "target"), multiplier=self.multiplier,
                              beta=0.0 if per_sample_beta else self.beta, beta_per_sample=float(per_sample_beta))

    def reward_grad(self, ctx: StepContext) -> torch.Tensor:
        """The reward gradient g, an operand of the step."""
        return self.grad


class DecodedLookAhead(GuidanceTerm):
    """G_loss through a decoder (the gradient-guidance paper's Stable Diffusion experiment).

    ``decode(latents) -> images``; ``grad``: the reward gradient in image space (shaped like
    the decoded batch or broadcastable to it); ``offset``: ``b = r(x) − gᵀx``, ``[B]`` or a number;
    ``target``: y*; ``beta``: the constant step β, per sample; ``scaling``: the latent scaling
    (SD: 0.18215). ``official_batch_scaling``: ``False`` (default, the paper) or ``True``, the
    authors' code's 1/B scaling of every sample's gradient (its β is ``B ×`` this one's).
    """
    place = "score"
    needs_model_grad = True
    name = "G_loss(decoded)"

    def __init__(self, decode, grad: torch.Tensor, offset=0.0, target: float = 10.0, beta: float = 100.0,
                 scaling: float = 0.18215, official_batch_scaling: bool = False):
        if not callable(decode):
            raise TypeError(f"DecodedLookAhead: decode: expected a callable latents -> images, got {type(decode).__name__}")
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"DecodedLookAhead: grad: expected a tensor in image space, got {type(grad).__name__}")
        self.decode = decode
        self.grad = grad
        self.offset = offset
        self.target = check_number("target", target, owner="DecodedLookAhead")
        self.beta = check_number("beta", beta, owner="DecodedLookAhead")
        self.scaling = check_number("scaling", scaling, owner="DecodedLookAhead")
        if self.scaling <= 0:
            raise ValueError(f"DecodedLookAhead: scaling: expected a positive number, got {scaling!r}")
        if not isinstance(official_batch_scaling, bool):
            raise TypeError(f"DecodedLookAhead: official_batch_scaling: expected True or False, "
                            f"got {official_batch_scaling!r}")
        self.official_batch_scaling = official_batch_scaling

    def bind(self, shape, device, dtype, sampler: str):
        if self.grad.device != torch.device(device):
            raise ValueError(f"DecodedLookAhead: grad: on {self.grad.device}, but the samples are on {device}")
        bound = copy.copy(self)
        bound.offset = batch_tensor("offset", self.offset, shape, device, torch.float32, "DecodedLookAhead")
        bound.shift = bound.offset - self.target   # r = gᵀx̂_0 + shift
        bound.__dict__.pop("_cast", None)
        return bound

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        # −β ∇_{z_t} ½ r² = −β r ∇_{z_t}(gᵀ decode(ẑ_0/scaling)), by the chain rule
        # −(β/scaling) J_{ẑ_0}ᵀ (r J_decodeᵀ g): the decoder's backward gives w = r J_decodeᵀ g at
        # the decoder's input, and the same VJP G_loss takes carries w through the denoiser
        latent = ctx.ops.materialize("decoder_input", x0 * (1.0 / self.scaling))
        w = ctx.operand("decoder_pullback", self.pullback, latent)
        vjp = ctx.vjp_of_x0(x0, w, "DecodedLookAhead: model (the VJP runs through its output)")
        batch = self.offset.shape[0] if self.official_batch_scaling else 1   # the authors' B×B mean
        return vjp * (-self.beta / (self.scaling * batch))

    def pullback(self, ctx: StepContext, latent: torch.Tensor) -> torch.Tensor:
        """``r · J_decodeᵀ g`` at ``latent`` (the decoder's input), with the per-sample residual
        ``r = gᵀ decode(latent) + b − y*``."""
        with torch.enable_grad():
            leaf = latent.detach().requires_grad_(True)
            image = self.decode(leaf)
            if not isinstance(image, torch.Tensor) or not image.requires_grad:
                raise ValueError("DecodedLookAhead: decode: returned no tensor with a gradient with respect to its "
                                 "input (it is detached or computed under torch.no_grad())")
            g = self._grad_as(image)
            residual = self._residual(g, image.detach())
            (u,) = torch.autograd.grad(image, leaf, grad_outputs=g)
        return ctx.scale_rows(u, residual)

    def _grad_as(self, image: torch.Tensor) -> torch.Tensor:
        """``grad`` broadcast to ``image``, in its dtype (cast once per run: the decoder's backward
        and a fused residual need equal dtypes)."""
        try:
            g = self.grad.expand_as(image)
        except RuntimeError:
            raise ValueError(f"DecodedLookAhead: grad: shape {tuple(self.grad.shape)} does not broadcast to the "
                             f"decoded images {tuple(image.shape)}") from None
        if g.dtype == image.dtype:
            return g
        cast = self.__dict__.setdefault("_cast", {})
        if image.dtype not in cast:
            cast[image.dtype] = self.grad.to(image.dtype)
        return cast[image.dtype].expand_as(image)

    def _residual(self, g: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``r = gᵀ image + b − y*`` per sample, accumulated in float32 or wider: one batched
        product (half-precision images accumulate in float32 on a GPU), else the products widened
        elementwise (half precision on a CPU, where a batched product cannot widen)."""
        b, shift = image.shape[0], self.shift
        if image.dtype in (torch.float32, torch.float64):
            return torch.baddbmm(shift.to(image.dtype).view(b, 1, 1), g.reshape(b, 1, -1),
                                 image.reshape(b, -1, 1)).view(b)
        if image.device.type in ("cuda", "meta"):
            return torch.bmm(g.reshape(b, 1, -1), image.reshape(b, -1, 1), out_dtype=torch.float32).view(b) + shift
        return (self.grad.float() * image).flatten(1).sum(1) + shift


class DPS(GuidanceTerm):
    """Diffusion posterior sampling: ``x_{t−1} −= ζ ∇_{x_t} ‖y − operator(x̂_0(x_t))‖``."""
    place = "post"
    needs_model_grad = True
    name = "dps"

    def __init__(self, operator, measurement: torch.Tensor, zeta: float = 1.0):
        if not callable(operator):
            raise TypeError(f"DPS: operator: expected a callable x0 -> measurement, got {type(operator).__name__}")
        if not isinstance(measurement, torch.Tensor):
            raise TypeError(f"DPS: measurement: expected a tensor, got {type(measurement).__name__}")
        self.operator = operator
        self.measurement = measurement
        self.zeta = check_number("zeta", zeta, 0.0, owner="DPS")

    def bind(self, shape, device, dtype, sampler: str):
        if self.measurement.device != torch.device(device):
            raise ValueError(f"DPS: measurement: on {self.measurement.device}, but the samples are on {device}")
        if self.measurement.dim() == 0 or self.measurement.shape[0] != shape[0]:
            raise ValueError(f"DPS: measurement: expected a leading batch dimension of {shape[0]}, "
                             f"got shape {tuple(self.measurement.shape)}")
        return self

    def post(self, ctx: StepContext, x0: LinComb) -> LinComb:
        with torch.enable_grad():
            predicted = self.operator(ctx.tracked_x0())
            if not isinstance(predicted, torch.Tensor) or predicted.shape != self.measurement.shape:
                got = tuple(predicted.shape) if isinstance(predicted, torch.Tensor) else type(predicted).__name__
                raise ValueError(f"DPS: operator returned {got}, expected the measurement's shape "
                                 f"{tuple(self.measurement.shape)}")
            residual = (self.measurement - predicted).flatten(1).norm(dim=1)
            grad = ctx.grad_wrt_input(residual, "DPS: operator")
        return ctx.ops.add("dps_grad", grad) * (-self.zeta)
