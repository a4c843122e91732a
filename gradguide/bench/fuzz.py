"""Differential fuzzing of the public API (no silent wrong result): ``ops.reduce / combine / fused_combine``,
the registered ops called directly (``raw_op``: ``torch.ops.gradguide.*`` and
``torch.ops.gradguide_triton.*``), ``project``, ``off_support_ratio`` and ``sample``, on every
backend this installation has.

A *case* is a small picklable dict (``spec``) drawn by the test suite (tests/kernels/test_fuzz.py,
hypothesis): the target, backend, dtype, shapes, a seed for the values, and at most one
*mutation* that makes the call invalid in a known way (which names the argument at fault).
:func:`run_case` builds the inputs from the spec, calls the target and classifies the call:

- ``"correct"`` — a valid call whose result agrees with a float64 evaluation of the same
  formula on the same input values, within a tolerance set by the dtype (the accumulation
  epsilon times the sum of the magnitudes that enter each element, plus the rounding of the
  output dtype), with NaN/inf exactly where the float64 result has them;
- ``"clean_error"`` — an invalid call refused with a TypeError/ValueError whose message names
  the argument the mutation broke (``name:`` or ``name[i]:``); an error that names no such
  argument, or of another type, is ``"unclean_error"``;

- ``"known_imprecise"`` — ``sample`` below float64 with a rule computed from Gram entries
  (PixelAsParam projections, APG, CFG-Zero*, guidance rescale) whose finite result is further
  from float64 than the dtype's rounding explains: the Gram trick's cancellation (``‖u − v‖²``
  from ``‖u‖² − 2<u,v> + ‖v‖²``; docs/architecture.md#precision), and projections against a partner that
  vanishes to rounding level (a direction the run's dtype cannot resolve). Counted and reported,
  never silent; to become ``"wrong"`` once the precision fix covers it;

and every other outcome is a failure: ``"wrong"`` (disagreement, or invalid input accepted),
``"nan"`` (NaN/inf from finite inputs where float64 is finite), ``"unclean_error"`` (another
exception type, an error not naming the argument, or a valid call refused), and — only seen by
the process pool of :func:`run_isolated` — ``"crash"`` (the worker died) and ``"hang"``.
"""
from __future__ import annotations

import math
import re
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Optional, Tuple

import torch

OK = ("correct", "clean_error", "known_imprecise")
FAILURES = ("wrong", "nan", "unclean_error", "crash", "hang")
TWO_BRANCH = ("cfg", "apg", "cfg-zero*", "rescale")   # the guidance names the sample cases draw with a class label
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class Result(Exception):
    """Raised inside a target to finish the case with ``(outcome, detail)``."""

    def __init__(self, outcome: str, detail: str = ""):
        super().__init__(outcome, detail)
        self.outcome, self.detail = outcome, detail


# -- classification ---------------------------------------------------------------------------

def names_argument(message: str, names) -> bool:
    """Whether ``message`` names one of ``names`` as ``name:``, ``name[...]:`` or ``'name'``."""
    for name in names:
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(name)}(\[[^\]]*\])*:|'{re.escape(name)}'"
        if re.search(pattern, message):
            return True
    return False


def _call(fn, expect: Optional[Tuple[str, ...]]):
    """Run ``fn``; an exception ends the case (clean or not), a return is checked by the caller."""
    if isinstance(expect, str):
        expect = (expect,)
    try:
        out = fn()
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if expect is None:
            raise Result("unclean_error", f"valid call refused: {type(exc).__name__}: {msg}")
        if names_argument(msg, expect):
            raise Result("clean_error", msg)
        raise Result("unclean_error", f"error does not name {expect}: {type(exc).__name__}: {msg}")
    except Result:
        raise
    except Exception as exc:  # noqa: BLE001 - any other type is a failure by definition
        raise Result("unclean_error", f"{type(exc).__name__} (expected TypeError/ValueError naming "
                                      f"{expect or 'nothing'}): {exc}")
    if expect is not None:
        raise Result("wrong", f"invalid input accepted (mutation of {expect})")
    return out


def _compare(got: torch.Tensor, truth: torch.Tensor, tol: torch.Tensor, inputs_finite: bool, what: str,
             poisoned: Optional[torch.Tensor] = None):
    """``got`` (any dtype) against the float64 ``truth`` (already rounded to got's dtype range).
    ``poisoned``: elements that must be non-finite whatever ``truth`` says (the documented rule
    for projections: a non-finite operand poisons its whole sample or group)."""
    if got.shape != truth.shape:
        raise Result("wrong", f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}")
    g = got.detach().double()
    if poisoned is not None and bool(poisoned.any()):
        if bool(torch.isfinite(g[poisoned]).any()):
            raise Result("wrong", f"{what}: finite values in a sample/group with a non-finite operand")
        keep = ~poisoned
        g, truth, tol = g[keep], truth[keep], tol.expand_as(poisoned)[keep]
    t_fin, g_fin = torch.isfinite(truth), torch.isfinite(g)
    if inputs_finite and bool((~g_fin & t_fin).any()):
        raise Result("nan", f"{what}: {int((~g_fin & t_fin).sum())} non-finite element(s) from finite inputs")
    if bool((torch.isnan(truth) != torch.isnan(g)).any()) or bool((g[~g_fin & ~torch.isnan(g)] !=
                                                                    truth[~g_fin & ~torch.isnan(g)]).any()):
        raise Result("wrong", f"{what}: NaN/inf pattern differs from float64")
    both = g_fin & t_fin
    err = (g - truth).abs()[both]
    bound = tol.expand_as(truth)[both]
    if bool((err > bound).any()):
        i = int(torch.argmax(err - bound))
        raise Result("wrong", f"{what}: error {float(err[i]):.3g} > tolerance {float(bound[i]):.3g}")


def _acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _round_to(truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values as the output dtype would hold them (overflow -> inf), back in float64."""
    return truth.to(dtype).double() if dtype != torch.float64 else truth


def _out_tol(truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    return 2 * fi.eps * truth.abs() + fi.tiny * 4


# -- inputs -----------------------------------------------------------------------------------

def _values(gen: torch.Generator, shape, kind: str) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "large":
        x = x * 300.0
    elif kind == "tiny":
        x = x * 1e-3
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "nonfinite" and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (2,), generator=gen)
        flat[idx[0]] = float("nan")
        flat[idx[1]] = float("inf")
    return x


def _layout(t: torch.Tensor, noncontig: bool) -> torch.Tensor:
    """The same values, optionally as a non-contiguous view (a slice of a wider buffer)."""
    if not noncontig or t.dim() < 1:
        return t
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],) if t.dim() > 1 else (2 * t.shape[0],),
                       dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _operands(spec, gen) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(operands in the spec's dtype and layout, their exact float64 values)."""
    dtype = DTYPES[spec["dtype"]]
    shape = (spec["b"],) + tuple(spec["feat"])
    ops_, exact = [], []
    for _ in range(spec["k"]):
        v = _values(gen, shape, spec["values"]).to(dtype)
        exact.append(v.double().clone())   # a copy: an in-place call may overwrite the operand
        ops_.append(_layout(v, spec["noncontig"]))
    return ops_, exact


def _apply_operand_mutation(m: str, ops_: List[torch.Tensor]):
    if m == "op_int":
        ops_[-1] = ops_[-1].to(torch.int32)
    elif m in ("op_shape", "op_dtype_mix", "op_meta"):
        pass
    elif m == "op_complex":
        ops_[-1] = ops_[-1].to(torch.complex64)
    elif m == "op_bool":
        ops_[-1] = ops_[-1] > 0
    if m in ("op_shape", "op_dtype_mix", "op_meta") and len(ops_) == 1:
        ops_.append(ops_[0].clone())   # one operand has nothing to disagree with: add a second
    if m == "op_shape":
        ops_[-1] = ops_[-1].reshape(-1)[:-1] if ops_[-1].numel() > 1 else ops_[-1].new_zeros(3, 3)
    elif m == "op_dtype_mix":
        ops_[-1] = ops_[-1].to(torch.float64 if ops_[-1].dtype != torch.float64 else torch.float32)
    elif m == "op_empty_list":
        ops_[:] = []
    elif m == "op_not_tensor":
        ops_[-1] = ops_[-1].tolist()
    elif m == "op_zero_batch":
        ops_[:] = [o[:0] for o in ops_]
    elif m == "op_meta":
        ops_[-1] = torch.empty(ops_[-1].shape, dtype=ops_[-1].dtype, device="meta")
    elif m == "too_many":
        ops_[:] = ops_ + [ops_[0]] * (9 - len(ops_))
    return ops_


OPERAND_MUTATIONS = ("op_int", "op_complex", "op_bool", "op_shape", "op_dtype_mix", "op_empty_list",
                     "op_not_tensor", "op_zero_batch", "op_meta")


def _clamp(spec):
    """(the clamp argument, its expected argument name if invalid)."""
    kind = spec.get("clamp", "none")
    lo, hi = sorted(spec.get("bounds", (-1.0, 1.0)))
    return {"none": (None, None), "both": ((lo, hi), None), "low": ((lo, None), None), "high": ((None, hi), None),
            "inf": ((-math.inf, math.inf), None), "ints": ((int(math.floor(lo)), int(math.ceil(hi))), None),
            "nan_low": ((float("nan"), hi), "clamp"), "nan_high": ((lo, float("nan")), "clamp"),
            "short": ((lo,), "clamp"), "scalar": (0.5, "clamp"), "str": ("-1,1", "clamp"),
            "str_pair": (("a", "b"), "clamp"), "inverted": ((hi + 1.0, lo - 1.0), "clamp"),
            "tensor": ((torch.tensor(lo), hi), "clamp")}[kind]


def _clamp64(x: torch.Tensor, clamp) -> torch.Tensor:
    if clamp is None:
        return x
    lo = -math.inf if clamp[0] is None else float(clamp[0])
    hi = math.inf if clamp[1] is None else float(clamp[1])
    return x.clamp(lo, hi)


def _out(spec, ops_: List[torch.Tensor], like: torch.Tensor):
    """(out argument, expected arg if invalid, a description)."""
    kind = spec.get("out", "none")
    if kind == "none":
        return None, None
    if kind == "fresh":
        return torch.empty_like(like, memory_format=torch.contiguous_format), None
    if kind == "noncontig":
        return _layout(torch.zeros_like(like, memory_format=torch.contiguous_format), True), None
    if kind == "alias":   # exactly an operand (in place)
        j = spec["seed"] % len(ops_)
        if not ops_[j].is_contiguous():
            ops_[j] = ops_[j].contiguous()
        return ops_[j], None
    if kind == "partial":  # a shifted view of the memory holding an operand
        j = spec["seed"] % len(ops_)
        n = like.numel()
        buf = torch.zeros(n + 3, dtype=like.dtype)
        shift = 1 + spec["seed"] % 3
        buf[shift:shift + n].copy_(ops_[j].reshape(-1))
        ops_[j] = buf[shift:shift + n].view(like.shape)
        return buf[:n].view(like.shape), None
    if kind == "expanded":
        return torch.zeros(like.shape[:1] + (1,) * (like.dim() - 1), dtype=like.dtype).expand(like.shape), "out"
    if kind == "wrong_dtype":
        return torch.empty(like.shape, dtype=torch.float64 if like.dtype != torch.float64 else torch.float32), "out"
    if kind == "wrong_shape":
        return torch.empty((like.shape[0] + 1,) + tuple(like.shape[1:]), dtype=like.dtype), "out"
    if kind == "not_tensor":
        return [0.0], "out"
    raise ValueError(kind)


# -- targets ----------------------------------------------------------------------------------

def _reduce(spec):
    from gradguide import ops
    gen = torch.Generator().manual_seed(spec["seed"])
    ops_, exact = _operands(spec, gen)
    m = spec["mutation"]
    groups, expect = spec["groups"], None
    if m in OPERAND_MUTATIONS or m == "too_many":
        _apply_operand_mutation(m, ops_)
        expect = ("operands",)
        if m == "too_many" and spec["backend"] == "reference":
            expect = None   # the reference takes any K
            exact = exact + [exact[0]] * (9 - len(exact))
    elif m == "groups_bad":
        groups, expect = {0: 0, 1: -1, 2: True, 3: 2.0}[spec["seed"] % 4], ("groups",)
    elif m == "groups_nondivisor":
        per = math.prod(spec["feat"])
        groups, expect = next(g for g in range(2, per + 2) if per % g), ("groups",)
    elif m == "backend_bad":
        expect = ("backend",)
    backend = "magic" if m == "backend_bad" else spec["backend"]
    gram, sums = _call(lambda: ops.reduce(ops_, groups, backend=backend), expect)
    b = spec["b"]
    rows = torch.stack([e.reshape(b, groups, -1) for e in exact], 2)          # [B, G, K, N]
    n = rows.shape[-1]
    finite = all(bool(torch.isfinite(e).all()) for e in exact)
    want_gram, want_sums = rows @ rows.transpose(-1, -2), rows.sum(-1)
    eps = _acc_eps(ops_[0].dtype)
    scale = max(16.0, 4 * math.sqrt(n)) * eps
    mag = rows.abs()
    _compare(gram, want_gram, scale * (mag @ mag.transpose(-1, -2)) + 1e-300, finite, "gram")
    _compare(sums, want_sums, scale * mag.sum(-1) + 1e-300, finite, "sums")
    return "correct", ""


def _combine(spec):
    from gradguide import ops
    gen = torch.Generator().manual_seed(spec["seed"])
    ops_, exact = _operands(spec, gen)
    dtype, b, k, groups = DTYPES[spec["dtype"]], spec["b"], spec["k"], spec["groups"]
    coef64 = torch.randn((b, groups, k) if groups > 1 or spec["coef3"] else (b, k), generator=gen,
                         dtype=torch.float64) * spec["coef_scale"]
    coef = coef64.to(DTYPES[spec["coef_dtype"]])
    coef64 = coef.double()
    clamp, expect = _clamp(spec)
    m = spec["mutation"]
    out, out_expect = _out(spec, ops_, ops_[0])
    expect = expect or out_expect
    backend = spec["backend"]
    if m in OPERAND_MUTATIONS or m == "too_many":
        _apply_operand_mutation(m, ops_)
        if m == "too_many":
            coef64 = torch.randn(b, 9, generator=gen, dtype=torch.float64)
            coef = coef64.to(DTYPES[spec["coef_dtype"]])
            coef64 = coef.double()
            exact = exact + [exact[0]] * (9 - len(exact))
            clamp, out = None, None
            expect = None if backend == "reference" else ("operands",)
        else:
            expect = ("operands",)
    elif m.startswith("coef_"):
        coef = {"coef_float": lambda: 1.0, "coef_list": coef.tolist, "coef_int": lambda: coef.to(torch.int64),
                "coef_complex": lambda: coef.to(torch.complex64),
                "coef_shape": lambda: coef[..., :-1] if k > 1 else torch.ones((b + 1,) + coef.shape[1:]),
                "coef_meta": lambda: torch.empty(coef.shape, device="meta")}[m]()
        expect = ("coef",)
    elif m == "backend_bad":
        backend, expect = "magic", ("backend",)
    result = _call(lambda: ops.combine(coef, ops_, out=out, clamp=clamp, backend=backend), expect)
    if out is not None and result.data_ptr() != out.data_ptr():
        raise Result("wrong", "out= given but the result is not out")
    c3 = coef64 if coef64.dim() == 3 else coef64.unsqueeze(1)
    rows = torch.stack([e.reshape(b, c3.shape[1], -1) for e in exact], 2)  # [B, G, K, N]
    truth = _clamp64((c3.unsqueeze(-1) * rows).sum(2), clamp).reshape(exact[0].shape)
    mag = (c3.abs().unsqueeze(-1) * rows.abs()).sum(2).reshape(exact[0].shape)
    finite = all(bool(torch.isfinite(e).all()) for e in exact) and bool(torch.isfinite(coef64).all())
    eps = _acc_eps(dtype)
    _compare(result, _round_to(truth, dtype), 8 * eps * mag + _out_tol(truth, dtype), finite, "combine")
    return "correct", ""


def _policy_params(spec, gen, b, k, policy):
    from gradguide.ops import policies
    vector_names, scalar_defaults = policies.POLICIES[policy]
    params = {}
    for name in vector_names:
        v = torch.randn(b, k, generator=gen, dtype=torch.float64)
        if name == "base" and spec["seed"] % 3 == 0:
            v = torch.zeros(b, k, dtype=torch.float64)
        params[name] = v.float()
    rnd = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))
    ranges = {"scale": (-2.0, 9.0), "delta": (0.0, 2.0), "delta2": (0.0, 2.0), "post": (-1.0, 2.0),
              "eta": (0.0, 1.0), "norm_threshold": (0.0, 20.0), "a": (0.1, 1.0), "h": (0.01, 1.0),
              "sigma": (0.05, 1.0), "target": (-2.0, 2.0), "multiplier": (0.0, 2.0), "beta": (0.0, 1.0),
              "alpha": (0.0, 4.0)}
    for name in scalar_defaults:
        # flags (TCFG / MAMBO-G's formulation, G_loss's per-sample β): both values across seeds
        flag = name in ("original", "beta_per_sample")
        value = float(spec["seed"] // 2 % 2) if flag else rnd(*ranges[name])
        params[name] = torch.full((b,), value) if spec["seed"] % 2 else value
    return params


def _fused(spec):
    from gradguide import ops
    from gradguide.ops import policies
    gen = torch.Generator().manual_seed(spec["seed"])
    ops_, exact = _operands(spec, gen)
    dtype, b, k = DTYPES[spec["dtype"]], spec["b"], spec["k"]
    policy = spec["policy"]
    params = _policy_params(spec, gen, b, k, policy)
    clamp, expect = _clamp(spec)
    out, out_expect = _out(spec, ops_, ops_[0])
    expect = expect or out_expect
    m = spec["mutation"]
    backend = spec["backend"]
    gram = None
    vector_names, scalar_defaults = policies.POLICIES[policy]
    if m in OPERAND_MUTATIONS:
        _apply_operand_mutation(m, ops_)
        expect = ("operands",)
    elif m == "policy_bad":
        policy, expect = ["nope", 3, None][spec["seed"] % 3], ("policy",)
    elif m == "vector_missing":
        name = vector_names[spec["seed"] % len(vector_names)]
        params.pop(name)
        expect = (name,)
    elif m == "vector_complex":
        name = vector_names[spec["seed"] % len(vector_names)]
        params[name] = params[name].to(torch.complex64)
        expect = (name,)
    elif m == "vector_shape":
        name = vector_names[spec["seed"] % len(vector_names)]
        params[name] = params[name][:, :-1] if k > 1 else params[name].repeat(1, 2)
        expect = (name,)
    elif m == "scalar_bad":
        name = list(scalar_defaults)[spec["seed"] % len(scalar_defaults)]
        params[name] = [1 + 2j, "2", torch.tensor(2), torch.tensor([1.0, 2.0, 3.0] * (b + 1))][spec["seed"] % 4]
        expect = (name,)
    elif m == "unexpected_param":
        params["zzz"], expect = 1.0, ("zzz",)
    elif m == "gram_bad":
        gram, expect = torch.zeros(b, 1, k + 1, k + 1), ("gram",)
    elif m == "backend_bad":
        backend, expect = "magic", ("backend",)
    elif spec.get("give_gram") or spec.get("poison") == "gram":
        gram = ops.reduce(ops_, backend="reference")[0]
    poison = spec.get("poison", "none") if expect is None else "none"
    row, bad = spec["seed"] % b, [float("nan"), math.inf, -math.inf][spec["seed"] % 3]
    if poison == "vector":   # a NaN/inf entry in one sample's coefficient vector (a valid call)
        name = vector_names[spec["seed"] % len(vector_names)]
        params[name] = params[name].clone()
        params[name][row, spec["seed"] % k] = bad
    elif poison == "scalar" and scalar_defaults:
        name = list(scalar_defaults)[spec["seed"] % len(scalar_defaults)]
        if isinstance(params[name], torch.Tensor):
            params[name] = params[name].clone()
            params[name][row] = bad
        else:
            params[name] = bad
    elif poison == "gram" and gram is not None and policies.NEEDS_GRAM[policy]:
        gram = gram.clone()   # one entry, not its mirror: the rule reads the whole block
        gram[row, 0, spec["seed"] % k, (spec["seed"] // k) % k] = bad
    result = _call(lambda: ops.fused_combine(policy, ops_, gram=gram, out=out, clamp=clamp, backend=backend,
                                             **params), expect)
    rows = torch.stack([e.reshape(b, 1, -1) for e in exact], 2)
    gram64 = rows @ rows.transpose(-1, -2)
    if poison == "gram" and gram is not None and policies.NEEDS_GRAM[policy]:
        gram64 = torch.where(torch.isfinite(gram), gram64, gram.double())   # the poisoned entry, exactly
    vec64 = {n: params[n].double().reshape(b, 1, k) for n in vector_names}
    sc64 = {n: (params[n].double() if isinstance(params[n], torch.Tensor) else torch.tensor(float(params[n]),
            dtype=torch.float64)).reshape(-1, 1, 1) for n in scalar_defaults}
    c = policies.coefficients(policy, gram64, vec64, sc64)                     # [B, 1, K]
    truth = _clamp64((c.unsqueeze(-1) * rows).sum(2), clamp).reshape(exact[0].shape)
    # the output rounds to its dtype (fp16/bf16 Grams sum in float32): a tolerance relative to the row's scale
    mag = (c.abs().unsqueeze(-1) * rows.abs()).sum(2)
    scale = mag.amax(-1, keepdim=True).expand_as(mag).reshape(exact[0].shape)
    finite = all(bool(torch.isfinite(e).all()) for e in exact)
    # the truth is the same coefficient program on the float64 Gram matrix: it has the NaN/inf
    # structure the rule prescribes (policies.coefficients: a row whose program reads a NaN/inf,
    # or computes a non-finite weight, is all NaN; a NaN operand poisons every Gram entry it enters)
    rtol = 1e-9 if dtype == torch.float64 else 2e-3
    _compare(result, _round_to(truth, dtype), rtol * scale + _out_tol(truth, dtype), finite, f"fused {policy}")
    return "correct", ""


RAW_MUTATIONS = ("empty", "zero_d", "shape", "dtype_mix", "int", "meta", "strided", "zero_batch", "bad_groups",
                 "coef_shape", "coef_int", "policy", "vector_int", "scalar_meta", "bounds")


def _raw(spec):
    """A registered op called directly (``torch.ops.gradguide.*`` / ``torch.ops.gradguide_triton.*``),
    past ``gradguide.ops``' checks: a valid call agrees with the reference, an invalid one raises
    a TypeError/ValueError naming the argument."""
    from gradguide import ops
    from gradguide.ops import reference
    if ops.available_backends("cpu")[spec["backend"]] is not True:   # also loads the native extension
        raise Result("unclean_error", f"backend {spec['backend']!r} is unavailable here")
    gen = torch.Generator().manual_seed(spec["seed"])
    ops_, exact = _operands(dict(spec, noncontig=False), gen)
    dtype, b, k, op = DTYPES[spec["dtype"]], spec["b"], spec["k"], spec["op"]
    ns = torch.ops.gradguide if spec["backend"] == "native" else torch.ops.gradguide_triton
    coef = torch.randn(b, 1, k, generator=gen, dtype=torch.float64)
    coef = coef if spec["backend"] == "native" else coef.to(reference.accumulation_dtype(dtype))
    groups, low, high, policy, vectors, scalars = 1, None, None, "cfg", [coef] * 3, [torch.full((1,), 2.0,
                                                                                                dtype=torch.float64)]
    cp = torch.randn(1, k, generator=gen, dtype=torch.float64)
    cs = torch.randn(1, k, generator=gen, dtype=torch.float64)
    m, expect = spec["mutation"], None
    if m in ("empty", "zero_d", "shape", "dtype_mix", "int", "meta", "strided", "zero_batch"):
        expect = ("operands",)
        if m == "empty":
            ops_ = []
        elif m == "zero_d":
            ops_ = [torch.tensor(1.0, dtype=dtype)] * k
        elif m == "zero_batch":
            ops_ = [o[:0] for o in ops_]
        else:
            extra = {"shape": lambda o: o.reshape(-1)[:-1] if o.numel() > 1 else o.new_zeros(3, 3),
                     "dtype_mix": lambda o: o.to(torch.float64 if o.dtype != torch.float64 else torch.float32),
                     "int": lambda o: o.to(torch.int32), "meta": lambda o: o.to("meta"),
                     "strided": lambda o: torch.stack([o, o], -1)[..., 0]}[m]
            ops_ = ops_ + [extra(ops_[0])]
            coef, cp, cs = (torch.cat([c, c[..., :1]], -1) for c in (coef, cp, cs))
            vectors = [coef] * 3
    elif m == "bad_groups":
        groups, expect = [0, -1, 7 * math.prod(spec["feat"]) + 1][spec["seed"] % 3], ("groups", "coef")
        coef = coef.expand(b, groups, k).contiguous() if groups > 0 else coef[:, :0]
        vectors = [coef] * 3
    elif m == "coef_shape":
        coef, cp, expect = coef[..., :-1] if k > 1 else coef.repeat(1, 1, 2), cp[:, :-1] if k > 1 else cp.repeat(1, 2), \
            ("coef", "coef_p", "vectors")
        vectors = [coef] * 3
    elif m == "coef_int":
        coef, cp, expect = coef.to(torch.int64), cp.to(torch.int64), ("coef", "coef_p", "vectors")
        vectors = [coef] * 3
    elif m == "policy":
        policy, expect = "pcgrad", ("policy",)
    elif m == "vector_int":
        vectors, expect = [coef, coef.to(torch.int32), coef], ("vectors",)
    elif m == "scalar_meta":
        scalars, expect = [scalars[0].to("meta")], ("scalars",)
    elif m == "bounds":
        low, high = (float("nan"), 1.0) if op != "clip_shift" else (1.0, -1.0)
        expect = ("low", "high", "low, high")
    if op == "reduce":
        call = lambda: ns.reduce(ops_, groups)
    elif op == "combine":
        call = lambda: ns.combine(coef, ops_, low, high)
    elif op == "fused_combine":
        call = (lambda: ns.fused_combine(policy, ops_, None, vectors, scalars, low, high)) \
            if spec["backend"] == "native" else (lambda: ns.fused_combine(policy, None, vectors, scalars, ops_, low, high))
    else:
        lo, hi = (-1.0, 1.0) if m != "bounds" else (low, high)
        call = lambda: ns.clip_shift(cp, cs, ops_, lo, hi)
    if expect is not None and op == "reduce" and m in ("coef_shape", "coef_int", "policy", "vector_int",
                                                       "scalar_meta", "bounds"):
        expect = None   # reduce takes none of these arguments: the call is valid
    if expect is not None and op != "fused_combine" and m in ("policy", "vector_int", "scalar_meta"):
        expect = None
    if expect is not None and op == "fused_combine" and m in ("bad_groups",):
        expect = ("vectors", "groups")
    if op == "clip_shift" and m == "bad_groups":
        expect = None   # clip_shift has no groups
    got = _call(call, expect)
    rows = torch.stack([e.reshape(b, -1) for e in exact], 1)          # [B, K, N]
    if op == "reduce":
        want = rows @ rows.transpose(-1, -2)
        got_ = got[0][:, 0]
    elif op in ("combine", "fused_combine"):
        # cfg with base = cond = uncond = coef: base + uncond + 2 (cond − uncond) = 2 coef
        c = coef.double()[:, 0] * (1.0 if op == "combine" else 2.0)
        want = (c.unsqueeze(-1) * rows).sum(1).reshape(exact[0].shape)
        got_ = got
    else:
        want = torch.clamp((cp.double().unsqueeze(-1) * rows).sum(1), -1.0, 1.0).reshape(exact[0].shape)
        got_ = got[0]
    mag = rows.abs().sum(1, keepdim=True).amax(-1, keepdim=True) * 10 + 1
    scale = (mag * mag) if op == "reduce" else mag.reshape(b, *([1] * (exact[0].dim() - 1)))
    finite = all(bool(torch.isfinite(e).all()) for e in exact)
    eps = 1e-9 if dtype == torch.float64 else 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    _compare(got_, want if op == "reduce" else _round_to(want, dtype), (eps * scale).expand_as(want), finite, f"raw {op}")
    return "correct", ""


def _project(spec):
    import gradguide as gg
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, b = DTYPES[spec["dtype"]], spec["b"]
    shape = (b,) + tuple(spec["feat"])
    a64 = _values(gen, shape, spec["values"])
    rel = spec.get("relation", "random")
    b64 = {"random": lambda: _values(gen, shape, "normal"), "zero": lambda: torch.zeros(shape, dtype=torch.float64),
           "opposite": lambda: -a64 * 0.5 + 0.1 * _values(gen, shape, "normal"), "same": lambda: a64.clone()}[rel]()
    a, bb = _layout(a64.to(dtype), spec["noncontig"]), b64.to(dtype)
    a64, b64 = a.double(), bb.double()
    delta, granularity, backend, expect = spec["delta"], spec["granularity"], spec["backend"], None
    m = spec["mutation"]
    if m == "a_not_tensor":
        a, expect = a.tolist(), ("a",)
    elif m == "b_shape":
        bb = bb[:, :1] if shape[1] > 1 else torch.zeros((b, 2) + shape[2:], dtype=dtype)
        expect = ("b", "project(a, b)")
    elif m == "a_int":
        a, expect = a.to(torch.int64), ("a", "project(a, b)")
    elif m == "delta_nan":
        delta, expect = [float("nan"), math.inf, "1", None][spec["seed"] % 4], ("delta",)
    elif m == "granularity_bad":
        granularity, expect = "pixel", ("granularity",)
    elif m == "backend_bad":
        backend, expect = "magic", ("backend", "granularity")
    elif m == "a_1d":
        a, bb, expect = a.reshape(-1), bb.reshape(-1), ("a",)
    elif granularity == "channel" and len(shape) < 3:
        expect = ("granularity",)
    if spec.get("grad") and expect is None:
        a = a.detach().requires_grad_(True)
    result = _call(lambda: gg.project(a, bb, delta=delta, granularity=granularity, backend=backend), expect)
    if spec.get("grad") and not result.requires_grad:
        raise Result("wrong", "project dropped autograd")
    g = 1 if granularity == "sample" else shape[1]
    ra, rb = a64.reshape(b, g, -1), b64.reshape(b, g, -1)
    dot, nb = (ra * rb).sum(-1), (rb * rb).sum(-1)
    if granularity == "sample":
        dot, nb = dot.sum(1, keepdim=True), nb.sum(1, keepdim=True)
    factor = torch.where(nb == 0, torch.zeros_like(nb), dot.clamp(max=0.0) / torch.where(nb == 0, 1.0, nb))
    truth = (ra - delta * factor.unsqueeze(-1) * rb).reshape(shape)
    scale = (ra.abs() + abs(delta) * ra.norm(dim=-1, keepdim=True).expand_as(ra)).amax(-1, keepdim=True)
    scale = scale.expand_as(ra).reshape(shape)
    finite = bool(torch.isfinite(a64).all() and torch.isfinite(b64).all())
    bad = ~(torch.isfinite(ra).all(-1) & torch.isfinite(rb).all(-1))                 # [B, g]
    if granularity == "sample":
        bad = bad.any(1, keepdim=True).expand_as(bad)
    poisoned = bad.unsqueeze(-1).expand_as(ra).reshape(shape)
    rtol = 1e-9 if dtype == torch.float64 else 2e-3
    _compare(result, _round_to(truth, dtype), rtol * scale + _out_tol(truth, dtype), finite, "project", poisoned)
    return "correct", ""


def _off_support(spec):
    import gradguide as gg
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, b = DTYPES[spec["dtype"]], spec["b"]
    shape = (b,) + tuple(spec["feat"])
    dim = math.prod(spec["feat"])
    d = max(1, min(dim, spec["d"]))
    q, _ = torch.linalg.qr(torch.randn(dim, d, generator=gen, dtype=torch.float64))
    x64 = _values(gen, shape, spec["values"])
    if spec.get("relation") == "off_only" and d < dim:
        x64 = (x64.reshape(b, -1) - (x64.reshape(b, -1) @ q) @ q.T).reshape(shape)
    elif spec.get("relation") == "zero_row":
        x64[0] = 0.0
    x, basis = x64.to(dtype), q.to(DTYPES[spec["basis_dtype"]])
    m, expect = spec["mutation"], None
    if m == "x_0d":
        x, expect = torch.tensor(1.0, dtype=dtype), ("x",)
    elif m == "x_empty":
        x, expect = x[:0], ("x",)
    elif m == "x_int":
        x, expect = x.to(torch.int64), ("x",)
    elif m == "x_complex":
        x, expect = x.to(torch.complex64), ("x",)
    elif m == "x_not_tensor":
        x, expect = x.tolist(), ("x",)
    elif m == "basis_shape":
        basis, expect = basis[:-1] if dim > 1 else basis.repeat(2, 1), ("basis",)
    elif m == "basis_int":
        basis, expect = basis.to(torch.int32), ("basis",)
    elif m == "basis_empty":
        basis, expect = basis[:, :0], ("basis",)
    elif m == "basis_not_tensor":
        basis, expect = basis.tolist(), ("basis",)
    result = _call(lambda: gg.off_support_ratio(x, basis), expect)
    flat, q64 = x.double().reshape(b, -1), basis.double()
    on = (flat @ q64) @ q64.T
    off_n, on_n = (flat - on).norm(dim=1), on.norm(dim=1)
    truth = torch.where(on_n == 0, torch.full_like(on_n, math.inf), off_n / torch.where(on_n == 0, 1.0, on_n))
    # computed in float64 whatever the inputs (documented): only the output rounding differs
    out_dtype = torch.float64 if torch.float64 in (x.dtype, basis.dtype) else torch.float32
    finite = bool(torch.isfinite(flat).all())
    truth = _round_to(truth, out_dtype)
    _compare(result, truth, 1e-12 * truth.abs() + _out_tol(truth, out_dtype), finite, "off_support_ratio")
    return "correct", ""


# -- sample -----------------------------------------------------------------------------------

def _sample_setup(spec):
    import gradguide as gg
    from gradguide.experiments.demo_mixture import default_mixture
    schedule = gg.Schedule.linear(spec["T"])
    b = spec["b"]
    if spec["model"] == "mixture":
        gm = default_mixture(schedule)
        shape = (b, 2)
        # the models compute in float64 and return the run's dtype: the comparison with the
        # float64 run then measures the sampler's rounding, not the model's own arithmetic
        model = lambda x, t, y=None: gm(x.double(), t, y).to(x.dtype)
        log_prob = lambda x, t, y=None: gm.log_prob_class(x.double(), t, torch.full((x.shape[0],), 2)).to(x.dtype)
    else:   # a smooth per-channel toy model on [B, C, L] (any deterministic function serves)
        shape = (b, 2, 3)
        w = torch.linspace(-0.5, 0.8, 6, dtype=torch.float64).reshape(1, 2, 3)

        def model(x, t, y=None):
            s = (t.double() / spec["T"]).reshape(-1, 1, 1)
            shift = 0.0 if y is None else 0.3 * y.double().reshape(-1, 1, 1)
            return (torch.tanh(x.double() * w + s) * 0.9 + shift).to(x.dtype)
        log_prob = lambda x, t, y=None: (-((x.double() - 0.5) ** 2).flatten(1).sum(1)).to(x.dtype)
    return schedule, shape, model, log_prob


def _sample_kwargs(spec, dtype, schedule, shape, model, log_prob):
    from gradguide.tools import guidance_spec
    b = shape[0]
    kw = dict(schedule=schedule, sampler=spec["sampler"], steps=spec["steps"], backend=spec["backend"])
    if spec["sampler"] == "ddim":
        kw["eta"] = spec["eta"]
    y = torch.ones(b, dtype=torch.int64)
    g = spec["guidance"]
    # the two-branch terms read the class label; CFG-Zero* without its zero-init steps (every
    # step goes through the rule being fuzzed)
    cond = {"y": y} if g in TWO_BRANCH else None
    guidance, projection = guidance_spec.build(
        (g, spec["scale"]) if g != "none" else None, spec["projection"], granularity=spec["granularity"],
        options={"cfg-zero*": {"zero_init_steps": None}}, classifier=log_prob)
    if projection is not None:
        kw["projection"] = projection
    kw["guidance"], kw["cond"] = guidance, cond
    kw["clip"] = {"none": None, "true": True, "range": (-2.0, 3.0)}[spec["clip"]]
    gen64 = torch.Generator().manual_seed(spec["seed"])
    kw["x_T"] = torch.randn(shape, generator=gen64, dtype=torch.float64).to(dtype)
    # per-sample generators: each draws fewer than 16 numbers, for which CPU randn gives the
    # same stream in every dtype, so the float64 truth sees the same noise
    kw["generator"] = [torch.Generator().manual_seed(spec["seed"] * 100 + i) for i in range(b)]
    return kw


SAMPLE_ARGS = ("model", "shape", "schedule", "sampler", "steps", "eta", "guidance", "projection", "cond", "x_T",
               "generator", "backend", "clip", "device", "dtype", "check_finite", "scale", "T")
# the case's flat settings that go into sample()'s configuration objects
_SAMPLER_FIELDS, _EXECUTION_FIELDS, _DIAGNOSTICS_FIELDS = ("eta", "clip"), ("backend", "device", "dtype"), \
    ("check_finite",)


def _run_sample(model, shape, kw):
    """``gradguide.sample`` with the case's flat settings put into :class:`gradguide.Sampler`,
    ``Execution`` and ``Diagnostics``, built inside the call so that an invalid setting is
    refused (and must be named) where a user meets it."""
    import gradguide as gg
    kw = dict(kw)
    fields = {}
    for group in (_SAMPLER_FIELDS, _EXECUTION_FIELDS, _DIAGNOSTICS_FIELDS):
        fields[group] = {k: kw.pop(k) for k in group if k in kw}
    kw["sampler"] = gg.Sampler(kw["sampler"], **fields[_SAMPLER_FIELDS])
    return gg.sample(model, shape, execution=gg.Execution(**fields[_EXECUTION_FIELDS]),
                     diagnostics=gg.Diagnostics(**fields[_DIAGNOSTICS_FIELDS]), **kw)


def _sample(spec):
    import gradguide as gg
    if spec["mutation"] == "scale_huge":   # finite, valid, far beyond any useful scale: it runs like
        spec = dict(spec, scale=1e30)      # float64 or its error names the scale (guidance.base rule)
    dtype = DTYPES[spec["dtype"]]
    schedule, shape, model, log_prob = _sample_setup(spec)
    m = spec["mutation"]
    expect = None
    model_call = model
    try:
        kw = _sample_kwargs(spec, dtype, schedule, shape, model, log_prob)
    except (TypeError, ValueError) as exc:
        raise Result("unclean_error", f"valid setup refused: {exc}")
    if m == "sampler_bad":
        kw["sampler"], expect = "no-such-sampler", ("sampler", "sampler.name")
    elif m == "steps_bad":
        kw["steps"] = [0, "ddimx", torch.tensor(3), 2.5, [1.5, 3], spec["T"] + 1][spec["seed"] % 6]
        expect = ("steps",)
    elif m == "guidance_int":
        kw["guidance"], expect = 3, ("guidance",)
    elif m == "clip_bad":
        kw["clip"], expect = [(float("nan"), 1.0), (1.0,), 0.5, "yes", (2.0, -2.0)][spec["seed"] % 5], ("clip",)
    elif m == "cond_batch":   # the unconditional branch's label batched differently from cond's
        kw["cond"], expect = {"y": torch.ones(shape[0], dtype=torch.int64)}, ("uncond",)
        kw["guidance"] = [gg.CFG(2.0, uncond={"y": torch.zeros(shape[0] + 1, dtype=torch.int64)})]
        kw.pop("projection", None)
    elif m == "x_T_nan":
        kw["x_T"] = kw["x_T"].clone()
        kw["x_T"].view(-1)[0] = float("nan")
        expect = ("x_T",)
    elif m == "dtype_int":
        kw.pop("x_T")
        kw["dtype"], expect = torch.int64, ("dtype",)
    elif m == "device_bad":
        kw.pop("x_T")
        kw["device"], expect = ["meta", "gpu", 3.5][spec["seed"] % 3], ("device",)
    elif m == "scale_inf":
        raise _construct_scale(spec)
    elif m == "model_int":
        model_call, expect = (lambda x, t, **c: model(x, t, **c).to(torch.int64)), ("model",)
    elif m == "model_complex":
        model_call, expect = (lambda x, t, **c: model(x, t, **c).to(torch.complex64)), ("model",)
    elif m == "model_shape":
        model_call, expect = (lambda x, t, **c: model(x, t, **c)[:, :1]), ("model",)
    elif m == "model_meta":
        model_call, expect = (lambda x, t, **c: torch.empty(x.shape, device="meta")), ("model",)
    elif m == "schedule_bad":
        kw["schedule"], expect = [0.9, 0.5], ("schedule",)
    elif m == "shape_bad":
        expect = ("shape",)
    elif m == "backend_bad":
        kw["backend"], expect = "magic", ("backend",)
    elif m == "generator_bad":
        kw["generator"], expect = "seed", ("generator",)
    elif m == "check_finite_bad":
        kw["check_finite"], expect = "sometimes", ("check_finite",)
    call_shape = (shape[0],) if m == "shape_bad" else shape
    # the truth: the float64 sampler on the same inputs as the run sees them, i.e. the model's
    # input and output rounded to the run's dtype (a model output stored in float32 carries its
    # rounding into every step; no sampler can undo that, so the oracle must not ask it to)
    rnd = lambda v: v.to(dtype).double()
    model64 = lambda x, t, **c: rnd(model(rnd(x), t, **c))
    kw64 = _sample_kwargs(spec, torch.float64, schedule, shape, model64, log_prob)
    kw64["x_T"] = rnd(kw64["x_T"])
    kw64["backend"] = "reference"
    kw64["check_finite"] = False
    try:
        got = _call(lambda: _run_sample(model_call, call_shape, kw), expect)
    except Result as r:
        if m == "scale_huge" and r.outcome == "unclean_error" and expect is None:
            raise Result("clean_error" if names_argument(r.detail, ("scale",)) else "unclean_error",
                         f"huge scale: {r.detail}")
        # a valid half-precision run may be refused by the finiteness check when the float64
        # run leaves the dtype's range: that refusal is the documented behaviour
        if r.outcome == "unclean_error" and expect is None and "check_finite:" in r.detail:
            truth = _run_sample(model64, shape, kw64)
            if bool((truth.abs() > torch.finfo(dtype).max).any()) or not bool(torch.isfinite(truth).all()):
                raise Result("clean_error", "refused: " + r.detail)
        raise
    truth = _run_sample(model64, shape, kw64)
    if not bool(torch.isfinite(truth).all()):
        raise Result("correct", "float64 truth not finite: only the shape is checked")
    fi = torch.finfo(dtype)
    scale = float(truth.abs().amax()) + 1.0
    # every step rounds x and the model outputs to the run's dtype; x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ
    # multiplies the rounding of ε by up to √((1−ᾱ)/ᾱ) at the noisiest step (≈ 160 for these
    # schedules): for half precision that, not the sampler, bounds the agreement with float64
    abar = float(schedule.alphas_cumprod[-1])
    amp = math.sqrt((1 - abar) / abar)
    rtol = {torch.float64: 1e-7, torch.float32: 2e-3}.get(dtype, 4 * fi.eps * (1 + amp) * spec["steps"])
    try:
        _compare(got, truth, torch.full_like(truth, rtol * scale + fi.tiny), True, "sample")
    except Result as r:
        gram_based = spec["projection"] is not None or spec["guidance"] in ("apg", "cfg-zero*", "rescale")
        if r.outcome == "wrong" and gram_based and dtype != torch.float64 and bool(torch.isfinite(got).all()):
            raise Result("known_imprecise", f"float32 cancellation: {r.detail}")
        raise
    return "correct", ""


def _construct_scale(spec):
    import gradguide as gg
    cls = [gg.CFG, gg.APG, gg.CFGZeroStar, gg.Rescale][spec["seed"] % 4]
    value = [math.inf, -math.inf, float("nan")][spec["seed"] % 3]
    try:
        _call(lambda: cls(value), ("scale",))
    except Result as r:
        return r
    return Result("wrong", "unreachable")


def _crash(spec):   # test hook: a worker that dies like a segfaulting native op
    import os
    os.abort()


def _hang(spec):    # test hook: a call that never returns
    import time
    time.sleep(10 ** 6)


TARGETS = {"_crash": _crash, "_hang": _hang, "reduce": _reduce, "combine": _combine, "fused_combine": _fused,
           "raw_op": _raw, "project": _project, "off_support_ratio": _off_support, "sample": _sample}


def run_case(spec: dict) -> Tuple[str, str]:
    """Run one case in this process; ``(outcome, detail)``."""
    try:
        return TARGETS[spec["target"]](spec)
    except Result as r:
        return r.outcome, r.detail


# -- isolation --------------------------------------------------------------------------------

class IsolatedRunner:
    """Runs cases in a worker process (spawned once, reused): a crash of a native op kills the
    worker, not the test session, and counts as ``"crash"``; a case running longer than
    ``timeout`` seconds counts as ``"hang"``; either way a fresh worker takes over."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.pool = None

    def _pool(self):
        if self.pool is None:
            import multiprocessing
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)
            # start-up (spawn, import torch and gradguide) is not part of any case's time limit
            self.pool.submit(_ping).result(timeout=600)
        return self.pool

    def __call__(self, spec: dict) -> Tuple[str, str]:
        future = self._pool().submit(run_case, spec)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            self._kill()
            return "hang", f"no result after {self.timeout} s"
        except BrokenProcessPool as exc:
            self._kill()
            return "crash", f"worker died: {exc}"

    def _kill(self):
        if self.pool is not None:
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def _worker_init():
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    import gradguide  # noqa: F401
    from gradguide import ops
    ops.available_backends("cpu")   # load the native extension (and triton) once


def _ping():
    return True


def tally(counts: Dict[str, Dict[str, int]], target: str, outcome: str) -> None:
    counts.setdefault(target, {}).setdefault(outcome, 0)
    counts[target][outcome] += 1
