"""PixelAsParam over a perturbed-branch guider's differences (docs/pixelasparam.md): each difference
(CFG's c − u, a perturbed branch's c − p, ...) is an update direction. Closed forms, hand-derived, on a
model whose branch outputs are fixed vectors (x̂_0-prediction: x̂_0 is the output), with LTX-2's guider
``x̂_0c + (w − 1)(x̂_0c − x̂_0u) + s (x̂_0c − x̂_0p)`` (w = 2, s = 1; the perturbed branch a Custom
perturbation, a call of its own):

two directions (s = 0), sample 0: x̂_0c = (1, 0), Δ_cfg = (−1, 1), a conflict; policy C:
PC(x̂_0c|Δ) = (½, ½), PC(Δ|x̂_0c) = (0, 1): x̂_0 = (½, 3/2) (unprojected (0, 1)); policy A the same.

three directions, sample 0: d0 = x̂_0c = (1, 0), d1 = Δ_cfg = (−1, 1), d2 = Δ_p = (0, −2). Policy C: each
projected in turn against the other originals, ascending: d0 → (½, ½) → (½, 0); d1 → (0, 1) → (0, 0);
d2 → (0, −2) (⟂ d0) → (−1, −1); x̂_0 = (−½, −1) (unprojected (0, −1)). Policy A sums the guidance
directions: PC(d0|d1 + d2) = (½, −½), PC(d1 + d2|d0) = (0, −1): (½, −3/2).

Sample 1 has no conflict (x̂_0c = (1, 1), Δ_cfg = (1, 0), Δ_p = (0, 1)): never projected."""
import contextlib
import math

import pytest
import torch

import gradguide as gg

DT = torch.float64
SCHED = gg.Schedule.linear(1000)
SHAPE = (2, 2, 1, 1)
C = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DT)
D_CFG = torch.tensor([[-1.0, 1.0], [1.0, 0.0]], dtype=DT)
D_P = torch.tensor([[0.0, -2.0], [0.0, 1.0]], dtype=DT)
U, P = C - D_CFG, C - D_P      # w − 1 = 1, s = 1


class Fixed(torch.nn.Module):
    """x̂_0 per sample and branch: the label y selects cond (0) or uncond (1); the ``perturbed`` flag (set
    by a Custom perturbation) the perturbed branch."""

    def __init__(self):
        super().__init__()
        self.perturbed = False

    def forward(self, x, t, y):
        reps = x.shape[0] // 2
        out = P.repeat(reps, 1) if self.perturbed else torch.where((y == 0).view(-1, 1), C.repeat(reps, 1),
                                                                    U.repeat(reps, 1))
        return out.view(-1, 2, 1, 1) + 0 * x


@contextlib.contextmanager
def _perturbed(module):
    module.perturbed = True
    try:
        yield
    finally:
        module.perturbed = False


def _guider(three):
    if three:
        return gg.LTX2(2.0, stg_scale=1.0, stg=gg.Custom(_perturbed), uncond={"y": torch.ones(2)})
    return gg.LTX2(2.0, uncond={"y": torch.ones(2)})


def _run(model, guidance, projection, fused=True, steps=1, callback=None, sampler="ddim"):
    return gg.sample(model, SHAPE, schedule=SCHED, sampler=gg.Sampler(sampler, prediction="x0"), steps=steps,
                     guidance=guidance, projection=projection, cond={"y": torch.zeros(2)},
                     x_T=torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=DT),
                     execution=gg.Execution(fused=fused), diagnostics=gg.Diagnostics(callback=callback))


class Constant(torch.nn.Module):
    """An unguided model predicting a fixed x̂_0: a DDIM step from the same x_T then differs from a
    guided one only through the x̂_0 it uses."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, y=None):
        return self.x0.view(SHAPE) + 0 * x


# (policy, three directions) -> the hand-derived x̂_0 the step uses, per sample
EXPECTED = {("C", False): [[0.5, 1.5], [2.0, 1.0]], ("A", False): [[0.5, 1.5], [2.0, 1.0]],
            ("C", True): [[-0.5, -1.0], [2.0, 2.0]], ("A", True): [[0.5, -1.5], [2.0, 2.0]]}


@pytest.mark.parametrize("policy,three", list(EXPECTED))
@pytest.mark.parametrize("fused", [True, False])
def test_projected_update_is_the_hand_derived_one(policy, three, fused):
    proj = gg.PixelAsParam(policy, convention="paper") if policy == "C" else gg.PixelAsParam("A")
    got = _run(Fixed(), _guider(three), proj, fused=fused)
    want = _run(Constant(torch.tensor(EXPECTED[policy, three], dtype=DT)), [], None)
    unprojected = _run(Fixed(), _guider(three), None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - unprojected)[0].abs().max() > 0.1 and (got - unprojected)[1].abs().max() < 1e-12


def test_telemetry_reports_every_pair():
    records = []
    _run(Fixed(), _guider(True), gg.PixelAsParam("C", convention="paper"), callback=records.append)
    tel = records[0].telemetry
    assert {"cond/cfg", "cond/stg", "cfg/stg"} <= set(tel)
    r2 = 1 / math.sqrt(2)
    torch.testing.assert_close(tel["cond/cfg"]["cos"], torch.tensor([-r2, r2], dtype=DT))
    torch.testing.assert_close(tel["cond/stg"]["cos"], torch.tensor([0.0, r2], dtype=DT))
    torch.testing.assert_close(tel["cfg/stg"]["cos"], torch.tensor([-r2, 0.0], dtype=DT))
    assert tel["cond/cfg"]["conflict"].tolist() == [True, False]
    assert tel["cond/stg"]["conflict"].tolist() == [False, False]
    assert tel["cfg/stg"]["conflict_share"].item() == 0.5
    records.clear()   # policy A: the denoising direction, each difference, the noise (DDPM)
    _run(Fixed(), _guider(True), gg.PixelAsParam("A"), callback=records.append, steps=2, sampler="ddpm")
    assert {"den/cfg", "den/stg", "cfg/stg", "den/div", "cfg/div", "stg/div"} <= set(records[0].telemetry)


def test_single_difference_steps_run_fused_and_several_take_the_general_step():
    from gradguide import sampling
    two = sampling.prepare_run(Fixed(), SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", prediction="x0"), steps=3,
                               guidance=_guider(False), projection=gg.PixelAsParam("C", convention="paper"),
                               cond={"y": torch.zeros(2)})
    assert two.plan is not None and {st.policy for v in two.plan.variants.values() for st in v.stages} >= {"pxp-c"}
    three = sampling.prepare_run(Fixed(), SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", prediction="x0"), steps=3,
                                 guidance=_guider(True), projection=gg.PixelAsParam("C", convention="paper"),
                                 cond={"y": torch.zeros(2)})
    assert three.plan is None and "PixelAsParam.combine_directions" in three.fused_reason
    a = sampling.prepare_run(Fixed(), SHAPE, schedule=SCHED, sampler=gg.Sampler("ddim", prediction="x0"), steps=3,
                             guidance=_guider(True), projection=gg.PixelAsParam("A"), cond={"y": torch.zeros(2)})
    assert a.plan is not None and {st.policy for v in a.plan.variants.values() for st in v.stages} >= {"pxp-a"}


def test_refusals():
    kw = dict(schedule=SCHED, steps=2, cond={"y": torch.zeros(2)})
    with pytest.raises(ValueError, match="guidance_rescale=0.5 rescales the guided prediction"):
        gg.sample(Fixed(), SHAPE, guidance=gg.LTX2(2.0, guidance_rescale=0.5, uncond={"y": torch.ones(2)}),
                  projection=gg.PixelAsParam("C"), **kw)
    with pytest.raises(ValueError, match="convention='official' is the authors' code for CFG"):
        gg.sample(Fixed(), SHAPE, guidance=_guider(False), projection=gg.PixelAsParam("C"),
                  sampler=gg.Sampler("ddim", prediction="x0", clip=True), **kw)
    with pytest.raises(ValueError, match="policy A over LTX2's branch differences with the sampler's"):
        gg.sample(Fixed(), SHAPE, guidance=_guider(False), projection=gg.PixelAsParam("A"),
                  sampler=gg.Sampler("ddim", prediction="x0", clip=True), **kw)
