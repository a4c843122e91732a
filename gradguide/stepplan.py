"""Built-in step programs: a guided step as at most reduce + one fused combine (docs/architecture.md#the-fused-step).

The general step (:func:`gradguide.sampling._step_body`) writes every sampler × guidance ×
projection combination in :class:`~gradguide.linear.LinComb` algebra; evaluated each step,
that algebra is dozens of tiny torch ops (kernel launches on a GPU, per-call overhead on a
CPU). Most of it does not depend on the data: the sampler's scalars, the guidance scales and
the ε/x̂_0 conversions give weights that are known, per step, before sampling starts. Only the
policies' inner products (PixelAsParam's projections, APG's split and clip, G_loss's β and
residual) need the step's Gram matrix.

So when a run matches a built-in program, :func:`build` evaluates the *same* LinComb algebra
once, on the host, for all steps at once (symbolic operands whose "batch" is the step axis),
and appends the resulting per-step coefficient vectors and scalars to the run's device table.
A step then reads one column of that table (the index_select the general step does anyway),
calls ``reduce`` over the operands whose inner products the policy takes, and one
``fused_combine`` (:mod:`gradguide.ops.policies`: ``linear``, ``pxp-a``, ``pxp-b``, ``pxp-c``,
``apg``, ``lookahead``) — on the native backend that is two C++ calls. Clipping x̂_0 adds one
materialising pass (clipping is not linear): a clamped combine, or ``ops.clip_shift`` for a
clipped x̂_0 and a small clipped difference (a guidance shift; policy C's branch difference).

Built-in programs (anything else takes the general path, which stays the truth the fused
path is tested against in tests/test_fused_step.py):

- samplers DDPM, DDIM, flow-euler and flow-lcm (samplers that carry state between steps — multistep, Heun, UniPC,
  PLMS — take the general path); ε, x0, v and flow predictions; fixed variances;
- guidance: none, :class:`~gradguide.CFG`, :class:`~gradguide.APG` (no momentum),
  :class:`~gradguide.TCFG` and :class:`~gradguide.MamboG` (no ``guidance_rescale``; the start/stop
  window is a per-step scale),
  :class:`~gradguide.Classifier` (mean or score form, any number), one
  :class:`~gradguide.LookAhead` alone (no clipping);
- projection: none, PixelAsParam A/B (not pcgrad) over linear directions, C with CFG;
- clipping, with ``clip_eps="clipped"`` (and ``"model"`` for a linear x̂_0);
- no telemetry and no callback record (those read quantities the fused path never forms).

G_loss's VJP: the general step differentiates ``gᵀx̂_0`` through the tracked x̂_0
(``c_x x_t + c_o model(x_t)``, weights held constant). Its gradient is
``c_x g + c_o Jᵀg``, so the fused step asks autograd for ``Jᵀg`` only (the model's backward,
with ``grad_outputs = g``) and keeps ``g`` and ``Jᵀg`` as operands; ``gᵀx̂_0`` comes from the
Gram matrix. Same maths, no elementwise ops outside the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import ops, predictions
from .guidance.apg import APG
from .guidance.base import StepContext
from .guidance.cfg import CFG
from .guidance.classifier import Classifier
from .guidance.gradient import LookAhead
from .guidance.tangential import TCFG, MamboG
from .linear import LinComb, SymbolicOperands


@dataclass
class Stage:
    """One fused combine: ``output = policy(vectors, scalars; Gram of operands[:n_gram])``."""
    policy: str
    operands: List[str]
    n_gram: int
    vector_rows: List[int]               # first table row of each vector (K rows each)
    scalars: List[Tuple[str, object]]    # ("row", table row) or ("tensor", a [B] device tensor)
    clamp: Optional[tuple]
    output: str


@dataclass
class Variant:
    """The stages of a step with (or without) noise, and the operands it computes."""
    stages: List[Stage]
    inputs: List[str]                    # operand names the step must supply


@dataclass
class StepPlan:
    variants: Dict[bool, Variant] = field(default_factory=dict)   # keyed by "draws noise"


def unsupported(run) -> Optional[str]:
    """Why ``run``'s step is not a built-in program (``None`` if it is)."""
    if run.tables.name not in ("ddpm", "ddim", "flow-euler", "flow-lcm") or run.tables.slots:
        return f"sampler {run.tables.name!r} (carried state or not a built-in program)"
    if run.tables.learned_variance or run.variance_channels:
        return "learned-range variance"
    if run.telemetry:
        return "telemetry"
    if run.post_terms:
        return "post-step guidance (DPS)"
    branch, proj = run.branch, run.projection
    if branch is not None and type(branch) not in (CFG, APG, TCFG, MamboG):
        return f"{type(branch).__name__} guidance"
    if isinstance(branch, (TCFG, MamboG)) and branch.guidance_rescale > 0:
        return f"{type(branch).__name__} with guidance_rescale (standard deviations: not a built-in program)"
    if isinstance(branch, APG) and (branch.momentum != 0.0 or branch.convention != "paper"):
        return "APG momentum or a diffusers convention"
    for term in run.score_terms + run.mean_terms:
        if type(term) not in (Classifier, LookAhead):
            return f"{type(term).__name__} guidance"
    lookahead = [t for t in run.score_terms if type(t) is LookAhead]
    gram_x0 = isinstance(branch, (APG, TCFG, MamboG)) or (proj is not None and proj.policy == "C")
    if lookahead and (branch is not None or len(run.score_terms + run.mean_terms) > 1 or proj is not None
                      or run.clip is not None):
        return "G_loss with other guidance, a projection or clipping"
    if gram_x0 and (run.score_terms or run.mean_terms):
        return "APG / TCFG / MAMBO-G / policy C with further guidance terms"
    if proj is not None and proj.pcgrad:
        return "PCGrad projection"
    if gram_x0 and run.clip is not None and run.clip_eps == "model":
        return "clip_eps='model' with a data-dependent x̂_0"
    return None


def build(run) -> Optional[StepPlan]:
    """The run's step as built-in fused stages, with their per-step weights appended to
    ``run.table_rows`` (or ``None``, with ``run.fused_reason`` saying why not)."""
    run.fused_reason = unsupported(run)
    if run.fused_reason is not None:
        return None
    rows, index = run.tables.stacked("cpu", torch.float64)
    scalars = {name: rows[j] for name, j in index.items()}
    extra: List[torch.Tensor] = []
    first_row = run.table_rows.shape[0]
    plan = StepPlan()
    for noisy in sorted(set(run.tables.draws_noise)):
        variant = _program(run, scalars, noisy, extra, first_row)
        if variant is None:
            return None
        plan.variants[noisy] = variant
    if extra:
        table = torch.stack(extra).to(device=run.table_rows.device, dtype=run.table_rows.dtype)
        run.table_rows = torch.cat([run.table_rows, table])
    return plan


def copy_plan(plan: Optional[StepPlan]) -> Optional[StepPlan]:
    """A copy of ``plan`` that shares no list or dict with it (a run's own, see
    ``sampling._finish_prepare``'s cache); tensors in scalar specs are shared, not copied."""
    if plan is None:
        return None
    return StepPlan({noisy: Variant([Stage(s.policy, list(s.operands), s.n_gram, list(s.vector_rows), list(s.scalars),
                                           s.clamp, s.output) for s in v.stages], list(v.inputs))
                     for noisy, v in plan.variants.items()})


class _Builder:
    """Collects stages; vectors/scalars go to table rows."""

    def __init__(self, space: SymbolicOperands, extra: List[torch.Tensor], first_row: int, n: int):
        self.space, self.extra, self.first_row, self.n = space, extra, first_row, n
        self.stages: List[Stage] = []

    def _row(self, values) -> int:
        if not isinstance(values, torch.Tensor):
            values = torch.full((self.n,), float(values), dtype=torch.float64)
        self.extra.append(values.to(torch.float64).expand(self.n).clone())
        return self.first_row + len(self.extra) - 1

    def stage(self, policy: str, vectors: Dict[str, LinComb], scalars: Dict[str, object], output: str,
              gram_vectors=(), clamp=None) -> LinComb:
        k_all = len(self.space.names)
        coefs = {name: v._padded(k_all)[:, 0, :] for name, v in vectors.items()}   # [n, K_all]
        nonzero = {name: (c != 0).any(0).tolist() for name, c in coefs.items()}   # per operand, at any step
        used = [j for j in range(k_all) if any(nz[j] for nz in nonzero.values())]
        in_gram = [j for j in used if any(nonzero[v][j] for v in gram_vectors)]
        order = in_gram + [j for j in used if j not in in_gram]
        if len(order) > ops.MAX_K:
            raise _TooMany()
        vector_rows = []
        for name in ops.policies.POLICIES[policy][0]:
            c = coefs.get(name, torch.zeros(self.n, k_all, dtype=torch.float64))
            rows = [self._row(c[:, j]) for j in order]
            vector_rows.append(rows[0] if rows else self._row(0.0))
        scalar_specs = []
        for name, default in ops.policies.POLICIES[policy][1].items():
            value = scalars.get(name, default)
            if isinstance(value, PerSample):
                scalar_specs.append(("tensor", value.tensor))
            else:
                scalar_specs.append(("row", self._row(value)))
        self.stages.append(Stage(policy, [self.space.names[j] for j in order], len(in_gram) if gram_vectors else 0,
                                 vector_rows, scalar_specs, clamp, output))
        return self.space.add(output)


    def clip_shift(self, p: LinComb, s: LinComb, clip: tuple, names=("x0_clipped", "clip_shift")):
        """Stage ``names = (clamp(p), clamp(p + s) − clamp(p))`` (ops.clip_shift)."""
        k_all = len(self.space.names)
        cp, cs = p._padded(k_all)[:, 0, :], s._padded(k_all)[:, 0, :]
        order = [j for j in range(k_all) if bool((cp[:, j] != 0).any() or (cs[:, j] != 0).any())]
        if len(order) > ops.MAX_K:
            raise _TooMany()
        rows = [[self._row(c[:, j]) for j in order][0] for c in (cp, cs)]
        self.stages.append(Stage("clip-shift", [self.space.names[j] for j in order], 0, rows, [], clip,
                                 ",".join(names)))
        return self.space.add(names[0]), self.space.add(names[1])


class _TooMany(Exception):
    pass


class PerSample:
    """A per-sample ``[B]`` device tensor a stage reads as a scalar (e.g. G_loss's target)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _program(run, sc: Dict[str, torch.Tensor], noisy: bool, extra, first_row):
    """The step of ``sampling._step_body`` for the built-in combinations, on symbolic operands."""
    n = len(run.tables.timesteps)
    sp = SymbolicOperands(n)
    X = sp.add("x")
    ctx = StepContext(ops=sp, index=0, t=None, scalars=sc, cond={}, x=X, x_input=None, state={},
                      sampler=run.tables.name, prediction=run.prediction)
    bld = _Builder(sp, extra, first_row, n)
    eps_c = predictions.eps_from(run.prediction, sp.add("model_cond"), X, ctx.a, ctx.s)
    eps_u = None
    if run.branch is not None:
        eps_u = predictions.eps_from(run.prediction, sp.add("model_uncond"), X, ctx.a, ctx.s)
    c_0 = sc["c_0"]
    base = X * sc["c_x"]
    noise_terms = []
    div = sp.add("noise") * sc["sigma"] if noisy else None
    if div is not None:
        noise_terms = [div]
    proj = run.projection
    try:
        # x̂_0 that depends on the Gram matrix: APG, TCFG, MAMBO-G, policy C (the only terms of such a run)
        x0_base, x0_post = sp.zero(), 1.0   # x̂_0 = x0_base + x0_post · (the policy's output)
        if isinstance(run.branch, (APG, TCFG, MamboG)) or (proj is not None and proj.policy == "C"):
            if isinstance(run.branch, (TCFG, MamboG)):   # diffusers' guiders: on the raw outputs
                policy = "tcfg" if isinstance(run.branch, TCFG) else "mambo"
                vectors = {"cond": ctx.output_of_eps(eps_c), "uncond": ctx.output_of_eps(eps_u)}
                scalars = {"scale": _window_scales(run.branch, n), "original": float(run.branch.original)}
                if policy == "mambo":
                    scalars["alpha"] = run.branch.alpha
                x0_base, x0_post = _x0_of_output(run.prediction, ctx)
            elif isinstance(run.branch, APG):
                policy = "apg"
                vectors = {"d_cond": ctx.x0_of_eps(eps_c), "d_uncond": ctx.x0_of_eps(eps_u)}
                # an infinite threshold never clips, which the program spells 0 (it clips where > 0):
                # its inputs must be finite (a non-finite one makes the row NaN, gradguide.ops.policies)
                threshold = run.branch.norm_threshold
                scalars = {"scale": run.branch.scale, "eta": run.branch.eta,
                           "norm_threshold": 0.0 if threshold == float("inf") else threshold}
            else:
                policy = "pxp-c"
                vectors = {"x0_cond": ctx.x0_of_eps(eps_c), "x0_uncond": ctx.x0_of_eps(eps_u)}
                scalars = {"scale": run.branch.scale, "delta": proj.delta, "delta2": proj.delta2}
                if run.clip is not None and proj.convention == "official":   # branches clipped first, their
                    # difference an operand of its own (PixelAsParam.combine_cfg, docs/architecture.md#precision)
                    x0_u, diff = bld.clip_shift(vectors["x0_uncond"], vectors["x0_cond"] - vectors["x0_uncond"],
                                                run.clip, ("x0_uncond_clipped", "x0_cfg_diff_clipped"))
                    vectors = {"x0_cond": x0_u + diff, "x0_uncond": x0_u}
            gram_vectors = tuple(vectors)
            if run.clip is None:
                vectors["base"] = _sum([base, x0_base * c_0] + noise_terms)
                bld.stage(policy, vectors, dict(scalars, post=c_0 * x0_post), "x_next", gram_vectors=gram_vectors)
                return Variant(bld.stages, _inputs(bld))
            x0_pre = bld.stage(policy, dict(vectors, base=x0_base), dict(scalars, post=x0_post), "x0_clipped",
                               gram_vectors=gram_vectors, clamp=run.clip)
        elif run.branch is not None:   # CFG: linear
            eps_pre, _ = run.branch.branches(ctx, eps_c, eps_u)
            x0_pre = ctx.x0_of_eps(eps_pre)
        else:
            x0_pre = ctx.x0_of_eps(eps_c)

        lookahead = None
        shifts = []
        for j, term in enumerate(run.score_terms):
            if type(term) is LookAhead:
                lookahead = term
            else:   # Classifier, score form: ε̃ = ε̂ − √(1−ᾱ) s ∇log p  <=>  x̂_0 += (h/a) s ∇log p
                shifts.append(sp.add(f"classifier_grad{j}") * term.scale * (ctx.h / ctx.a))
        x0_guided = _sum([x0_pre] + shifts)
        renoise = None
        if run.clip is not None and run.clip_eps == "model":
            renoise = ctx.eps_of_x0(x0_guided)
        if run.clip is not None and shifts:   # the clipped shift as an operand of its own (sampling._step_body)
            x0_pre, shift = bld.clip_shift(x0_pre, _sum(shifts), run.clip)
            x0_guided, shifts = x0_pre + shift, [shift]
        elif run.clip is not None:
            if not isinstance(run.branch, (APG, TCFG, MamboG)) and not (proj is not None and proj.policy == "C"):
                x0_pre = bld.stage("linear", {"coef": x0_pre}, {}, "x0_clipped", clamp=run.clip)
            x0_guided = x0_pre
        den = x0_pre * c_0
        if renoise is not None:
            den = den + (renoise - ctx.eps_of_x0(x0_guided)) * (sc["c_x"] * ctx.s)
        guides = [shift * c_0 for shift in shifts]
        for j, term in enumerate(run.mean_terms):   # Classifier, mean form: μ += s Σ ∇log p
            guides.append(sp.add(f"classifier_grad_mean{j}") * (sc["var_mean"] * term.scale))

        if lookahead is not None:
            r, v = sp.add("reward_grad"), sp.add("model_vjp")
            k_x, k_m = sp.names.index("x"), sp.names.index("model_cond")
            coef = x0_pre._padded(len(sp.names))
            vjp = r * coef[:, 0, k_x] + v * coef[:, 0, k_m]   # ∇(gᵀx̂_0) = c_x g + c_o Jᵀg
            beta = lookahead.beta
            bld.stage("lookahead", {"base": _sum([base, den] + noise_terms), "x0": x0_pre, "vjp": vjp, "reward": r},
                      {"a": ctx.a, "h": ctx.h, "sigma": lookahead.sigma, "target": PerSample(lookahead.target),
                       "multiplier": lookahead.multiplier, "beta": 0.0 if beta is None else beta,
                       "beta_per_sample": 1.0 if beta is None else 0.0, "post": c_0 * ctx.h / ctx.a},
                      "x_next", gram_vectors=("x0", "vjp", "reward"))
        elif proj is not None and proj.policy != "C":   # policies A / B on the step's directions
            cls = _sum(guides)
            policy = "pxp-a" if proj.policy == "A" else "pxp-b"
            vectors = {"base": base, "den": den, "cls": cls, "div": div if div is not None else sp.zero()}
            bld.stage(policy, vectors, {"delta": proj.delta}, "x_next",
                      gram_vectors=("den", "cls") + (("div",) if policy == "pxp-b" else ()))
        else:
            bld.stage("linear", {"coef": _sum([base, den] + guides + noise_terms)}, {}, "x_next")
    except _TooMany:
        run.fused_reason = f"more than {ops.MAX_K} operands in one pass"
        return None
    return Variant(bld.stages, _inputs(bld))


def _window_scales(term, n: int) -> torch.Tensor:
    """A diffusers guider's weight per step: the scale inside its window, the identity weight
    outside (1, or 0 with the original formulation: TCFG's and MAMBO-G's output is then the
    conditional branch, as diffusers')."""
    off = 0.0 if term.original else 1.0
    return torch.tensor([term.scale if term.on(i) else off for i in range(n)], dtype=torch.float64)


def _x0_of_output(prediction: str, ctx: StepContext):
    """``(A, B)`` with x̂_0 = A + B · p for the model's raw output p (A a LinComb on x_t, B per step)."""
    aux = SymbolicOperands(ctx.ops.batch)
    x_aux, p_aux = aux.add("x"), aux.add("p")
    x0 = predictions.x0_from_eps(predictions.eps_from(prediction, p_aux, x_aux, ctx.a, ctx.s), x_aux, ctx.a, ctx.s)
    coef = x0._padded(2)
    return ctx.x * coef[:, 0, 0], coef[:, 0, 1]


def _sum(items: List[LinComb]) -> LinComb:
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def _inputs(bld: _Builder) -> List[str]:
    produced = {name for s in bld.stages for name in s.output.split(",")}
    names = []
    for s in bld.stages:
        names += [n for n in s.operands if n not in produced and n not in names]
    return names


# -- running a plan ----------------------------------------------------------------------------

def run_stages(run, variant: Variant, column: torch.Tensor, tensors: Dict[str, torch.Tensor]):
    """Execute ``variant``'s stages; ``tensors`` maps operand names to (contiguous) tensors and
    receives each stage's output."""
    for st in variant.stages:
        operands = [tensors[name] for name in st.operands]
        k = len(operands)
        if st.policy == "clip-shift":
            coef_p, coef_s = (column[r:r + k].view(1, k) for r in st.vector_rows)
            out_p, out_s = st.output.split(",")
            tensors[out_p], tensors[out_s] = ops.clip_shift_unchecked(coef_p, coef_s, operands, st.clamp, run.backend)
            continue
        gram = ops.gram_unchecked(operands[:st.n_gram], run.groups, run.backend) if st.n_gram else None
        vectors = [column[r:r + k].view(1, 1, k) for r in st.vector_rows]
        scalars = [column[v:v + 1] if kind == "row" else v for kind, v in st.scalars]
        tensors[st.output] = ops.fused_unchecked(st.policy, run.backend, operands, gram, vectors, scalars,
                                                 run.groups if st.n_gram else 1, st.clamp)
    return tensors
