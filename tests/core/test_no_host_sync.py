"""No host synchronisation inside a step (issue acceptance).

On CPU, ``check_sync=True`` runs every step with ``.item()``/``.tolist()``/``.numpy()``/
``float()``/``int()``/tensor-valued ``if`` made to raise; where CUDA exists it also turns on
``torch.cuda.set_sync_debug_mode("error")``. Every sampler x guidance x projection runs under it.
"""
import pytest
import torch

import gradguide as gg
from helpers import guidance_cases
from gradguide.experiments.analytic import SubspaceGaussian
from gradguide.debug import HostSyncError, forbid_host_sync
from gradguide.samplers import SAMPLERS
from gradguide.experiments.demo_mixture import default_mixture

SCHED = gg.Schedule.linear(200)
GM = default_mixture(SCHED)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
Y = torch.full((8,), 2)


TERMS = guidance_cases(GM)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
@pytest.mark.parametrize("name", list(TERMS))
def test_steps_never_synchronise(name, sampler, device):
    terms, projection, model = TERMS[name]
    records = []
    gg.sample(model, (8, 2), schedule=SCHED, sampler=gg.Sampler(sampler, clip=(-5, 5)), steps=6, guidance=terms,
              projection=projection, cond={"y": Y},
              diagnostics=gg.Diagnostics(check_sync=True, telemetry=True, callback=records.append),
              generator=torch.Generator().manual_seed(0), execution=gg.Execution(device=device))
    assert len(records) == 6


def _sampler_kwargs(name):
    """A sampler's sample() arguments on SCHED: its name and six steps, or what it needs instead."""
    abar = SCHED.alphas_cumprod
    sigma_max = float(((1 - abar[-1]) / abar[-1]).sqrt())
    if name == "dpm_fast":   # makes its own steps between two σ's
        return dict(sampler=gg.Sampler(name, sigmas=[sigma_max, 0.05], options=dict(nfe=12)))
    if name in ("sa_solver", "sa_solver_pece"):   # the σ interval with noise (ComfyUI's sde_sigmas)
        return dict(sampler=gg.Sampler(name, options=dict(sde_sigmas=(sigma_max, 0.05))), steps=6)
    return dict(sampler=name, steps=6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_every_guidance_term_and_projection_without_a_host_sync(sampler):
    """Each sampler is a LinComb step: every guidance term and PixelAsParam policy of the cases above
    runs on it under check_sync=True (a host sync raises), to a finite sample that the term moved."""
    kwargs = _sampler_kwargs(sampler)
    plain = gg.sample(TERMS["cfg"][2], (8, 2), schedule=SCHED, cond={"y": Y}, generator=torch.Generator().manual_seed(0),
                      **kwargs)
    for name, (terms, projection, model) in TERMS.items():
        records = []
        out = gg.sample(model, (8, 2), schedule=SCHED, guidance=terms, projection=projection, cond={"y": Y},
                        diagnostics=gg.Diagnostics(check_sync=True, callback=records.append),
                        generator=torch.Generator().manual_seed(0), **kwargs)
        assert records and bool(torch.isfinite(out).all()), name
        if model is TERMS["cfg"][2]:
            assert (out - plain).abs().max() > 1e-6, name


def test_the_guard_catches_item_and_tensor_valued_if():
    with pytest.raises(HostSyncError, match="Tensor.item"):
        gg.sample(lambda x, t: x * t.max().item(), (4, 2), schedule=SCHED, steps=3,
                  diagnostics=gg.Diagnostics(check_sync=True))

    def branching_model(x, t):
        if (x > 0).any():
            return x
        return -x
    with pytest.raises(HostSyncError, match="__bool__"):
        gg.sample(branching_model, (4, 2), schedule=SCHED, steps=3, diagnostics=gg.Diagnostics(check_sync=True))
    # the guard is lifted afterwards
    assert torch.ones(1).item() == 1.0 and bool(torch.ones(1))
    with forbid_host_sync():
        with pytest.raises(HostSyncError):
            torch.zeros(2).tolist()
    assert torch.zeros(2).tolist() == [0.0, 0.0]


def test_learned_range_and_subspace_steps_never_synchronise():
    sub = SubspaceGaussian.random(gg.Schedule.cosine(50), D=8, d=2)
    gg.sample(sub, (4, 8), schedule=gg.Schedule.cosine(50), guidance=gg.LookAhead(torch.ones(8), 1.0),
              diagnostics=gg.Diagnostics(check_sync=True))
    gg.sample(lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1), (2, 3, 4), schedule=SCHED, steps=5,
              sampler=gg.Sampler(variance="learned-range"),
              guidance=gg.Classifier(lambda x, t: x.flatten(1).sum(1), 1.0),
              diagnostics=gg.Diagnostics(check_sync=True))
