"""float32 you can trust (issue 12 item 4): a float32 run matches the float64 run of the same
sampling within 1e-4 relative (max |x32 − x64| / max |x64|), on every backend.

The loss the issue traced: rules take inner products of small combinations of large operands
from the Gram matrix (``uᵀGu``); with a float32 Gram the clipped guidance shift
``x̂0_guided,clipped − x̂0_clipped`` (norm ~1e-3 between operands of norm ~1.4) had its norm²
8 % off. Fixed at the root: the Gram matrix, sums and coefficient programs are float64
(gradguide/ops/reference.py) and the clipped shift is an operand of its own.

float32 and float64 runs see the same x_T and noise (drawn in float64, rounded): torch.randn's
float32 and float64 streams differ. The model and the classifier evaluate in float64 and return
the run's dtype (their outputs rounded): what is measured is gradguide's own arithmetic, not the
user model's float32 error (with the test model evaluated in float32 the issue case moves by
1.1e-4 through the model alone, guidance or not).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguide as gg
from gradguide import sampling
from gradguide.experiments.demo_mixture import default_mixture

TOL = 1e-4
SCHED = gg.Schedule.linear(1000)
SHAPE = (4, 3, 8, 8)
BACKENDS = [b for b, ok in gg.ops.available_backends("cpu").items() if ok is True]


@pytest.fixture(autouse=True)
def float64_noise(monkeypatch):
    draw = sampling._noise
    monkeypatch.setattr(sampling, "_noise", lambda shape, gen, device, dt: draw(shape, gen, device, torch.float64).to(dt))


class _Float32Values(torch.autograd.Function):
    """Identity that rounds the value (forward) and the gradient (backward) to float32 values."""

    @staticmethod
    def forward(ctx, x):
        return x.float().to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.float().to(g.dtype)


def in_float64(fn):
    """``fn`` evaluated in float64, its output and its input-gradient rounded to float32 values in
    *both* runs: the float32 and float64 runs see the same model, so the comparison measures
    gradguide's arithmetic (and the conditioning of the sampling to float32 rounding of x_t),
    not the model's float32 error. (Without the rounding, policy C's Δ = x̂0_c − x̂0_u — a small
    difference of model outputs — makes even two float64 runs differ by 8e-2 when one model's
    outputs are rounded to float32: the problem's conditioning, not the arithmetic's.)"""
    return lambda x, t, **kw: _Float32Values.apply(fn(_Float32Values.apply(x).double(), t, **kw)).to(x.dtype)


@in_float64
def _model(x, t, y=None):
    """An ε model near the exact one for N(0, I) data, nonlinear, x̂_0 = O(1) at every t."""
    abar = SCHED.alphas_cumprod.to(x.dtype)[t].reshape(-1, *([1] * (x.dim() - 1)))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    out = s * x + a * (0.3 * torch.tanh(1.3 * x) + 0.2 * x.roll(1, -1))
    return out + a * 0.4 * torch.sin(x + 1.0) if y is not None else out


def _classifier(seed):
    d = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return in_float64(lambda x, t, y=None: (torch.sin(2 * x) * d).flatten(1).sum(1))


def relative_error(x32, x64):
    return float((x32.double() - x64).abs().max() / x64.abs().max())


def sensitivity(seed=0, **kw):
    """How far the float64 run itself moves when x_T moves by float32 rounding (1e-7 relative):
    where that exceeds TOL the sampling is ill-conditioned (e.g. policy C's projection onto a
    vanishing Δ = x̂0_c − x̂0_u is discontinuous) and no float32 arithmetic can meet TOL."""
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bumped = x_T * (1 + 1e-7 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(99),
                                           dtype=torch.float64))
    runs = [gg.sample(x_T=x, backend="reference", generator=torch.Generator().manual_seed(seed + 1), **kw)
            for x in (x_T, bumped)]
    return relative_error(runs[1], runs[0])


def _pair(backend, seed=0, **kw):
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    for dtype in (torch.float64, torch.float32):
        out[dtype] = gg.sample(x_T=x_T.to(dtype), backend=backend,
                               generator=torch.Generator().manual_seed(seed + 1), **kw)
    return relative_error(out[torch.float32], out[torch.float64])


def issue_case(eta=0.0, seed=0, scale=1.5, fused=True):
    """Issue 12's case: DDIM, classifier scale 1.5, PixelAsParam("B", granularity="channel"),
    clip=True, 5 steps (and eta = 1)."""
    return dict(model=_model, shape=SHAPE, schedule=SCHED, sampler="ddim", eta=eta, steps=5,
                guidance=gg.Classifier(_classifier(seed + 7), scale), cond={"y": torch.ones(SHAPE[0])},
                projection=gg.PixelAsParam("B", granularity="channel"), clip=True, fused=fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_issue_case_float32_matches_float64(backend, eta, fused):
    err = _pair(backend, **issue_case(eta, fused=fused))
    assert err <= TOL, err


def test_issue_case_backends_agree_in_float32():
    """With eta = 1 the backends differed by up to 1.1 in float32 while agreeing in float64."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = [gg.sample(x_T=x_T, backend=b, generator=torch.Generator().manual_seed(1), **issue_case(1.0))
            for b in BACKENDS]
    assert len(outs) >= 2
    for other in outs[1:]:
        assert relative_error(other, outs[0].double()) <= TOL


# Across seeds float32 reaches 1.0-1.5e-4 on some draws (float64's own sensitivity there is 5-8e-5):
# issue 12's 1e-4 goal is missed by up to 1.5x. The property test holds what is achieved (the
# issue's case was 2e-2 / 3e-1 before the float64 Gram); the pinned cases below hold the goal.
ACHIEVED = 2e-4


def _check_float32_across_seeds(seed, eta, scale, tol):
    for backend in BACKENDS:
        if backend == "triton":
            continue   # interpreted Triton: covered by the parametrised tests, too slow for many examples
        kw = issue_case(eta, seed, scale)
        err = _pair(backend, seed=seed, **kw)
        if err > tol:   # allowed only where float64 itself moves that much under float32-sized noise
            sens = sensitivity(seed=seed, **kw)
            assert sens > tol and err <= 10 * sens, (backend, err, sens)


# derandomised: CI sees the same examples on every run (a fresh random draw found the case below)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), eta=st.sampled_from([0.0, 1.0]), scale=st.floats(0.5, 4.0))
def test_property_float32_matches_float64_across_seeds(seed, eta, scale):
    _check_float32_across_seeds(seed, eta, scale, ACHIEVED)


@pytest.mark.xfail(strict=True, reason="open (issue 12): float32 is 1.0-1.5e-4 from float64 on the reference "
                   "backend here, above the 1e-4 goal, where float64's own sensitivity is 5-8e-5")
@pytest.mark.parametrize("seed,eta,scale", [(65, 1.0, 3.26171875), (377, 1.0, 1.0), (244, 0.0, 2.5)])
def test_float32_cases_found_by_hypothesis_miss_the_goal(seed, eta, scale):
    _check_float32_across_seeds(seed, eta, scale, TOL)


# -- every sampler x guidance x projection combination of the suite (tests/test_no_host_sync.py) ---

_GM = default_mixture(gg.Schedule.linear(200))
Y = torch.full((8,), 2)


class _Mixture:
    """The suite's Gaussian mixture, evaluated in float64."""
    schedule = _GM.schedule
    __call__ = staticmethod(in_float64(_GM))
    log_prob_class = staticmethod(in_float64(_GM.log_prob_class))


GM = _Mixture()


def _uncond(x, t, **_):
    return GM(x, t)


TERMS = {
    "none": ([], None, _uncond),
    "cfg": ([gg.CFG(3.0)], None, GM),
    "apg": ([gg.APG(3.0)], None, GM),
    "apg-momentum": ([gg.APG(3.0, momentum=-0.5)], None, GM),
    "rescale": ([gg.Rescale(3.0)], None, GM),
    "cfg-zero*": ([gg.CFGZeroStar(3.0, zero_init_steps=1)], None, GM),
    "cfg++": ([gg.CFGPlusPlus(0.5)], None, GM),
    "classifier+A": ([gg.Classifier(GM.log_prob_class, 2.0)], gg.PixelAsParam("A"), GM),
    "classifier+B": ([gg.Classifier(GM.log_prob_class, 2.0)], gg.PixelAsParam("B"), _uncond),
    "classifier+B-pcgrad": ([gg.Classifier(GM.log_prob_class, 2.0)], gg.PixelAsParam("B", pcgrad=True), _uncond),
    "cfg+C": ([gg.CFG(3.0)], gg.PixelAsParam("C"), GM),
    "G": ([gg.NaiveGradient(torch.tensor([1.0, 0.0]), 2.0)], None, _uncond),
    "G_loss": ([gg.LookAhead(torch.tensor([1.0, 0.0]), 2.0)], None, _uncond),
    "G_loss+classifier": ([gg.LookAhead(torch.tensor([1.0, 0.0]), 2.0), gg.Classifier(GM.log_prob_class, 1.0)],
                          gg.PixelAsParam("A"), _uncond),
    "dps": ([gg.DPS(lambda x0: x0, torch.zeros(8, 2))], None, _uncond),
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim-eta1", "dpmpp-2m"])
@pytest.mark.parametrize("name", list(TERMS))
def test_every_combination_float32_matches_float64(name, sampler, backend, request):
    if name == "cfg+C" and sampler == "dpmpp-2m":
        # Known, open (issue 12): policy C's official convention (the default since the authors'
        # clip-then-project order) forms Δ from the two materialised clipped x̂_0's on the general
        # path, and the Gram of that difference cancels in float32 (measured 1.2e-3 against a
        # float64 sensitivity of 3e-7). ddpm/ddim take the fused step, which keeps the shift an
        # operand of its own. Strict: this test must start passing when that is fixed.
        request.node.add_marker(pytest.mark.xfail(strict=True, reason="policy C official convention, general "
                                                  "path: Gram cancellation of clip(x0_c) - clip(x0_u) (issue 12)"))
    terms, projection, model = TERMS[name]
    for clip in (None, (-5.0, 5.0)):
        kw = dict(model=model, shape=(8, 2), schedule=GM.schedule, sampler=sampler.split("-eta")[0],
                  eta=1.0 if sampler == "ddim-eta1" else 0.0, steps=6, guidance=terms, projection=projection,
                  cond={"y": Y}, clip=clip)
        err = _pair(backend, **kw)
        if err > TOL:   # allowed only where float64 itself moves that much under float32-sized noise
            sens = sensitivity(**kw)
            assert sens > TOL and err <= 10 * sens, (clip, err, sens)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton (interpreted) not available")
@pytest.mark.parametrize("name", ["cfg", "classifier+A", "cfg+C", "G_loss"])
def test_triton_interpreted_float32_matches_float64(name):
    terms, projection, model = TERMS[name]
    err = _pair("triton", model=model, shape=(8, 2), schedule=GM.schedule, sampler="ddpm", steps=6,
                guidance=terms, projection=projection, cond={"y": Y}, clip=(-5.0, 5.0))
    assert err <= TOL, err
