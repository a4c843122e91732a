"""Row-strided and Σ-scaled operands in the native (csrc/) ``reduce`` and ``fused_combine``.

A row-strided operand has contiguous samples and any batch stride (the halves ``out[:, :C]``,
``out[:, C:]`` of a ``[B, 2C, ...]`` model output): the ops read it in place. A Σ-scaled operand
``k`` (bit ``k`` of the mask) is read as ``op_k · exp(slope[b, k] · log_scale + offset[b, k])``
(:class:`gradguide.ops.reference.Scaling`), formed in float32 for fp16/bf16/fp32 data and in
float64 for fp64 data. Everything is checked against the float64 truth of
:mod:`gradguide.ops.reference` on the same inputs cast to float64; calls without the new
arguments are checked to be unchanged (bitwise) by the new code paths.
"""
import os
import subprocess
import sys

import pytest
import torch

from gradguide.ops import native_backend, policies, reference
from gradguide.ops.reference import Scaling
from helpers import policy_program

if native_backend.status(torch.device("cpu")) is not True:   # CI: a failed build must fail, not skip
    if "native" in os.environ.get("GRADGUIDE_REQUIRE_BACKENDS", "").split(","):
        raise RuntimeError(f"the native backend is required here: {native_backend.status(torch.device('cpu'))}")
    pytest.skip(f"native ops unavailable: {native_backend.status(torch.device('cpu'))}", allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# |error| / scale bounds. reduce: float64 accumulation, so the scaled products' float32 rounding
# (a few ulps of float32: the factor's exp and argument, the product) dominates; exact for fp64.
# combine: that plus the output's rounding to the dtype.
REDUCE_TOL = {torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float32: 2e-6, torch.float64: 1e-13}
COMBINE_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-13}
MASKS = {"none": lambda k: 0, "one": lambda k: 1 << (k - 1), "all": lambda k: (1 << k) - 1,
         "mixed": lambda k: 0b10110101 & ((1 << k) - 1) or 1}


def _tensor(b, sample, dtype, g, strided, half, scale=1.0):
    """A [b, *sample] tensor: fresh and contiguous, or one half (first or second) of a
    [b, 2·sample[0], ...] buffer (contiguous samples, batch stride twice the sample size)."""
    if not strided:
        return (torch.randn(b, *sample, generator=g, dtype=torch.float64) * scale).to(dtype)
    c = sample[0]
    buf = (torch.randn(b, 2 * c, *sample[1:], generator=g, dtype=torch.float64) * scale).to(dtype)
    t = buf[:, c:] if half else buf[:, :c]
    assert not t.is_contiguous() or b == 1
    return t


def _case(b, sample, k, dtype, seed, strided, mask, coef_rows=None):
    """Operands (alternating halves when strided), a Scaling and the float64 truth inputs."""
    g = torch.Generator().manual_seed(seed)
    operands = [_tensor(b, sample, dtype, g, strided, j % 2, 1 + 0.5 * j) for j in range(k)]
    log_scale = _tensor(b, sample, dtype, g, strided, 1, 0.7)
    rows = coef_rows or b
    slope = torch.randn(rows, k, generator=g, dtype=torch.float64) * 0.6
    offset = torch.randn(rows, k, generator=g, dtype=torch.float64) * 0.4
    if seed % 3 == 0:                       # non-contiguous slope: [K, B] transposed
        slope = slope.t().contiguous().t()
    if rows == 1 and b > 1 and seed % 8 == 0:   # a broadcast batch dim of stride 0: read through strides
        slope, offset = slope.expand(b, k), offset.expand(b, k)
    scaling = Scaling(log_scale, slope, offset, mask)
    exact = Scaling(log_scale.double(), slope, offset, mask)
    return operands, scaling, exact


def _scaled_rows(operands, exact, groups):
    """The float64 scaled operands [B, G, K, N/G] (the truth's own values)."""
    return reference._rows([o.double() for o in operands], groups, torch.float64, exact)


def _check_reduce(operands, scaling, exact, groups):
    gram, sums = native_backend.reduce(operands, groups, scaling=scaling)
    b, k = operands[0].shape[0], len(operands)
    assert gram.shape == (b, groups, k, k) and gram.dtype == torch.float64
    assert sums.shape == (b, groups, k) and sums.dtype == torch.float64
    g64, s64 = reference.reduce([o.double() for o in operands], groups, exact)
    rows = _scaled_rows(operands, exact, groups)
    diag = torch.diagonal(g64, dim1=-2, dim2=-1)
    scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt() + 1e-300     # Cauchy-Schwarz of sum |x_i x_j|
    abs_sum = rows.abs().sum(-1) + 1e-300
    tol = REDUCE_TOL[operands[0].dtype]
    assert ((gram - g64).abs() / scale).max() <= tol
    assert ((sums - s64).abs() / abs_sum).max() <= tol
    return gram, sums


# -- reduce -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_reduce_matches_float64_truth(dtype, strided):
    """Every K, masks none/one/all/mixed, B = 1 and 3, groups 1 and 3, sample sizes that are not a
    multiple of 4/8/16 (and one longer than a parallel chunk of 16384 elements)."""
    seed = 0
    for b, sample, groups in ((3, (5, 7, 3), 1), (1, (3, 11), 3), (3, (6, 13), 3), (1, (3, 6000), 1)):
        for k in range(1, 9):
            if sample == (3, 6000) and k not in (2, 8):
                continue
            for name, mask_of in MASKS.items():
                seed += 1
                operands, scaling, exact = _case(b, sample, k, dtype, seed, strided, mask_of(k),
                                                 coef_rows=1 if seed % 4 == 0 else None)
                _check_reduce(operands, scaling, exact, groups)


def test_reduce_without_scaling_is_unchanged_and_strided_reads_as_contiguous():
    """A call without the new arguments, one with ``scaled=0`` and all three tensors, and one with
    the operands row-strided, give bitwise the same Gram and sums (the unscaled code path)."""
    for dtype in DTYPES:
        operands, scaling, _ = _case(3, (5, 7, 3), 4, dtype, 7, True, 0)
        contiguous = [o.contiguous() for o in operands]
        want = torch.ops.gradguide.reduce(contiguous, 5)
        for got in (torch.ops.gradguide.reduce(operands, 5),
                    native_backend.reduce(operands, 5, scaling=scaling),
                    torch.ops.gradguide.reduce(contiguous, 5, scaling.log_scale, scaling.slope, scaling.offset, 0)):
            assert all(torch.equal(w, x) for w, x in zip(want, got))
        # and the scaled path on row-strided operands equals it on contiguous copies
        sc = scaling._replace(mask=0b1011)
        got = native_backend.reduce(operands, 5, scaling=sc)
        want = native_backend.reduce(contiguous, 5, scaling=sc._replace(log_scale=sc.log_scale.contiguous()))
        assert all(torch.equal(w, x) for w, x in zip(want, got))


def test_scaled_value_is_formed_in_float32_not_rounded_to_the_dtype():
    """fp16: the product op · exp(...) is the operand's value in float32; rounding it to fp16 (what
    a pre-scaled operand would be) gives a different sum, and the kernel's is the float32 one."""
    g = torch.Generator().manual_seed(3)
    op = torch.randn(1, 4099, generator=g).half()
    v = torch.randn(1, 4099, generator=g).half()
    slope = torch.tensor([[0.37]], dtype=torch.float64)
    offset = torch.tensor([[0.11]], dtype=torch.float64)
    _, sums = native_backend.reduce([op], 1, scaling=Scaling(v, slope, offset, 1))
    value32 = op.float() * torch.exp(v.float() * slope.float() + offset.float())
    want32 = value32.double().sum().item()
    rounded = value32.half().double().sum().item()
    # torch's vectorised expf and the kernel's may differ by an ulp: far below fp16's rounding
    assert abs(sums.item() - want32) <= 2e-7 * value32.abs().sum().item()
    assert abs(sums.item() - rounded) > 20 * abs(sums.item() - want32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernels_exp_is_accurate_and_ieee_at_the_ends(dtype):
    """The factor's exp (vectorised in the kernels): ones scaled by exp(v) through the linear
    program (weight 1: the output is the factor itself, no rounding for fp32/fp64) against float64
    exp: within 2 ulps over the normal range, to the subnormal spacing below it, and
    exp(NaN) = NaN, exp(inf) = inf, exp(-inf) = 0, overflow to inf, underflow to 0."""
    info = torch.finfo(dtype)
    top = 88.7 if dtype == torch.float32 else 709.7
    bottom = -87.3 if dtype == torch.float32 else -708.3
    v = torch.cat([torch.linspace(bottom, top, 20011, dtype=torch.float64),
                   torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64),      # |r| near ln2 / 2 and 0
                   torch.linspace(bottom - 16, bottom, 3001, dtype=torch.float64)]).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), top + 1, bottom - 40, 0.0], dtype=dtype)
    v = torch.cat([v, special]).view(1, -1)
    ones = torch.ones_like(v)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    sc = Scaling(v, torch.ones(1, 1, **f64), torch.zeros(1, 1, **f64), 1)
    got = native_backend.fused_combine("linear", [ones], None, [one], [], scaling=sc)[0]
    want = torch.exp(v[0].double())
    n = v.shape[1] - len(special)
    err = (got[:n].double() - want[:n]).abs()
    assert (err <= 2 * info.eps * want[:n] + info.tiny * info.eps).all(), (err / want[:n]).max().item()
    tail = got[n:]
    assert tail[0].isnan() and tail[1] == float("inf") and tail[2] == 0 and tail[3] == float("inf")
    assert tail[4] == 0 and tail[5] == 1
    # and reduce reads the same factors: sums of one operand = sum of its values
    _, sums = native_backend.reduce([ones[:, :n]], 1, scaling=sc._replace(log_scale=v[:, :n]))
    torch.testing.assert_close(sums[0, 0, 0], got[:n].double().sum(), rtol=1e-12, atol=0)


# -- fused_combine --------------------------------------------------------------------------------



def _fused_truth(policy, gram, vectors, scalars, operands, exact, groups, clamp):
    b, k = operands[0].shape[0], len(operands)
    names_v, names_s = policies.POLICIES[policy]
    coef = policies.coefficients(policy, gram,
                                 {n: v.double().expand(b, groups, k) for n, v in zip(names_v, vectors)},
                                 {n: t.double().reshape(-1, 1, 1) for n, t in zip(names_s, scalars)})
    want = reference.combine(coef, [o.double() for o in operands], clamp=clamp, scaling=exact)
    rows = _scaled_rows(operands, exact, groups)
    scale = (coef.abs().unsqueeze(-1) * rows.abs()).sum(2).reshape(operands[0].shape)
    return want, scale


def _check_fused(policy, operands, scaling, exact, groups, kg, clamp, g, out=None):
    b, k, dtype = operands[0].shape[0], len(operands), operands[0].dtype
    vectors, scalars = policy_program(policy, b, groups, k, kg, g)
    gram = None
    if policies.NEEDS_GRAM[policy]:   # the Gram of the scaled operands (what the scaled reduce gives)
        gram = reference.reduce([o.double() for o in operands[:kg]], groups,
                                None if exact.mask & ((1 << kg) - 1) == 0 else
                                exact._replace(slope=exact.slope[:, :kg], offset=exact.offset[:, :kg],
                                               mask=exact.mask & ((1 << kg) - 1)))[0]
    got = native_backend.fused_combine(policy, operands, gram, vectors, scalars, clamp=clamp, out=out,
                                       scaling=scaling)
    if out is not None:
        assert got is out
    assert got.dtype == dtype and got.shape == operands[0].shape and got.is_contiguous()
    want, scale = _fused_truth(policy, gram, vectors, scalars, operands, exact, groups, clamp)
    big = want.abs() > torch.finfo(dtype).max    # a product of weights can leave fp16's range
    assert torch.isinf(got[big]).all()
    err = (got.double() - want).abs()[~big]
    info = torch.finfo(dtype)   # + the spacing of the dtype's subnormals (an output rounds to it)
    bound = (COMBINE_TOL[dtype] * (scale + want.abs()))[~big] + info.tiny * info.eps
    assert (err <= bound).all(), (policy, dtype, b, groups, k, exact.mask, (err / bound).max().item())
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("policy", ["pxp-a", "linear"])
def test_fused_pxp_a_and_clamped_linear_match_float64_truth(policy, dtype, strided):
    """pxp-a (a Gram program) and linear with a clamp: every K and mask kind, B = 1/3, groups 1/3."""
    g = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + 2 * int(strided) + (policy == "linear"))
    seed = 100
    for b, sample, groups in ((3, (5, 7, 3), 1), (1, (3, 11), 3), (3, (6, 13), 3)):
        for k in range(1, 9):
            kg = max(1, k - 1) if policies.NEEDS_GRAM[policy] else 0
            for name, mask_of in MASKS.items():
                seed += 1
                operands, scaling, exact = _case(b, sample, k, dtype, seed, strided, mask_of(k),
                                                 coef_rows=1 if seed % 4 == 0 else None)
                clamp = (-2.5, 3.0) if policy == "linear" else None
                _check_fused(policy, operands, scaling, exact, groups, kg, clamp, g)


@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_every_fused_policy_with_scaled_strided_operands(policy):
    """Every built-in program, cheaply: fp32 and bf16, row-strided, a mixed mask, groups 3."""
    g = torch.Generator().manual_seed(list(policies.POLICIES).index(policy))
    for dtype, b, k in ((torch.float32, 3, 5), (torch.bfloat16, 1, 8)):
        operands, scaling, exact = _case(b, (6, 5), k, dtype, 40 + k, True, MASKS["mixed"](k))
        kg = k - 2 if policies.NEEDS_GRAM[policy] else 0
        _check_fused(policy, operands, scaling, exact, 3, kg, (-4.0, None), g)


def test_fused_out_variant_matches_the_fresh_output():
    """fused_combine_out with scaling and row-strided operands: into a fresh buffer, in place into
    exactly a (contiguous) operand, and into a buffer overlapping log_scale (a temporary inside)."""
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        operands, scaling, exact = _case(3, (4, 9), 3, dtype, 11, True, 0b101)
        vectors, scalars = policy_program("pxp-a", 3, 1, 3, 2, g)
        gram = reference.reduce([o.double() for o in operands[:2]], 1,
                                exact._replace(slope=exact.slope[:, :2], offset=exact.offset[:, :2], mask=0b01))[0]
        fresh = native_backend.fused_combine("pxp-a", operands, gram, vectors, scalars, scaling=scaling)
        out = torch.full_like(fresh, float("nan"))
        assert native_backend.fused_combine("pxp-a", operands, gram, vectors, scalars, out=out, scaling=scaling) is out
        assert torch.equal(out, fresh)
        # in place: out is exactly operands[1] (made contiguous for it)
        ops_ = list(operands)
        ops_[1] = operands[1].contiguous()
        native_backend.fused_combine("pxp-a", ops_, gram, vectors, scalars, out=ops_[1], scaling=scaling)
        assert torch.equal(ops_[1], fresh)
        # out shares memory with log_scale (the second half of one buffer): computed through a temporary
        buf = (torch.randn(3, 8, 9, generator=g, dtype=torch.float64) * 0.7).to(dtype)
        sc = scaling._replace(log_scale=buf[:, 4:])
        want = native_backend.fused_combine("pxp-a", operands, gram, vectors, scalars, scaling=sc)
        target = buf.view(-1)[:want.numel()].view(want.shape)            # contiguous, overlaps buf[0, 4:]
        native_backend.fused_combine("pxp-a", operands, gram, vectors, scalars, out=target, scaling=sc)
        assert torch.equal(target, want)


def test_fused_without_scaling_is_unchanged_and_strided_reads_as_contiguous():
    g = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        operands, scaling, _ = _case(3, (6, 7), 4, dtype, 13, True, 0)
        contiguous = [o.contiguous() for o in operands]
        vectors, scalars = policy_program("pxp-a", 3, 2, 4, 3, g)
        gram = reference.reduce([o.double() for o in contiguous[:3]], 2)[0]
        args = (gram, vectors, scalars)
        want = torch.ops.gradguide.fused_combine("pxp-a", contiguous, *args, -1.0, None)
        for got in (torch.ops.gradguide.fused_combine("pxp-a", operands, *args, -1.0, None),
                    native_backend.fused_combine("pxp-a", operands, *args, clamp=(-1.0, None), scaling=scaling),
                    torch.ops.gradguide.fused_combine("pxp-a", contiguous, *args, -1.0, None, scaling.log_scale,
                                                      scaling.slope, scaling.offset, 0)):
            assert torch.equal(got, want)
        sc = scaling._replace(mask=0b0110)
        want = native_backend.fused_combine("pxp-a", contiguous, *args, scaling=sc._replace(
            log_scale=sc.log_scale.contiguous()))
        assert torch.equal(native_backend.fused_combine("pxp-a", operands, *args, scaling=sc), want)


_ISA_SCRIPT = r"""
import sys, torch
from gradguide import _C
from gradguide.ops import native_backend
from gradguide.ops.reference import Scaling
inp = torch.load(sys.argv[1])
res = {"isa": _C.cpu_isa()}
for key, (operands, v, a, c, mask, groups, vectors) in inp.items():
    sc = Scaling(v, a, c, mask)
    res[key] = (*native_backend.reduce(operands, groups, scaling=sc),
                native_backend.fused_combine("linear", operands, None, vectors, [], clamp=(-3.0, 3.0), scaling=sc))
torch.save(res, sys.argv[2])
"""


def test_instruction_sets_agree_bitwise_on_scaled_operands(tmp_path):
    """The AVX-512, AVX2 and baseline variants (the latter two run the tiled reduce) give
    bit-identical scaled results, each run in its own process (ATEN_CPU_CAPABILITY)."""
    from gradguide import _C
    caps = {"avx512": ["avx512", "avx2", "default"], "avx2": ["avx2", "default"], "default": ["default"]}[_C.cpu_isa()]
    if len(caps) == 1:
        pytest.skip("this CPU runs only the baseline variant of the native CPU kernels")
    inputs = {}
    for dtype in DTYPES:
        for k, groups in ((3, 1), (8, 3)):
            operands, sc, _ = _case(2, (6, 301), k, dtype, k, True, MASKS["mixed"](k))
            # torch.save keeps views' storage: the strided halves stay strided when loaded
            g = torch.Generator().manual_seed(k)
            inputs[f"{dtype} {k}"] = (operands, sc.log_scale, sc.slope, sc.offset, sc.mask, groups,
                                      [torch.randn(2, groups, k, generator=g, dtype=torch.float64)])
    path = tmp_path / "inputs.pt"
    torch.save(inputs, path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = {}
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path), str(tmp_path / f"{cap}.pt")], env=env,
                              capture_output=True, text=True, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[cap] = torch.load(tmp_path / f"{cap}.pt")
        assert runs[cap].pop("isa") == cap
    for cap in caps[1:]:
        for key, want in runs[caps[0]].items():
            assert all(torch.equal(a, b) for a, b in zip(want, runs[cap][key])), (cap, key)


# -- errors, fake kernels, autograd ---------------------------------------------------------------

def _bad_calls(operands, sc):
    b, k = operands[0].shape[0], len(operands)
    v, a, c = sc.log_scale, sc.slope, sc.offset
    f64 = dict(dtype=torch.float64, device=operands[0].device)
    return [
        ((v, a, c, 1 << k), ValueError, r"scaled: expected a mask in \[0, 2\*\*K\)"),
        ((v, a, c, -1), ValueError, "scaled: expected a mask"),
        ((None, None, None, 1), ValueError, "log_scale: scaled=1 needs"),
        ((v, a, None, 1), ValueError, "log_scale, slope, offset: expected all three or none"),
        ((v.double() if v.dtype != torch.float64 else v.float(), a, c, 1), TypeError, "log_scale: dtype"),
        ((v[:, :-1], a, c, 1), ValueError, "log_scale: expected a"),
        ((v.transpose(-1, -2).contiguous().transpose(-1, -2), a, c, 1), ValueError,
         "log_scale: expected contiguous samples"),
        ((v, a.float(), c, 1), TypeError, "slope: expected a"),
        ((v, a, torch.zeros(b, k + 1, **f64), 1), ValueError, r"offset: expected a float64 \[1 or B"),
        ((v, torch.zeros(2 if b != 2 else 3, k, **f64), c, 1), ValueError, r"slope: expected a float64 \[1 or B"),
        ((v, a, torch.zeros(k, **f64), 1), ValueError, r"offset: expected a float64 \[1 or B"),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_scaling_arguments_are_named(device):
    """The C++ op (cpu) and the fake kernel (meta: opchecks) refuse the same bad arguments by name."""
    operands, sc, _ = _case(3, (4, 5), 3, torch.float32, 1, True, 0b011)
    operands = [o.to(device) for o in operands]
    sc = Scaling(*(t.to(device) for t in sc[:3]), sc.mask)
    vec = [torch.ones(1, 1, 3, dtype=torch.float64, device=device)]
    for (v, a, c, mask), exc, match in _bad_calls(operands, sc):
        with pytest.raises(exc, match="gradguide::reduce: " + match):
            torch.ops.gradguide.reduce(operands, 1, v, a, c, mask)
        with pytest.raises(exc, match="gradguide::fused_combine: " + match):
            torch.ops.gradguide.fused_combine("linear", operands, None, vec, [], None, None, v, a, c, mask)
        with pytest.raises(exc, match="gradguide::fused_combine_out: " + match):
            torch.ops.gradguide.fused_combine_out("linear", operands, None, vec, [], None, None,
                                                  torch.empty(3, 4, 5, device=device), v, a, c, mask)
    # an operand whose samples are not contiguous (a transposed inner pair of dims)
    bad = operands[:2] + [operands[2].transpose(-1, -2).contiguous().transpose(-1, -2)]
    with pytest.raises(ValueError, match=r"gradguide::reduce: operands\[2\]: expected contiguous samples"):
        torch.ops.gradguide.reduce(bad, 1)
    with pytest.raises(ValueError, match=r"gradguide::fused_combine: operands\[2\]: expected contiguous samples"):
        torch.ops.gradguide.fused_combine("linear", bad, None, vec, [], None, None)


def test_combine_and_clip_shift_still_need_contiguous_operands():
    operands, _, _ = _case(3, (4, 5), 2, torch.float32, 2, True, 0)
    with pytest.raises(ValueError, match=r"gradguide::combine: operands\[0\]: expected a contiguous tensor"):
        torch.ops.gradguide.combine(torch.ones(3, 1, 2, dtype=torch.float64), operands, None, None)
    with pytest.raises(ValueError, match=r"gradguide::clip_shift: operands\[0\]: expected a contiguous tensor"):
        torch.ops.gradguide.clip_shift(torch.ones(1, 2), torch.ones(1, 2), operands, -1.0, 1.0)


def test_opcheck_with_strided_and_scaled_arguments():
    """torch.library.opcheck: schema, fake kernels (shapes, dtypes) and the dispatcher agree."""
    operands, sc, _ = _case(3, (4, 5), 3, torch.float32, 4, True, 0b110)
    v, a, c, mask = sc
    torch.library.opcheck(torch.ops.gradguide.reduce.default, (operands, 2, v, a, c, mask))
    vec = [torch.randn(3, 1, 3, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.gradguide.fused_combine.default,
                          ("linear", operands, None, vec, [], -1.0, 1.0, v, a, c, mask))
    torch.library.opcheck(torch.ops.gradguide.fused_combine_out.default,
                          ("linear", operands, None, vec, [], -1.0, 1.0, torch.empty(3, 4, 5), v, a, c, mask))
    # fake tensors: shapes and dtypes of the outputs
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        f_ops = [mode.from_tensor(o) for o in operands]
        f_sc = [mode.from_tensor(t) for t in (v, a, c)]
        gram, sums = torch.ops.gradguide.reduce(f_ops, 2, *f_sc, mask)
        out = torch.ops.gradguide.fused_combine("linear", f_ops, None, [mode.from_tensor(vec[0])], [], None, None,
                                                *f_sc, mask)
    assert gram.shape == (3, 2, 3, 3) and sums.shape == (3, 2, 3) and gram.dtype == torch.float64
    assert out.shape == (3, 4, 5) and out.is_contiguous()


def test_scaled_reduce_refuses_inputs_that_require_grad():
    operands, sc, _ = _case(2, (3, 4), 2, torch.float64, 3, False, 0b01)
    operands[0].requires_grad_(True)
    with pytest.raises(ValueError, match="gradguide::reduce: log_scale: Σ-scaled operands are not differentiable"):
        native_backend.reduce(operands, 1, scaling=sc)
    # unscaled, row-strided: differentiable as before (the gradient of sum over the sums is 1)
    buf = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    gram, sums = native_backend.reduce([buf[:, :3], buf[:, 3:]], 1)
    sums.sum().backward()
    torch.testing.assert_close(buf.grad, torch.ones_like(buf))
