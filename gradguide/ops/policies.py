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
- ``"gloss"`` (Guo et al. 2024, Definition 1, the per-sample β): with ``v`` = *vjp*,
  ``β = (a²/2)/(a² sigma² + h ‖v‖²)``, ``base + post · residual · β · v`` where ``residual`` is
  ``2·multiplier·(y − gᵀx̂_0)`` per sample and ``post`` maps a score shift to the step
  (``c_0 h / a``).
- ``"lookahead"`` (the same G_loss, with the residual from the Gram matrix, as a step runs it):
  ``v`` = *vjp*, ``β`` = the per-sample formula above if ``beta_per_sample`` ≠ 0, else ``beta``;
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

# name -> (coefficient vectors, scalars with their defaults; None = required)
POLICIES = {
    "linear": (("coef",), {}),
    "cfg": (("base", "cond", "uncond"), {"scale": None}),
    "pxp-a": (("base", "den", "cls", "div"), {"delta": 1.0}),
    "pxp-b": (("base", "den", "cls", "div"), {"delta": 1.0}),
    "pxp-c": (("base", "x0_cond", "x0_uncond"), {"scale": None, "delta": 1.0, "delta2": 1.0, "post": 1.0}),
    "apg": (("base", "d_cond", "d_uncond"), {"scale": None, "eta": 0.0, "norm_threshold": 15.0, "post": 1.0}),
    "tcfg": (("base", "cond", "uncond"), {"scale": None, "original": 0.0, "post": 1.0}),
    "mambo": (("base", "cond", "uncond"), {"scale": None, "alpha": None, "original": 0.0, "post": 1.0}),
    "gloss": (("base", "vjp"), {"a": None, "h": None, "sigma": 0.1, "residual": None, "post": 1.0}),
    "lookahead": (("base", "x0", "vjp", "reward"), {"a": None, "h": None, "sigma": 0.1, "target": None,
                                                    "multiplier": 1.0, "beta": 0.0, "beta_per_sample": 1.0,
                                                    "post": 1.0}),
}
NEEDS_GRAM = {name: name not in ("cfg", "linear") for name in POLICIES}


def _safe_div(num, den):
    """``num/den``; 0 where ``den == 0`` (a zero-norm partner); NaN propagates (a non-finite
    operand poisons its row, the rule of every backend)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _dot(gram, u, v):
    """``<u, v>`` per row from the Gram matrix of the first ``Kg`` operands (``u``, ``v`` are
    zero beyond them), in the Gram's dtype (float64: see :mod:`gradguide.ops.reference`)."""
    kg = gram.shape[-1]
    u, v = u[..., :kg].to(gram.dtype), v[..., :kg].to(gram.dtype)
    return torch.einsum("bgk,bgkl,bgl->bg", u, gram, v).unsqueeze(-1)


def _pc(gram, a, b, delta):
    factor = _safe_div(_dot(gram, a, b).clamp(max=0.0), _dot(gram, b, b).clamp_min(0.0))
    return a - b * (factor * delta)


def coefficients(policy: str, gram, vectors: Dict[str, torch.Tensor], scalars: Dict[str, torch.Tensor]):
    """``C[B, G, K]`` of ``policy``. ``vectors[name]`` are ``[B, G, K]``; ``scalars[name]`` are
    ``[B, 1, 1]`` (see :func:`gradguide.ops.fused_combine` for the checked entry point). Rows
    with a non-finite input or weight are all NaN (module doc)."""
    coef = _program(policy, gram, vectors, scalars)
    finite = torch.isfinite(coef).all(-1, keepdim=True)                       # [B, G, 1]
    if gram is not None and NEEDS_GRAM[policy]:   # (cfg and linear read no Gram, even when given one)
        finite = finite & torch.isfinite(gram).flatten(-2).all(-1, keepdim=True)
    for t in (*vectors.values(), *scalars.values()):
        finite = finite & torch.isfinite(t).all(-1, keepdim=True)
    return torch.where(finite, coef, torch.full((), float("nan"), dtype=coef.dtype, device=coef.device))


def _program(policy: str, gram, vectors: Dict[str, torch.Tensor], scalars: Dict[str, torch.Tensor]):
    v, s = vectors, scalars
    if policy == "linear":
        return v["coef"]
    if policy == "cfg":
        return v["base"] + v["uncond"] + s["scale"] * (v["cond"] - v["uncond"])
    if policy in ("pxp-a", "pxp-b"):
        den, cls, div, d = v["den"], v["cls"], v["div"], s["delta"]
        den1, cls1 = _pc(gram, den, cls, d), _pc(gram, cls, den, d)
        if policy == "pxp-a":
            return v["base"] + den1 + cls1 + div
        return v["base"] + den1 + _pc(gram, cls1, div, d) + _pc(gram, div, cls, d)
    if policy == "pxp-c":
        xc = v["x0_cond"]
        delta = (xc - v["x0_uncond"]) * (s["scale"] - 1.0)
        x0 = _pc(gram, xc, delta, s["delta"]) + _pc(gram, delta, xc, s["delta2"])
        return v["base"] + s["post"] * x0
    if policy == "apg":
        dc = v["d_cond"]
        delta = dc - v["d_uncond"]
        r = s["norm_threshold"]
        norm = _dot(gram, delta, delta).clamp_min(0.0).sqrt()
        clip = torch.where(norm > 0, _safe_div(r.expand_as(norm), norm).clamp(max=1.0), torch.ones_like(norm))
        delta = torch.where(r > 0, delta * clip, delta)
        par = dc * _safe_div(_dot(gram, delta, dc), _dot(gram, dc, dc).clamp_min(0.0))
        out = dc + (delta - par + par * s["eta"]) * (s["scale"] - 1.0)
        return v["base"] + s["post"] * out
    if policy == "tcfg":
        c, u = v["cond"], v["uncond"]
        a, d, b = _dot(gram, c, c).clamp_min(0.0), _dot(gram, u, u).clamp_min(0.0), _dot(gram, c, u)
        r = torch.sqrt((a - d) * (a - d) + 4.0 * b * b)
        cos2 = torch.where(r > 0, _safe_div(a - d, r), -torch.ones_like(r))
        sin2 = torch.where(r > 0, _safe_div(2.0 * b, r), torch.zeros_like(r))
        u1 = c * (0.5 * sin2) + u * (0.5 * (1.0 - cos2))
        anchor = torch.where(s["original"] != 0, c, u1)
        return v["base"] + s["post"] * (anchor + s["scale"] * (c - u1))
    if policy == "mambo":
        c, u = v["cond"], v["uncond"]
        diff = c - u
        norm_u = _dot(gram, u, u).clamp_min(0.0).sqrt()
        decay = torch.exp(-s["alpha"] * _safe_div(_dot(gram, diff, diff).clamp_min(0.0).sqrt(), norm_u))
        decay = torch.where((norm_u > 0) | (s["alpha"] <= 0), decay, torch.zeros_like(decay))
        original = s["original"] != 0
        weight = torch.where(original, s["scale"] * decay, 1.0 + (s["scale"] - 1.0) * decay)
        return v["base"] + s["post"] * (torch.where(original, c, u) + weight * diff)
    if policy == "gloss":
        vjp = v["vjp"]
        a2 = s["a"] * s["a"]
        beta = (a2 / 2) / (a2 * s["sigma"] ** 2 + s["h"] * _dot(gram, vjp, vjp).clamp_min(0.0))
        return v["base"] + vjp * (s["post"] * s["residual"] * beta)
    if policy == "lookahead":
        vjp = v["vjp"]
        a2 = s["a"] * s["a"]
        per_sample = (a2 / 2) / (a2 * s["sigma"] ** 2 + s["h"] * _dot(gram, vjp, vjp).clamp_min(0.0))
        beta = torch.where(s["beta_per_sample"] != 0, per_sample, s["beta"])
        residual = 2 * s["multiplier"] * (s["target"] - _dot(gram, v["reward"], v["x0"]))
        return v["base"] + vjp * (s["post"] * residual * beta)
    raise ValueError(f"policy: expected one of {tuple(POLICIES)}, got {policy!r}")
