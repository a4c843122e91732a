"""The fused step: a guided step as at most reduce + one fused combine (docs/architecture.md#the-fused-step).

The general step (:func:`gradguide.sampling.step_algebra`) writes every sampler × guidance ×
projection combination in :class:`~gradguide.linear.LinComb` algebra; evaluated each step,
that algebra is dozens of tiny torch ops (kernel launches on a GPU, per-call overhead on a
CPU). Most of it does not depend on the data: the sampler's scalars, the guidance scales and
the ε/x̂_0 conversions give weights that are known, per step, before sampling starts. Only the
fused programs (:mod:`gradguide.ops.policies`, which terms call through ``ops.policy``) take
inner products, and they run inside the combine.

So :func:`build` runs the *same* ``step_algebra`` once, on the host, on :class:`TraceOperands`:
symbolic operands whose "batch" axis is the step axis (steps that make the same host-side
choices — noise or not, each term's :meth:`~gradguide.guidance.base.GuidanceTerm.variant` —
are traced together). Instead of computing, a trace records each ``ops.policy`` call,
each materialised (clipped) operand and the new sample as stages over the operands, and the
operands terms compute (``ctx.operand``: a classifier's gradient, G_loss's reward gradient and
the model's VJP) as methods to call on each step. A policy stage whose output only feeds one
linear stage is folded into it (its ``base``/``post`` absorb that stage's weights), so a CFG
step is one ``linear`` combine and an APG, TCFG or G_loss step is reduce + one fused combine.
The per-step weights become rows of the run's device table. Anything the trace cannot record
— an inner product outside a program, a tensor carried between steps, autograd through x̂_0,
telemetry — raises :class:`NotFusable` and the run takes the general step, with the reason in
``run.fused_reason``. tests/core/test_fused_step.py holds the two paths equal.

G_loss's VJP: the general step differentiates ``gᵀx̂_0`` through the tracked x̂_0. For an x̂_0
that is ``c_x x_t + Σ_b c_b model_b(x_t)`` (the branches after CFG; weights held constant) its
gradient is ``c_x g + Σ_b c_b J_bᵀg``, so the fused step asks autograd for each branch's ``J_bᵀg``
(the model's backward, one pass) and weighs them per step in the combine. A computed operand may
read a stage's output (decoded G_loss decodes the materialised x̂_0): the running step computes
each when it is first needed (:func:`run_stages`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from . import ops
from .guidance.base import StepContext
from .linear import LinComb, SymbolicOperands
from .ops.policies import GRAM_VECTORS, PROGRAMS, program_arguments


@dataclass
class Stage:
    """One fused combine: ``output = policy(vectors, scalars; Gram of operands[:n_gram])``."""
    policy: str
    operands: List[str]
    n_gram: int
    vector_rows: List[int]               # first table row of each vector (K rows each)
    scalars: List[Tuple[str, object]]    # ("row", table row) or ("term", (term position, attribute)): a [B] tensor
    clamp: Optional[tuple]
    output: str
    per_group: bool = False              # inner products per (sample, group), PixelAsParam's per-channel
    # operands read Σ-scaled (ops.reference.Scaling): (log-scale operand, mask over ``operands``,
    # first table row of the K slopes, of the K offsets)
    scaling: Optional[Tuple[str, int, int, int]] = None


@dataclass
class Computed:
    """An operand the running step computes: a guidance term's method called on the step's
    context and the ``reads`` operands (``position`` ≥ 0), or the model's VJP (``position`` −1)
    through the branch ``method`` names (``"model_cond"``/``"model_uncond"``) with the cotangent
    ``reads[0]``. A read may be a stage's output: the step computes an operand when a stage or
    another computed operand first needs it, so stages and computed operands interleave."""
    position: int
    method: object
    reads: Tuple[str, ...] = ()


@dataclass
class Variant:
    """The stages of the steps that make one set of host-side choices, and their inputs."""
    stages: List[Stage]
    inputs: List[str]                    # operand names the step must supply (or compute)
    computed: Dict[str, Computed] = field(default_factory=dict)


@dataclass
class StepPlan:
    variants: Dict[Hashable, Variant] = field(default_factory=dict)
    keys: List[Hashable] = field(default_factory=list)     # each step's variant


class NotFusable(Exception):
    """The step does something a fused plan cannot hold (the message says what)."""


def _who() -> str:
    """Where the refused call came from (for NotFusable's message): the function that made it,
    and the guidance term or projection whose code was running."""
    frame = sys._getframe(2)
    where = f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and type(owner).__module__.startswith(("gradguide.guidance", "gradguide.projection")):
            return f" ({where}, in {type(owner).__name__}.{frame.f_code.co_name})"
        frame = frame.f_back
    return f" ({where})"


class PerSample:
    """A term's per-sample ``[B]`` tensor a stage reads as a scalar (e.g. G_loss's target): where
    to find it on the running step's terms (the plan holds no per-call tensor)."""

    def __init__(self, position: int, name: str):
        self.position, self.name = position, name


@dataclass
class _Scaled:
    """An operand ``base ⊙ exp(slope · log_scale + offset)`` of a trace (per-step slope, offset)."""
    base: str
    log_scale: str
    slope: torch.Tensor
    offset: torch.Tensor


@dataclass
class _Pending:
    policy: str                          # a program of gradguide.ops.policies, or "clip-shift"
    vectors: Dict[str, LinComb]
    scalars: Dict[str, object]
    clamp: Optional[tuple]
    outputs: Tuple[str, ...]
    per_group: bool = False


class _RefuseState(dict):
    """A traced step's ``ctx.state``: reading carried tensors is not a fused program."""

    def __getitem__(self, key):
        raise NotFusable(f"state carried between steps ({key}){_who()}")


def _fusable_clamp(clamp) -> None:
    if clamp is not None and not isinstance(clamp, tuple):   # gradguide.DynamicThreshold
        raise NotFusable(f"dynamic thresholding ({clamp!r}): a per-sample quantile of x̂_0 is not a fused combine")


class TraceOperands(SymbolicOperands):
    """Operands that record a step instead of computing it (module doc)."""
    tracing = True

    def __init__(self, n_steps: int, terms: List[object]):
        super().__init__(n_steps)
        self.pending: List[_Pending] = []
        self.computed: Dict[str, Computed] = {}
        self.scaled_operands: Dict[str, _Scaled] = {}
        self.terms = terms

    def add(self, name: str, tensor=None) -> LinComb:
        base, j = name, 1
        while name in self.names:   # one name per operand (the concrete step allows repeats)
            j += 1
            name = f"{base}{j}"
        return super().add(name)

    def add_computed(self, name: str, compute, ctx, reads=()) -> LinComb:
        owner = getattr(compute, "__self__", None)
        position = next((j for j, t in enumerate(self.terms) if t is owner), None)
        if position is None:
            raise NotFusable(f"operand {name!r} computed by something other than a guidance term's method")
        names = tuple(self.names[self.single(r)] for r in reads)
        u = self.add(name)
        self.computed[self.names[-1]] = Computed(position, compute.__func__, names)
        return u

    def scaled(self, name: str, u: LinComb, log_scale: LinComb, slope, offset) -> LinComb:
        base, log = self.names[self.single(u)], self.names[self.single(log_scale)]
        v = self.add(name)
        n = self.batch
        self.scaled_operands[self.names[-1]] = _Scaled(base, log, torch.as_tensor(slope, dtype=torch.float64).expand(n),
                                                       torch.as_tensor(offset, dtype=torch.float64).expand(n))
        return v

    def single(self, u: LinComb) -> int:
        """The operand ``u`` is (one operand with weight 1 at every step)."""
        coef = u._padded(len(self.names))[:, 0, :]
        nonzero = [j for j in range(coef.shape[1]) if bool((coef[:, j] != 0).any())]
        if len(nonzero) != 1 or not bool((coef[:, nonzero[0]] == 1).all()):
            raise NotFusable(f"a computed operand reads a combination, not an operand{_who()}")
        return nonzero[0]

    def per_sample(self, term, name: str):
        position = next((j for j, t in enumerate(self.terms) if t is term), None)
        if position is None:
            raise NotFusable(f"a per-sample scalar of something other than a guidance term ({name})")
        return PerSample(position, name)

    def policy(self, name: str, per: str = "sample", **params) -> LinComb:
        vectors, scalars = program_arguments(name, params, self.zero())
        out = f"{name}_out"
        u = self.add(out)
        self.pending.append(_Pending(name, vectors, scalars, None, (self.names[-1],), per == "group"))
        return u

    def materialize(self, name: str, u: LinComb, clamp=None) -> LinComb:
        _fusable_clamp(clamp)
        v = self.add(name)
        self.pending.append(_Pending("linear", {"coef": u}, {}, clamp, (self.names[-1],)))
        return v

    def materialize_clip_shift(self, names, p: LinComb, s: LinComb, clip: tuple):
        _fusable_clamp(clip)
        a, b = self.add(names[0]), self.add(names[1])
        self.pending.append(_Pending("clip-shift", {"p": p, "s": s}, {}, clip, tuple(self.names[-2:])))
        return a, b

    def finish(self, u: LinComb):
        self.pending.append(_Pending("linear", {"coef": u}, {}, None, ("x_next",)))

    def vjp_of_x0(self, x0: LinComb, g: LinComb) -> LinComb:
        coef = x0._padded(len(self.names))[:, 0, :]
        branches = [b for b in ("model_cond", "model_uncond") if b in self.names]
        k_x = self.names.index("x")
        used = [j for j in range(coef.shape[1]) if bool((coef[:, j] != 0).any())]
        if any(self.names[j] not in branches and j != k_x for j in used):
            raise NotFusable("a VJP through an x̂_0 that is not c_x x_t + Σ c_b model_b(x_t) (clipped, projected "
                             "or guided by data-dependent weights)")
        k_g = self.names[self.single(g)]
        vjp = g * coef[:, k_x]
        for branch in branches:
            k_b = self.names.index(branch)
            if k_b in used:   # each branch's Jᵀg is an operand: its weight changes per step
                vjp = vjp + self.add(f"vjp_{branch}") * coef[:, k_b]
                self.computed[self.names[-1]] = Computed(-1, branch, (k_g,))
        return vjp

    def combine(self, u, out=None, clamp=None):
        raise NotFusable(f"a tensor written out between steps{_who()}")

    def dot(self, *args, **kwargs):
        raise NotFusable(f"an inner product outside a fused program{_who()}")

    norm2 = total = numel = dot

    def algebra(self, per: str = "sample"):
        raise NotFusable(f"an inner product outside a fused program{_who()}")

    def clip_shift(self, p, s, clip):
        raise NotFusable("clip_shift outside materialize_clip_shift")


def unsupported(run) -> Optional[str]:
    """What of ``run`` the trace does not follow, before tracing (``None``: trace it)."""
    if run.tables.slots:
        return f"sampler {run.tables.name!r} carries state between steps"
    if run.telemetry:
        return "telemetry"
    return None


def build(run, step_algebra) -> Optional[StepPlan]:
    """The run's step as fused stages, with their per-step weights appended to
    ``run.table_rows`` (or ``None``, with ``run.fused_reason`` saying why not). ``step_algebra``:
    :func:`gradguide.sampling.step_algebra`, the step this traces (passed in: the loop sits above)."""
    run.fused_reason = unsupported(run)
    if run.fused_reason is not None:
        return None
    rows, index = run.tables.stacked("cpu", torch.float64)
    n = rows.shape[1]
    terms = [run.branch] + run.score_terms + run.mean_terms + run.post_terms
    groups: Dict[Hashable, List[int]] = {}
    keys = []
    for i in range(n):
        key = (bool(run.tables.draws_noise[i]),) + tuple(None if t is None else t.variant(i) for t in terms)
        groups.setdefault(key, []).append(i)
        keys.append(key)
    table = _Table(n, run.table_rows.shape[0])
    plan = StepPlan(keys=keys)
    try:
        for key, steps in groups.items():
            at = torch.tensor(steps)
            space = TraceOperands(len(steps), terms)
            ctx = StepContext(ops=space, index=steps[0], t=None, scalars={name: rows[j][at] for name, j in index.items()},
                              cond=run.cond, x=None, x_input=None, state=_RefuseState(), sampler=run.tables.name,
                              prediction=run.prediction)
            x_next, _, _ = step_algebra(run, ctx, {"x": None, "model_cond": None, "model_uncond": None,
                                                   "noise": True if key[0] else None,
                                                   "variance": True if run.tables.learned_variance else None,
                                                   "variance_uncond": True if run.tables.learned_variance else None,
                                                   "further": _further_branches(run, steps)}, track=_refuse_tracking)
            space.finish(x_next)
            if ctx.new_state:
                raise NotFusable(f"state carried between steps ({', '.join(ctx.new_state)})")
            plan.variants[key] = _emit(space, _fold(space.pending), table, at)
    except NotFusable as why:
        run.fused_reason = str(why)
        return None
    if table.rows:
        extra = torch.stack(table.rows).to(device=run.table_rows.device, dtype=run.table_rows.dtype)
        run.table_rows = torch.cat([run.table_rows, extra])
    return plan


def _further_branches(run, steps: List[int]) -> Dict[str, None]:
    """A perturbed guider's branches beyond cond/uncond at ``steps`` (one variant), as operands of
    the trace: the model calls stay outside the plan (the fused step makes them, as the general
    step does), their outputs are inputs of its stages like ``model_cond``."""
    if run.branch_caller is None:
        return {}
    names = {tuple(b.name for b in run.branch.step_branches(i)) for i in steps}
    if len(names) != 1:   # the variant key must fix the branches (term.variant(i) does for the built-ins)
        raise NotFusable(f"{type(run.branch).__name__}: steps of one variant call different model branches")
    return {name: None for name in next(iter(names)) if name not in ("cond", "uncond")}


def _refuse_tracking(x0):
    def tracked():
        raise NotFusable(f"autograd through x̂_0{_who()}")
    return tracked


def _has_post(policy: str) -> bool:
    return "post" in PROGRAMS.get(policy, ((), {}))[1]


def _fold(pending: List[_Pending]) -> List[_Pending]:
    """Fold a policy stage whose output only one later linear stage reads into that stage:
    ``Σ c_j op_j + w·(base + post·core)`` is the policy with ``base ← Σ c_j op_j + w·base`` and
    ``post ← w·post`` (or with ``post`` absent, where ``w`` is 1 at every step)."""
    stages = list(pending)
    changed = True
    while changed:
        changed = False
        for li, lin in enumerate(stages):
            if lin.policy != "linear":
                continue
            coef = lin.vectors["coef"]
            for pi, pol in enumerate(stages[:li]):
                if pol.policy in ("linear", "clip-shift") or pol.clamp is not None:
                    continue
                (out,) = pol.outputs
                k = coef.space.names.index(out)
                readers = [st for st in stages if st is not pol and _reads(st, k)]
                if readers != [lin]:
                    continue
                w = coef._padded(len(coef.space.names))[:, 0, k]
                if not _has_post(pol.policy) and not bool((w == 1).all()):
                    continue
                rest = LinComb(coef.space, coef._padded(len(coef.space.names)).clone())
                rest.coef[:, :, k] = 0
                vectors = dict(pol.vectors, base=rest + pol.vectors["base"] * w)
                scalars = dict(pol.scalars)
                if _has_post(pol.policy):
                    scalars["post"] = _times(scalars["post"], w)
                stages[pi] = _Pending(pol.policy, vectors, scalars, lin.clamp, lin.outputs, pol.per_group)
                del stages[li]
                changed = True
                break
            if changed:
                break
    return stages


def _reads(stage: _Pending, k: int) -> bool:
    return any(k < v.coef.shape[-1] and bool((v.coef[..., k] != 0).any()) for v in stage.vectors.values())


def _times(value, w: torch.Tensor):
    if isinstance(value, PerSample):
        raise NotFusable("a per-sample post weight")
    return w * value


class _Table:
    """Rows appended to the run's table: one value per step (zeros at the other variants' steps)."""

    def __init__(self, n: int, first_row: int):
        self.n, self.first_row, self.rows = n, first_row, []

    def row(self, values, at: torch.Tensor) -> int:
        full = torch.zeros(self.n, dtype=torch.float64)
        full[at] = values.to(torch.float64) if isinstance(values, torch.Tensor) else float(values)
        self.rows.append(full)
        return self.first_row + len(self.rows) - 1


def _emit(space: TraceOperands, stages: List[_Pending], table: _Table, at: torch.Tensor) -> Variant:
    """The recorded stages as table rows: per stage, the operands it reads (those inside its Gram
    first), a row per (vector, operand) and a row per scalar."""
    k_all = len(space.names)
    out: List[Stage] = []
    for st in stages:
        coefs = {name: _pruned(v._padded(k_all)[:, 0, :]) for name, v in st.vectors.items()}
        nonzero = {name: (c != 0).any(0).tolist() for name, c in coefs.items()}
        used = [j for j in range(k_all) if any(nz[j] for nz in nonzero.values())]
        gram_vectors = GRAM_VECTORS.get(st.policy, ())
        in_gram = [j for j in used if any(nonzero[v][j] for v in gram_vectors)]
        order = in_gram + [j for j in used if j not in in_gram]
        if len(order) > ops.MAX_K:
            raise NotFusable(f"more than {ops.MAX_K} operands in one pass")
        names_v = ("p", "s") if st.policy == "clip-shift" else PROGRAMS[st.policy][0]
        scaled = [space.scaled_operands.get(space.names[j]) for j in order]
        scaling = None
        if any(scaled):
            logs = {sc.log_scale for sc in scaled if sc is not None}
            if st.policy == "clip-shift" or len(logs) > 1:
                raise NotFusable("Σ-scaled operands in a clip-shift pass, or scaled by two variances in one pass")
            slopes = [table.row(0.0 if sc is None else sc.slope, at) for sc in scaled]
            offsets = [table.row(0.0 if sc is None else sc.offset, at) for sc in scaled]
            scaling = (logs.pop(), sum(1 << p for p, sc in enumerate(scaled) if sc is not None), slopes[0], offsets[0])
        vector_rows = []
        for name in names_v:
            rows = [table.row(coefs[name][:, j], at) for j in order]
            vector_rows.append(rows[0] if rows else table.row(0.0, at))
        scalar_specs = []
        for name, value in st.scalars.items():
            if isinstance(value, PerSample):
                scalar_specs.append(("term", (value.position, value.name)))
            else:
                value = value.expand(len(at)) if isinstance(value, torch.Tensor) else value
                scalar_specs.append(("row", table.row(value, at)))
        operands = [space.names[j] if sc is None else sc.base for j, sc in zip(order, scaled)]
        out.append(Stage(st.policy, operands, len(in_gram) if gram_vectors else 0,
                         vector_rows, scalar_specs, st.clamp, ",".join(st.outputs), st.per_group, scaling))
    produced = {name for s in out for name in s.output.split(",")}
    needed: List[str] = []

    def need(name):
        if name in needed or name in produced:
            return
        for read in getattr(space.computed.get(name), "reads", ()):
            need(read)
        needed.append(name)
    for s in out:
        for name in s.operands + ([s.scaling[0]] if s.scaling else []):
            need(name)
    return Variant(out, needed, {n: c for n, c in space.computed.items() if n in needed})


def _pruned(coef: torch.Tensor) -> torch.Tensor:
    """Coefficients with round-off residues (below 1e-13 of the step's largest) set to 0: an
    ε ↔ x̂_0 round trip leaves ~1e-17 of x_t where the algebra cancels it, which would otherwise
    cost a pass over x_t."""
    scale = coef.abs().amax(-1, keepdim=True)
    return torch.where(coef.abs() <= 1e-13 * scale, torch.zeros_like(coef), coef)


def copy_plan(plan: Optional[StepPlan]) -> Optional[StepPlan]:
    """A copy of ``plan`` that shares no list or dict with it (a run's own, see
    ``sampling._finish_prepare``'s cache); tensors in scalar specs are shared, not copied."""
    if plan is None:
        return None
    return StepPlan({key: Variant([Stage(s.policy, list(s.operands), s.n_gram, list(s.vector_rows), list(s.scalars),
                                         s.clamp, s.output, s.per_group, s.scaling) for s in v.stages], list(v.inputs),
                                  dict(v.computed))
                     for key, v in plan.variants.items()}, list(plan.keys))


# -- running a plan ----------------------------------------------------------------------------

def run_stages(run, variant: Variant, column: torch.Tensor, tensors: Dict[str, torch.Tensor], compute=None):
    """Execute ``variant``'s stages; ``tensors`` maps operand names to (contiguous) tensors and
    receives each stage's output. ``compute(name)`` adds a computed operand to ``tensors`` (called
    the first time a stage needs it, after the stages it reads)."""
    terms = [run.branch] + run.score_terms + run.mean_terms + run.post_terms
    for st in variant.stages:
        for name in st.operands + ([st.scaling[0]] if st.scaling else []):
            if name not in tensors:
                compute(name)
        operands = [tensors[name] for name in st.operands]
        k = len(operands)
        scaling = None
        if st.scaling is not None:
            log_scale, mask, slope, offset = st.scaling
            scaling = ops.reference.Scaling(tensors[log_scale], column[slope:slope + k].view(1, k),
                                            column[offset:offset + k].view(1, k), mask)
        if st.policy == "clip-shift":
            operands = [op.contiguous() for op in operands]   # (its kernels take contiguous rows only)
            coef_p, coef_s = (column[r:r + k].view(1, k) for r in st.vector_rows)
            out_p, out_s = st.output.split(",")
            tensors[out_p], tensors[out_s] = ops.clip_shift_unchecked(coef_p, coef_s, operands, st.clamp, run.backend)
            continue
        groups = run.groups if st.per_group else 1
        gram = ops.gram_unchecked(operands[:st.n_gram], groups, run.backend, _head(scaling, st.n_gram)) \
            if st.n_gram else None
        vectors = [column[r:r + k].view(1, 1, k) for r in st.vector_rows]
        scalars = [column[v:v + 1] if kind == "row" else getattr(terms[v[0]], v[1]) for kind, v in st.scalars]
        tensors[st.output] = ops.fused_unchecked(st.policy, run.backend, operands, gram, vectors, scalars,
                                                 groups if st.n_gram else 1, st.clamp, scaling=scaling)
    return tensors


def _head(scaling, n: int):
    """``scaling`` restricted to the first ``n`` operands (a Gram's), or None where none of them is scaled."""
    if scaling is None or not scaling.mask & ((1 << n) - 1):
        return None
    return scaling._replace(slope=scaling.slope[:, :n], offset=scaling.offset[:, :n], mask=scaling.mask & ((1 << n) - 1))
