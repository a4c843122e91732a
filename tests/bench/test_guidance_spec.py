"""The harness's one guidance factory (gradguide/tools/guidance_spec.py): each name builds its
term with the harness's configuration, and a missing input or an unknown name is refused by name."""
import pytest
import torch

import gradguide as gg
from gradguide.tools import guidance_spec as gs


def test_names_build_their_terms_and_scales():
    terms, proj = gs.build([("cfg", 7.5), "apg-momentum", ("classifier", 2.0)], "pcgrad",
                           classifier=lambda x, t, y: x.sum(), uncond={"y": torch.zeros(1)})
    assert [type(t) for t in terms] == [gg.CFG, gg.APG, gg.Classifier]
    assert terms[0].scale == 7.5 and terms[1].scale == 4.0 and terms[2].scale == 2.0
    assert terms[1].momentum == -0.5
    assert isinstance(proj, gg.PixelAsParam) and proj.policy == "A" and proj.pcgrad
    assert gs.build("none") == ([], None) and gs.build(None, "none") == ([], None)
    # an option overrides the table's default, for that name only
    (z,) = gs.guidance_terms("cfg-zero*", options={"cfg-zero*": {"zero_init_steps": None}})
    assert isinstance(z, gg.CFGZeroStar)
    assert gs.projection("B", granularity="channel").granularity == "channel"


def test_every_listed_name_builds_with_its_inputs():
    x = torch.zeros(2, 3)
    inputs = dict(classifier=lambda x, t, y: x.sum(), gradient=x, target=torch.zeros(2), decode=lambda z: z,
                  operator=lambda z: z, measurement=x)
    for name in gs.GUIDANCE:
        assert len(gs.guidance_terms(name, **inputs)) == (name != "none"), name


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="'G_loss' needs the input 'gradient'"):
        gs.guidance_terms("G_loss", target=torch.zeros(2))
    with pytest.raises(ValueError, match="guidance: expected one of"):
        gs.guidance_terms("cfgzero")
    with pytest.raises(ValueError, match="projection: expected one of"):
        gs.projection("D")
    with pytest.raises(TypeError, match="unknown inputs"):
        gs.guidance_terms("cfg", uncnd={})
    with pytest.raises(ValueError, match="'dps' takes no scale"):
        gs.guidance_terms(("dps", 2.0), operator=lambda z: z, measurement=torch.zeros(2))
