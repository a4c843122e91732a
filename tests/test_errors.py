"""Bad input gets a clear error naming the argument."""
import pytest
import torch

import gradguide as gg
from gradguide.demo_mixture import default_mixture

SCHED = gg.Schedule.linear(100)
GM = default_mixture(SCHED)
uncond = lambda x, t, **_: GM(x, t)


def call(**kw):
    args = dict(model=uncond, shape=(4, 2), schedule=SCHED, steps=5)
    args.update(kw)
    return gg.sample(args.pop("model"), args.pop("shape"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="lcm"), "sampler: expected one of"),
    (dict(backend="cuda-magic"), "backend: expected one of"),
    (dict(steps=101), "steps: 101 is more than the schedule's T = 100"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(x_T=torch.zeros(3, 2)), r"x_T: shape \(3, 2\) does not match"),
    (dict(x_T=torch.tensor([[float("nan"), 0.0]] * 4)), "x_T: contains NaN"),
    (dict(x_T=torch.zeros(4, 2, dtype=torch.int64)), "x_T: expected a floating dtype"),
    (dict(x_T=torch.zeros(4, 2), dtype=torch.float64), "x_T: dtype"),
    (dict(shape=(4,)), "shape: expected a batch shape"),
    (dict(prediction="score"), "prediction: expected one of"),
    (dict(variance="huge"), "variance: expected one of"),
    (dict(spacing="odd"), "spacing: expected one of"),
    (dict(eta=0.5), "eta: only the DDIM sampler"),
    (dict(sampler="ddim", eta=-1.0), "eta: expected a finite number >= 0"),
    (dict(clip=(1, -1)), "clip: expected"),
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
    (dict(model=lambda x, t: x, variance="learned-range"), "twice the channels"),
    (dict(variance="learned-range", sampler="ddim"), "learned-range"),
    (dict(guidance=gg.DecodedLookAhead(lambda z: z, torch.ones(4, 3))), "DecodedLookAhead: grad: shape"),
    (dict(guidance=gg.DecodedLookAhead(lambda z: z, torch.ones(2), offset=torch.ones(5))),
     r"DecodedLookAhead: offset: expected shape \[B\]"),
])
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(**kw)


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
