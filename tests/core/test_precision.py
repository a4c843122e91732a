"""float32 you can trust (docs/architecture.md#precision): a float32 run matches the float64 run of the same
sampling within 1e-4 relative (max |x32 − x64| / max |x64|), on every backend.

The loss the issue traced: rules take inner products of small combinations of large operands
from the Gram matrix (``uᵀGu``); with a float32 Gram the clipped guidance shift
``x̂0_guided,clipped − x̂0_clipped`` (norm ~1e-3 between operands of norm ~1.4) had its norm²
8 % off. Fixed at the root: the Gram matrix, sums and coefficient programs are float64
(gradguide/ops/reference.py), and small differences of clipped tensors are operands of their
own (``ops.clip_shift``: the classifier's clipped shift; policy C's clipped branch difference Δ).

Like with like: both runs get the same inputs. x_T and the noise are drawn in float64 and
rounded to float32 values for *both* runs (a float32 run cannot see the unrounded values; with
them the float64 run started 1.2e-7 away, which the guided samplings here amplify to 1-1.5e-4).
The model and the classifier evaluate in float64 and return the run's dtype, their outputs
rounded to float32 values in both runs: what is measured is gradguide's own arithmetic, not the
user model's float32 error (with the test model evaluated in float32 the issue case moves by
1.1e-4 through the model alone, guidance or not). What a float32 run cannot avoid is storing
its sample x_t in float32 after every step; where the sampling amplifies that rounding beyond
the goal (:func:`float32_floor`), float32 is held to that floor instead (reference and native
are bit-identical to it: their arithmetic adds nothing).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguide as gg
from gradguide import sampling
# the precision suite's shape, model wrapper, error measure and float32 floor
from gradguide.bench.precision import SHAPE, float32_floor, in_float64, relative_error
from gradguide.experiments.demo_mixture import default_mixture

TOL = 1e-4
SCHED = gg.Schedule.linear(1000)
BACKENDS = [b for b, ok in gg.ops.available_backends("cpu").items() if ok is True]


@pytest.fixture(autouse=True)
def float64_noise(monkeypatch):
    draw = sampling._noise
    monkeypatch.setattr(sampling, "_noise",
                        lambda shape, gen, device, dt: draw(shape, gen, device, torch.float64).float().to(dt))


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


def check_float32(err, seed=0, **kw):
    """``err`` (float32 vs float64) within TOL; or, where the sampling's conditioning puts the
    float32 floor above TOL / 2, within 3x that floor (one realisation of float32-sized
    perturbations; others differ by a few times)."""
    if err > TOL:
        floor = float32_floor(seed=seed, **kw)
        assert floor > TOL / 2 and err <= 3 * floor, (err, floor)


def _pair(backend, seed=0, fused=True, **kw):
    """float32 on ``backend`` against the float64 truth: the reference backend's float64 run
    (every backend's float64 ops are held to the reference's to 1e-12 in tests/kernels; running
    the truth on the reference spares interpreted Triton half its work here)."""
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    out = {}
    for dtype, b in ((torch.float64, "reference"), (torch.float32, backend)):
        out[dtype] = gg.sample(x_T=x_T.to(dtype), execution=gg.Execution(backend=b, fused=fused),
                               generator=torch.Generator().manual_seed(seed + 1), **kw)
    return relative_error(out[torch.float32], out[torch.float64])


def issue_case(eta=0.0, seed=0, scale=1.5, fused=True):
    """The pinned precision case: DDIM, classifier scale 1.5, PixelAsParam("B", granularity="channel"),
    clip=True, 5 steps (and eta = 1). ``fused`` is the execution's (see _pair)."""
    return dict(model=_model, shape=SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", eta=eta, clip=True), steps=5,
                guidance=gg.Classifier(_classifier(seed + 7), scale), cond={"y": torch.ones(SHAPE[0])},
                projection=gg.PixelAsParam("B", granularity="channel"), fused=fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_issue_case_float32_matches_float64(backend, eta, fused):
    err = _pair(backend, **issue_case(eta, fused=fused))
    assert err <= TOL, err


def test_issue_case_backends_agree_in_float32():
    """With eta = 1 the backends differed by up to 1.1 in float32 while agreeing in float64."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    case = issue_case(1.0)
    fused = case.pop("fused")
    outs = [gg.sample(x_T=x_T, execution=gg.Execution(backend=b, fused=fused),
                      generator=torch.Generator().manual_seed(1), **case)
            for b in BACKENDS]
    assert len(outs) >= 2
    for other in outs[1:]:
        assert relative_error(other, outs[0].double()) <= TOL


def _check_float32_across_seeds(seed, eta, scale, backends):
    kw = issue_case(eta, seed, scale)
    for backend in backends:
        check_float32(_pair(backend, seed=seed, **kw), seed=seed, **kw)


# derandomised: CI sees the same examples on every run. Interpreted Triton is too slow for many
# examples: the pinned cases below run it.
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), eta=st.sampled_from([0.0, 1.0]), scale=st.floats(0.5, 4.0))
def test_property_float32_matches_float64_across_seeds(seed, eta, scale):
    _check_float32_across_seeds(seed, eta, scale, [b for b in BACKENDS if b != "triton"])


@pytest.mark.parametrize("seed,eta,scale", [(65, 1.0, 3.26171875), (377, 1.0, 1.0), (244, 0.0, 2.5)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_cases_found_by_hypothesis(seed, eta, scale, backend):
    """Found by hypothesis at 1.0-1.5e-4 when the float64 run started from the unrounded x_T
    and noise; like with like they are 3-6e-5 on reference and native. Triton reached 1.1e-4 /
    2.3e-4 on two of them while its kernels summed float32 data in float32 (tensor-core tiles):
    they sum in float64 now (gradguide/kernels/reduce.py), like the other backends."""
    kw = issue_case(eta, seed, scale)
    err = _pair(backend, seed=seed, **kw)
    assert err <= TOL


# -- every sampler x guidance x projection combination of the suite (tests/core/test_no_host_sync.py) ---

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
def test_every_combination_float32_matches_float64(name, sampler, backend):
    terms, projection, model = TERMS[name]
    for clip in (None, (-5.0, 5.0)):
        kw = dict(model=model, shape=(8, 2), schedule=GM.schedule,
                  sampler=gg.Sampler(sampler.split("-eta")[0], eta={"ddim": 0.0, "ddim-eta1": 1.0}.get(sampler),
                                     clip=clip),
                  steps=6, guidance=terms, projection=projection, cond={"y": Y})
        check_float32(_pair(backend, **kw), **kw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton (interpreted) not available")
@pytest.mark.parametrize("name,sampler", [("cfg", "ddpm"), ("classifier+A", "ddpm"), ("cfg+C", "ddpm"),
                                          ("G_loss", "ddpm"), ("cfg+C", "dpmpp-2m"), ("apg", "ddim"),
                                          ("apg-momentum", "ddim")])
def test_triton_interpreted_float32_matches_float64(name, sampler):
    """(cfg+C on dpmpp-2m: the general path's clipped Δ, 1.2e-3 off when it was the difference of
    the two materialised clipped branches; APG, fused and general (momentum): 1.3e-4 while the
    Triton kernels summed float32 in float32.)"""
    terms, projection, model = TERMS[name]
    err = _pair("triton", model=model, shape=(8, 2), schedule=GM.schedule,
                sampler=gg.Sampler(sampler, clip=(-5.0, 5.0)), steps=6, guidance=terms, projection=projection,
                cond={"y": Y})
    assert err <= TOL, err
