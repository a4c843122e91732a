"""Linear combinations of a step's operands: the algebra every rule is written in.

A guided step (docs/architecture.md) is: K operand tensors (``x_t``, model outputs, guidance
gradients, noise, ...), one ``reduce`` pass giving the per-sample Gram matrix and sums, a
tiny coefficient program, and one ``combine`` pass. Rules (CFG variants, G / G_loss,
PixelAsParam projections, samplers) never touch the big tensors: they manipulate
:class:`LinComb` values, i.e. coefficient vectors ``[B, G, K]`` meaning
``sum_k coef[:, :, k] * operand_k``, and ask :class:`Operands` for inner products, which it
answers from the Gram matrix (``<u, v> = u^T Gram v``). Everything here is tensor algebra on
tiny tensors: no host synchronisation, no branching on tensor values.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import ops
from .predictions import DynamicThreshold


class LinComb:
    """``sum_k coef[b, g, k] * operand_k[b, g]`` over the operands of one :class:`Operands`."""

    __slots__ = ("space", "coef", "support")

    def __init__(self, space: "Operands", coef: torch.Tensor, support=None):
        self.space = space
        self.coef = coef
        # the operands it may read (known on the host: no look at coefficient values)
        self.support = frozenset(range(coef.shape[-1])) if support is None else frozenset(support)

    def _padded(self, k: int) -> torch.Tensor:
        have = self.coef.shape[-1]
        return self.coef if have == k else torch.nn.functional.pad(self.coef, (0, k - have))

    def _scale(self, s) -> torch.Tensor:
        """Turn a scalar, a 0-d tensor, a per-sample ``[B]`` or per-group ``[B, G]`` factor into
        something that broadcasts against ``coef``."""
        if not isinstance(s, torch.Tensor):
            return s
        if s.dim() == 0:
            return s
        if s.dim() == 1:
            return s.reshape(-1, 1, 1)
        if s.dim() == 2:
            return s.unsqueeze(-1)
        raise ValueError(f"a LinComb factor must be a scalar, [B] or [B, G]; got shape {tuple(s.shape)}")

    def __add__(self, other: "LinComb") -> "LinComb":
        k = max(self.coef.shape[-1], other.coef.shape[-1])
        return LinComb(self.space, self._padded(k) + other._padded(k), self.support | other.support)

    def __sub__(self, other: "LinComb") -> "LinComb":
        k = max(self.coef.shape[-1], other.coef.shape[-1])
        return LinComb(self.space, self._padded(k) - other._padded(k), self.support | other.support)

    def __neg__(self) -> "LinComb":
        return LinComb(self.space, -self.coef, self.support)

    def __mul__(self, s) -> "LinComb":
        return LinComb(self.space, self.coef * self._scale(s), self.support)

    __rmul__ = __mul__

    def __truediv__(self, s) -> "LinComb":
        return LinComb(self.space, self.coef / self._scale(s), self.support)


class Operands:
    """The operand tensors of one step, with their Gram matrix computed lazily by ``ops.reduce``.

    ``groups`` > 1 gives per-(sample, group) statistics (PixelAsParam's per-channel
    granularity); ``dot(..., per="sample")`` sums them back to per-sample values.
    ``compute_dtype`` is the dtype of coefficients and of the Gram matrix: float64 for every
    operand dtype (why: :mod:`gradguide.ops.reference`).
    """

    def __init__(self, like: torch.Tensor, groups: int = 1, backend: str = "reference"):
        self.batch = like.shape[0]
        self.shape = like.shape
        self.groups = groups
        self.backend = backend
        self.device = like.device
        self.dtype = like.dtype
        self.compute_dtype = ops.reference.coefficient_dtype(like.dtype)
        self.tensors: List[torch.Tensor] = []
        self.names: List[str] = []
        self.units: List[LinComb] = []   # each operand as add() returned it (see tensor())
        self._gram = None
        self._sums = None
        self._partial: Dict[tuple, tuple] = {}   # operand columns -> (gram, sums), beyond MAX_K operands
        self.recipes: Dict[str, tuple] = {}   # materialised operand -> (coef, clamp), for autograd replays

    # -- building ---------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> LinComb:
        """Register an operand; returns it as a LinComb (unit coefficient)."""
        if tensor.shape != self.shape:
            raise ValueError(f"{name}: expected shape {tuple(self.shape)}, got {tuple(tensor.shape)}")
        self.tensors.append(tensor.to(self.dtype))
        self.names.append(name)
        k = len(self.tensors)
        coef = torch.zeros(self.batch, 1, k, device=self.device, dtype=self.compute_dtype)
        coef[:, :, k - 1] = 1.0
        unit = LinComb(self, coef, (k - 1,))
        self.units.append(unit)
        return unit

    def zero(self) -> LinComb:
        return LinComb(self, torch.zeros(self.batch, 1, max(len(self.tensors), 1),
                                         device=self.device, dtype=self.compute_dtype), ())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.names.index(name)]

    # -- statistics -------------------------------------------------------------------------
    def _reduced(self):
        if self._gram is None or self._gram.shape[-1] != len(self.tensors):
            self._gram, self._sums = ops.reduce(self.tensors, self.groups, backend=self.backend)
        return self._gram, self._sums

    def _full(self, u: LinComb) -> torch.Tensor:
        return u._padded(len(self.tensors)).to(self.compute_dtype).expand(self.batch, self.groups, -1)

    def _over(self, *vectors: LinComb):
        """``(gram, sums, columns)``: the statistics an inner product of ``vectors`` reads. All
        operands in one reduce while they fit one kernel pass (``ops.MAX_K``); beyond, the
        operands the vectors may read (their ``support``), each such set reduced once."""
        k = len(self.tensors)
        if k <= ops.MAX_K or self.backend == "reference":
            gram, sums = self._reduced()
            return gram, sums, None
        cols = tuple(sorted(set().union(*(v.support for v in vectors))))
        if cols not in self._partial:
            self._partial[cols] = ops.reduce([self.tensors[c] for c in cols], self.groups, backend=self.backend)
        gram, sums = self._partial[cols]
        return gram, sums, list(cols)

    def dot(self, u: LinComb, v: LinComb, per: str = "sample") -> torch.Tensor:
        """Inner product ``<u, v>``: ``[B]`` (per sample) or ``[B, G]`` (per group)."""
        gram, _, cols = self._over(u, v)
        fu, fv = self._full(u), self._full(v)
        if cols is not None:
            fu, fv = fu[..., cols], fv[..., cols]
        d = torch.einsum("bgk,bgkl,bgl->bg", fu, gram, fv)
        return d.sum(1) if per == "sample" else d

    def norm2(self, u: LinComb, per: str = "sample") -> torch.Tensor:
        return self.dot(u, u, per).clamp_min(0.0)  # exact algebra can round to tiny negatives

    def total(self, u: LinComb, per: str = "sample") -> torch.Tensor:
        """Sum of the elements of ``u``: ``[B]`` or ``[B, G]``."""
        _, sums, cols = self._over(u)
        fu = self._full(u) if cols is None else self._full(u)[..., cols]
        s = (fu * sums).sum(-1)
        return s.sum(1) if per == "sample" else s

    tracing = False   # a TraceOperands (gradguide.stepplan) records instead of computing

    def policy(self, name: str, per: str = "sample", **params) -> LinComb:
        """The fused program ``name`` of :mod:`gradguide.ops.policies` on these operands:
        ``params`` are its coefficient vectors (LinCombs; a missing one is zero) and scalars
        (numbers, per-step 0-d or per-sample ``[B]`` tensors; a missing one takes its default).
        A step written with this call is the step the fused path traces (docs/architecture.md)."""
        vectors, scalars = ops.policies.program_arguments(name, params, self.zero())
        return ops.policies.PROGRAMS[name][2](self.algebra(per), vectors, scalars)

    def add_computed(self, name: str, compute, ctx, reads=()) -> LinComb:
        """Register the operand ``compute(ctx, *reads)`` (a term's method, e.g. a classifier
        gradient; ``reads``: operands it takes as tensors, e.g. a materialised x̂_0)."""
        return self.add(name, compute(ctx, *[self.tensor(u) for u in reads]))

    def scaled(self, name: str, u: LinComb, log_scale: LinComb, slope, offset) -> LinComb:
        """The operand ``u ⊙ exp(slope · log_scale + offset)`` (``u``, ``log_scale``: operands;
        ``slope``, ``offset``: per-step scalars): a learned variance Σ, or √Σ, times ``u``
        elementwise. Written out here; a traced step records it, and the fused kernels form it as
        they load ``u`` and ``log_scale`` (:class:`gradguide.ops.reference.Scaling`)."""
        return self.add(name, ops.reference.variance_scaled(self.tensor(u), self.tensor(log_scale), slope, offset))

    def tensor(self, u: LinComb) -> torch.Tensor:
        """The tensor of the operand ``u`` (as :meth:`add` returned it; checked on the host)."""
        k = next(iter(u.support)) if len(u.support) == 1 else None
        if k is None or self.units[k] is not u:
            raise ValueError("expected an operand as ops.add returned it, got a combination: materialize it first")
        return self.tensors[k]

    def per_sample(self, term, name: str):
        """The term's per-sample ``[B]`` tensor ``term.<name>``, a scalar of :meth:`policy` (a trace
        records where to read it, so a plan holds no per-call tensor)."""
        return getattr(term, name)

    def finish(self, u: LinComb) -> torch.Tensor:
        """The step's new sample, ``u`` written out."""
        return self.combine(u)

    def algebra(self, per: str = "sample") -> "StepAlgebra":
        """These operands as the algebra of :mod:`gradguide.ops.policies`' formulas: LinCombs,
        inner products per sample (or per group) from the Gram matrix."""
        return StepAlgebra(self, per)

    def numel(self, per: str = "sample") -> int:
        n = self.tensors[0][0].numel()
        return n if per == "sample" else n // self.groups

    # -- materialising ----------------------------------------------------------------------
    def _columns(self, *vectors: LinComb) -> Optional[List[int]]:
        """The operands a pass over ``vectors`` reads when all of them do not fit one kernel pass
        (``None``: all)."""
        if len(self.tensors) <= ops.MAX_K or self.backend == "reference":
            return None
        cols = sorted(set().union(*(v.support for v in vectors)))
        if len(cols) > ops.MAX_K:
            raise ValueError(f"a combination of {len(cols)} operands: backend {self.backend!r} takes at most "
                             f"{ops.MAX_K} in one pass (use fewer guidance terms, or backend='reference')")
        return cols

    def combine(self, u: LinComb, out: Optional[torch.Tensor] = None, clamp=None) -> torch.Tensor:
        coef, tensors, cols = self._full(u), self.tensors, self._columns(u)
        if cols is not None:
            coef, tensors = coef[..., cols], [self.tensors[c] for c in cols]
        return ops.combine(coef, tensors, out=out, clamp=clamp, backend=self.backend)

    def clip_shift(self, p: LinComb, s: LinComb, clip: tuple):
        """``(clamp(p), clamp(p + s) − clamp(p))`` as tensors (:func:`gradguide.ops.clip_shift`)."""
        if isinstance(clip, DynamicThreshold):   # a per-sample quantile: outside the combine kernels
            tp, ts = self.combine(p), self.combine(s)
            return clip(tp), clip.shift(tp, ts)
        k = len(self.tensors)
        cp, cs, tensors, cols = p._padded(k)[:, 0, :], s._padded(k)[:, 0, :], self.tensors, self._columns(p, s)
        if cols is not None:
            cp, cs, tensors = cp[..., cols], cs[..., cols], [self.tensors[c] for c in cols]
        return ops.clip_shift(cp, cs, tensors, clip, backend=self.backend)

    def materialize(self, name: str, u: LinComb, clamp=None) -> LinComb:
        """Write ``u`` out as a new operand (needed where a rule is not linear, e.g. clipping)."""
        self.recipes[name] = (u.coef.detach(), clamp)
        if isinstance(clamp, DynamicThreshold):   # a per-sample quantile: outside the combine kernels
            return self.add(name, clamp(self.combine(u)))
        return self.add(name, self.combine(u, clamp=clamp))

    def materialize_clip_shift(self, names, p: LinComb, s: LinComb, clip: tuple):
        """Write ``clamp(p)`` and ``clamp(p + s) − clamp(p)`` out as two new operands (one pass,
        :func:`gradguide.ops.clip_shift`): for ``s`` small beside ``p`` (a clipped guidance shift,
        policy C's clipped branch difference) the second keeps ``s``'s relative precision, where
        the difference of two materialised clipped tensors would keep only ``p``'s (docs/architecture.md#precision)."""
        k = len(self.tensors)
        cp, cs = p._padded(k).detach(), s._padded(k).detach()
        clipped, shift = self.clip_shift(p, s, clip)
        self.recipes[names[0]] = (cp, clip)
        self.recipes[names[1]] = (cp, clip, cs)   # autograd replays: clamp(p + s) − clamp(p), reference formula
        return self.add(names[0], clipped), self.add(names[1], shift)


def replay(recipe, tensors: List[torch.Tensor], batch: int, groups: int) -> torch.Tensor:
    """A materialised operand recomputed from its recipe with the reference ops (with autograd):
    ``(coef, clamp)`` from :meth:`Operands.materialize`, ``(coef_p, clip, coef_s)`` the shift of
    :meth:`Operands.materialize_clip_shift`."""
    c, clamp, *shift = recipe
    c = torch.nn.functional.pad(c, (0, len(tensors) - c.shape[-1]))
    if shift:   # clamp(p + s) − clamp(p)
        s = torch.nn.functional.pad(shift[0], (0, len(tensors) - shift[0].shape[-1]))
        if isinstance(clamp, DynamicThreshold):
            p = ops.reference.combine(c.expand(batch, groups, -1), tensors)
            return clamp.shift(p, ops.reference.combine(s.expand(batch, groups, -1), tensors))
        return ops.reference.clip_shift(c[:, 0], s[:, 0], tensors, clamp)[1]
    if isinstance(clamp, DynamicThreshold):
        return clamp(ops.reference.combine(c.expand(batch, groups, -1), tensors))
    return ops.reference.combine(c.expand(batch, groups, -1), tensors, clamp=clamp)


class StepAlgebra:
    """A step's LinCombs as the algebra the formulas of :mod:`gradguide.ops.policies` are written
    in (``dot`` per sample or per group, ``select`` per row), so a guidance term and the fused
    combine evaluate one definition."""

    def __init__(self, ops_: Operands, per: str):
        self.ops, self.per = ops_, per

    def dot(self, u: LinComb, v: LinComb) -> torch.Tensor:
        return self.ops.dot(u, v, self.per)

    def select(self, flag, u: LinComb, v: LinComb) -> LinComb:
        if isinstance(flag, bool):
            return u if flag else v
        k = max(u.coef.shape[-1], v.coef.shape[-1])
        return LinComb(u.space, torch.where(u._scale(flag), u._padded(k), v._padded(k)), u.support | v.support)


class SymbolicOperands(Operands):
    """Operands without tensors, for weights known before sampling (:mod:`gradguide.stepplan`):
    the "batch" axis is the step axis, so per-step scalars (``[n_steps]`` tables) scale
    LinCombs exactly as per-sample factors do. Only the algebra works; no inner products."""

    def __init__(self, n_steps: int):
        self.batch = n_steps
        self.shape = None
        self.groups = 1
        self.backend = "reference"
        self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.compute_dtype = torch.float64
        self.tensors = []
        self.names = []
        self._gram = self._sums = None

    def add(self, name: str, tensor: Optional[torch.Tensor] = None) -> LinComb:
        if name in self.names:
            raise ValueError(f"operand {name!r} added twice")
        self.names.append(name)
        k = len(self.names)
        coef = torch.zeros(self.batch, 1, k, dtype=torch.float64)
        coef[:, :, k - 1] = 1.0
        return LinComb(self, coef, (k - 1,))

    def zero(self) -> LinComb:
        return LinComb(self, torch.zeros(self.batch, 1, max(len(self.names), 1), dtype=torch.float64), ())

    def _reduced(self):
        raise TypeError("SymbolicOperands has no tensors: inner products need a step's operands")
