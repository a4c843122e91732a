"""Coefficient programs of the built-in policies, for the fused combine (docs/architecture.md, coefficients).

A fused combine evaluates one of these tiny per-row programs on the Gram matrix and a few
coefficient vectors (LinCombs over the step's operands, ``[B, G, K]``) and writes
``sum_k C[b, g, k] op_k`` in the same pass. This module is the plain-torch truth of each
program; the Triton kernel (``gradguide/kernels/fused.py``) and the native CPU op
(``csrc/gradguide_ops.cpp``) evaluate the same formulas in float64 inside their combine, and
the reference backend runs these functions and then its ``combine``. Inner products are per row (a sample, or a (sample, group) pair), exactly
``gradguide.linear.Operands.dot(..., per="group")``; with one group, per sample.

Programs (vectors in *italics* are coefficient vectors; all others per-sample scalars, a
number or a 0-d / ``[B]`` device tensor):

- ``"linear"``: ``coef`` (no Gram: a combine whose weights need no inner product, e.g. a
  plain sampler step or CFG with the weights of every step precomputed).

- ``"cfg"`` (Ho & Salimans 2022, diffusers' ``w``): ``base + uncond + scale (cond − uncond)``.
- ``"pxp-a"`` (PixelAsParam policy A, docs/mathematics.md#pixelasparam): ``base + PC(den|cls) + PC(cls|den) + div``.
- ``"pxp-b"`` (policy B): ``base + PC(den|cls) + PC(PC(cls|den)|div) + PC(div|cls)``.
- ``"pxp-c"`` (policy C): ``Δ = (scale − 1)(x0_cond − x0_uncond)``,
  ``base + post (PC_delta(x0_cond|Δ) + PC_delta2(Δ|x0_cond))``.
- ``"apg"`` (Sadat et al. 2025, no momentum): ``Δ = d_cond − d_uncond`` clipped to norm
  ``norm_threshold`` (if > 0), ``Δ_∥ = <Δ, d_c>/‖d_c‖² d_c``,
  ``base + post (d_cond + (scale − 1)(Δ − Δ_∥ + eta Δ_∥))``.
- ``"tcfg"`` (tangential CFG, diffusers' guider; derivation in :mod:`gradguide.guidance.tangential`):
  ``cond``/``uncond`` are the branches' raw outputs ``c``, ``u``; with ``a = ‖c‖²``, ``b = <c, u>``,
  ``d = ‖u‖²``, ``r = √((a − d)² + 4b²)``, ``cos 2θ = (a − d)/r``, ``sin 2θ = 2b/r`` (−1 and 0
  where ``r = 0``), ``u' = (sin 2θ/2) c + ((1 − cos 2θ)/2) u``;
  ``base + post (A + scale (c − u'))`` with ``A = c`` if ``original`` ≠ 0 else ``u'``.
- ``"mambo"`` (MAMBO-G, diffusers' ``MagnitudeAwareGuidance``): ``Δ = cond − uncond``,
  ``e = exp(−alpha ‖Δ‖/‖uncond‖)`` (0 where ‖uncond‖ = 0 and alpha > 0), weight
  ``scale·e`` if ``original`` ≠ 0 else ``1 + (scale − 1) e``; ``base + post (A + weight Δ)`` with
  ``A = cond`` if ``original`` ≠ 0 else ``uncond``.
- ``"lookahead"`` (G_loss, Guo et al. 2024, Definition 1, as a step runs it): with ``v`` = *vjp*,
  ``β = (a²/2)/(a² sigma² + h ‖v‖²)`` per sample if ``beta_per_sample`` ≠ 0, else ``beta``;
  ``residual = 2·multiplier·(target − <reward, x0>)`` (``gᵀx̂_0`` with *reward* = ``g`` and
  *x0* = ``x̂_0`` as vectors); ``base + post · residual · β · v``.

``PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b``, ``a`` where ``‖b‖ = 0`` (per row).

**Non-finite values** (the one rule of every backend: this module, the native CPU and CUDA
ops through ``csrc/gradguide_policies.h``, the Triton prologue in ``gradguide/kernels/fused.py``):
if any input of a row's program — its Gram block, one of its coefficient vectors, one of its
sample's scalars — is NaN or ±inf, or a weight the program computes from them is not finite,
all K weights of that row are NaN, so the whole row (sample, or sample × group) of the
output is NaN. Without the rule the outcome would depend on each program's comparisons
(``min(0, NaN)``, a zero-norm test, APG's clip, a β selected by ``beta_per_sample``), and so
on the backend. The combine itself then follows IEEE arithmetic elementwise: every operand is
multiplied by its weight, so a non-finite operand element poisons its output element even
where the weight is 0 (and, for a policy with a Gram matrix, its whole row through the Gram).
"""
from __future__ import annotations

from typing import Dict

import torch


# -- the formulas, each written once ---------------------------------------------------------
# Each takes an *algebra*: ``alg.dot(u, v)`` (the per-row inner product) and ``alg.select(flag,
# u, v)`` (per-row choice between two vectors). Vectors are whatever the algebra holds: the
# coefficient tensors ``[B, G, K]`` of a fused combine (:class:`GramAlgebra`) or the LinCombs of
# a step (:meth:`gradguide.linear.Operands.algebra`); scalars are numbers or tensors that
# broadcast against the algebra's inner products. The fused programs below, the guidance terms
# and :mod:`gradguide.projection` all call these functions (docs/mathematics.md).

def safe_div(num, den):
    """``num/den``; 0 where ``den == 0`` (a zero-norm partner); NaN propagates (a non-finite
    operand poisons its row, the rule of every backend)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _like(value, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a number, bool or tensor) as a tensor that broadcasts against ``ref``."""
    if isinstance(value, torch.Tensor):
        return value
    # new_full: a tensor of ref's kind (a fake tensor under a dry run's FakeTensorMode too)
    return ref.new_full((), value, dtype=torch.bool if isinstance(value, bool) else ref.dtype)


def norm2(alg, u):
    """``‖u‖²`` per row (exact algebra can round a tiny value below 0: clamped)."""
    return alg.dot(u, u).clamp_min(0.0)


def pc(alg, a, b, delta):
    """PixelAsParam's projection ``PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b``; ``a`` where ``‖b‖ = 0``."""
    factor = safe_div(alg.dot(a, b).clamp(max=0.0), norm2(alg, b))
    return a - b * (factor * delta)


def pxp_directions(alg, policy: str, den, cls, div, delta):
    """PixelAsParam policies A and B on a step's directions (denoising, guidance, diversity):
    A: ``PC(den|cls) + PC(cls|den) + div``; B: ``PC(den|cls) + PC(PC(cls|den)|div) + PC(div|cls)``."""
    den1, cls1 = pc(alg, den, cls, delta), pc(alg, cls, den, delta)
    if policy == "A":
        return den1 + cls1 + div
    return den1 + pc(alg, cls1, div, delta) + pc(alg, div, cls, delta)


def pxp_cfg(alg, x0_cond, delta, delta1, delta2):
    """PixelAsParam policy C's x̂_0 from the conditional x̂_0 and ``Δ = (w − 1)(x̂_0c − x̂_0u)``:
    ``PC_δ1(x̂_0c|Δ) + PC_δ2(Δ|x̂_0c)``."""
    return pc(alg, x0_cond, delta, delta1) + pc(alg, delta, x0_cond, delta2)


def apg_update(alg, d_cond, delta, norm_threshold, eta):
    """Adaptive projected guidance's update ``Δ_⊥ + η Δ_∥`` (Sadat et al. 2025): ``Δ`` clipped to
    norm ``r = norm_threshold`` where ``r > 0`` (a zero Δ is left alone), split along ``d_cond``."""
    norm = norm2(alg, delta).sqrt()
    r = _like(norm_threshold, norm)
    clip = torch.where(norm > 0, safe_div(r.expand_as(norm), norm).clamp(max=1.0), torch.ones_like(norm))
    delta = alg.select(r > 0, delta * clip, delta)
    parallel = d_cond * safe_div(alg.dot(delta, d_cond), norm2(alg, d_cond))
    return (delta - parallel) + parallel * eta


def tangential_uncond(alg, cond, uncond):
    """TCFG's unconditional branch: ``uncond`` projected on the principal right singular vector of
    ``[cond; uncond]`` (derivation: :mod:`gradguide.guidance.tangential`); ``uncond`` where that
    direction is not defined (``r = 0``)."""
    a, d, b = norm2(alg, cond), norm2(alg, uncond), alg.dot(cond, uncond)
    r = torch.sqrt((a - d) * (a - d) + 4.0 * b * b)
    cos2 = torch.where(r > 0, safe_div(a - d, r), torch.full_like(r, -1.0))
    sin2 = torch.where(r > 0, safe_div(2.0 * b, r), torch.zeros_like(r))
    return cond * (0.5 * sin2) + uncond * (0.5 * (1.0 - cos2))


def mambo_weight(alg, diff, uncond, scale, alpha, original):
    """MAMBO-G's CFG weight ``1 + (w − 1) e^{−α‖Δ‖/‖u‖}`` (``original``: ``w e^{−α‖Δ‖/‖u‖}``);
    where ``‖u‖ = 0`` and α > 0 the ratio is infinite and ``e^{...} = 0``."""
    norm_u = norm2(alg, uncond).sqrt()
    decay = torch.exp(-alpha * safe_div(norm2(alg, diff).sqrt(), norm_u))
    decay = torch.where((norm_u > 0) | (_like(alpha, norm_u) <= 0), decay, torch.zeros_like(decay))
    return torch.where(_like(original, norm_u), scale * decay, 1.0 + (scale - 1.0) * decay)


def lookahead_beta(alg, a, h, sigma, vjp):
    """G_loss's per-sample step size ``β = (a²/2)/(a² σ² + h ‖v‖²)`` with ``v = ∇_x(gᵀx̂_0)``
    (Guo et al. 2024, Definition 1; ``a = √ᾱ``, ``h = 1 − ᾱ``)."""
    a2 = a * a
    return (a2 / 2) / (a2 * sigma ** 2 + h * norm2(alg, vjp))


def lookahead_score(vjp, beta, multiplier, target, g_x0):
    """G_loss's score shift ``2 m β (y − gᵀx̂_0) v`` (``m``: the multiplier, 1 in the paper)."""
    return vjp * (2 * multiplier * beta * (target - g_x0))


class GramAlgebra:
    """The algebra of a fused combine: vectors are coefficient tensors ``[B, G, K]``, inner
    products ``uᵀ Gram v`` per row (``[B, G, 1]``, float64: see :mod:`gradguide.ops.reference`)
    from the Gram matrix of the first ``Kg`` operands (the vectors are zero beyond them)."""

    def __init__(self, gram):
        self.gram = gram

    def dot(self, u, v):
        kg = self.gram.shape[-1]
        u, v = u[..., :kg].to(self.gram.dtype), v[..., :kg].to(self.gram.dtype)
        return torch.einsum("bgk,bgkl,bgl->bg", u, self.gram, v).unsqueeze(-1)

    @staticmethod
    def select(flag, u, v):
        return torch.where(flag, u, v)


# -- the fused programs: coefficient vectors and scalars -> the combine's weights -------------

def _linear(alg, v, s):
    return v["coef"]


def _cfg(alg, v, s):
    return v["base"] + v["uncond"] + (v["cond"] - v["uncond"]) * s["scale"]


def _pxp_a(alg, v, s):
    return v["base"] + pxp_directions(alg, "A", v["den"], v["cls"], v["div"], s["delta"])


def _pxp_b(alg, v, s):
    return v["base"] + pxp_directions(alg, "B", v["den"], v["cls"], v["div"], s["delta"])


def _pxp_c(alg, v, s):
    delta = (v["x0_cond"] - v["x0_uncond"]) * (s["scale"] - 1.0)
    return v["base"] + pxp_cfg(alg, v["x0_cond"], delta, s["delta"], s["delta2"]) * s["post"]


def _apg(alg, v, s):
    d_cond = v["d_cond"]
    update = apg_update(alg, d_cond, d_cond - v["d_uncond"], s["norm_threshold"], s["eta"])
    return v["base"] + (d_cond + update * (s["scale"] - 1.0)) * s["post"]


def _tcfg(alg, v, s):
    cond = v["cond"]
    uncond = tangential_uncond(alg, cond, v["uncond"])
    anchor = alg.select(s["original"] != 0, cond, uncond)
    return v["base"] + (anchor + (cond - uncond) * s["scale"]) * s["post"]


def _mambo(alg, v, s):
    cond, uncond = v["cond"], v["uncond"]
    diff = cond - uncond
    original = s["original"] != 0
    weight = mambo_weight(alg, diff, uncond, s["scale"], s["alpha"], original)
    return v["base"] + (alg.select(original, cond, uncond) + diff * weight) * s["post"]


def _lookahead(alg, v, s):
    vjp = v["vjp"]
    per_sample = lookahead_beta(alg, s["a"], s["h"], s["sigma"], vjp)
    beta = torch.where(_like(s["beta_per_sample"] != 0, per_sample), per_sample, _like(s["beta"], per_sample))
    score = lookahead_score(vjp, beta, s["multiplier"], s["target"], alg.dot(v["reward"], v["x0"]))
    return v["base"] + score * s["post"]


# name -> (coefficient vectors, scalars with their defaults (None = required), program)
PROGRAMS = {
    "linear": (("coef",), {}, _linear),
    "cfg": (("base", "cond", "uncond"), {"scale": None}, _cfg),
    "pxp-a": (("base", "den", "cls", "div"), {"delta": 1.0}, _pxp_a),
    "pxp-b": (("base", "den", "cls", "div"), {"delta": 1.0}, _pxp_b),
    "pxp-c": (("base", "x0_cond", "x0_uncond"), {"scale": None, "delta": 1.0, "delta2": 1.0, "post": 1.0}, _pxp_c),
    "apg": (("base", "d_cond", "d_uncond"), {"scale": None, "eta": 0.0, "norm_threshold": 15.0, "post": 1.0}, _apg),
    "tcfg": (("base", "cond", "uncond"), {"scale": None, "original": 0.0, "post": 1.0}, _tcfg),
    "mambo": (("base", "cond", "uncond"), {"scale": None, "alpha": None, "original": 0.0, "post": 1.0}, _mambo),
    "lookahead": (("base", "x0", "vjp", "reward"), {"a": None, "h": None, "sigma": 0.1, "target": None,
                                                    "multiplier": 1.0, "beta": 0.0, "beta_per_sample": 1.0,
                                                    "post": 1.0}, _lookahead),
}
# name -> the coefficient vectors whose inner products the program takes (the Gram's operands)
GRAM_VECTORS = {"linear": (), "cfg": (), "pxp-a": ("den", "cls"), "pxp-b": ("den", "cls", "div"),
                "pxp-c": ("x0_cond", "x0_uncond"), "apg": ("d_cond", "d_uncond"), "tcfg": ("cond", "uncond"),
                "mambo": ("cond", "uncond"), "lookahead": ("x0", "vjp", "reward")}


def program_arguments(policy: str, params: dict, zero):
    """``(vectors, scalars)`` of ``policy`` from keyword ``params``: a missing vector is ``zero``,
    a missing scalar its default (a required one missing: TypeError naming it)."""
    if policy not in PROGRAMS:
        raise ValueError(f"policy: expected one of {tuple(PROGRAMS)}, got {policy!r}")
    names_v, defaults = PROGRAMS[policy][:2]
    unknown = set(params) - set(names_v) - set(defaults)
    if unknown:
        raise TypeError(f"policy {policy!r}: unexpected parameters {sorted(unknown)}")
    scalars = {}
    for name, default in defaults.items():
        if name not in params and default is None:
            raise TypeError(f"policy {policy!r}: missing scalar {name!r}")
        scalars[name] = params.get(name, default)
    return {name: params.get(name, zero) for name in names_v}, scalars


# name -> (coefficient vectors, scalars with their defaults): the signature every backend implements
POLICIES = {name: (vectors, scalars) for name, (vectors, scalars, _) in PROGRAMS.items()}
NEEDS_GRAM = {name: bool(GRAM_VECTORS[name]) for name in POLICIES}


def coefficients(policy: str, gram, vectors: Dict[str, torch.Tensor], scalars: Dict[str, torch.Tensor]):
    """``C[B, G, K]`` of ``policy``. ``vectors[name]`` are ``[B, G, K]``; ``scalars[name]`` are
    ``[B, 1, 1]`` (see :func:`gradguide.ops.fused_combine` for the checked entry point). Rows
    with a non-finite input or weight are all NaN (module doc)."""
    if policy not in PROGRAMS:
        raise ValueError(f"policy: expected one of {tuple(PROGRAMS)}, got {policy!r}")
    coef = PROGRAMS[policy][2](GramAlgebra(gram) if gram is not None else None, vectors, scalars)
    finite = torch.isfinite(coef).all(-1, keepdim=True)                       # [B, G, 1]
    if gram is not None and NEEDS_GRAM[policy]:   # (cfg and linear read no Gram, even when given one)
        finite = finite & torch.isfinite(gram).flatten(-2).all(-1, keepdim=True)
    for t in (*vectors.values(), *scalars.values()):
        finite = finite & torch.isfinite(t).all(-1, keepdim=True)
    return torch.where(finite, coef, torch.full((), float("nan"), dtype=coef.dtype, device=coef.device))
