"""PixelAsParam (Dinh, Liu & Xu, ICML 2023): guidance terms as conflicting update directions.

Pixels are the parameters; each additive term of a sampling step is an update direction.
For DDPM with classifier guidance (docs/mathematics.md#pixelasparam):

    x_{t−1} = c2 x_t + g_den + g_cls + g_div,  g_den = c1 x̂_0, g_cls = s Σ_t ∇log p, g_div = σ_t z.

When two directions conflict (negative inner product, per sample), project one against the
other: ``PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b``; ``a`` is unchanged where ``‖b‖ = 0`` (per
sample). Each member of a pair is projected against the *original* other member.

- Policy A (conditional model + classifier): ``g_cls' = PC(g_cls|g_den)``, ``g_den' = PC(g_den|g_cls)``.
- Policy B (unconditional model + classifier): A, then ``g_cls'' = PC(g_cls'|g_div)``,
  ``g_div' = PC(g_div|g_cls)``.
- Policy C (classifier-free guidance, in x̂_0 space): ``Δ = w'(x̂_0c − x̂_0u)`` (``w' = w − 1``),
  ``x̂_0 = clip(PC_δ1(x̂_0c|Δ) + PC_δ2(Δ|x̂_0c))``, then the sampler step.
  ``convention="official"`` (default) follows the authors' code (``ClassFreeMLT6``), with
  which the paper's numbers were made: with clipping on, x̂_0c and x̂_0u are clipped *before*
  Δ and the projections (then the result is clipped again), and with ADM's learned-range
  variance the noise σ comes from the unconditional branch. ``convention="paper"`` is the
  formula as printed: unclipped branches, σ from the conditional branch. Without clipping and
  learned variance the two are identical. (docs/pixelasparam.md lists every difference from
  the official code.)
- ``pcgrad=True``: N-way PCGrad (Yu et al. 2020) over the denoising direction, each guidance
  term's direction and (policy B) the noise, each projected in turn against every other
  original direction; the denoising–diversity pair is never projected. With one guidance
  term it equals policy A (or B) exactly.
- **Perturbed-branch guiders** (PAG, SLG, SEG, AutoGuidance, LTX2): each branch difference
  ``Δ_k = w_k (x̂_0c − x̂_0k)`` is a direction of its own. Policy C: ``x̂_0c`` and the Δ_k, each
  projected in turn against every other original (two directions: policy C exactly); A and B:
  ``c_0 x̂_0c`` denoises, each ``c_0 Δ_k`` guides next to the terms' directions
  (docs/pixelasparam.md#perturbed-branch-guiders).

**Other samplers.** Every sampler here writes its step as
``x_{t−1} = c_x x_t + c_0 x̂_0 + c_h x̂_0^{prev} + σ z`` (see :mod:`gradguide.samplers`). The
directions are the terms' contributions to ``x_{t−1}``: ``g_den = c_0 x̂_0`` (the prediction
before score-level guidance), each guidance direction is its own contribution (for a score
shift G: ``c_0 (1−ᾱ_t)/√ᾱ_t G``; for a mean shift, the shift itself; for DPS its update),
``g_div = σ z``, and ``c_x x_t + c_h x̂_0^{prev}`` is never touched. For DDPM
(``c_x = c2``, ``c_0 = c1``) this is exactly the formulas above; for DDIM and DPM-Solver++
it is the same policy applied to the same decomposition. Policy C acts in x̂_0 space and
applies to every sampler unchanged.

**Telemetry** (the paper's gradient-view plots): per step and per pair, per-sample cosine
similarity and conflict flag (cos < 0), the share of samples with cos < 0 and
``Φ = 2‖a‖‖b‖/(‖a‖² + ‖b‖²)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .guidance.base import check_number
from .linear import LinComb, Operands
from .ops import policies
from .ops.policies import safe_div

POLICIES = ("A", "B", "C")
GRANULARITIES = ("sample", "channel")
CONVENTIONS = ("official", "paper")


def pc(ops: Operands, a: LinComb, b: LinComb, delta=1.0, per: str = "sample") -> LinComb:
    """``PC_δ(a|b)`` (:func:`gradguide.ops.policies.pc`) on a step's LinCombs, per sample (or per group)."""
    return policies.pc(ops.algebra(per), a, b, delta)


def pair_telemetry(ops: Operands, a: LinComb, b: LinComb) -> Dict[str, torch.Tensor]:
    """Per-sample cosine, the share of samples with cos < 0, and Φ for directions ``a``, ``b``."""
    aa, bb, ab = ops.norm2(a), ops.norm2(b), ops.dot(a, b)
    cos = safe_div(ab, (aa * bb).sqrt())
    phi = safe_div(2 * (aa * bb).sqrt(), aa + bb)
    return {"cos": cos, "conflict": cos < 0, "conflict_share": (cos < 0).to(cos.dtype).mean(), "phi": phi}


def named_telemetry(ops: Operands, directions: List[Tuple[str, LinComb]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """:func:`pair_telemetry` of every pair of ``[(name, direction)]``, keyed ``"a/b"`` in list order."""
    return {f"{a}/{b}": pair_telemetry(ops, u, v)
            for i, (a, u) in enumerate(directions) for b, v in directions[i + 1:]}


def step_telemetry(ops: Operands, den: LinComb, guide: Optional[LinComb], div: Optional[LinComb],
                   branch: Sequence[Tuple[str, LinComb]] = ()):
    """The pairs of a step's directions. ``branch``: a branch guider's differences as directions of
    their own (policies A and B over PAG, SLG, ...): then every pair of den, each difference, the
    terms' guidance (``cls``) and div."""
    if branch:
        return named_telemetry(ops, [("den", den)] + list(branch) + ([("cls", guide)] if guide is not None else [])
                               + ([("div", div)] if div is not None else []))
    pairs = {}
    if guide is not None:
        pairs["den/cls"] = pair_telemetry(ops, den, guide)
        if div is not None:
            pairs["cls/div"] = pair_telemetry(ops, guide, div)
    if div is not None:
        pairs["den/div"] = pair_telemetry(ops, den, div)
    return pairs


class PixelAsParam:
    """PixelAsParam projection, passed to :func:`gradguide.sample` as ``projection=``.

    ``policy``: ``"A"``, ``"B"`` or ``"C"`` (see the module doc). ``delta``: δ of every
    projection (policy C's δ1); ``delta2``: policy C's δ2 (defaults to ``delta``).
    ``granularity``: conflicts tested per ``"sample"`` (the paper) or per ``"channel"`` (per
    sample and channel, which the authors also tried). ``pcgrad``: N-way PCGrad over all
    guidance directions (policies A and B). ``convention``: policy C's ``"official"``
    (default: the authors' code — clip the branches' x̂_0 before projecting, σ from the
    unconditional branch) or ``"paper"`` (the printed formula); they differ only with
    clipping or learned-range variance, and policies A and B ignore it.
    """

    def __init__(self, policy: str = "A", delta: float = 1.0, delta2: Optional[float] = None,
                 granularity: str = "sample", pcgrad: bool = False, convention: str = "official"):
        if policy not in POLICIES:
            raise ValueError(f"PixelAsParam: policy: expected one of {POLICIES}, got {policy!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"PixelAsParam: granularity: expected one of {GRANULARITIES}, got {granularity!r}")
        if pcgrad and policy == "C":
            raise ValueError("PixelAsParam: pcgrad applies to policies A and B (policy C is a single pair)")
        self.policy = policy
        self.delta = check_number("delta", delta, 0.0, owner="PixelAsParam")
        self.delta2 = self.delta if delta2 is None else check_number("delta2", delta2, 0.0, owner="PixelAsParam")
        self.granularity = granularity
        self.pcgrad = bool(pcgrad)
        if convention not in CONVENTIONS:
            raise ValueError(f"PixelAsParam: convention: expected one of {CONVENTIONS}, got {convention!r}")
        self.convention = convention

    @property
    def per(self) -> str:
        return "sample" if self.granularity == "sample" else "group"

    def groups(self, shape) -> int:
        if self.granularity == "sample":
            return 1
        if len(shape) < 3:
            raise ValueError(f"PixelAsParam: granularity: 'channel' needs samples shaped [B, C, ...], got {tuple(shape)}")
        return int(shape[1])

    def __repr__(self) -> str:
        return (f"PixelAsParam(policy={self.policy!r}, delta={self.delta}, delta2={self.delta2}, "
                f"granularity={self.granularity!r}, pcgrad={self.pcgrad}, convention={self.convention!r})")

    # -- policies A and B: on the step's directions ------------------------------------------
    def project_directions(self, ops: Operands, den: LinComb, guides: List[LinComb], div: LinComb) -> LinComb:
        """The sum of the projected directions (``den + guidance + div``, projected)."""
        if self.pcgrad:
            return self._pcgrad(ops, den, guides, div)
        cls = guides[0]
        for g in guides[1:]:
            cls = cls + g
        return ops.policy("pxp-a" if self.policy == "A" else "pxp-b", per=self.per, den=den, cls=cls, div=div,
                          delta=self.delta)

    def _pcgrad(self, ops: Operands, den: LinComb, guides: List[LinComb], div: LinComb) -> LinComb:
        directions = [("den", den)] + [(f"cls{j}", g) for j, g in enumerate(guides)]
        if self.policy == "B":
            directions.append(("div", div))
        total = None
        for name_i, d_i in directions:
            projected = d_i
            for name_j, d_j in directions:
                if name_j == name_i or {name_i, name_j} == {"den", "div"}:
                    continue
                projected = pc(ops, projected, d_j, self.delta, self.per)
            total = projected if total is None else total + projected
        return total if self.policy == "B" else total + div

    # -- a branch guider's differences (PAG, SLG, SEG, AutoGuidance, LTX2) ---------------------
    def check_branch_guider(self, guider, clip, learned: bool) -> None:
        """Refuse, by name, what has no defined meaning over a branch guider's directions."""
        owner = type(guider).__name__
        if guider.guidance_rescale > 0:
            raise ValueError(f"projection: PixelAsParam over {owner}'s branch differences: guidance_rescale="
                             f"{guider.guidance_rescale} rescales the guided prediction as a whole, which is not a "
                             "sum of update directions; pass guidance_rescale=0 or no projection")
        if self.policy == "C" and self.convention == "official" and (clip or learned):
            raise ValueError(f"projection: convention='official' is the authors' code for CFG's two branches "
                             f"(branches clipped before projecting, σ from the unconditional branch); {owner} has "
                             "no such code: pass PixelAsParam('C', convention='paper') (branches unclipped, the "
                             "result clipped, σ from the conditional branch)")
        if self.policy in ("A", "B") and clip:
            raise ValueError(f"projection: policy {self.policy} over {owner}'s branch differences with the sampler's "
                             "x̂_0 clipping: the clipped guided x̂_0 is not a sum of the conditional prediction and the "
                             "differences; use policy C (it clips the projected x̂_0) or sampler clip=False")

    def combine_directions(self, ops: Operands, x0_cond: LinComb, differences: List[Tuple[str, LinComb]],
                           telemetry: bool = False):
        """Policy C over a branch guider's directions in x̂_0 space: ``d_0 = x̂_0c`` and the differences
        ``d_k = Δ_k`` in the guider's order (CFG's first), ``x̂_0 = x̂_0c + Σ Δ_k`` unprojected. Each
        ``d_i`` is projected in turn against every other *original* ``d_j`` (``j`` ascending; δ1 for
        ``d_0``, δ2 for the differences) and the results are summed; with one difference this is
        policy C exactly (:meth:`combine_cfg`, the ``pxp-c`` program, which the fused step runs).
        Returns ``(x̂_0, telemetry of every pair or {})``."""
        named = [("cond", x0_cond)] + list(differences)
        if not differences:   # guidance off this step
            return x0_cond, {}
        if len(differences) == 1:
            ((_, d),) = differences
            # pxp-c's Δ = (scale − 1)(x0_cond − x0_uncond): with scale 2 and x0_uncond = x̂_0c − d it is d
            x0 = ops.policy("pxp-c", per=self.per, x0_cond=x0_cond, x0_uncond=x0_cond - d, scale=2.0,
                            delta=self.delta, delta2=self.delta2)
        else:
            x0 = None
            for i, (_, d_i) in enumerate(named):
                projected = d_i
                for j, (_, d_j) in enumerate(named):
                    if j != i:
                        projected = pc(ops, projected, d_j, self.delta if i == 0 else self.delta2, self.per)
                x0 = projected if x0 is None else x0 + projected
        return x0, (named_telemetry(ops, named) if telemetry else {})

    # -- policy C: on the two CFG branches in x̂_0 space --------------------------------------
    @property
    def sigma_from_uncond(self) -> bool:
        """Policy C, official convention: learned-range σ from the unconditional branch."""
        return self.policy == "C" and self.convention == "official"

    def combine_cfg(self, ops: Operands, x0_cond: LinComb, x0_uncond: LinComb, scale: float, clip=None,
                    telemetry: bool = False):
        """Policy C's ``x̂_0 = PC_δ1(x̂_0c|Δ) + PC_δ2(Δ|x̂_0c)``, ``Δ = (w − 1)(x̂_0c − x̂_0u)``,
        and (``telemetry``) the pair's telemetry, else ``{}`` (the caller clips the result). ``clip``: the run's
        ``(low, high)`` or None; under the official convention the branches' x̂_0 are clipped
        first (clipping is not linear): ``clip(x̂_0u)`` and the clipped difference
        ``clip(x̂_0c) − clip(x̂_0u)`` are written out as operands of their own, so that Δ, small
        where the branches agree, is not a difference of two large materialised tensors (in
        float32 that kept only their absolute precision: 1e-3 off float64, docs/architecture.md#precision)."""
        if clip is not None and self.convention == "official":
            x0_uncond, diff = ops.materialize_clip_shift(("x0_uncond_clipped", "x0_cfg_diff_clipped"), x0_uncond,
                                                         x0_cond - x0_uncond, clip)
            x0_cond = x0_uncond + diff
        x0 = ops.policy("pxp-c", per=self.per, x0_cond=x0_cond, x0_uncond=x0_uncond, scale=scale, delta=self.delta,
                        delta2=self.delta2)
        if not telemetry:
            return x0, {}
        return x0, {"cond/cfg": pair_telemetry(ops, x0_cond, (x0_cond - x0_uncond) * (scale - 1.0))}


def project(a: torch.Tensor, b: torch.Tensor, delta: float = 1.0, granularity: str = "sample",
            backend: str = "auto") -> torch.Tensor:
    """``PC_δ(a|b) = a − δ min(0, <a,b>)/‖b‖² b`` per sample (``granularity="channel"``: per
    sample and channel); ``a`` unchanged for samples where ``‖b‖ = 0``."""
    from . import ops as _ops
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"project: {name}: expected a tensor, got {type(value).__name__}")
    _ops.check_operands([a, b], name="project(a, b)")
    if a.dim() < 2:
        raise ValueError(f"project: a: expected a batch [B, ...] with at least 2 dimensions, got {tuple(a.shape)}")
    proj = PixelAsParam("A", delta=delta, granularity=granularity)
    space = Operands(a, groups=proj.groups(a.shape), backend=_ops.resolve_backend(backend, a.device))
    ua, ub = space.add("a", a), space.add("b", b)
    return space.combine(pc(space, ua, ub, delta, proj.per))
