"""Every backend of ``reduce`` / ``combine`` / ``fused_combine`` against the float64 reference.

Triton runs through its interpreter on CPU (``TRITON_INTERPRET=1``, set in conftest.py
before any import); the interpreter pays per program, so interpreted shapes stay small.
Tolerances: a backend's error against the float64 truth must stay within a small multiple
of the reference's own error in the same dtype, or within a per-dtype bound scaled by the
magnitudes involved (Cauchy-Schwarz for Gram entries, ``sum |c_k x_k|`` for combine).
"""
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradguide
from gradguide import ops
from gradguide.ops import policies, reference
from helpers import policy_program

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# per-dtype bound on |error| / scale: fp32 accumulation for low precision inputs (exact upcast),
# fp64 for fp32 and fp64 (gradguide/kernels/_common.py); rounding of the output to the dtype for combine
REDUCE_TOL = {torch.float32: 1e-12, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
COMBINE_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}


def _backend(name):
    status = ops.available_backends("cpu")[name]
    if status is not True:
        # CI sets GRADGUIDE_REQUIRE_BACKENDS so a failed native build fails the run instead of skipping
        if name in os.environ.get("GRADGUIDE_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(f"backend {name!r} is required here but unavailable: {status}")
        pytest.skip(f"backend {name!r} unavailable: {status}")
    return name


BACKENDS = ["reference", "triton", "native"]


def _operands(shape, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).mul(1 + j).to(dtype) for j in range(k)]


def _check_reduce(operands, groups, backend):
    gram, sums = ops.reduce(operands, groups, backend=backend)
    k, dtype = len(operands), operands[0].dtype
    acc = reference.coefficient_dtype(dtype)  # the Gram contract: float64 for every dtype
    assert gram.shape == (operands[0].shape[0], groups, k, k) and gram.dtype == acc
    assert sums.shape == (operands[0].shape[0], groups, k) and sums.dtype == acc
    exact = [op.to(torch.float64) for op in operands]
    g64, s64 = reference.reduce(exact, groups)
    diag = torch.diagonal(g64, dim1=-2, dim2=-1)
    scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt() + 1e-30
    abs_sum = reference.reduce([op.abs() for op in exact], groups)[1] + 1e-30
    tol = REDUCE_TOL[dtype]
    assert ((gram.double() - g64).abs() / scale).max() <= tol
    assert ((sums.double() - s64).abs() / abs_sum).max() <= tol
    return gram, sums


def _check_combine(coef, operands, backend, clamp=None, out=None):
    got = ops.combine(coef, operands, out=out, clamp=clamp, backend=backend)
    dtype = operands[0].dtype
    assert got.dtype == dtype and got.shape == operands[0].shape
    c3 = coef if coef.dim() == 3 else coef.unsqueeze(1)
    exact = [op.to(torch.float64) for op in operands]
    truth = reference.combine(c3.double(), exact, clamp=clamp)
    scale = reference.combine(c3.double().abs(), [op.abs() for op in exact]) + 1e-30
    own = (reference.combine(c3, operands, clamp=clamp).double() - truth).abs()  # the reference's own error
    err = (got.double() - truth).abs()
    assert (err <= torch.maximum(2 * own, COMBINE_TOL[dtype] * scale)).all(), float((err / scale).max())
    return got


# -- reduce / combine on awkward shapes ------------------------------------------------------

SHAPES = [((1, 1023), 1), ((3, 7, 13), 1), ((3, 7, 13), 7), ((2, 4, 5, 3), 4)]


def _shapes(backend, dtype):
    """Every shape on compiled backends; the interpreter (triton) gets every shape in fp32 and
    two of them in the other dtypes, to keep the suite within its time budget."""
    if backend == "triton" and dtype != torch.float32:
        return [SHAPES[0], SHAPES[2]]
    return SHAPES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_odd_shapes_all_k(backend, dtype):
    _backend(backend)
    for i, (shape, groups) in enumerate(_shapes(backend, dtype)):
        for k in ((1, 8) if backend == "triton" else range(1, 9)):
            _check_reduce(_operands(shape, k, dtype, seed=i * 10 + k), groups, backend)
    if backend == "triton" and dtype == torch.float32:  # every K once, one shape (the interpreter is slow)
        for k in range(2, 8):
            _check_reduce(_operands((2, 33), k, dtype, seed=k), 1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_odd_shapes_all_k(backend, dtype):
    _backend(backend)
    g = torch.Generator().manual_seed(1)
    for i, (shape, groups) in enumerate(_shapes(backend, dtype)):
        for k in ((1, 8) if backend == "triton" else range(1, 9)):
            ops_ = _operands(shape, k, dtype, seed=i * 10 + k)
            coef = torch.randn(shape[0], groups, k, generator=g)
            _check_combine(coef, ops_, backend)
            _check_combine(coef, ops_, backend, clamp=(-1.0, 0.5))


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_combine_into_preallocated_out(backend):
    _backend(backend)
    ops_ = _operands((3, 7, 13), 3, torch.float32)
    coef = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    out = torch.full_like(ops_[0], float("nan"))
    got = _check_combine(coef, ops_, backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    # a non-contiguous out is written through a temporary
    out_t = torch.zeros(13, 7, 3).permute(2, 1, 0)
    _check_combine(coef, ops_, backend, out=out_t)
    torch.testing.assert_close(out_t, out, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_non_contiguous_operands(backend):
    _backend(backend)
    base = _operands((2, 13, 7, 3), 4, torch.float32)
    views = [t.permute(0, 3, 2, 1) for t in base]  # [2, 3, 7, 13], non-contiguous
    assert not views[0].is_contiguous()
    gram, sums = ops.reduce(views, 3, backend=backend)
    g_ref, s_ref = ops.reduce([v.contiguous() for v in views], 3, backend="reference")
    torch.testing.assert_close(gram, g_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums, s_ref, rtol=1e-5, atol=1e-4)
    coef = torch.randn(2, 3, 4)
    torch.testing.assert_close(ops.combine(coef, views, backend=backend),
                               ops.combine(coef, [v.contiguous() for v in views], backend="reference"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_rejects_bad_input(backend):
    _backend(backend)
    nine = _operands((2, 5), 9, torch.float32)
    with pytest.raises(ValueError, match="at most 8"):
        ops.reduce(nine, backend=backend)
    with pytest.raises(ValueError, match="at most 8"):
        ops.combine(torch.ones(2, 9), nine, backend=backend)
    two = _operands((2, 6), 2, torch.float32)
    with pytest.raises(ValueError, match="groups"):
        ops.reduce(two, 4, backend=backend)
    with pytest.raises(ValueError, match="coef"):
        ops.combine(torch.ones(2, 3), two, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.reduce([two[0], two[1].double()], backend=backend)


def test_unavailable_backend_says_why(monkeypatch):
    from gradguide.ops import native_backend
    monkeypatch.setitem(native_backend._state, "loaded", False)
    monkeypatch.setitem(native_backend._state, "reason", "not built in this test")
    assert ops.available_backends("cpu")["native"] == "not built in this test"
    with pytest.raises(RuntimeError, match="native.*not built in this test"):
        ops.reduce(_operands((2, 3), 2, torch.float32), backend="native")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda-magic", torch.device("cpu"))


# -- random cases ----------------------------------------------------------------------------

@st.composite
def _cases(draw, max_n):
    b = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    n = groups * draw(st.integers(1, max_n // groups))
    k = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 16))
    return (b, n), groups, k, dtype, seed


def _random_case(case, backend):
    shape, groups, k, dtype, seed = case
    ops_ = _operands(shape, k, dtype, seed)
    _check_reduce(ops_, groups, backend)
    coef = torch.randn(shape[0], groups, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_combine(coef, ops_, backend)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases(max_n=5000))
def test_native_random(case):
    _random_case(case, _backend("native"))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases(max_n=3000))
def test_triton_random(case):
    _random_case(case, _backend("triton"))


# -- non-finite inputs: identical behaviour on every backend ------------------------------------

def _nonfinite_operands():
    ops_ = _operands((2, 3, 5), 3, torch.float32)
    ops_ = [o.clone() for o in ops_]
    ops_[1][0, 1, 2] = float("nan")
    ops_[2][1, 0, 4] = float("inf")
    return ops_


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_nonfinite_inputs_match_reference(backend):
    _backend(backend)
    ops_ = _nonfinite_operands()
    for groups in (1, 3):
        got, ref = ops.reduce(ops_, groups, backend=backend), ops.reduce(ops_, groups, backend="reference")
        for a, r in zip(got, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(r)) and torch.equal(torch.isinf(a), torch.isinf(r))
            assert torch.equal(a[torch.isinf(a)], r[torch.isinf(r)])  # same signs
            fin = torch.isfinite(r)
            torch.testing.assert_close(a[fin], r[fin], rtol=1e-5, atol=1e-5)
        # the poisoned rows are exactly those of the non-finite operands' samples
        gram = got[0]
        assert torch.isnan(gram[0, :, 1, 1]).any() and not torch.isnan(gram[1, :, 1, 1]).any()
    coef = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 0.0]])  # zero weights on the poisoned operands
    out, ref = ops.combine(coef, ops_, backend=backend), ops.combine(coef, ops_, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 1, 2]) and torch.isnan(out[1, 0, 4])
    assert torch.isfinite(out).sum() == out.numel() - 2
    clamped = ops.combine(coef, ops_, clamp=(-0.5, 0.5), backend=backend)
    assert torch.isnan(clamped[0, 1, 2]) and clamped[torch.isfinite(clamped)].abs().max() <= 0.5


# -- the non-finite rule of the coefficient programs (gradguide/ops/policies.py) -------------------

_SCALARS = {"cfg": {"scale": 3.0}, "pxp-a": {"delta": 1.0}, "pxp-b": {"delta": 0.7},
            "pxp-c": {"scale": 4.0, "delta": 1.0, "delta2": 0.5, "post": 0.3},
            "apg": {"scale": 5.0, "eta": 0.2, "norm_threshold": 2.0, "post": 0.8},
            "linear": {},
            "lookahead": {"a": 0.7, "h": 0.51, "sigma": 0.1, "target": 0.3, "multiplier": 1.5, "beta": 0.2,
                          "beta_per_sample": 1.0, "post": 0.2},
            "tcfg": {"scale": 4.0, "original": 0.0, "post": 0.6},
            "mambo": {"scale": 5.0, "alpha": 0.7, "original": 0.0, "post": 0.6}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_fused_nonfinite_rule(policy, backend, dtype):
    """One rule on every backend: a NaN/inf in a row's Gram block, coefficient vectors or
    scalars, or a non-finite weight computed from finite inputs, makes that whole row NaN;
    the other rows are untouched. Row 0: a Gram entry (or, without a Gram, a vector entry)
    is NaN; row 1: a vector entry is inf; row 2: a scalar is NaN; row 3: a weight overflows
    (scale 1e308 times a difference of 20) for cfg and pxp-c; row 4: clean."""
    _backend(backend)
    b, k = 5, 4
    names_v, names_s = policies.POLICIES[policy]
    operands = _operands((b, 6), k, dtype, seed=7)
    g = torch.Generator().manual_seed(11)
    vectors = {n: torch.randn(b, k, generator=g, dtype=torch.float64) for n in names_v}
    scalars = {n: torch.full((b,), float(v), dtype=torch.float64) for n, v in _SCALARS[policy].items()}
    poisoned = [1]
    vectors[names_v[-1]][1, 2] = float("inf")
    gram = None
    if policies.NEEDS_GRAM[policy]:
        gram = ops.reduce(operands, backend="reference")[0].clone()
        gram[0, 0, 1, 2] = float("nan")   # one entry only (not its mirror): the row must still be NaN
    else:
        vectors[names_v[0]][0, 3] = float("nan")
    poisoned.append(0)
    if scalars:
        scalars[list(names_s)[-1]][2] = float("nan")
        poisoned.append(2)
    if policy in ("cfg", "pxp-c"):        # finite inputs, but scale · (cond − uncond) overflows float64
        scalars["scale"][3] = 1e308
        vectors[names_v[1]][3] = 10.0
        vectors[names_v[2]][3] = -10.0
        poisoned.append(3)
    got = ops.fused_combine(policy, operands, gram=gram, backend=backend, **vectors, **scalars)
    bad = torch.zeros(b, dtype=torch.bool)
    bad[poisoned] = True
    assert torch.isnan(got[bad]).all(), (policy, backend, dtype, got)
    assert torch.isfinite(got[~bad]).all()
    if backend != "reference":
        ref = ops.fused_combine(policy, operands, gram=gram, backend="reference", **vectors, **scalars)
        tol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(got[~bad].double(), ref[~bad].double(), rtol=tol, atol=tol)
    # a Gram policy computes its Gram from the operands: a NaN operand element poisons its row
    if gram is not None:
        dirty = [o.clone() for o in operands]
        dirty[0][4, 5] = float("nan")
        clean_vectors = {n: torch.randn(b, k, generator=g, dtype=torch.float64) for n in names_v}
        clean_scalars = {n: float(v) for n, v in _SCALARS[policy].items()}
        out = ops.fused_combine(policy, dirty, backend=backend, **clean_vectors, **clean_scalars)
        assert torch.isnan(out[4]).all() and torch.isfinite(out[:4]).all()


# -- fused policies ------------------------------------------------------------------------------

class _DenseAlgebra:
    """The policy formulas on materialised float64 vectors ``[B, G, N/G]``, inner products summed
    element by element: shares nothing with the fused path (Gram matrix, coefficient vectors,
    kernels) but the formulas themselves."""

    @staticmethod
    def dot(u, v):
        return (u * v).sum(-1, keepdim=True)

    @staticmethod
    def select(flag, u, v):
        return torch.where(flag, u, v)


def _dense_policy(policy, operands, groups, params):
    """``policy``'s output evaluated directly on the combined tensors, in float64."""
    b, k = operands[0].shape[0], len(operands)
    rows = torch.stack([o.double().reshape(b, groups, -1) for o in operands], -1)      # [B, G, N/G, K]
    names_v, names_s = policies.POLICIES[policy]
    vectors = {n: torch.einsum("bgnk,bgk->bgn", rows, params[n].double().expand(b, groups, k)) for n in names_v}
    scalars = {}
    for n, default in names_s.items():
        value = torch.as_tensor(params.get(n, default), dtype=torch.float64)
        scalars[n] = value.reshape(-1, 1, 1)
    out = policies.PROGRAMS[policy][2](_DenseAlgebra, vectors, scalars)
    return out.reshape(operands[0].shape).to(operands[0].dtype)


def _policy_params(policy, b, groups, k, zero=()):
    g = torch.Generator().manual_seed(3)
    params = {}
    for name in policies.POLICIES[policy][0]:
        vec = torch.randn(b, groups, k, generator=g)
        params[name] = torch.zeros_like(vec) if name in zero else vec
    params.update({"cfg": {"scale": 3.0}, "pxp-a": {"delta": 1.0}, "pxp-b": {"delta": 0.7},
                   "pxp-c": {"scale": 4.0, "delta": 1.0, "delta2": 0.5, "post": 0.3},
                   "apg": {"scale": 5.0, "eta": 0.2, "norm_threshold": 2.0, "post": 0.8},
                   "linear": {}, "tcfg": {"scale": 4.0, "original": 0.0, "post": 0.6},
                   "mambo": {"scale": 5.0, "alpha": 0.7, "original": 0.0, "post": 0.6},
                   "lookahead": {"a": 0.7, "h": 0.51, "sigma": 0.1, "target": 0.3, "multiplier": 1.5,
                                 "post": 0.2}}[policy])
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_fused_policies_match_a_dense_evaluation(backend, policy):
    _backend(backend)
    for groups, zero in ((1, ()), (3, ()), (1, ("cls", "x0_uncond", "d_cond", "vjp", "uncond"))):
        operands = _operands((2, 3, 5), 5, torch.float32, seed=groups)
        params = _policy_params(policy, 2, groups, 5, zero)
        want = _dense_policy(policy, operands, groups, params)
        got = ops.fused_combine(policy, operands, backend=backend, **params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        gram = ops.reduce(operands, groups, backend="reference")[0]
        out = torch.empty_like(operands[0])
        got2 = ops.fused_combine(policy, operands, gram=gram, out=out, clamp=(-2.0, 2.0), backend=backend, **params)
        assert got2.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got2, want.clamp(-2.0, 2.0), rtol=1e-5, atol=1e-5)


def test_fused_per_sample_scalars_and_errors():
    operands = _operands((3, 4), 3, torch.float32)
    g = torch.Generator().manual_seed(0)
    base, cond, uncond = (torch.randn(3, 3, generator=g) for _ in range(3))
    scale = torch.tensor([1.0, 2.0, 3.0])
    got = ops.fused_combine("cfg", operands, base=base, cond=cond, uncond=uncond, scale=scale, backend="reference")
    coef = base + uncond + scale[:, None] * (cond - uncond)
    torch.testing.assert_close(got, ops.combine(coef, operands, backend="reference"))
    with pytest.raises(TypeError, match="missing scalar 'scale'"):
        ops.fused_combine("cfg", operands, base=base, cond=cond, uncond=uncond)
    with pytest.raises(TypeError, match="unexpected parameters"):
        ops.fused_combine("cfg", operands, base=base, cond=cond, uncond=uncond, scale=1.0, delta=1.0)
    with pytest.raises(ValueError, match="policy"):
        ops.fused_combine("pcgrad", operands)
    with pytest.raises(ValueError, match="uncond"):
        ops.fused_combine("cfg", operands, base=base, cond=cond, uncond=uncond[:, :2], scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        ops.fused_combine("cfg", operands, base=base, cond=cond, uncond=uncond, scale=torch.ones(2))


# -- full samplers on the closed-form mixture --------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "native"])
def test_sample_matches_reference_backend(backend):
    _backend(backend)
    from gradguide import CFG, Classifier, PixelAsParam, Schedule, sample
    from gradguide.experiments.demo_mixture import default_mixture
    schedule = Schedule.linear(1000)
    gm = default_mixture(schedule)
    y = torch.full((6,), 2, dtype=torch.int64)
    log_prob = lambda x, t, y: gm.log_prob_class(x, t, y)  # noqa: E731
    runs = [dict(sampler=gradguide.Sampler("ddpm", clip=(-4.0, 4.0)), guidance=[CFG(3.0)],
                 projection=PixelAsParam("C")),
            dict(sampler=gradguide.Sampler("ddim", eta=0.5), guidance=[Classifier(log_prob, 4.0)],
                 projection=PixelAsParam("B"))]
    if backend == "native":  # the compiled backend can afford the multistep sampler too
        runs.append(dict(sampler="dpmpp-2m", guidance=[CFG(2.0)]))
    for kw in runs:
        records = []
        results = {}
        for b in ("reference", backend):
            results[b] = sample(gm, (6, 2), schedule=schedule, steps=6, cond={"y": y},
                                execution=gradguide.Execution(backend=b), generator=torch.Generator().manual_seed(0),
                                diagnostics=gradguide.Diagnostics(callback=records.append), **kw)
        torch.testing.assert_close(results[backend], results["reference"], rtol=1e-4, atol=1e-4)
        assert {r.backend for r in records} == {"reference", backend}


# -- native ops: dispatcher registration, fake kernels, torch.compile ------------------------------

def test_native_opcheck():
    _backend("native")
    operands = _operands((2, 3, 5), 3, torch.float32)
    coef = torch.randn(2, 3, 3)
    torch.library.opcheck(torch.ops.gradguide.reduce.default, (operands, 3))
    torch.library.opcheck(torch.ops.gradguide.reduce.default, ([o.double() for o in operands], 1))
    torch.library.opcheck(torch.ops.gradguide.combine.default, (coef, operands, -1.0, None))
    torch.library.opcheck(torch.ops.gradguide.combine_out.default,
                          (coef, operands, None, 1.0, torch.empty_like(operands[0])))


_ISA_SCRIPT = r"""
import sys, torch
from gradguide import _C
from gradguide.ops import native_backend
assert native_backend.load()
results = {"isa": _C.cpu_isa()}
for key, (ops_, groups, coef, vec, sc) in torch.load(sys.argv[1]).items():
    results[key + " reduce"] = torch.ops.gradguide.reduce(ops_, groups)
    results[key + " combine"] = torch.ops.gradguide.combine(coef, ops_, -1.5, 2.0)
    results[key + " clip_shift"] = torch.ops.gradguide.clip_shift(coef[:, 0], 0.1 * coef[:, 0], ops_, -1.0, 1.0)
    if len(ops_) >= 4:
        gram = torch.ops.gradguide.reduce(ops_, 1)[0]
        results[key + " apg"] = torch.ops.gradguide.fused_combine("apg", ops_, gram, vec, sc, None, None)
torch.save(results, sys.argv[2])
"""


def _isa_inputs():
    """Operands for every dtype; rows of 1, 7 (tail only), 8, 16387 (blocks + tail) and
    3 x 16389 elements in 3 groups (several chunks); a NaN in one operand."""
    g = torch.Generator().manual_seed(7)
    cases = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape, groups in (((2, 1), 1), ((3, 7), 1), ((2, 8), 1), ((2, 16387), 1), ((2, 3, 16389), 3)):
            for k in (1, 4, 8):
                ops_ = [torch.randn(shape, generator=g).mul(1 + j).to(dtype) for j in range(k)]
                ops_[-1].view(-1)[-1] = float("nan")
                coef = torch.randn(shape[0], groups, k, generator=g, dtype=torch.float64)
                vec = [torch.randn(shape[0], 1, k, generator=g) for _ in range(3)]
                sc = [torch.tensor([5.0]), torch.tensor([0.2]), torch.tensor([3.0]), torch.tensor([0.5])]
                cases[f"{dtype} {shape} {groups} {k}"] = (ops_, groups, coef, vec, sc)
    return cases


def test_native_cpu_instruction_sets_agree_bitwise(tmp_path):
    """The CPU kernels are compiled for AVX-512, AVX2 and the baseline and picked at run time
    (csrc/gradguide_cpu_kernels.h); all sum in the same order, so each variant this CPU can run
    (ATEN_CPU_CAPABILITY caps the choice) gives bit-identical results, NaNs included."""
    _backend("native")
    import subprocess
    import sys
    from gradguide import _C
    best = _C.cpu_isa()
    caps = {"avx512": ["avx512", "avx2", "default"], "avx2": ["avx2", "default"], "default": ["default"]}[best]
    if len(caps) == 1:
        pytest.skip("this CPU runs only the baseline variant of the native CPU kernels")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    inputs = tmp_path / "inputs.pt"  # made here: torch's own random kernels differ between capabilities
    torch.save(_isa_inputs(), inputs)
    runs = {}
    for cap in caps:
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="2",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(inputs), str(path)], env=env, capture_output=True,
                              text=True, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[cap] = torch.load(path)
        assert runs[cap].pop("isa") == cap
    first = runs[caps[0]]
    for cap in caps[1:]:
        assert runs[cap].keys() == first.keys()
        for key, want in first.items():
            for a, b in zip(want if isinstance(want, tuple) else (want,),
                            runs[cap][key] if isinstance(want, tuple) else (runs[cap][key],)):
                assert torch.equal(a.isnan(), b.isnan()), (cap, key)
                assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), (cap, key)


def test_native_under_fake_tensors():
    _backend("native")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        operands = [torch.empty(4, 3, 7) for _ in range(5)]
        gram, sums = torch.ops.gradguide.reduce(operands, 3)
        out = torch.ops.gradguide.combine(torch.empty(4, 3, 5), operands, None, None)
    assert gram.shape == (4, 3, 5, 5) and sums.shape == (4, 3, 5) and out.shape == (4, 3, 7)


def test_auto_prefers_native_on_cpu():
    status = ops.available_backends("cpu")
    want = "native" if status["native"] is True else "reference"
    assert ops.resolve_backend("auto", torch.device("cpu")) == want
    assert gradguide.project(torch.ones(2, 3), -torch.ones(2, 3), backend="auto").abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_project_backend(backend):
    _backend(backend)
    a, b = _operands((3, 2, 4, 4), 2, torch.float32)
    for granularity in ("sample", "channel"):
        torch.testing.assert_close(gradguide.project(a, b, granularity=granularity, backend=backend),
                                   gradguide.project(a, b, granularity=granularity, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(gradguide.project(a, torch.zeros_like(b), backend=backend).sum()))


# -- Triton addressing: 128-bit aligned rows, offset (unaligned) operands, split and looped rows ----

@pytest.mark.parametrize("how", ["ff", "f64", "dot"])
def test_triton_reduce_fp32_sums_beyond_float32(how):
    """Every way the Triton reduce accumulates fp32 operands keeps ~fp64 accuracy (a float32 Gram
    lost small combinations such as APG's ‖d_c − d_u‖): float-float (exact two-products, TwoSum;
    GPUs with slow fp64), fp64 fma per thread (A100/H100/B200) and the tensor-core fp64 tile Gram.
    x = 1 + 2**-12 + 2**-20
    needs all 24 significand bits, two operands nearly cancel (x and −x(1 + 2**-20)), and
    3000 same-sign terms: an fp32 accumulator, or products rounded to fewer bits, would be off
    by >= 1e-7 relative, and the nearly cancelling ‖a + b‖² by far more. Non-finite values pass
    through (inf where the reference has inf, not the NaN of inf * 0)."""
    _backend("triton")
    x = 1 + 2.0 ** -12 + 2.0 ** -20
    n = 3000
    ops_ = [torch.full((2, n), x), torch.full((2, n), -x * (1 + 2.0 ** -20)),
            torch.linspace(-1, 1, 2 * n).view(2, n)]
    from gradguide.kernels import reduce as kreduce
    gram, sums = kreduce.reduce(ops_, 1, how=how)
    g64, s64 = reference.reduce([o.double() for o in ops_], 1)
    assert gram.dtype == torch.float64
    diag = torch.diagonal(g64, dim1=-2, dim2=-1)
    scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()
    assert ((gram - g64).abs() / scale).max() <= 1e-13
    assert ((sums - s64).abs() / n).max() <= 1e-13
    u = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)   # ‖op0 + op1‖², ~4e-13 of ‖op0‖²
    small = torch.einsum("k,bgkl,l->bg", u, gram, u)
    small64 = torch.einsum("k,bgkl,l->bg", u, g64, u)
    assert ((small - small64).abs() / small64).max() <= 1e-3
    inf = [torch.full((1, 64), x), torch.full((1, 64), x)]
    inf[0][0, 5] = float("inf")
    got = kreduce.reduce(inf, 1, how=how)[0]
    assert torch.isinf(got[0, 0, 0, 0]) and torch.isinf(got[0, 0, 0, 1]) and torch.isfinite(got[0, 0, 1, 1])


def test_triton_reduce_method_per_architecture():
    """fp32: float-float where fp64 runs at 1/64 of fp32 (sm_86/89/120) and under the
    interpreter, per-thread fp64 on sm_80/90/100; fp16/bf16: per-thread fp32; fp64: the
    tensor-core tile Gram."""
    from gradguide.kernels import reduce as kreduce
    assert [kreduce.method(torch.float32, 3, a) for a in (0, 80, 86, 89, 90, 100, 120)] == \
        ["ff", "f64", "ff", "ff", "f64", "f64", "ff"]
    assert {kreduce.method(d, k, a) for d in (torch.float16, torch.bfloat16) for k in (1, 5, 8)
            for a in (0, 80, 86)} == {"f32"}
    assert {kreduce.method(torch.float64, k, a) for k in (1, 8) for a in (0, 80, 86)} == {"dot"}


@pytest.mark.parametrize("how", ["ff", "f64"])
def test_triton_reduce_fp32_methods_awkward_shapes(how):
    """Both per-thread fp32 methods (the one the interpreter does not pick by default included)
    against the float64 reference: K = 1..8, odd row lengths, groups, an aligned long row."""
    _backend("triton")
    from gradguide.kernels import reduce as kreduce
    for k in range(1, 9):
        for shape, groups in (((3, 5, 7), 5), ((2, 2056), 2)):
            ops_ = _operands(shape, k, torch.float32, seed=k)
            gram, sums = kreduce.reduce(ops_, groups, how=how)
            g64, s64 = reference.reduce([o.double() for o in ops_], groups)
            diag = torch.diagonal(g64, dim1=-2, dim2=-1)
            scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()
            assert ((gram - g64).abs() / scale).max() <= 1e-12, (k, shape)
            assert ((gram - gram.transpose(-1, -2)) == 0).all()
            abs_sum = reference.reduce([o.double().abs() for o in ops_], groups)[1]
            assert ((sums - s64).abs() / abs_sum).max() <= 1e-12, (k, shape)
    with pytest.raises(ValueError, match="how"):
        kreduce.reduce(_operands((2, 8), 2, torch.float16), 1, how=how)
        kreduce.reduce(_operands((2, 8), 2, torch.float32), 1, how="f32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_aligned_rows_splits_and_offsets(dtype, monkeypatch):
    """Rows that are a multiple of 8 elements take the ALIGN > 1 (128-bit load) path; operands
    offset by one element (not 16-byte aligned) the scalar one; long rows are split across
    programs and walked in several steps; combine's block loop runs when blocks are capped."""
    _backend("triton")
    from gradguide.kernels import combine as kcombine
    g = torch.Generator().manual_seed(5)
    long_row = (1, 20000) if dtype == torch.float32 else (1, 6000)
    for shape, groups in (((2, 3, 64), 3), (long_row, 1)):
        for k in (1, 3, 8):
            ops_ = _operands(shape, k, dtype, seed=k)
            _check_reduce(ops_, groups, "triton")
            coef = torch.randn(shape[0], groups, k, generator=g)
            _check_combine(coef, ops_, "triton", clamp=(-1.0, 0.5))
    # operands at odd addresses (views one element into a buffer): same results, scalar path
    flat = [torch.randn(2 * 64 + 1, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    offset = [f[1:].view(2, 64) for f in flat]
    assert offset[0].data_ptr() % 16 and offset[0].is_contiguous()
    _check_reduce(offset, 2, "triton")
    _check_combine(torch.randn(2, 2, 3, generator=g), offset, "triton")
    # more blocks than the grid allows: each program loops over several blocks
    monkeypatch.setattr(kcombine, "MAX_GRID_1", 2)
    ops_ = _operands((2, 9000), 2, dtype, seed=9)
    _check_combine(torch.randn(2, 1, 2, generator=g), ops_, "triton")
    params = _policy_params("cfg", 2, 1, 2)
    got = ops.fused_combine("cfg", ops_, backend="triton", **params)
    torch.testing.assert_close(got, ops.fused_combine("cfg", ops_, backend="reference", **params),
                               **({} if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)))


def _fused_truth(policy, gram, vectors, scalars, operands):
    """float64 truth of a fused combine (the torch program on the same Gram, operands upcast
    exactly), and the per-element scale sum_k |c_k x_k| its rounding is measured against."""
    b, k = operands[0].shape[0], len(operands)
    groups = gram.shape[1] if gram is not None else max(v.shape[1] for v in vectors)
    names_v, names_s = policies.POLICIES[policy]
    coef = policies.coefficients(policy, None if gram is None else gram.double(),
                                 {n: v.double().expand(b, groups, k) for n, v in zip(names_v, vectors)},
                                 {n: t.double().reshape(-1, 1, 1) for n, t in zip(names_s, scalars)})
    exact = [op.double() for op in operands]
    return reference.combine(coef, exact), reference.combine(coef.abs(), [x.abs() for x in exact])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_fused_kernel_matches_float64_truth(policy, dtype):
    """The fused kernel itself (no glue between) against the float64 truth, with the inputs a
    step passes: coefficient vectors broadcast ([1, 1, K], [B, 1, K]) or per row ([B, G, K]) in
    float64 or float32, scalars of 1 or B elements, a Gram over the first Kg < K operands in
    float32 (what the fp32 reduce kernel writes) or float64, awkward row lengths, groups."""
    _backend("triton")
    from gradguide.ops import triton_backend
    g = torch.Generator().manual_seed(10 * list(policies.POLICIES).index(policy) + DTYPES.index(dtype))
    for b, per_sample, groups, k, kg, gram_dtype in ((3, (5, 7), 1, 5, 3, torch.float32),
                                                      (2, (3, 8), 3, 8, 8, torch.float64),
                                                      (1, (64,), 4, 1, 1, torch.float64)):
        operands = [torch.randn(b, *per_sample, generator=g, dtype=torch.float64).mul(1 + j).to(dtype)
                    for j in range(k)]
        vectors, scalars = policy_program(policy, b, groups, k, kg, g)
        gram = None
        if policies.NEEDS_GRAM[policy]:
            gram = reference.reduce(operands[:kg], groups)[0].to(gram_dtype)
        got = triton_backend.fused_combine(policy, gram, vectors, scalars, operands, clamp=(-4.0, None))
        want, scale = _fused_truth(policy, gram, vectors, scalars, operands)
        assert got.dtype == dtype and got.shape == operands[0].shape
        want = want.clamp(min=-4.0)
        # a weight product (lookahead's residual · β) can leave float16's range: the output
        # rounds to inf exactly where the truth is beyond the dtype's largest value
        big = want.abs() > torch.finfo(dtype).max
        assert torch.isinf(got[big]).all()
        err = (got.double() - want).abs()[~big]
        bound = (COMBINE_TOL[dtype] * (scale + want.abs()))[~big] + 1e-300
        assert (err <= bound).all(), (policy, dtype, b, groups, k, (err / bound).max().item())


def test_fused_kernel_coefficient_program_is_float64():
    """G_loss's β of a small direction of two large float32 operands: ‖v‖² = G00 − 2 G01 + G11
    cancels to ~1e-6 of the entries, which a float32 program would get ~10 % wrong (docs/architecture.md#precision);
    the kernel's float64 prologue on the float64 Gram keeps it, as the native op does."""
    _backend("triton")
    from gradguide.ops import triton_backend
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4096, generator=g, dtype=torch.float64)
    operands = [x.float(), (x + 1e-3 * torch.randn(2, 4096, generator=g, dtype=torch.float64)).float()]
    gram = reference.reduce(operands, 1)[0]
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)
    vectors = [f64(0.0, 0.0).view(1, 1, 2), f64(-1.0, 1.0).view(1, 1, 2)]      # base = 0, vjp = op1 − op0
    scalars = [f64(1.0), f64(1e3), f64(1e-3), f64(1.0), f64(1.0)]            # a, h (β ∝ 1/‖v‖²), σ, residual, post
    for policy, vecs, scs in (("lookahead", [vectors[0], vectors[0], vectors[1], vectors[0]],
                               scalars[:3] + [f64(0.5), f64(1.0), f64(0.0), f64(1.0), f64(1.0)]),):
        got = triton_backend.fused_combine(policy, gram, vecs, scs, operands)
        want, _ = _fused_truth(policy, gram, vecs, scs, operands)
        # the streaming loop's float32 rounding (~1e-7 |op| / 1e-3 |v|) is 1e-4 of the result
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_triton_fused_step_launches_one_kernel_and_no_small_ops():
    """ops.fused_unchecked on "triton" is one custom op for every policy: no padded Gram, no
    expanded or cast vectors, no torch coefficient program (each would be a GPU launch)."""
    _backend("triton")
    from gradguide.bench.step_launches import LaunchCounter
    operands = _operands((2, 3, 8), 4, torch.float32, seed=4)
    column = torch.randn(40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for policy, (names_v, names_s) in policies.POLICIES.items():
        vectors = [column[4 * j:4 * j + 4].view(1, 1, 4) for j in range(len(names_v))]
        scalars = [column[20 + j:21 + j] for j in range(len(names_s))]
        counter = LaunchCounter(big_numel=operands[0].numel())
        with counter:
            gram = ops.gram_unchecked(operands[:3], 3, "triton") if policies.NEEDS_GRAM[policy] else None
            ops.fused_unchecked(policy, "triton", operands, gram, vectors, scalars, 3 if gram is not None else 1)
        want = (["gradguide_triton::reduce"] if gram is not None else []) + ["gradguide_triton::fused_combine"]
        assert counter.ops == want, (policy, counter.ops)


# -- clip_shift: clamp(p) and clamp(p + s) − clamp(p) (gradguide/kernels/clip_shift.py) -------------------

CLIP = (-1.0, 1.0)


def _clip_shift_truth(coef_p, coef_s, operands):
    """float64 truth of both outputs, the scales Σ|c_k||x_k| of p and s, and p, q = p + s."""
    exact = [op.double() for op in operands]
    b, k = exact[0].shape[0], len(exact)
    rows = torch.stack([x.reshape(b, -1) for x in exact], 1)
    absr = rows.abs()
    cp, cs = coef_p.double().expand(b, k).unsqueeze(-1), coef_s.double().expand(b, k).unsqueeze(-1)
    p, s = (cp * rows).sum(1), (cs * rows).sum(1)
    scale_p, scale_s = (cp.abs() * absr).sum(1), (cs.abs() * absr).sum(1)
    clipped, shift = reference.clip_shift(coef_p.double(), coef_s.double(), exact, CLIP)
    shape = exact[0].shape
    return clipped, shift, *(t.reshape(shape) for t in (scale_p, scale_s, p, p + s))


def _check_clip_shift(coef_p, coef_s, operands):
    got_c, got_s = ops.clip_shift(coef_p, coef_s, operands, CLIP, backend="triton")
    dtype = operands[0].dtype
    assert got_c.dtype == got_s.dtype == dtype and got_c.shape == got_s.shape == operands[0].shape
    clipped, shift, scale_p, scale_s, p, q = _clip_shift_truth(coef_p, coef_s, operands)
    tol = COMBINE_TOL[dtype]
    fin = torch.isfinite(scale_p) & torch.isfinite(scale_s)
    # non-finite elements: the same NaNs and the same values elsewhere (bounds, 0, their difference)
    assert torch.equal(torch.isnan(got_c), torch.isnan(clipped)) and torch.equal(torch.isnan(got_s), torch.isnan(shift))
    for got, want in ((got_c, clipped), (got_s, shift)):
        odd = ~fin & ~torch.isnan(want)
        assert torch.equal(got.double()[odd], want[odd])
    err_c = (got_c.double() - clipped).abs()[fin]
    assert (err_c <= tol * scale_p[fin] + 1e-300).all(), (dtype, float((err_c / scale_p[fin]).max()))
    # the shift keeps s's own relative precision wherever p and q are clearly inside the bounds
    # (a difference of clamped values would be off by ~eps·|p| there, >> tol·|s| for a small
    # s); where one clips it is bound − p (p's absolute precision), and within the
    # accumulator's error of a bound the clip decision may go either way
    margin = 4 * tol * (scale_p + scale_s)
    away = fin & (p > CLIP[0] + margin) & (p < CLIP[1] - margin) & (q > CLIP[0] + margin) & (q < CLIP[1] - margin)
    err_s = (got_s.double() - shift).abs()
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps   # a subnormal output's rounding
    assert (err_s[away] <= tol * scale_s[away] + spacing).all(), (dtype, float((err_s[away] / scale_s[away]).max()))
    assert (err_s[fin] <= 2 * tol * (scale_p + scale_s)[fin] + 1e-300).all()
    return got_c, got_s, away


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_clip_shift_matches_float64_truth(dtype):
    """The Triton clip_shift against the float64 truth on fresh random inputs: odd rows, B = 1,
    rows a multiple of 8 (the 128-bit path), K = 1..8, coefficient rows [1, K] (broadcast),
    [B, K] and a strided view, p spread over ±3 (much of it clipped) and a shift 1e-3 of it."""
    _backend("triton")
    g = torch.Generator().manual_seed(1000 + DTYPES.index(dtype))
    cases = [((1, 1023), 1, 1), ((3, 7, 13), 3, 3), ((2, 4096), 8, 1), ((4, 5, 3), 5, 4), ((2, 16), 2, 2)]
    inside_seen = 0
    for shape, k, bc in cases:
        operands = [torch.randn(shape, generator=g, dtype=torch.float64).mul(1 + j).to(dtype) for j in range(k)]
        coef_p = torch.randn(bc, k, generator=g, dtype=torch.float64) * 1.5 / k
        coef_s = torch.randn(bc, k, generator=g, dtype=torch.float64) * 1e-3
        if bc == 4:   # a strided [B, K] view (the K stride is 2): read in place, not copied
            coef_p = torch.randn(bc, 2 * k, generator=g, dtype=torch.float64)[:, ::2] * 1.5 / k
        inside_seen += int(_check_clip_shift(coef_p, coef_s, operands)[2].sum())
    assert inside_seen > 1000   # the precision check above actually ran on many elements


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_clip_shift_bounds_and_nonfinite(dtype):
    """Values exactly at and over the bounds give the exact clipped values and shifts in every
    dtype (p == bound counts as clipped); NaN and ±inf follow the reference (NaN in, NaN out;
    an infinite p clips to the bound; inf − inf is NaN)."""
    _backend("triton")
    from gradguide.kernels import clip_shift as kclip
    vals = [1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.75, 1.5, -3.0, 0.0, 0.25]
    x = torch.tensor([vals, vals[::-1]], dtype=dtype)
    for cp, cs in ((1.0, 0.5), (1.0, -0.5), (-1.0, 0.25), (2.0, -4.0)):
        coef_p = torch.tensor([[cp]], dtype=torch.float64)
        coef_s = torch.tensor([[cs]], dtype=torch.float64)
        got_c, got_s = ops.clip_shift(coef_p, coef_s, [x], CLIP, backend="triton")
        want_c, want_s = reference.clip_shift(coef_p, coef_s, [x.double()], CLIP)
        assert torch.equal(got_c.double(), want_c) and torch.equal(got_s.double(), want_s), (cp, cs)
        own_c, own_s = kclip.reference(coef_p, coef_s, [x], CLIP)   # the kernel file's own reference
        assert torch.equal(own_c, got_c) and torch.equal(own_s, got_s)
    operands = [t.clone() for t in _operands((2, 3, 5), 3, dtype, seed=7)]
    operands[1][0, 1, 2] = float("nan")
    operands[2][1, 0, 4] = float("inf")
    operands[0][1, 2, 0] = float("-inf")
    for coef_s in (torch.tensor([[0.1, 0.0, 0.2]]), torch.tensor([[0.1, -0.3, -0.2]]), torch.zeros(1, 3)):
        coef_p = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)   # zero weight on an inf: NaN
        got_c, got_s, _ = _check_clip_shift(coef_p, coef_s.double(), operands)
        assert torch.isnan(got_c[0, 1, 2]) and torch.isnan(got_s[0, 1, 2]) and torch.isnan(got_c[1, 0, 4])
        assert got_c[1, 2, 0] == -1.0


def test_triton_clip_shift_is_one_launch():
    """ops.clip_shift_unchecked on "triton" is one custom op (no torch fallback, no coefficient
    expand/cast): the [1, K] float64 views of a fused step's table column go in as they are."""
    _backend("triton")
    from gradguide.bench.step_launches import LaunchCounter
    operands = _operands((2, 3, 8), 4, torch.float32, seed=4)
    column = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    counter = LaunchCounter(big_numel=operands[0].numel())
    with counter:
        ops.clip_shift_unchecked(column[:4].view(1, 4), column[4:].view(1, 4), operands, CLIP, "triton")
    assert counter.ops == ["gradguide_triton::clip_shift"], counter.ops


def test_triton_clip_shift_compile_fullgraph():
    """torch.compile(fullgraph=True) traces ops.clip_shift on "triton" (one opaque custom op)
    and matches eager."""
    _backend("triton")
    operands = _operands((2, 3, 8), 3, torch.float32, seed=3)

    def step(a, b, c, cp, cs):
        clipped, shift = ops.clip_shift(cp, cs, [a, b, c], CLIP, backend="triton")
        return clipped + shift

    cp = torch.randn(1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*operands, cp, 0.01 * cp)
    torch.testing.assert_close(got, step(*operands, cp, 0.01 * cp))


# -- custom ops: opcheck, FakeTensor, torch.compile ------------------------------------------------

def _triton_op_cases():
    operands = _operands((2, 3, 8), 3, torch.float32)
    coef = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    gram = ops.reduce(operands, 3, backend="reference")[0]
    out = torch.empty_like(operands[0])
    t = torch.ops.gradguide_triton
    return [(t.reduce.default, (operands, 3)),
            (t.reduce.default, ([o.to(torch.bfloat16) for o in operands], 1)),
            (t.combine.default, (coef, operands, -1.0, None)),
            (t.combine_out.default, (coef, operands, None, 1.0, out)),
            (t.fused_combine.default, ("cfg", None, [coef] * 3, [torch.full((1,), 2.0)], operands, None, None)),
            (t.fused_combine_out.default, ("lookahead", gram, [coef] * 4,
                                            [torch.ones(1)] * 3 + [torch.randn(2)] + [torch.ones(1)] * 4,
                                            operands, -1.0, 1.0, out)),
            (t.clip_shift.default, (coef[:1, 0].double(), 0.01 * coef[:1, 1].double(), operands, -1.0, 1.0)),
            (t.clip_shift.default, (coef[:, 0].double(), coef[:, :, 1].double(), operands, -0.5, 2.0))] \
        + _step_op_cases(operands)


def _step_op_cases(operands):
    """``linear`` and ``lookahead`` with the inputs a fused step passes: [1, 1, K] float64 views
    of the step's table column, 1-element views as scalars (a [B] target), a float32 Gram of the
    first Kg < K operands (groups 3; a fused kernel reads any float Gram)."""
    t = torch.ops.gradguide_triton
    k = len(operands)
    column = torch.randn(4 * k + 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectors = [column[j * k:(j + 1) * k].view(1, 1, k) for j in range(4)]
    scalars = [column[4 * k + j:4 * k + j + 1] for j in range(8)]
    scalars[3] = torch.randn(2, dtype=torch.float64)
    scalars[6] = torch.ones(1, dtype=torch.float64)
    gram = ops.reduce(operands[:2], 3, backend="reference")[0].float()
    return [(t.fused_combine.default, ("linear", None, vectors[:1], [], operands, None, 0.5)),
            (t.fused_combine.default, ("lookahead", gram, vectors, scalars, operands, None, None))]


def test_triton_opcheck():
    """The Triton kernels are torch custom ops with fake kernels: schema, fake tensors, autograd
    registration and AOT dispatch with dynamic shapes all check out."""
    _backend("triton")
    for op, args in _triton_op_cases():
        torch.library.opcheck(op, args)


def test_triton_ops_under_fake_cuda_tensors():
    """Shapes, dtypes and devices propagate on fake CUDA tensors (no data, no GPU, no data_ptr)."""
    _backend("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from gradguide.ops import triton_backend
    with FakeTensorMode(allow_non_fake_inputs=False):
        operands = [torch.empty(4, 3, 8, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
        gram, sums = triton_backend.reduce(operands, 3)
        coef = torch.empty(4, 3, 5, device="cuda")
        out = triton_backend.combine(coef, operands, clamp=(-1.0, None))
        fused = triton_backend.fused_combine("pxp-a", gram, [coef] * 4, [torch.ones(1, device="cuda")], operands)
        into = torch.empty_like(operands[0])
        same = triton_backend.fused_combine("cfg", None, [coef] * 3, [torch.ones(4, device="cuda")], operands, out=into)
        column = torch.empty(20, device="cuda", dtype=torch.float64)
        vec = [column.narrow(0, 5 * j, 5).view(1, 1, 5) for j in range(4)]   # (no Python indexing of
        one = column.narrow(0, 0, 1)                                          # cuda tensors on CPU torch)
        look = triton_backend.fused_combine("lookahead", torch.empty(4, 3, 3, 3, device="cuda"), vec,
                                            [one] * 3 + [torch.ones(4, device="cuda")] + [one] * 4, operands)
        clipped, shift = triton_backend.clip_shift(column.narrow(0, 0, 5).view(1, 5), column.narrow(0, 5, 5).view(1, 5),
                                                   operands, (-1.0, 1.0))
    assert gram.shape == (4, 3, 5, 5) and gram.dtype == torch.float32 and gram.device.type == "cuda"
    assert sums.shape == (4, 3, 5) and out.shape == fused.shape == (4, 3, 8) and out.dtype == torch.bfloat16
    assert same is into and look.shape == (4, 3, 8) and look.dtype == torch.bfloat16 and look.device.type == "cuda"
    assert clipped.shape == shift.shape == (4, 3, 8) and clipped.dtype == shift.dtype == torch.bfloat16
    assert clipped.device.type == shift.device.type == "cuda"


def test_triton_ops_compile_fullgraph():
    """``torch.compile(fullgraph=True)`` traces reduce -> fused combine -> combine through
    gradguide.ops with backend='triton' without a graph break, and matches eager."""
    _backend("triton")
    operands = _operands((2, 3, 8), 4, torch.float32, seed=2)
    params = _policy_params("pxp-a", 2, 1, 4)

    def step(a, b, c, d, w):
        gram, _ = ops.reduce([a, b, c, d], 1, backend="triton")
        x = ops.fused_combine("pxp-a", [a, b, c, d], gram=gram, backend="triton", **params)
        return ops.combine(w, [x, b], clamp=(-3.0, 3.0), backend="triton")

    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*operands, w)
    torch.testing.assert_close(got, step(*operands, w))


def test_fused_policy_lists_agree():
    """The fused kernel implements every built-in coefficient program (so a step on "triton"
    never falls back to torch coefficient ops); an unknown policy is refused by name instead of
    running the wrong coefficient program."""
    _backend("triton")
    from gradguide.ops import triton_backend
    from gradguide.kernels.fused import ARITY, POLICY_IDS
    assert set(POLICY_IDS) == set(triton_backend.FUSED_POLICIES) == set(policies.POLICIES)
    assert all(ARITY[p] == (len(v), len(s)) for p, (v, s) in policies.POLICIES.items())
    assert all(triton_backend.supports_policy(p) for p in triton_backend.FUSED_POLICIES)
    assert not triton_backend.supports_policy("pcgrad")
    from gradguide.kernels.fused import NEEDS_GRAM
    assert NEEDS_GRAM == policies.NEEDS_GRAM
    operands = _operands((2, 8), 2, torch.float32)
    with pytest.raises(NotImplementedError, match="'pcgrad'.*implements"):
        triton_backend.fused_combine("pcgrad", None, [torch.zeros(2, 1, 2)], [], operands)


def test_native_policy_table_is_the_python_one():
    """The C++ programs' table (csrc/gradguide_policies.h: name, vectors, scalars, Gram) lists
    exactly the Python programs, with their arities; the values of every program are held to the
    Python ones by test_fused_policies_match_a_dense_evaluation and the non-finite rule tests."""
    import re
    from gradguide.bench import compile_gates
    header = (Path(__file__).resolve().parents[2] / "csrc" / "gradguide_policies.h").read_text()
    table = header[header.index("kPolicies[] = {"):]
    table = table[:table.index("};")]
    rows = re.findall(r'\{"([a-z-]+)", k\w+, (\d+), (\d+), (true|false)\}', table)
    assert {name: (int(v), int(s), g == "true") for name, v, s, g in rows} == {
        name: (len(v), len(s), policies.NEEDS_GRAM[name]) for name, (v, s) in policies.POLICIES.items()}
    names = re.search(r'kPolicyNames = "([^"]+)"', header).group(1)
    assert set(re.split(r", | or ", names)) == set(policies.POLICIES)
    assert set(compile_gates.POLICIES) == set(policies.POLICIES)   # the CUDA compile gates cover every one
