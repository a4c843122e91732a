"""The fused combine into an existing output (a fresh CPU output pays first-touch
page faults; a caller that owns its loop can write each step into a buffer it keeps).

``gradguide::fused_combine_out`` / ``ops.fused_unchecked(out=)`` / ``ops.fused_combine(out=)``
write exactly what the fresh-output op writes, on every backend; an ``out`` that overlaps the
inputs other than by being exactly an operand is computed through a temporary; bad ``out``
arguments are named.
"""
import pytest
import torch

import gradguide as gg
from gradguide.ops import policies

BACKENDS = [b for b in ("native", "reference", "triton") if gg.ops.available_backends("cpu")[b] is True]
NATIVE = "native" in BACKENDS


# -- the op ------------------------------------------------------------------------------------------

def _program(policy, k=4, groups=2, shape=(3, 2, 7, 5), dtype=torch.float32, seed=0):
    """Random operands and a policy's program arguments (as test_fused_step's native test)."""
    g = torch.Generator().manual_seed(seed)
    operands = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]
    names_v, names_s = policies.POLICIES[policy]
    kg = k - 1 if policies.NEEDS_GRAM[policy] else 0
    vectors = [torch.randn(1, 1, k, generator=g, dtype=torch.float64) for _ in names_v]
    if kg:
        vectors = [v if n in ("base", "coef") else torch.cat([v[..., :kg], torch.zeros(1, 1, k - kg,
                                                                                       dtype=torch.float64)], -1)
                   for n, v in zip(names_v, vectors)]
    scalars = [torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5 for _ in names_s]
    gram = gg.ops.reduce(operands[:kg], groups, backend="reference")[0] if kg else None
    return operands, gram, vectors, scalars, (groups if kg else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("policy", ["linear", "cfg", "pxp-a", "pxp-c", "apg", "lookahead"])
def test_fused_out_writes_what_the_fresh_output_op_returns(policy, dtype, backend):
    operands, gram, vectors, scalars, groups = _program(policy, dtype=dtype, seed=hash(policy) % 100)
    clamp = (-1.5, None) if policy == "linear" else None
    fresh = gg.ops.fused_unchecked(policy, backend, operands, gram, vectors, scalars, groups, clamp)
    out = torch.full_like(fresh, float("nan"))   # every element must be written
    got = gg.ops.fused_unchecked(policy, backend, operands, gram, vectors, scalars, groups, clamp, out=out)
    assert got is out
    assert torch.equal(out, fresh)
    # and the fresh-output op is right (float64 reference program and combine)
    want = gg.ops.fused_unchecked(policy, "reference", [o.double() for o in operands], gram, vectors, scalars,
                                  groups, clamp)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_out_is_computed_through_a_temporary(backend):
    """out exactly an operand: an in-place update; out a shifted view of an operand's memory,
    or holding a program vector: the result equals the one computed from untouched copies."""
    operands, gram, vectors, scalars, groups = _program("pxp-a", k=3, shape=(2, 3, 50), dtype=torch.float64)
    n = operands[0].numel()

    def expect(ops_, vecs):
        return gg.ops.fused_unchecked("pxp-a", "reference", [o.clone() for o in ops_], gram,
                                      [v.clone() for v in vecs], scalars, groups)

    # exactly operand 1
    ops_ = [o.clone() for o in operands]
    want = expect(ops_, vectors)
    got = gg.ops.fused_unchecked("pxp-a", backend, ops_, gram, vectors, scalars, groups, out=ops_[1])
    assert got.data_ptr() == ops_[1].data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # shifted by 5 elements within operand 0's storage
    buf = torch.zeros(n + 5, dtype=torch.float64)
    buf[:n] = operands[0].reshape(-1)
    ops_ = [buf[:n].view_as(operands[0])] + [o.clone() for o in operands[1:]]
    want = expect(ops_, vectors)
    out = buf[5:].view_as(operands[0])
    gg.ops.fused_unchecked("pxp-a", backend, ops_, gram, vectors, scalars, groups, out=out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # a non-contiguous out (the kernels write contiguous rows)
    out = torch.zeros(operands[0].shape[::-1], dtype=torch.float64).permute(2, 1, 0)
    want = expect(operands, vectors)
    assert gg.ops.fused_unchecked("pxp-a", backend, operands, gram, vectors, scalars, groups, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # a program vector inside out's memory (read while the output is written)
    out = torch.zeros_like(operands[0])
    vecs = [out.view(-1)[3 * j:3 * j + 3].view(1, 1, 3).copy_(v) for j, v in enumerate(vectors)]
    want = expect(operands, vecs)
    gg.ops.fused_unchecked("pxp-a", backend, operands, gram, vecs, scalars, groups, out=out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not NATIVE, reason="native ops not built")
def test_raw_fused_combine_out_checks_out_and_opcheck():
    operands, gram, vectors, scalars, groups = _program("pxp-a", dtype=torch.float32)
    args = ("pxp-a", operands, gram, vectors, scalars, None, 1.5)
    op = torch.ops.gradguide.fused_combine_out
    for bad, what in [(torch.empty(3, 2, 7, 4), "Float"), (torch.empty(3, 2, 7, 5, dtype=torch.float64), "Double"),
                      (torch.empty(3, 2, 5, 7).transpose(-1, -2), "not contiguous"),
                      (torch.empty(1, 1, 1, 5).expand(3, 2, 7, 5), "not contiguous")]:
        with pytest.raises(ValueError, match=f"fused_combine_out: out: .*{what}"):
            op(*args, bad)
    with pytest.raises(ValueError, match="low: NaN"):
        op("linear", operands, None, vectors[:1], [], float("nan"), None, torch.empty_like(operands[0]))
    out = torch.empty_like(operands[0])
    torch.library.opcheck(op.default, (*args, out))
    torch.library.opcheck(op.default, ("linear", operands, None, vectors[:1], [], -1.0, None, out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_refused_with_inputs_that_require_grad(backend):
    """The fused kernels compute no gradients: the unchecked entry refuses out (naming it); the
    checked ops.fused_combine takes its differentiable path and still fills out."""
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, dtype=torch.float64)
    coef = torch.tensor([[[0.5, -2.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="out: the fused kernels compute no gradients"):
        gg.ops.fused_unchecked("linear", backend, [a, b], None, [coef], [], out=torch.empty(2, 6, dtype=torch.float64))
    out = torch.empty(2, 6, dtype=torch.float64)
    got = gg.ops.fused_combine("linear", [a, b], coef=coef.expand(2, 1, 2)[:, 0], out=out, backend=backend)
    got.sum().backward()
    torch.testing.assert_close(out, 0.5 * a.detach() - 2.0 * b)
    torch.testing.assert_close(a.grad, torch.full_like(a, 0.5))
