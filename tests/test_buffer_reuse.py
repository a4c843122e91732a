"""Recycled step outputs (issue 12: a fresh CPU output pays first-touch page faults).

- ``gradguide::fused_combine_out`` / ``ops.fused_unchecked(out=)`` write exactly what the
  fresh-output op writes, on every backend; an ``out`` that overlaps the inputs other than by
  being exactly an operand is computed through a temporary; bad ``out`` arguments are named.
- The eager stepper offers the previous step's input as the fused step's output buffer only
  when nothing else holds it: results are bit-identical with and without recycling, recycling
  really happens (the model sees two alternating buffers), and x_T, inputs a model kept,
  callback records and autograd's saved tensors are never written.
"""
import pytest
import torch

import gradguide as gg
from gradguide import graphs, sampling
from gradguide.ops import policies

SCHED = gg.Schedule.linear(1000)
SHAPE = (3, 2, 8, 8)
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
        with pytest.raises(RuntimeError, match=f"fused_combine_out: out: .*{what}"):
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


# -- the sampling loop --------------------------------------------------------------------------------

def _model(x, t, y=None):
    abar = SCHED.alphas_cumprod.to(x.dtype)[t].reshape(-1, *([1] * (x.dim() - 1)))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    out = s * x + a * (0.3 * torch.tanh(1.3 * x) + 0.2 * x.roll(1, -1))
    return out + a * 0.4 * torch.sin(x + 1.0) if y is not None else out


def _log_prob(x, t, y=None):
    return (torch.sin(2 * x)).flatten(1).sum(1)


CASES = {   # sampler, eta, guidance, projection, clip
    "ddim-cfg": ("ddim", 0.0, lambda: [gg.CFG(3.0)], None, None),
    "ddpm-classifier-A-clip": ("ddpm", 0.0, lambda: [gg.Classifier(_log_prob, 0.05)], gg.PixelAsParam("A"), True),
    "ddim-eta1-cfg-C-clip": ("ddim", 1.0, lambda: [gg.CFG(3.0)], gg.PixelAsParam("C"), True),
    "ddpm-lookahead": ("ddpm", 0.0, lambda: [gg.LookAhead(0.1 * torch.randn(SHAPE, generator=torch.Generator()
                                                                              .manual_seed(6), dtype=torch.float64),
                                                          target=0.5)], None, None),
}


def _sample(case, backend, recycle, model=_model, x_T="fresh", steps=6, dtype=torch.float64, **kw):
    """One run; returns (samples, the stepper, the data pointers of the x the model saw)."""
    sampler, eta, guidance, projection, clip = CASES[case]
    seen, steppers = [], []

    def spy_model(x, t, **cond):
        seen.append(x.data_ptr())
        return model(x, t, **cond)
    original = sampling._stepper

    def spy_stepper(run, graph):
        stepper = original(run, graph)
        steppers.append(stepper)
        return stepper
    if x_T == "fresh":
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = graphs.EagerStepper.recycle
    graphs.EagerStepper.recycle, sampling._stepper = recycle, spy_stepper
    try:
        if backend == "triton" and gg.ops.triton_backend._interpret_env():
            _collecting_triton_launches()
        got = gg.sample(spy_model, SHAPE, schedule=SCHED, sampler=sampler, eta=eta, steps=steps, guidance=guidance(),
                        projection=projection, cond={"y": torch.ones(SHAPE[0])}, clip=clip, x_T=x_T, dtype=dtype,
                        generator=torch.Generator().manual_seed(2), backend=backend, batch_branches=False, **kw)
    finally:
        graphs.EagerStepper.recycle, sampling._stepper = before, original
        for name, fn in _REAL_TRITON.items():
            setattr(gg.ops.triton_backend, name, fn)
    return got, steppers[0], seen[::2 if CASES[case][2]()[0].__class__ is gg.CFG else 1]


_REAL_TRITON = {name: getattr(gg.ops.triton_backend, name) for name in ("reduce", "fused_combine", "clip_shift")}


def _collecting_triton_launches():
    """Triton's interpreter (3.9) keeps the launch arguments' storages in a reference cycle
    (runtime/interpreter.py: the recursive closure ``_from_cpu`` over its ``storages`` dict)
    until the cyclic collector runs; the stepper rightly sees them held. A launch on a GPU holds
    nothing afterwards: collect after every interpreted launch to model that."""
    import gc

    def collecting(fn):
        def launch(*args, **kwargs):
            result = fn(*args, **kwargs)
            gc.collect()
            return result
        return launch
    for name, fn in _REAL_TRITON.items():
        setattr(gg.ops.triton_backend, name, collecting(fn))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_recycled_outputs_are_bit_identical_and_really_recycled(case, backend):
    dtype = torch.float32 if backend == "native" else torch.float64
    want, plain, _ = _sample(case, backend, recycle=False, dtype=dtype)
    got, stepper, seen = _sample(case, backend, recycle=True, dtype=dtype)
    assert plain.offered == 0 and stepper.run.plan is not None
    assert torch.equal(got, want)
    # x_T is the caller's: step 1 gets a fresh output; from step 2 on every step writes into the
    # input of the step before it, so the model sees two buffers alternating
    assert stepper.offered == len(seen) - 2 >= 4
    assert all(seen[i] == seen[i - 2] for i in range(3, len(seen))), seen
    assert len(set(seen[1:])) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_internal_noise_is_recycled_from_step_one_and_x_T_never_written(backend):
    # no x_T: the loop's own noise is nobody else's, so step 1 already writes into it
    want, _, _ = _sample("ddim-cfg", backend, recycle=False, x_T=None)
    got, stepper, seen = _sample("ddim-cfg", backend, recycle=True, x_T=None)
    assert torch.equal(got, want) and stepper.offered == len(seen) - 1
    assert seen[2] == seen[0]
    # a caller's x_T is never written (it is the tensor the loop starts from: same dtype, no copy)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = x_T.clone()
    _, _, seen = _sample("ddim-cfg", backend, recycle=True, x_T=x_T)
    assert seen[0] == x_T.data_ptr() and x_T.data_ptr() not in seen[1:]
    assert torch.equal(x_T, keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["detached", "view", "same object"])
def test_a_model_that_keeps_its_inputs_sees_them_unchanged(backend, keep):
    kept, copies = [], []

    def model(x, t, y=None):
        kept.append({"detached": x.detach(), "view": x[:, :1], "same object": x}[keep])
        copies.append(x.clone())
        return _model(x, t, y)
    want, _, _ = _sample("ddpm-classifier-A-clip", backend, recycle=False)
    got, stepper, seen = _sample("ddpm-classifier-A-clip", backend, recycle=True, model=model)
    assert torch.equal(got, want)
    for k, c in zip(kept, copies):
        assert torch.equal(k, c if keep != "view" else c[:, :1])
    assert stepper.offered == 0 and len(set(seen)) == len(seen)   # nothing was reusable


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_records_and_autograd_saved_inputs_keep_their_values(backend):
    records = []
    want, _, _ = _sample("ddim-cfg", backend, recycle=False, callback=records.append)
    got_records = []
    got, _, _ = _sample("ddim-cfg", backend, recycle=True, callback=got_records.append)
    assert torch.equal(got, want)
    for a, b in zip(records, got_records):
        assert torch.equal(a.x, b.x)
    # a model whose own autograd graph saves its input (kept alive by the model)
    graphs_kept = []
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def model(x, t, y=None):
        with torch.enable_grad():
            z = (x * w).sum()                 # saves x for backward
        graphs_kept.append((z, x.clone()))
        return _model(x, t, y)
    got, stepper, _ = _sample("ddim-cfg", backend, recycle=True, model=model)
    assert torch.equal(got, want) and stepper.offered == 0
    for z, x in graphs_kept:
        (gw,) = torch.autograd.grad(z, w)
        torch.testing.assert_close(gw, x.sum())   # the saved x is unchanged (version counter agrees)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recycling_with_check_sync(backend):
    """No host synchronisation is added (the buffer test is host bookkeeping only)."""
    want, _, _ = _sample("ddim-eta1-cfg-C-clip", backend, recycle=False)
    got, stepper, _ = _sample("ddim-eta1-cfg-C-clip", backend, recycle=True, check_sync=True)
    assert torch.equal(got, want) and stepper.offered >= 4


def test_the_buffer_test_sees_every_holder():
    """graphs._holders against the cases it must catch, with the counts measured here."""
    w = torch.ones(3, requires_grad=True)
    holders = {"nothing": lambda t: None, "a list": lambda t: [t], "a view": lambda t: t[1:],
               "detach": lambda t: t.detach(), "autograd": lambda t: (t * w).sum(),
               "its storage": lambda t: t.untyped_storage(), "numpy": lambda t: t.numpy()}
    import weakref
    holders["a weak reference"] = lambda t: weakref.ref(t)
    for name, hold in holders.items():
        t = torch.randn(3)
        kept = hold(t)
        assert (graphs._holders(t) == graphs._ALONE[False]) == (name == "nothing"), name
        del kept
    # a view: reusable only while nothing but the view holds its base
    for name, hold in {"nothing": lambda v: None, "its base": lambda v: v._base, "another view": lambda v: v[1:],
                       "a view of the base": lambda v: v._base[1:]}.items():
        v = torch.randn(4).view(2, 2)
        kept = hold(v)
        assert (graphs._holders(v) == graphs._ALONE[True]) == (name == "nothing"), name
        del kept
