"""What a guidance term sees of a step, and the four places a term can act.

A term acts at one of four places of the step (docs/architecture.md#recipe-add-a-guidance-term), in this order:

- ``"branches"`` — combines the conditional and unconditional predictions (CFG and its
  variants: APG, rescale, CFG-Zero*, CFG++). At most one such term per sampling run.
- ``"score"`` — shifts the score: ``ε̃ = ε̂ − √(1−ᾱ_t) G`` (G, G_loss, classifier score form).
- ``"mean"`` — shifts the posterior mean: ``μ += Σ_t s ∇ log p`` (classifier, DDPM mean form).
- ``"post"`` — shifts ``x_{t−1}`` after the sampler step (DPS).

Each term returns :class:`~gradguide.linear.LinComb` values over the step's operands; the
step adds its own operands through ``ctx.ops.add`` and asks for gradients through
``ctx.grad_wrt_input``. No term synchronises with the host or branches on tensor values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from ..linear import LinComb, Operands
from .. import predictions


@dataclass
class LogVariance:
    """A learned variance, elementwise: ``log Σ = slope · channels + offset`` (``channels``: an
    operand; ``slope``, ``offset``: per-step scalars)."""
    channels: LinComb
    slope: object
    offset: object


@dataclass
class StepContext:
    """One step as the guidance terms see it."""
    ops: Operands
    index: int                       # step number (host int: for host-side bookkeeping only)
    t: torch.Tensor                  # [B] int64 training timesteps given to the model
    scalars: Dict[str, torch.Tensor]  # 0-d device tensors from the sampler tables
    cond: dict
    x: LinComb                       # x_t as an operand
    x_input: torch.Tensor            # x_t as passed to the model (a grad leaf when needed)
    state: Dict[str, torch.Tensor]   # tensors carried from the previous step
    new_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    tracked_x0: Optional[Callable[[], torch.Tensor]] = None  # x̂_0 with its autograd graph
    sampler: str = "ddpm"
    log_variance: Optional[LogVariance] = None   # a learned variance (ADM's learned range), else None
    prediction: str = "eps"          # the model's parametrisation ("eps", "x0", "v", "flow", "edm", "edm-v")
    input_scale: Optional[torch.Tensor] = None   # flow and EDM models: the model sees input_scale · x_t
    model_output: Optional[torch.Tensor] = None  # the conditional branch's output, with its autograd graph
    branch_eps: Dict[str, LinComb] = field(default_factory=dict)   # further model branches' ε (perturbed guiders)
    # a fused step whose VJP runs through both branches of one batched call: id(cotangent) -> the
    # cotangent written twice ([2, B, ...]), the batched output's (see :meth:`scale_rows`)
    stacked_cotangents: Optional[Dict[int, torch.Tensor]] = None

    def operand(self, name: str, compute: Callable[..., torch.Tensor], *reads: LinComb) -> LinComb:
        """The operand ``compute(ctx, *tensors of reads)`` (a term's own method, e.g. its gradient)
        as a LinComb; ``reads`` are operands (e.g. a materialised x̂_0). A traced step (the fused
        plan) records the method and calls it on each step's context once its reads exist."""
        return self.ops.add_computed(name, compute, self, reads)

    def per_sample(self, term: "GuidanceTerm", name: str):
        """``term.<name>``, a per-sample ``[B]`` tensor passed as a scalar of ``ctx.ops.policy`` (e.g.
        G_loss's target); a traced step reads it from the running step's term."""
        return self.ops.per_sample(term, name)

    def vjp_of_x0(self, x0: LinComb, g: LinComb, what: str) -> LinComb:
        """``∇_{x_t}(gᵀx̂_0)`` for the operand ``g`` (a reward gradient, a decoder's pullback), as
        a LinComb: autograd through the tracked x̂_0. (A traced step takes ``c_x g + Σ_b c_b J_bᵀg``
        for an x̂_0 that is ``c_x x_t + Σ_b c_b model_b(x_t)``: the model's backward only, see
        gradguide.stepplan.)"""
        if self.ops.tracing:
            return self.ops.vjp_of_x0(x0, g)
        with torch.enable_grad():
            g_x0 = (self.ops.tensor(g) * self.tracked_x0()).flatten(1).sum(1)
            return self.ops.add("lookahead_vjp", self.grad_wrt_input(g_x0, what))

    def variance_scaled(self, name: str, u: LinComb, power: float = 1.0) -> LinComb:
        """``Σ^power ⊙ u`` for the operand ``u`` (Σ the learned variance, elementwise), as the
        operand ``name``."""
        lv = self.log_variance
        return self.ops.scaled(name, u, lv.channels, lv.slope * power, lv.offset * power)

    def scale_rows(self, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``r[b] · u[b]`` for a per-sample ``r`` (``[B]``). Where the result will be the cotangent
        of a VJP through both branches of one batched model call, it is written twice in the same
        pass (the batched output's cotangent, uncond rows first) and the first copy returned."""
        r = r.view((-1,) + (1,) * (u.dim() - 1)).to(u.dtype)
        if self.stacked_cotangents is None:
            return u * r
        both = u.unsqueeze(0).expand(2, *u.shape) * r.unsqueeze(0)
        first = both[0]
        self.stacked_cotangents[id(first)] = both   # (ids are compared within this step only)
        return first

    def model_view(self) -> torch.Tensor:
        """``x_t`` as the model sees it (``x_input``, or the flow state ``x_σ`` for flow models),
        differentiable with respect to ``x_input``."""
        return self.x_input if self.input_scale is None else self.x_input * self.input_scale

    @property
    def a(self) -> torch.Tensor:
        """√ᾱ_t (the gradient-guidance paper's α(t))."""
        return self.scalars["sqrt_abar"]

    @property
    def s(self) -> torch.Tensor:
        """√(1−ᾱ_t)."""
        return self.scalars["sqrt_1m_abar"]

    @property
    def h(self) -> torch.Tensor:
        """h(t) = 1 − ᾱ_t."""
        return self.s * self.s

    @property
    def pre(self):
        """An EDM model's ``(c_x, c_F)`` at this step (``x̂_0 = c_x x_t + c_F F``), else None."""
        if self.prediction not in predictions.EDM:
            return None
        return self.scalars["edm_skip"], self.scalars["edm_out"]

    def eps_of_x0(self, x0: LinComb) -> LinComb:
        return predictions.eps_from_x0(x0, self.x, self.a, self.s)

    def x0_of_eps(self, eps: LinComb) -> LinComb:
        return predictions.x0_from_eps(eps, self.x, self.a, self.s)

    def output_of_eps(self, eps: LinComb) -> LinComb:
        """The model's own prediction (ε, x̂_0 or v) with this ε̂: what diffusers' guiders combine."""
        return predictions.output_from_eps(self.prediction, eps, self.x, self.a, self.s, self.pre)

    def eps_of_output(self, out: LinComb) -> LinComb:
        return predictions.eps_from(self.prediction, out, self.x, self.a, self.s, self.pre)

    def grad_wrt_input(self, objective: torch.Tensor, what: str = "objective") -> torch.Tensor:
        """∇_{x_t} of ``objective.sum()`` (objective is per-sample, ``[B]``). ``what`` names the
        user function that produced it, for the error when it does not depend on ``x_t``."""
        if not objective.requires_grad:
            raise ValueError(f"{what}: returned a tensor with no gradient with respect to x_t (it is detached, "
                             "computed under torch.no_grad(), or does not depend on x_t)")
        if not objective.is_floating_point():
            raise TypeError(f"{what}: expected a real floating tensor, got {objective.dtype}")
        (g,) = torch.autograd.grad(objective.sum(), self.x_input, retain_graph=True, allow_unused=True)
        if g is None:
            raise ValueError(f"{what}: returned a tensor that does not depend on x_t (no gradient)")
        return g.detach()


class GuidanceTerm:
    """Base class. ``place`` is one of ``"branches"``, ``"score"``, ``"mean"``, ``"post"``."""
    place: str = "score"
    needs_cond: bool = False          # needs ``cond=`` (a conditional model)
    needs_model_grad: bool = False    # needs autograd through the model (a VJP)
    needs_input_grad: bool = False    # needs autograd w.r.t. x_t (not through the model)
    name: str = "guidance"
    runtime_attributes: tuple = ()    # read only while a step runs, never by a fused plan (cache keys skip them)

    def bind(self, shape, device, dtype, sampler: str) -> "GuidanceTerm":
        """Check this term against a run (batch ``shape``, device, dtype, sampler) and return
        the term to use for it (a bound copy where inputs are prepared). Raises clear errors
        naming the argument that does not fit."""
        return self

    def for_steps(self, steps: int) -> "GuidanceTerm":
        """The term for a run of ``steps`` timesteps (terms with a step window, such as diffusers'
        ``start``/``stop`` fractions, return a bound copy that knows the count)."""
        return self

    def variant(self, index: int):
        """Host-side choice this term makes at step ``index`` (hashable). Steps with different
        variants are captured as different CUDA graphs; most terms have none."""
        return None

    def graph_tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors a captured step reads from this (bound) term: a later run with the same
        structure copies its values into them instead of re-capturing."""
        found = {}
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                found[key] = value
            elif isinstance(value, dict):
                found.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        return found

    def graph_signature(self) -> tuple:
        """Everything but tensor values that a captured step depends on: numbers and strings by
        value, tensors by shape/dtype/device, callables by identity. Unequal signatures re-capture."""
        return tuple(sorted((k, _signature_of(v)) for k, v in vars(self).items()))

    def initial_state(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Tensors this term carries from step to step (zeros before the first step)."""
        return {}

    # one of these, according to ``place``
    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: LinComb):
        raise NotImplementedError(f"{type(self).__name__} does not combine branches")

    def score(self, ctx: StepContext, x0: LinComb) -> LinComb:
        raise NotImplementedError(f"{type(self).__name__} does not shift the score")

    def mean(self, ctx: StepContext) -> LinComb:
        raise NotImplementedError(f"{type(self).__name__} does not shift the mean")

    def post(self, ctx: StepContext, x0: LinComb) -> LinComb:
        raise NotImplementedError(f"{type(self).__name__} does not shift x_(t-1)")


def _signature_of(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, str(value.device))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _signature_of(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_signature_of(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))


def check_number(name: str, value, low=None, high=None, owner: str = "", allow_inf: bool = False) -> float:
    """A real number (not bool, not NaN; finite unless ``allow_inf``) in ``[low, high]``."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name}: expected a number, got {type(value).__name__} {value!r}")
    if value != value or (not allow_inf and value in (float("inf"), float("-inf"))):
        raise ValueError(f"{where}{name}: expected a finite number, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{where}{name}: expected a value in [{low}, {high}], got {value!r}")
    return float(value)


def named_scales(guidance, terms) -> list:
    """``[(name, value)]`` of the terms' guidance weights (``scale``, ``multiplier``) as the user
    passed them: ``guidance[j].scale`` for a list, ``guidance.scale`` for a single term."""
    single = isinstance(guidance, GuidanceTerm)
    found = []
    for j, term in enumerate(terms):
        for attr in ("scale", "multiplier"):
            value = getattr(term, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append((f"guidance.{attr}" if single else f"guidance[{j}].{attr}", float(value)))
    return found


def scale_overflow_hint(scales, dtype: torch.dtype) -> str:
    """The part of a finiteness error that names the guidance weights too large for the run's
    dtype, or "". The rule: a scale is refused only when it is not finite (at construction);
    a finite one runs, and if the samples then leave the dtype's range, the error names every
    weight with ``|w|`` above the smaller of ``1/eps`` and ``√max`` of the dtype (float64: 4.5e15,
    float32: 8.4e6, float16: 256, bfloat16: 128) as the likely cause. Why: beyond ``1/eps``
    the guided term ``w · (branch difference)`` swamps the rest of the update below the dtype's
    rounding (the model's own prediction no longer shows in x); beyond ``√max`` the next step's
    difference, which can grow with x, overflows the dtype within two steps. A hint only: it
    does not refuse a run that stays finite."""
    fi = torch.finfo(dtype)
    limit = min(1.0 / fi.eps, math.sqrt(fi.max))
    big = [(name, value) for name, value in scales if abs(value) > limit]
    if not big:
        return ""
    names = "; ".join(f"{name}: {value:g}" for name, value in big)
    return (f". Likely cause: {names} (|value| > {limit:.3g}, beyond which a guidance weight swamps the rest "
            f"of the step in {str(dtype).replace('torch.', '')} and can overflow it): use a smaller value")


def batch_tensor(name: str, value, shape, device, dtype, owner: str) -> torch.Tensor:
    """A ``[B]`` tensor from a number or a ``[B]`` tensor, checked against the batch."""
    b = shape[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((b,), check_number(name, value, owner=owner), device=device, dtype=dtype)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name}: expected a number or a [B] tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{owner}: {name}: expected a real floating tensor, got {value.dtype}")
    if value.shape != (b,):
        raise ValueError(f"{owner}: {name}: expected shape [B] = [{b}], got {tuple(value.shape)}")
    if value.device != torch.device(device):
        raise ValueError(f"{owner}: {name}: on {value.device}, but the samples are on {device}")
    return value.to(dtype)


def sample_like(name: str, value, shape, device, owner: str) -> torch.Tensor:
    """A tensor shaped like the batch, from one that is or broadcasts to it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name}: expected a tensor, got {type(value).__name__}")
    if value.device != torch.device(device):
        raise ValueError(f"{owner}: {name}: on {value.device}, but the samples are on {device}")
    if not value.is_floating_point():
        raise TypeError(f"{owner}: {name}: expected a floating tensor, got {value.dtype}")
    try:
        return value.expand(shape)
    except RuntimeError:
        raise ValueError(f"{owner}: {name}: shape {tuple(value.shape)} does not broadcast to the batch "
                         f"shape {tuple(shape)}") from None
