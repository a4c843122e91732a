"""Row-strided and Σ-scaled operands in the Triton reduce and fused-combine kernels
(gradguide/kernels/scaling.py), against the float64 truth of ``gradguide.ops.reference``.

Triton runs through its interpreter on CPU (``TRITON_INTERPRET=1``, set in conftest.py before
any import); shapes stay small. Operand k of a mask's bit k is read as
``op_k · exp(slope[b, k] · log_scale + offset[b, k])``. The kernels form that factor and the
product in fp32 (fp64 for fp64 operands): the slope and offset rounded to F, times log2(e),
one fma and one ``exp2`` (approximate on a GPU: 2 ulp), one product. So a scaled element is
off by at most ``δ = eps_F · (4 A + 8)`` relative, ``A`` the largest ``|slope'·v| + |offset'|``
(the exponent in base 2): its rounding is ``eps_F · A`` absolute, a relative error of the
factor. Gram entries then move by at most ``(δ_i + δ_j) ‖x_i‖ ‖x_j‖`` (Cauchy-Schwarz) and sums
by ``δ Σ|x|``, on top of the unscaled bounds of tests/kernels/test_kernels.py.
"""
import math

import os

import pytest
import torch

from gradguide import ops
from gradguide.ops import policies, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# the unscaled per-dtype bounds of tests/kernels/test_kernels.py (accumulation; output rounding)
REDUCE_TOL = {torch.float32: 1e-12, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
COMBINE_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}
# reduce methods per dtype (gradguide/kernels/reduce.py: method); the interpreter's default first
METHODS = {torch.float32: ("ff", "f64", "dot"), torch.float16: ("f32", "dot"), torch.bfloat16: ("f32", "dot"),
           torch.float64: ("dot",)}


@pytest.fixture(autouse=True)
def _triton():
    status = ops.available_backends("cpu")["triton"]
    if status is not True:   # CI: a backend it requires must fail the run, not skip it
        if "triton" in os.environ.get("GRADGUIDE_REQUIRE_BACKENDS", "").split(","):
            raise RuntimeError(f"backend 'triton' is required here: {status}")
        pytest.skip(f"backend 'triton' unavailable: {status}")


def _masks(k):
    """none, one (the last operand), all, and a mixed one (every other operand)."""
    full = (1 << k) - 1
    return list(dict.fromkeys([0, 1 << (k - 1), full, 0b01010101 & full]))


def _tensors(g, b, k, per_sample, dtype, strided, count):
    """``count`` tensors [B, C, *rest]: the halves ``t[:, :C]`` / ``t[:, C:]`` of [B, 2C, *rest]
    tensors (row-strided: batch stride 2·C·rest) or contiguous ones."""
    c, rest = per_sample[0], per_sample[1:]
    out = []
    for j in range(count):
        if strided:
            full = torch.randn(b, 2 * c, *rest, generator=g, dtype=torch.float64).to(dtype)
            t = full[:, :c] if j % 2 else full[:, c:]
            assert not t.is_contiguous() or b == 1
        else:
            t = torch.randn(b, *per_sample, generator=g, dtype=torch.float64).to(dtype)
        out.append(t)
    return out


def _scaling(g, b, k, per_sample, dtype, strided, mask, slope_rows=None):
    """A Scaling with the log-scale laid out like the operands, slope / offset float64 [1 or B, K]
    (a broadcast batch read through stride 0 included), slopes of either sign."""
    (v,) = _tensors(g, b, k, per_sample, dtype, strided, 1)
    slope_rows = slope_rows or (1 if mask % 2 else b)
    slope = (torch.rand(slope_rows, k, generator=g, dtype=torch.float64) * 0.75 + 0.25) \
        * torch.where(torch.rand(slope_rows, k, generator=g) < 0.5, -1.0, 1.0).double()
    offset = torch.randn(b, 2 * k, generator=g, dtype=torch.float64)[:, ::2] * 0.5   # strided over K too
    return reference.Scaling(v, slope, offset, mask)


def _exact(scaling):
    return None if scaling is None else scaling._replace(log_scale=scaling.log_scale.double())


def _delta(scaling, dtype):
    """δ of the module doc: the relative error of one scaled element."""
    if scaling is None or not scaling.mask:
        return 0.0
    eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    log2e = 1 / math.log(2)
    v = scaling.log_scale.double().abs().max()
    bits = [k for k in range(scaling.slope.shape[1]) if scaling.mask >> k & 1]
    a = (scaling.slope[:, bits].abs().max() * v + scaling.offset[:, bits].abs().max()) * log2e
    return float(eps * (4 * a + 8))


def _check_reduce(operands, groups, scaling, how=None):
    from gradguide.kernels import reduce as kreduce
    dtype = operands[0].dtype
    if how is None:
        from gradguide.ops import triton_backend
        gram, sums = triton_backend.reduce(operands, groups, scaling=scaling)
    else:
        gram, sums = kreduce.reduce(operands, groups, how=how, scaling=scaling)
    exact = [op.double() for op in operands]
    g64, s64 = reference.reduce(exact, groups, _exact(scaling))
    assert gram.shape == g64.shape and sums.shape == s64.shape
    diag = torch.diagonal(g64, dim1=-2, dim2=-1)
    scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt() + 1e-300
    abs_sum = reference.reduce([x.abs() for x in exact], groups, _exact(scaling))[1] + 1e-300
    delta = _delta(scaling, dtype)
    err_g = ((gram.double() - g64).abs() / scale).max().item()
    err_s = ((sums.double() - s64).abs() / abs_sum).max().item()
    assert err_g <= REDUCE_TOL[dtype] + 2 * delta, (how, err_g, delta)
    assert err_s <= REDUCE_TOL[dtype] + delta, (how, err_s, delta)
    assert (gram == gram.transpose(-1, -2)).all()
    return gram, sums


# -- reduce ------------------------------------------------------------------------------------

CASES = [  # (B, per-sample shape [C, ...], groups): sample sizes not a multiple of 4/8/16, B = 1 and 3
    (3, (3, 5, 7), 3),
    (1, (2, 3, 11), 1),
    (3, (2, 16), 1),     # rows of 32 elements, batch stride 64: the 128-bit (ALIGN = VEC) path
    (3, (1, 9), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_scaled_strided_against_float64_truth(dtype):
    """Every K = 1..8 and mask (none, one, all, mixed), operands and log-scale row-strided or
    contiguous, every reduce method of the dtype, against reference.reduce in float64."""
    g = torch.Generator().manual_seed(100 + DTYPES.index(dtype))
    methods = METHODS[dtype]
    n = 0
    for k in range(1, 9):
        for i, mask in enumerate(_masks(k)):
            b, per_sample, groups = CASES[(k + i) % len(CASES)]
            strided = (k + i) % 2 == 0
            operands = _tensors(g, b, k, per_sample, dtype, strided, k)
            if k >= 3:   # a contiguous operand among row-strided ones (and the other way round)
                operands[1] = operands[1].contiguous() if strided else \
                    _tensors(g, b, k, per_sample, dtype, True, 1)[0]
            scaling = _scaling(g, b, k, per_sample, dtype, not strided, mask) if mask else None
            _check_reduce(operands, groups, scaling, how=methods[n % len(methods)])
            n += 1
    assert n >= 24


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_every_method_on_one_scaled_strided_case(dtype):
    """Each stage-1 kernel (per-thread ff / f64 / f32, the tile Gram) with a mixed mask, row-strided
    operands, B = 3, groups 3, and through the custom op (the interpreter's default method)."""
    g = torch.Generator().manual_seed(200 + DTYPES.index(dtype))
    operands = _tensors(g, 3, 5, (3, 5, 7), dtype, True, 5)
    scaling = _scaling(g, 3, 5, (3, 5, 7), dtype, True, 0b10110)
    for how in METHODS[dtype]:
        _check_reduce(operands, 3, scaling, how=how)
    _check_reduce(operands, 3, scaling)


def test_reduce_nonfinite_scaled_operands():
    """A NaN in the log-scale poisons the scaled operands' Gram entries and sums only (as a NaN
    operand does); an inf operand times a finite factor stays inf on its diagonal."""
    g = torch.Generator().manual_seed(7)
    operands = _tensors(g, 2, 3, (2, 9), torch.float32, True, 3)
    scaling = _scaling(g, 2, 3, (2, 9), torch.float32, True, 0b010)
    scaling.log_scale[0, 1, 4] = float("nan")
    operands[2][1, 0, 3] = float("inf")
    for how in ("ff", "f64", "dot"):
        from gradguide.kernels import reduce as kreduce
        gram, sums = kreduce.reduce(operands, 1, how=how, scaling=scaling)
        g64, s64 = reference.reduce([o.double() for o in operands], 1, _exact(scaling))
        assert torch.equal(torch.isnan(gram), torch.isnan(g64)) and torch.equal(torch.isnan(sums), torch.isnan(s64))
        assert torch.isnan(gram[0, 0, 1]).all() and torch.isfinite(gram[0, 0, 0, 0]) and torch.isinf(gram[1, 0, 2, 2])


# -- fused combine --------------------------------------------------------------------------------

def _fused_inputs(g, policy, b, groups, k, kg, dtype):
    names_v, names_s = policies.POLICIES[policy]
    vectors = []
    for j in range(len(names_v)):
        v = torch.randn((1, 1, k) if j % 2 == 0 else (b, groups, k), generator=g, dtype=torch.float64)
        if j > 0:
            v[..., kg:] = 0   # the vectors a policy takes inner products of live on the Gram's operands
        vectors.append(v)
    scalars = [torch.rand(b if j % 2 else 1, generator=g, dtype=torch.float64) + 0.5 for j in range(len(names_s))]
    if policy == "lookahead":
        scalars[6] = torch.arange(b, dtype=torch.float64) % 2
    return vectors, scalars


def _check_fused(policy, operands, groups, kg, scaling, vectors, scalars, clamp=None):
    from gradguide.ops import triton_backend
    dtype, b, k = operands[0].dtype, operands[0].shape[0], len(operands)
    exact = [op.double() for op in operands]
    gram = None
    if policies.NEEDS_GRAM[policy]:   # as a step computes it: the reduce of the first Kg (scaled) operands
        sub = None if scaling is None else scaling._replace(slope=scaling.slope[:, :kg], offset=scaling.offset[:, :kg],
                                                             mask=scaling.mask & ((1 << kg) - 1))
        gram = reference.reduce(exact[:kg], groups, _exact(sub))[0]
    got = triton_backend.fused_combine(policy, gram, vectors, scalars, operands, clamp=clamp, scaling=scaling)
    assert got.dtype == dtype and got.shape == operands[0].shape and got.is_contiguous()
    names_v, names_s = policies.POLICIES[policy]
    coef = policies.coefficients(policy, gram, {n: v.expand(b, groups, k) for n, v in zip(names_v, vectors)},
                                 {n: t.reshape(-1, 1, 1) for n, t in zip(names_s, scalars)})
    want = reference.combine(coef, exact, clamp=clamp, scaling=_exact(scaling)).double()
    scale = reference.combine(coef.abs(), [x.abs() for x in exact], scaling=_exact(scaling)).double()
    big = want.abs() > torch.finfo(dtype).max   # rounds to inf in the dtype
    assert torch.isinf(got[big]).all()
    err = (got.double() - want).abs()[~big]
    bound = (COMBINE_TOL[dtype] * (scale + want.abs()) + _delta(scaling, dtype) * scale)[~big] + 1e-300
    assert (err <= bound).all(), (policy, dtype, k, (err / bound).max().item())
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", ["pxp-a", "linear"])
def test_fused_scaled_strided_against_float64_truth(policy, dtype):
    """PixelAsParam A (its Gram the reduce of the scaled operands) and linear with a clamp, every
    K = 1..8 and mask, row-strided or contiguous operands and log-scale, B = 1 and 3, groups."""
    g = torch.Generator().manual_seed(300 + 10 * DTYPES.index(dtype) + (policy == "linear"))
    clamp = (-1.5, 2.0) if policy == "linear" else None
    for k in range(1, 9):
        for i, mask in enumerate(_masks(k)):
            b, per_sample, groups = CASES[(k + i) % len(CASES)]
            strided = (k + i) % 2 == 1
            operands = _tensors(g, b, k, per_sample, dtype, strided, k)
            scaling = _scaling(g, b, k, per_sample, dtype, strided or k % 3 == 0, mask) if mask else None
            vectors, scalars = _fused_inputs(g, policy, b, groups, k, max(1, k - 1), dtype)
            _check_fused(policy, operands, groups, max(1, k - 1), scaling, vectors, scalars, clamp)


@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_every_fused_policy_scaled_strided(policy):
    """Every fused policy once: fp32 and bf16, K = 5 with a mixed mask, row-strided."""
    g = torch.Generator().manual_seed(400 + list(policies.POLICIES).index(policy))
    for dtype in (torch.float32, torch.bfloat16):
        operands = _tensors(g, 3, 5, (3, 5, 7), dtype, True, 5)
        scaling = _scaling(g, 3, 5, (3, 5, 7), dtype, True, 0b10101)
        vectors, scalars = _fused_inputs(g, policy, 3, 1, 5, 4, dtype)
        _check_fused(policy, operands, 1, 4, scaling, vectors, scalars, clamp=(-3.0, None))


def test_fused_into_out_and_long_rows():
    """A preallocated contiguous out; rows longer than one block (several programs per row, and
    several blocks per program when the grid is capped) with a row-strided log-scale."""
    from gradguide.kernels import combine as kcombine
    from gradguide.ops import triton_backend
    g = torch.Generator().manual_seed(11)
    operands = _tensors(g, 2, 3, (2, 3000), torch.float32, True, 3)
    scaling = _scaling(g, 2, 3, (2, 3000), torch.float32, True, 0b110)
    vectors, scalars = _fused_inputs(g, "linear", 2, 1, 3, 3, torch.float32)
    want = _check_fused("linear", operands, 1, 3, scaling, vectors, scalars)
    out = torch.empty_like(want)
    got = triton_backend.fused_combine("linear", None, vectors, scalars, operands, out=out, scaling=scaling)
    assert got is out and torch.equal(out, want)
    with pytest.MonkeyPatch.context() as mp:   # more blocks than the grid allows: each program loops
        mp.setattr(kcombine, "MAX_GRID_1", 2)
        assert kcombine.launch_config(6000, torch.float32)[3] > 1
        assert torch.equal(triton_backend.fused_combine("linear", None, vectors, scalars, operands, scaling=scaling),
                           want)


# -- unscaled, contiguous: unchanged ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscaled_calls_are_bit_identical_across_layouts(dtype):
    """Without scaling (or with a zero mask), contiguous operands give the results the kernels gave
    before row strides existed: the same values read from row-strided halves give bit-identical
    Grams and outputs, a zero mask is no scaling, and the fused linear combine equals combine's
    own kernel (contiguous, coefficients the same numbers) bit for bit."""
    from gradguide.kernels import combine as kcombine
    from gradguide.kernels import reduce as kreduce
    from gradguide.ops import triton_backend
    g = torch.Generator().manual_seed(500 + DTYPES.index(dtype))
    for b, per_sample, groups in CASES[:3]:
        k = 4
        strided = _tensors(g, b, k, per_sample, dtype, True, k)
        contiguous = [t.contiguous() for t in strided]
        dummy = _scaling(g, b, k, per_sample, dtype, True, 0)
        for how in METHODS[dtype]:
            want = kreduce.reduce(contiguous, groups, how=how)
            for got in (kreduce.reduce(strided, groups, how=how), kreduce.reduce(contiguous, groups, how=how,
                                                                                 scaling=dummy)):
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), how
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
        coef = torch.randn(b, groups, k, generator=g).to(acc)    # fp32 numbers: exact in either
        want = kcombine.combine(coef, contiguous, clamp=(-1.0, None))
        for ops_ in (contiguous, strided):
            got = triton_backend.fused_combine("linear", None, [coef.double()], [], ops_, clamp=(-1.0, None))
            assert torch.equal(got, want)
        got = triton_backend.fused_combine("linear", None, [coef.double()], [], contiguous, clamp=(-1.0, None),
                                           scaling=dummy)
        assert torch.equal(got, want)


# -- the glue: custom ops, checks, launches ----------------------------------------------------------

def _glue_case():
    g = torch.Generator().manual_seed(13)
    operands = _tensors(g, 2, 3, (2, 8), torch.float32, True, 3)
    scaling = _scaling(g, 2, 3, (2, 8), torch.float32, True, 0b101)
    return operands, scaling


def test_ops_with_scaling_are_one_launch_each():
    """Row-strided operands and a scaling go to the kernels as they are: one custom op each, no
    expand / contiguous / cast around them (each would be a launch)."""
    from gradguide.bench.step_launches import LaunchCounter
    from gradguide.ops import triton_backend
    operands, scaling = _glue_case()
    vectors, scalars = _fused_inputs(torch.Generator().manual_seed(1), "pxp-a", 2, 1, 3, 3, torch.float32)
    counter = LaunchCounter(big_numel=operands[0].numel())
    with counter:
        gram, _ = triton_backend.reduce(operands, 1, scaling=scaling)
        triton_backend.fused_combine("pxp-a", gram, vectors, scalars, operands, scaling=scaling)
        triton_backend.fused_combine("pxp-a", gram, vectors, scalars, operands, out=torch.empty(2, 2, 8),
                                     scaling=scaling)
    assert counter.ops == ["gradguide_triton::reduce", "gradguide_triton::fused_combine", "empty",
                           "gradguide_triton::fused_combine_out"], counter.ops


def test_opcheck_with_scaling_and_row_strides():
    """Schemas with the optional trailing arguments, fake kernels, autograd registration and AOT
    dispatch check out for row-strided operands and a scaling (and without one)."""
    operands, scaling = _glue_case()
    t = torch.ops.gradguide_triton
    vectors, scalars = _fused_inputs(torch.Generator().manual_seed(2), "pxp-a", 2, 1, 3, 3, torch.float32)
    gram = reference.reduce([o.double() for o in operands], 1)[0]
    extra = (scaling.log_scale, scaling.slope, scaling.offset, scaling.mask)
    for op, args in ((t.reduce.default, (operands, 1) + extra), (t.reduce.default, (operands, 1)),
                     (t.fused_combine.default, ("pxp-a", gram, vectors, scalars, operands, None, 1.0) + extra),
                     (t.fused_combine_out.default, ("linear", None, vectors[:1], [], operands, -1.0, None,
                                                    torch.empty(2, 2, 8)) + extra)):
        torch.library.opcheck(op, args)


def test_fake_cuda_tensors_with_scaling():
    """Shapes propagate on fake CUDA tensors with row-strided halves and a scaling (no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from gradguide.ops import triton_backend
    with FakeTensorMode(allow_non_fake_inputs=False):
        out = torch.empty(4, 6, 8, device="cuda", dtype=torch.bfloat16)
        operands = [out.narrow(1, 0, 3), out.narrow(1, 3, 3)]   # (narrow: CPU torch cannot index
        table = torch.empty(2, 2, device="cuda", dtype=torch.float64)  # fake cuda tensors)
        scaling = reference.Scaling(out.narrow(1, 3, 3), table.narrow(0, 0, 1), table.narrow(0, 1, 1), 0b10)
        gram, sums = triton_backend.reduce(operands, 3, scaling=scaling)
        fused = triton_backend.fused_combine("pxp-a", gram, [torch.empty(4, 3, 2, device="cuda")] * 4,
                                             [torch.ones(1, device="cuda")], operands, scaling=scaling)
    assert gram.shape == (4, 3, 2, 2) and sums.shape == (4, 3, 2) and gram.device.type == "cuda"
    assert fused.shape == (4, 3, 8) and fused.dtype == torch.bfloat16 and fused.is_contiguous()


def test_bad_scaling_and_layout_are_refused_by_name():
    from gradguide.ops import triton_backend
    operands, scaling = _glue_case()
    cases = [
        (scaling._replace(mask=0b1000), ValueError, r"scaled: expected a mask in \[0, 2\*\*K\) with K=3"),
        (scaling._replace(slope=scaling.slope.float()), TypeError, r"slope: expected a dtype in \(torch.float64,\)"),
        (scaling._replace(offset=scaling.offset[:, :2]), ValueError, r"offset: expected a float64 \[1 or B=2, K=3\]"),
        (scaling._replace(log_scale=scaling.log_scale[:, :1]), ValueError, "log_scale: expected a"),
        (scaling._replace(log_scale=scaling.log_scale.double()), TypeError, "log_scale: dtype"),
        (scaling._replace(log_scale=scaling.log_scale.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         r"log_scale: expected contiguous samples \(any batch stride\)"),
        (scaling._replace(mask=True), TypeError, "scaling.mask"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            triton_backend.reduce(operands, 1, scaling=bad)
    with pytest.raises(ValueError, match=r"operands\[1\]: expected contiguous samples \(any batch stride\)"):
        triton_backend.reduce([operands[0], operands[1].transpose(1, 2).contiguous().transpose(1, 2)], 1)
    with pytest.raises(ValueError, match="scaled: expected a mask"):
        torch.ops.gradguide_triton.fused_combine("linear", None, [torch.zeros(1, 1, 3, dtype=torch.float64)], [],
                                                 operands, None, None, scaling.log_scale, scaling.slope,
                                                 scaling.offset, -1)
