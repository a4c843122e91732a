"""Schedules, ADM respacing and diffusers' spacings (docs/mathematics.md#schedules)."""
import math

import numpy as np
import pytest
import torch

import gradguide as gg
from gradguide.schedules import space_timesteps


def test_linear_matches_ddpm():
    s = gg.Schedule.linear(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    # ADM scales the betas by 1000/T
    assert gg.Schedule.linear(250).betas[-1].item() == pytest.approx(0.08)


def test_cosine_matches_nichol_dhariwal():
    T, s = 200, 0.008
    sched = gg.Schedule.cosine(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in [0, 50, 150]:
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() <= 0.999


def test_from_alphas_cumprod_round_trip():
    a = gg.Schedule.cosine(100).alphas_cumprod
    assert torch.equal(gg.Schedule.from_alphas_cumprod(a).alphas_cumprod, a)


def test_adm_space_timesteps():
    # ADM's documented examples: 10 steps over T = 1000, sections, and DDIM strides
    assert space_timesteps(1000, "10") == [round(i * 999 / 9) for i in range(10)]
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22] and len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "250") == sorted(set(round(i * 999 / 249) for i in range(250)))


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_diffusers_spacings(spacing, expected):
    ts = gg.Schedule.linear(1000).timesteps(10, spacing)
    assert ts.t.tolist() == expected
    assert ts.abar_prev[-1].item() == 1.0
    assert torch.equal(ts.abar_prev[:-1], ts.abar[1:])


def test_steps_offset_for_leading():
    assert gg.Schedule.linear(1000).timesteps(10, "leading", steps_offset=1).t.tolist()[0] == 901


def test_explicit_timesteps():
    ts = gg.Schedule.linear(1000).timesteps([10, 500, 999])
    assert ts.t.tolist() == [999, 500, 10]
