"""Bad input gets a clear error naming the argument."""
import pytest
import torch

import gradguide as gg
from gradguide.experiments.demo_mixture import default_mixture

SCHED = gg.Schedule.linear(100)
GM = default_mixture(SCHED)
uncond = lambda x, t, **_: GM(x, t)


def call(**kw):
    """``sample`` on a small default case; ``kw`` overrides sample()'s arguments."""
    args = dict(model=uncond, shape=(4, 2), schedule=SCHED, steps=5)
    args.update(kw)
    return gg.sample(args.pop("model"), args.pop("shape"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="no-such-sampler"), "sampler: expected one of"),
    (lambda: dict(execution=gg.Execution(backend="cuda-magic")), "execution.backend: expected one of"),
    (dict(steps=101), "steps: 101 is more than the schedule's T = 100"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(x_T=torch.zeros(3, 2)), r"x_T: shape \(3, 2\) does not match"),
    (dict(x_T=torch.tensor([[float("nan"), 0.0]] * 4)), "x_T: contains NaN"),
    (dict(x_T=torch.zeros(4, 2, dtype=torch.int64)), "x_T: expected a floating dtype"),
    (dict(x_T=torch.zeros(4, 2), execution=gg.Execution(dtype=torch.float64)), "x_T: dtype .* execution.dtype"),
    (dict(shape=(4,)), "shape: expected a batch shape"),
    (lambda: dict(sampler=gg.Sampler(prediction="score")), "sampler.prediction: expected one of"),
    (lambda: dict(sampler=gg.Sampler(variance="huge")), "sampler.variance: expected one of"),
    (lambda: dict(sampler=gg.Sampler(spacing="odd")), "sampler.spacing: expected one of"),
    (dict(sampler=gg.Sampler(eta=0.5)), "sampler.eta: sampler 'ddpm' takes no eta"),
    (lambda: dict(sampler=gg.Sampler("ddim", eta=-1.0)), "sampler.eta: expected a finite number >= 0"),
    (dict(sampler=gg.Sampler(clip=(1, -1))), "sampler.clip: expected"),
    (lambda: dict(sampler=gg.Sampler("no-such-sampler")), "sampler.name: expected one of"),
    (lambda: dict(sampler=gg.Sampler("ddim", clip_eps="unclipped")), "sampler.clip_eps: expected"),
    (lambda: dict(sampler=gg.Sampler(timesteps=[3, 2, 1])), "sampler.timesteps: expected a gradguide.Timesteps"),
    (dict(sampler=gg.Sampler("euler", sigmas=[2.0, 3.0, 0.0]), steps=None), "sampler.sigmas: expected finite"),
    (dict(sampler=gg.Sampler("euler", sigmas=[2.0, 0.0]), steps=3), "sampler.sigmas: pass either sigmas or steps"),
    (dict(sampler=gg.Sampler("ddim", final_noise="t>0")), "sampler 'ddim': unknown options"),
    (dict(sampler=object()), "sampler: expected a sampler name or a gradguide.Sampler"),
    (dict(execution="reference"), "execution: expected a gradguide.Execution"),
    (dict(diagnostics=True), "diagnostics: expected a gradguide.Diagnostics"),
    (lambda: dict(execution=gg.Execution(graph="yes")), "execution.graph: expected True, False or a"),
    (lambda: dict(execution=gg.Execution(fused=1)), "execution.fused: expected True or False"),
    (lambda: dict(execution=gg.Execution(dtype=torch.int64)), "execution.dtype: expected one of"),
    (lambda: dict(execution=gg.Execution(device=1.5)), "execution.device: expected a torch.device"),
    (lambda: dict(execution=gg.Execution(batch_branches="sometimes")), "execution.batch_branches: expected"),
    (lambda: dict(diagnostics=gg.Diagnostics(telemetry="yes")), "diagnostics.telemetry: expected True or False"),
    (lambda: dict(diagnostics=gg.Diagnostics(callback=3)), "diagnostics.callback: expected a callable"),
    (dict(guidance=[gg.CFG(3.0)]), "CFG needs a conditional model: pass cond="),
    (dict(guidance=[gg.CFG(2.0), gg.APG(2.0)], cond={"y": torch.zeros(4, dtype=torch.long)}), "at most one of"),
    (dict(guidance=["cfg"]), r"guidance\[0\]: expected a guidance term"),
    (dict(projection=gg.PixelAsParam("C")), "policy C projects the two branches"),
    (dict(projection=gg.PixelAsParam("A")), "policy A projects guidance directions"),
    (dict(guidance=gg.NaiveGradient(torch.ones(3), 1.0)), "NaiveGradient: grad: shape"),
    (dict(guidance=gg.LookAhead(torch.ones(2), torch.ones(3))), r"LookAhead: target: expected shape \[B\]"),
    (dict(guidance=gg.Classifier(lambda x, t: x.sum(1), form="mean"), sampler="ddim"), "form='mean'"),
    (dict(generator=[torch.Generator()] * 3), "generator: a list needs one generator per sample"),
    (dict(generator="seed"), "generator: expected a torch.Generator"),
    (dict(cond=[1, 2]), "cond: expected a dict"),
    (dict(schedule=[0.9, 0.5]), "schedule: expected a gradguide.Schedule"),
    (dict(model=lambda x, t: x[:, :1]), r"model: model\(x_t, t, \*\*cond\) returned shape \(4, 1\), expected \(4, 2\)"),
    (dict(model=lambda x, t: x, sampler=gg.Sampler(variance="learned-range")), "twice the channels"),
    (dict(sampler=gg.Sampler("ddim", variance="learned-range")), "sampler.variance: 'learned-range' is DDPM's"),
    (dict(guidance=gg.DecodedLookAhead(lambda z: z, torch.ones(4, 3))), "DecodedLookAhead: grad: shape"),
    (dict(guidance=gg.DecodedLookAhead(lambda z: z, torch.ones(2), offset=torch.ones(5))),
     r"DecodedLookAhead: offset: expected shape \[B\]"),
])
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):   # a configuration object may refuse when built
        call(**(kw() if callable(kw) else kw))


def test_classifier_returning_the_wrong_shape():
    with pytest.raises(ValueError, match=r"Classifier: log_prob must return a \[B\] = \[4\] tensor, got \(4, 2\)"):
        call(guidance=gg.Classifier(lambda x, t: x, 1.0))


def test_mismatched_devices_are_named():
    meta = torch.zeros(4, 2, device="meta")
    with pytest.raises(ValueError, match="LookAhead: grad: on meta"):
        call(guidance=gg.LookAhead(meta, 1.0))
    with pytest.raises(ValueError, match=r"cond\['y'\]: on meta"):
        call(guidance=gg.CFG(2.0), cond={"y": torch.zeros(4, device="meta")})


def test_bad_term_arguments():
    with pytest.raises(ValueError, match="CFGPlusPlus: scale"):
        gg.CFGPlusPlus(1.5)
    with pytest.raises(TypeError, match="CFG: scale: expected a number"):
        gg.CFG("7.5")
    with pytest.raises(ValueError, match="PixelAsParam: policy"):
        gg.PixelAsParam("D")
    with pytest.raises(ValueError, match="PixelAsParam: granularity"):
        gg.PixelAsParam("A", granularity="pixel")
    with pytest.raises(TypeError, match="Classifier: log_prob: expected a callable"):
        gg.Classifier(3.0)
    with pytest.raises(ValueError, match="Rescale: phi"):
        gg.Rescale(3.0, phi=2.0)
    with pytest.raises(TypeError, match="DecodedLookAhead: decode: expected a callable"):
        gg.DecodedLookAhead("vae", torch.ones(2))


def test_ops_errors():
    a = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"operands\[1\]: shape"):
        gg.ops.reduce([a, torch.zeros(2, 5)])
    with pytest.raises(TypeError, match=r"operands\[1\]: dtype"):
        gg.ops.reduce([a, a.double()])
    with pytest.raises(ValueError, match="groups: expected a positive divisor"):
        gg.ops.reduce([a], groups=4)
    with pytest.raises(ValueError, match=r"coef: expected shape"):
        gg.ops.combine(torch.zeros(2, 3), [a, a])
    with pytest.raises(ValueError, match="backend: expected one of"):
        gg.ops.combine(torch.zeros(2, 1), [a], backend="magic")
    with pytest.raises(ValueError, match="operands: expected a non-empty list"):
        gg.ops.reduce([])


def test_schedule_errors():
    with pytest.raises(ValueError, match="alphas_cumprod: expected a non-increasing"):
        gg.Schedule.from_alphas_cumprod([0.5, 0.9])
    with pytest.raises(ValueError, match="alphas_cumprod: expected finite values in"):
        gg.Schedule.from_alphas_cumprod([1.5, 0.9])
    with pytest.raises(ValueError, match="T: expected an integer >= 2"):
        gg.Schedule.linear(1)
    with pytest.raises(ValueError, match="steps: cannot take"):
        SCHED.timesteps("60,60")


# -- no silent wrong result ------------ ---------------------------------------------------------

import json
import math

from gradguide import ops
from gradguide.ops import reference

NATIVE = ops.available_backends("cpu")["native"] is True
BACKENDS = ["reference"] + (["native"] if NATIVE else [])
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")
NAN = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1, 7, -3, 999])
def test_out_partially_overlapping_an_operand(backend, shift):
    """``out`` a shifted view of the buffer holding an operand."""
    torch.manual_seed(shift % 17)
    buf = torch.randn(2000 + abs(shift))
    start = max(0, -shift)
    a = buf[start + max(shift, 0):start + max(shift, 0) + 2000].view(2, 1000)
    b = torch.randn(2, 1000)
    coef = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])
    want = reference.combine(coef.double().unsqueeze(1), [a.double(), b.double()]).float()
    out = buf[start:start + 2000].view(2, 1000)
    got = ops.combine(coef, [a, b], out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # the same through fused_combine (policy "cfg": eps_u + w (eps_c - eps_u))
    buf2 = torch.randn(2000 + abs(shift))
    a2 = buf2[start + max(shift, 0):start + max(shift, 0) + 2000].view(2, 1000)
    want2 = (b.double() + 3.0 * (a2.double() - b.double())).float()
    out2 = buf2[start:start + 2000].view(2, 1000)
    ops.fused_combine("cfg", [a2, b], out=out2, backend=backend, **_cfg_vectors(2, 3.0))
    torch.testing.assert_close(out2, want2, rtol=1e-5, atol=1e-5)


def _cfg_vectors(b, w):
    """The "cfg" policy's parameters for operands (eps_c, eps_u): uncond + w (cond - uncond)."""
    return dict(base=torch.zeros(b, 2), cond=torch.tensor([[1.0, 0.0]] * b),
                uncond=torch.tensor([[0.0, 1.0]] * b), scale=w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_exactly_an_operand_is_an_in_place_update(backend):
    a, b = torch.randn(3, 257), torch.randn(3, 257)
    coef = torch.randn(3, 2)
    want = (coef[:, :1] * a + coef[:, 1:] * b)
    got = ops.combine(coef, [a, b], out=a, backend=backend)
    assert got.data_ptr() == a.data_ptr()
    torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coef_inside_out_and_expanded_out(backend):
    buf = torch.randn(2, 8)
    coef = buf[:, :2]          # the weights live in the first columns of the output
    ops_ = [torch.randn(2, 8), torch.randn(2, 8)]
    want = coef[:, :1].clone() * ops_[0] + coef[:, 1:].clone() * ops_[1]
    ops.combine(coef, ops_, out=buf, backend=backend)
    torch.testing.assert_close(buf, want)
    with pytest.raises(ValueError, match="out: several of its elements share memory"):
        ops.combine(torch.ones(2, 2), ops_, out=torch.zeros(2, 1).expand(2, 8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp,exc,match", [
    ((NAN, 1.0), ValueError, "clamp: low: NaN is not a bound"),
    ((-1.0, NAN), ValueError, "clamp: high: NaN is not a bound"),
    ((1.0,), ValueError, r"clamp: expected a \(low, high\) pair"),
    (0.5, TypeError, "clamp: expected None or a"),
    ("ab", TypeError, "clamp: expected None or a"),
    (("a", "b"), TypeError, "clamp: low: expected a real number"),
    ((1.0, -1.0), ValueError, "clamp: expected low <= high"),
    ((torch.tensor(0.0), 1.0), TypeError, "clamp: low: expected a real number"),
])
def test_one_clamp_rule_on_every_backend(backend, clamp, exc, match):
    x = torch.randn(2, 5)
    with pytest.raises(exc, match=match):
        ops.combine(torch.ones(2, 1), [x], clamp=clamp, backend=backend)
    with pytest.raises(exc, match=match):
        ops.fused_combine("cfg", [x, x], clamp=clamp, backend=backend, **_cfg_vectors(2, 2.0))
    with pytest.raises(exc, match=match):
        reference.combine(torch.ones(2, 1, 1), [x], clamp=clamp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_sided_clamp_agrees(backend):
    x = torch.randn(3, 40)
    for clamp in [(None, 0.2), (-0.1, None), (None, None), (-math.inf, 0.0)]:
        got = ops.combine(torch.ones(3, 1), [x], clamp=clamp, backend=backend)
        lo, hi = (clamp[0] if clamp[0] is not None else -math.inf), (clamp[1] if clamp[1] is not None else math.inf)
        torch.testing.assert_close(got, x.clamp(lo, hi))


@pytest.mark.parametrize("clip", [(NAN, 1.0), (-1.0, NAN), (1.0, 1.0), (1,), "yes", 0.5])
def test_sample_clip_rule(clip):
    with pytest.raises((ValueError, TypeError), match="sampler.clip: "):
        call(sampler=gg.Sampler(clip=clip))


@needs_native
def test_native_ops_are_differentiable_like_the_reference():
    torch.manual_seed(0)
    a0, b0, c0 = torch.randn(3, 2, 6), torch.randn(3, 2, 6), torch.randn(3, 2, 2)
    grads = {}
    for backend in ("reference", "native"):
        a, b, c = (t.clone().requires_grad_(True) for t in (a0, b0, c0))
        y = ops.combine(c, [a, b], clamp=(-1.0, 1.0), backend=backend)
        g, s = ops.reduce([a, b], groups=2, backend=backend)
        p = gg.project(a, b, backend=backend)
        f = ops.fused_combine("pxp-a", [a, b], backend=backend, base=torch.zeros(3, 2), den=c[:, 0],
                              cls=torch.tensor([[0.0, 1.0]] * 3), div=torch.zeros(3, 2))
        loss = (y ** 2).sum() + (g ** 2).sum() + s.sum() + (p ** 3).sum() + (f * b0).sum()
        loss.backward()
        grads[backend] = [t.grad for t in (a, b, c)]
        assert all(t is not None for t in grads[backend])
    for got, want in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_gradient_matches_finite_differences():
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64)
    c = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: ops.combine(c, [a, b], backend="native"), (a, c))
    assert torch.autograd.gradcheck(lambda a: ops.reduce([a, b], backend="native")[0], (a,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_and_integer_inputs_are_refused(backend):
    x = torch.randn(2, 5)
    complex_coef = torch.ones(2, 1, dtype=torch.complex64)
    with pytest.raises(TypeError, match="coef: expected a real floating dtype.*complex64"):
        ops.combine(complex_coef, [x], backend=backend)
    with pytest.raises(TypeError, match="coef: expected a real floating dtype.*int64"):
        ops.combine(torch.ones(2, 1, dtype=torch.int64), [x], backend=backend)
    with pytest.raises(TypeError, match=r"operands\[0\]: expected a floating dtype"):
        ops.combine(torch.ones(2, 1), [torch.ones(2, 5, dtype=torch.int32)], backend=backend)
    with pytest.raises(TypeError, match=r"operands\[1\]: expected a floating dtype"):
        ops.reduce([x, x.to(torch.complex64)], backend=backend)
    params = _cfg_vectors(2, 2.0)
    name = next(iter(params))
    with pytest.raises(TypeError, match=f"{name}: expected a real floating dtype"):
        ops.fused_combine("cfg", [x, x], backend=backend, **dict(params, **{name: params[name].to(torch.complex64)}))
    scalar = [n for n, v in params.items() if not isinstance(v, torch.Tensor)][0]
    with pytest.raises(TypeError, match=f"{scalar}: expected a number"):
        ops.fused_combine("cfg", [x, x], backend=backend, **dict(params, **{scalar: 2 + 1j}))
    with pytest.raises(TypeError, match=f"{scalar}: expected a real floating tensor"):
        ops.fused_combine("cfg", [x, x], backend=backend, **dict(params, **{scalar: torch.tensor(2 + 0j)}))
    with pytest.raises(TypeError, match=f"{scalar}: expected a real floating tensor"):
        ops.fused_combine("cfg", [x, x], backend=backend, **dict(params, **{scalar: torch.tensor(2)}))


@pytest.mark.parametrize("coef,exc,match", [
    (1.0, TypeError, "coef: expected a .* tensor, got float"),
    ([[1.0]], TypeError, "coef: expected a .* tensor, got list"),
    (torch.ones(3, 1), ValueError, "coef: expected shape"),
])
def test_coef_errors(coef, exc, match):
    with pytest.raises(exc, match=match):
        ops.combine(coef, [torch.zeros(2, 4)])


def test_meta_tensors_and_devices():
    meta = torch.zeros(2, 4, device="meta")
    out = ops.combine(torch.ones(2, 1, device="meta"), [meta])   # shapes propagate on the reference
    assert out.device.type == "meta" and out.shape == (2, 4)
    with pytest.raises(ValueError, match="backend: 'native' runs on cpu and cuda tensors, got tensors on meta"):
        ops.combine(torch.ones(2, 1, device="meta"), [meta], backend="native")
    with pytest.raises(ValueError, match="execution.device: meta tensors hold no values"):
        call(execution=gg.Execution(device="meta"))
    with pytest.raises(ValueError, match="x_T: a meta tensor"):
        call(x_T=torch.zeros(4, 2, device="meta"))
    with pytest.raises(ValueError, match="execution.device: 'gpu' is not a device"):
        call(execution=gg.Execution(device="gpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's error")
def test_cuda_device_on_a_cpu_build():
    with pytest.raises(ValueError, match="execution.device: 'cuda' requested, but CUDA is not available"):
        call(execution=gg.Execution(device="cuda"))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(steps="ddimx"), ValueError, "steps: expected 'ddimN'"),
    (dict(steps=torch.tensor(5)), TypeError, "steps: expected a count .* got a 0-d Tensor"),
    (dict(steps=[10.5, 3]), TypeError, "steps: explicit timesteps must be integers"),
    (dict(steps="5,x"), ValueError, "steps: expected a count"),
    (dict(guidance=3), TypeError, "guidance: expected a guidance term .* got int"),
    (dict(guidance=gg.Classifier(lambda x, t: x.detach().sum(1), 1.0)), ValueError,
     "Classifier: log_prob: returned a tensor with no gradient"),
    (dict(guidance=gg.Classifier(lambda x, t: torch.zeros(4, requires_grad=True), 1.0)), ValueError,
     "Classifier: log_prob: returned a tensor that does not depend on x_t"),
    (dict(model=lambda x, t: torch.zeros(4, 2, dtype=torch.int64)), TypeError, "model: .* returned dtype torch.int64"),
    (dict(model=lambda x, t: torch.zeros(4, 2, dtype=torch.bool)), TypeError, "model: .* returned dtype torch.bool"),
    (dict(model=lambda x, t: torch.zeros(4, 2, dtype=torch.complex64)), TypeError, "returned dtype torch.complex64"),
    (dict(model=lambda x, t: torch.zeros(4, 2, device="meta")), ValueError, "model: .* returned a tensor on meta"),
    (dict(model=lambda x, t, y=None: GM(x, t), guidance=gg.CFG(3.0, uncond={"y": torch.zeros(2)}),
          cond={"y": torch.zeros(4, dtype=torch.long)}), ValueError,
     r"CFG: uncond\['y'\]: leading \(batch\) dimension 2, but the batch has B = 4 samples"),
    (dict(model=lambda x, t, y=None: GM(x, t), cond={"y": torch.zeros(7, dtype=torch.long)}), ValueError,
     r"cond\['y'\]: leading \(batch\) dimension 7, but the batch has B = 4 samples"),
    (lambda: dict(diagnostics=gg.Diagnostics(check_finite="sometimes")), ValueError,
     "diagnostics.check_finite: expected"),
    (lambda: dict(diagnostics=gg.Diagnostics(check_finite="step", check_sync=True)), ValueError,
     "diagnostics.check_finite: 'step' reads"),
    (dict(diagnostics=gg.Diagnostics(check_finite="step"), execution=gg.Execution(graph=True)), ValueError,
     "diagnostics.check_finite: 'step' .* graph capture"),
])
def test_more_bad_input_names_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**(kw() if callable(kw) else kw))


@pytest.mark.parametrize("term", [lambda v: gg.CFG(v), lambda v: gg.Classifier(lambda x, t: x.sum(1), v),
                                  lambda v: gg.APG(v), lambda v: gg.PixelAsParam("A", delta=v)])
@pytest.mark.parametrize("value", [math.inf, -math.inf, NAN])
def test_non_finite_scales_are_refused(term, value):
    with pytest.raises(ValueError, match="expected a finite number"):
        term(value)


def test_apg_norm_threshold_may_be_inf():
    assert gg.APG(2.0, norm_threshold=math.inf).norm_threshold == math.inf


def test_finiteness_policy():
    nan_model = lambda x, t: torch.full_like(x, NAN)
    with pytest.raises(ValueError, match="check_finite: the samples contain NaN or inf"):
        call(model=nan_model)
    with pytest.raises(ValueError, match=r"model: model\(x_t, t, \*\*cond\) returned NaN or inf at t = 99"):
        call(model=nan_model, diagnostics=gg.Diagnostics(check_finite="step"))
    assert torch.isnan(call(model=nan_model, diagnostics=gg.Diagnostics(check_finite=False))).all()


def test_float16_overflow_is_reported_not_returned():
    """A guided update beyond float16's range: refused with the reason (float32 holds it)."""
    steep = gg.Classifier(lambda x, t: (x.float() * 3e4).sum(1), 1e3)
    kw = dict(model=lambda x, t: torch.zeros_like(x), guidance=steep, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="float16 holds magnitudes up to 65504"):
        call(execution=gg.Execution(dtype=torch.float16), **kw)
    with pytest.raises(ValueError, match="not finite after step 0"):
        call(execution=gg.Execution(dtype=torch.float16), diagnostics=gg.Diagnostics(check_finite="step"), **kw)
    assert torch.isfinite(call(execution=gg.Execution(dtype=torch.float32), **kw)).all()


def test_schedule_linear_small_T_names_T():
    with pytest.raises(ValueError, match=r"T: Schedule.linear scales the betas by 1000/T .* use T >= 21"):
        gg.Schedule.linear(10)
    assert gg.Schedule.linear(21).T == 21


def test_off_support_ratio():
    basis = torch.eye(4)[:, :2]
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    r = gg.off_support_ratio(x, basis)
    assert r.dtype == torch.float32 and r.tolist() == [math.inf, 0.0, math.inf, 1.0]
    assert gg.off_support_ratio(x.double(), basis).dtype == torch.float64
    assert gg.off_support_ratio(x.half(), basis).tolist() == [math.inf, 0.0, math.inf, 1.0]
    for bad, exc, match in [(torch.tensor(1.0), ValueError, "x: expected a non-empty"),
                            (torch.zeros(0, 4), ValueError, "x: expected a non-empty"),
                            (torch.zeros(2, 4, dtype=torch.int64), TypeError, "x: expected a real floating"),
                            (torch.zeros(2, 4, dtype=torch.complex64), TypeError, "x: expected a real floating"),
                            ([[0.0] * 4], TypeError, "x: expected a tensor")]:
        with pytest.raises(exc, match=match):
            gg.off_support_ratio(bad, basis)
    with pytest.raises(ValueError, match=r"basis: expected shape \[D=4, d\] with d >= 1"):
        gg.off_support_ratio(x, torch.zeros(4, 0))
    with pytest.raises(TypeError, match="basis: expected a real floating"):
        gg.off_support_ratio(x, basis.long())


def test_project_errors_name_the_argument():
    with pytest.raises(TypeError, match="project: b: expected a tensor"):
        gg.project(torch.zeros(2, 3), [1, 2, 3])
    with pytest.raises(ValueError, match="delta: expected a finite number"):
        gg.project(torch.zeros(2, 3), torch.zeros(2, 3), delta=math.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_guided_sampling_matches_float64(backend):
    """The pinned precision case: DDIM, classifier guidance 1.5,
    PixelAsParam B per channel, clip=True, 5 steps on the shipped 8x8-digits models. float64 is
    well conditioned here; float32 must agree to 1e-4 relative (it was 1.6e-2 off)."""
    from gradguide.experiments.digits import models
    schedule, unc, cls = models.digits_schedule(), models.load("eps_uncond"), models.load("noisy_classifier")
    y = torch.arange(8) % 10
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(dtype):
        return gg.sample(lambda x, t: unc(x.float(), t).to(x.dtype), (8, 1, 8, 8), schedule=schedule,
                         sampler=gg.Sampler("ddim", clip=True), steps=5,
                         guidance=gg.Classifier(lambda x, t: cls.log_prob(x.float(), t, y), 1.5),
                         projection=gg.PixelAsParam("B", granularity="channel"), x_T=x_T.to(dtype),
                         execution=gg.Execution(backend=backend), generator=torch.Generator().manual_seed(1))
    single, double = run(torch.float32), run(torch.float64)
    assert (single.double() - double).abs().max() <= 1e-4 * double.abs().max()


@needs_native
def test_raw_native_ops_are_differentiable():
    """The registered ops themselves (``torch.ops.gradguide.*``) carry gradients, not only the glue."""
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.gradguide.combine(c, [a, b, a], -0.5, 0.7), (a, b, c))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.gradguide.reduce([a, b, a], 3), (a, b))


@needs_native
def test_raw_native_combine_out_refuses_overlap_and_nan_bounds():
    """The registered op itself checks what the glue works around (C++: the root)."""
    buf = torch.randn(2001)
    a, b, c = buf[:2000].view(2, 1000), torch.randn(2, 1000), torch.ones(2, 1, 2)
    with pytest.raises(ValueError, match=r"out: shares memory with operands\[0\] other than by being exactly it"):
        torch.ops.gradguide.combine_out(c, [a, b], None, None, buf[1:].view(2, 1000))
    with pytest.raises(ValueError, match="low: NaN is not a bound"):
        torch.ops.gradguide.combine(c, [a, b], NAN, None)
    want = a + b
    torch.ops.gradguide.combine_out(c, [a, b], None, None, a)   # exactly an operand: in place
    torch.testing.assert_close(a, want)


# -- the registered ops called directly: errors name the argument -------------------------------

def _raw_cases():
    """(name, call(ns), exception, argument) for ``ns`` = torch.ops.gradguide (native) or
    torch.ops.gradguide_triton; their schemas differ only in fused_combine's argument order."""
    x, d = torch.randn(2, 4), torch.tensor(1.0)
    v, s = torch.zeros(1, 1, 2), torch.ones(1)
    gram = torch.zeros(2, 1, 2, 2, dtype=torch.float64)

    def fused(ns, policy, operands, gram_, vectors, scalars, low=None, high=None):
        if ns is torch.ops.gradguide:
            return ns.fused_combine(policy, operands, gram_, vectors, scalars, low, high)
        return ns.fused_combine(policy, gram_, vectors, scalars, operands, low, high)

    return [
        ("reduce, no operand", lambda ns: ns.reduce([], 1), ValueError, "operands"),
        ("reduce, 0-d", lambda ns: ns.reduce([d], 1), ValueError, "operands"),
        ("reduce, shapes", lambda ns: ns.reduce([x, x[:1]], 1), ValueError, "operands[1]"),
        ("reduce, dtypes", lambda ns: ns.reduce([x, x.double()], 1), TypeError, "operands[1]"),
        ("reduce, int", lambda ns: ns.reduce([x.int()], 1), TypeError, "operands"),
        ("reduce, meta", lambda ns: ns.reduce([x, x.to("meta")], 1), ValueError, "operands[1]"),
        ("reduce, strided", lambda ns: ns.reduce([x, x.t().contiguous().t()], 1), ValueError, "operands[1]"),
        ("reduce, groups", lambda ns: ns.reduce([x], 3), ValueError, "groups"),
        ("combine, no operand", lambda ns: ns.combine(torch.ones(2, 1, 0), [], None, None), ValueError, "operands"),
        ("combine, 0-d operand", lambda ns: ns.combine(torch.ones(1, 1, 1), [d], None, None), ValueError, "operands"),
        ("combine, 0-d coef", lambda ns: ns.combine(d, [x, x], None, None), ValueError, "coef"),
        ("combine, coef shape", lambda ns: ns.combine(torch.ones(2, 1, 3), [x, x], None, None), ValueError, "coef"),
        ("combine, int coef", lambda ns: ns.combine(torch.ones(2, 1, 1, dtype=torch.int64), [x], None, None),
         TypeError, "coef"),
        ("combine, NaN bound", lambda ns: ns.combine(torch.ones(2, 1, 1), [x], None, NAN), ValueError, "high"),
        ("combine_out, out", lambda ns: ns.combine_out(torch.ones(2, 1, 1), [x], None, None, torch.empty(3)),
         ValueError, "out"),
        ("fused, no tensor at all", lambda ns: fused(ns, "linear", [], None, [], []), ValueError, "operands"),
        ("fused, no operand", lambda ns: fused(ns, "linear", [], None, [v], []), ValueError, "operands"),
        ("fused, 0-d", lambda ns: fused(ns, "linear", [d], None, [v], []), ValueError, "operands"),
        ("fused, policy", lambda ns: fused(ns, "pcgrad", [x, x], None, [v], []), ValueError, "policy"),
        ("fused, int vector", lambda ns: fused(ns, "linear", [x, x], None, [v.int()], []), TypeError, "vectors[0]"),
        ("fused, vector shape", lambda ns: fused(ns, "linear", [x, x], None, [torch.zeros(1, 1, 3)], []),
         ValueError, "vectors"),
        ("fused, no gram", lambda ns: fused(ns, "pxp-a", [x, x], None, [v] * 4, [s]), ValueError, "gram"),
        ("fused, meta gram", lambda ns: fused(ns, "pxp-a", [x, x], gram.to("meta"), [v] * 4, [s]), ValueError,
         "gram"),
        ("fused, scalar dtype", lambda ns: fused(ns, "cfg", [x, x], None, [v] * 3, [s.int()]), TypeError,
         "scalars[0]"),
        ("clip_shift, no operand", lambda ns: ns.clip_shift(torch.ones(1, 0, dtype=torch.float64),
                                                            torch.ones(1, 0, dtype=torch.float64), [], -1.0, 1.0),
         ValueError, "operands"),
        ("clip_shift, 0-d", lambda ns: ns.clip_shift(torch.ones(1, 1, dtype=torch.float64),
                                                     torch.ones(1, 1, dtype=torch.float64), [d], -1.0, 1.0),
         ValueError, "operands"),
        ("clip_shift, coef", lambda ns: ns.clip_shift(torch.ones(1, 3, dtype=torch.float64),
                                                      torch.ones(1, 3, dtype=torch.float64), [x], -1.0, 1.0),
         ValueError, "coef_p"),
        ("clip_shift, bounds", lambda ns: ns.clip_shift(torch.ones(1, 1, dtype=torch.float64),
                                                        torch.ones(1, 1, dtype=torch.float64), [x], 1.0, -1.0),
         ValueError, "low, high"),
    ]


def _raw_namespaces():
    names = []
    if NATIVE:
        names.append("gradguide")
    if ops.available_backends("cpu")["triton"] is True:
        names.append("gradguide_triton")
    return names


@pytest.mark.parametrize("namespace", _raw_namespaces())
@pytest.mark.parametrize("case", _raw_cases(), ids=lambda c: c[0])
def test_raw_ops_name_the_argument(namespace, case):
    """A direct call of a registered op with an empty operand list, 0-d tensors, mismatched
    shapes/dtypes/devices or bad weights: a TypeError/ValueError naming the argument (the C++
    ops: TORCH_CHECK_TYPE/_VALUE; Triton's glue and both ops' fake kernels: gradguide.ops.opchecks),
    never the dispatcher's NotImplementedError or an IndexError."""
    from gradguide.bench.fuzz import names_argument
    _, fn, exc, argument = case
    with pytest.raises((TypeError, ValueError)) as info:
        fn(getattr(torch.ops, namespace))
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert names_argument(str(info.value), [argument]) or f"{argument}:" in str(info.value), str(info.value)


# -- huge guidance scales: refused when not finite, named when they overflow the run -------------

def test_huge_scale_is_named_when_the_run_overflows():
    """The rule (gradguide.guidance.base.scale_overflow_hint): a finite scale runs; if the
    samples leave the dtype's range, the finiteness error names every weight above √(largest
    value of the dtype), by the argument the user passed."""
    from gradguide.bench.fuzz import names_argument
    model = lambda x, t, y=None: GM(x.double(), t, y).to(x.dtype)   # noqa: E731
    y = {"y": torch.ones(4, dtype=torch.long)}
    run = lambda **kw: call(sampler="ddim", steps=4, **kw)   # noqa: E731  (a setting that overflows float32)
    f32, f16, f64 = (gg.Execution(dtype=d) for d in (torch.float32, torch.float16, torch.float64))
    with pytest.raises(ValueError, match=r"check_finite: .* Likely cause: guidance\[0\]\.scale: 1e\+30") as info:
        run(model=model, guidance=[gg.CFG(1e30)], cond=y, execution=f32)
    assert names_argument(str(info.value), ["scale"])
    with pytest.raises(ValueError, match=r"after step \d.* Likely cause: guidance\.scale: 1e\+30"):
        run(model=model, guidance=gg.CFG(1e30), cond=y, execution=f32, diagnostics=gg.Diagnostics(check_finite="step"))
    with pytest.raises(ValueError, match=r"Likely cause: guidance\[1\]\.scale: 100000 .*float16"):
        run(model=model, guidance=[gg.Classifier(lambda x, t, **_: x.float().sum(1), 1.0), gg.CFG(1e5)], cond=y,
            execution=f16)
    # the same scale fits float64's range here: it runs (finite), as the float64 reference does
    assert torch.isfinite(run(model=model, guidance=[gg.CFG(1e30)], cond=y, execution=f64)).all()


def test_ordinary_scale_is_not_blamed_for_a_nan_model():
    nan_model = lambda x, t, y=None: torch.full_like(x, NAN)   # noqa: E731
    with pytest.raises(ValueError, match="check_finite: the samples contain NaN or inf") as info:
        call(model=nan_model, guidance=[gg.CFG(7.5)], cond={"y": torch.ones(4, dtype=torch.long)})
    assert "Likely cause" not in str(info.value) and "scale" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apg_infinite_norm_threshold_never_clips(backend):
    """norm_threshold=inf (allowed) is 'no clip', which the fused program spells 0: the step
    never hands it a non-finite scalar (that would make the row NaN, the ops' rule)."""
    model = lambda x, t, y=None: GM(x.double(), t, y).to(x.dtype)   # noqa: E731
    y = {"y": torch.ones(4, dtype=torch.long)}
    runs = [call(model=model, guidance=[gg.APG(3.0, norm_threshold=r)], cond=y, execution=gg.Execution(backend=backend),
                 generator=torch.Generator().manual_seed(0), sampler="ddim") for r in (math.inf, 0.0)]
    assert torch.isfinite(runs[0]).all()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
