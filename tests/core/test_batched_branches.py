"""Both guidance branches in one model call of batch 2B (as diffusers pipelines call the model).

Every two-branch term (CFG, APG, Rescale, CFG-Zero*, CFG++, PixelAsParam C) must give the
two-call path's output (float64, tight tolerance) while calling the model once per step; the
inputs stack as diffusers pipelines stack them; G_loss through both branches runs one backward
pass; the (emulated) graph stepper captures the batched call; inputs that cannot stack are
refused with the input named (batch_branches=True) or fall back to two calls ("auto")."""
import pytest
import torch

import gradguide as gg
from gradguide import APG, CFG, CFGPlusPlus, CFGZeroStar, DecodedLookAhead, LookAhead, PixelAsParam, Rescale
from gradguide.graphs import GraphCache
from gradguide.guidance.cfg import BranchInputsError, batch_branch_inputs

B, C, H = 3, 2, 4
SHAPE = (B, C, H, H)
DT = torch.float64


class BatchModel(torch.nn.Module):
    """A per-sample nonlinear ε model with structured conditioning: a label tensor, a list
    (tensor, None), a nested dict, a string and a shared tensor without a batch dimension.
    Records the batch size of every call and counts backward passes through it."""

    def __init__(self, learned=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        out_c = C * (2 if learned else 1)
        self.conv = torch.nn.Conv2d(C, out_c, 3, padding=1).double()
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.3)
        self.emb = torch.randn(5, out_c, generator=g, dtype=DT)
        self.calls, self.backwards = [], 0

    def forward(self, x, t, y=None, ctx=None, extra=None, mode="plain", table=None):
        self.calls.append(x.shape[0])
        h = self.conv(x) * (1 + t.to(DT).reshape(-1, 1, 1, 1) / 1000)
        if y is not None:
            h = h + self.emb[y].reshape(x.shape[0], -1, 1, 1)
        if ctx is not None:
            vec, nothing = ctx
            assert nothing is None
            h = h + vec.repeat(1, h.shape[1] // C).reshape(x.shape[0], -1, 1, 1)
        if extra is not None:
            h = h * (1 + extra["w"].reshape(-1, 1, 1, 1))
        if table is not None:
            h = h + table.sum()
        if mode == "tanh":
            h = torch.tanh(h)
        return _CountBackward.apply(h, self)


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, model):
        ctx.model = model
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        ctx.model.backwards += 1
        return grad, None


def _inputs():
    g = torch.Generator().manual_seed(1)
    # a shared input with no batch dimension: sample() accepts only 0-d tensors as shared
    # (a tensor with a leading dimension must have B rows), and the batched call passes it once
    table = torch.randn((), dtype=DT, generator=g)
    cond = {"y": torch.tensor([0, 1, 2]), "ctx": [torch.randn(B, C, dtype=DT, generator=g), None],
            "extra": {"w": torch.rand(B, dtype=DT, generator=g)}, "mode": "tanh", "table": table}
    uncond = {"y": torch.full((B,), 4), "ctx": [torch.zeros(B, C, dtype=DT), None],
              "extra": {"w": torch.zeros(B, dtype=DT)}, "mode": "tanh", "table": table}
    return cond, uncond


def _run(model, guidance, batch, sampler="ddim", projection=None, graph=False, seed=0, **config):
    """``config``: further gg.Sampler fields (clip, variance)."""
    cond, uncond = _inputs()
    for term in guidance if isinstance(guidance, list) else [guidance]:
        if hasattr(term, "uncond"):
            term.uncond = uncond
    model.calls.clear()
    model.backwards = 0
    x_T = torch.randn(SHAPE, dtype=DT, generator=torch.Generator().manual_seed(seed))
    eta = 0.5 if sampler == "ddim" else None   # DDIM's η; the other samplers here take none
    return gg.sample(model, SHAPE, schedule=gg.Schedule.linear(1000), sampler=gg.Sampler(sampler, eta=eta, **config),
                     steps=5, guidance=guidance, projection=projection, cond=cond, x_T=x_T,
                     generator=torch.Generator().manual_seed(seed + 1),
                     execution=gg.Execution(graph=graph, batch_branches=batch))


def _terms():
    return {"cfg": lambda: CFG(3.0), "apg": lambda: APG(4.0, eta=0.3, momentum=-0.5, norm_threshold=2.0),
            "rescale": lambda: Rescale(5.0, phi=0.7), "cfg-zero*": lambda: CFGZeroStar(4.0, zero_init_steps=1),
            "cfg++": lambda: CFGPlusPlus(0.6)}


@pytest.mark.parametrize("name", list(_terms()))
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
def test_batched_equals_two_calls(name, sampler):
    model = BatchModel()
    ref = _run(model, _terms()[name](), False, sampler)
    assert model.calls == [B] * 10                  # two calls of batch B per step
    got = _run(model, _terms()[name](), True, sampler)
    assert model.calls == [2 * B] * 5               # one call of batch 2B per step
    assert torch.allclose(got, ref, rtol=0, atol=1e-12), (got - ref).abs().max()
    assert (got - _run(model, _terms()[name](), "auto", sampler)).abs().max() == 0  # auto batches these inputs
    assert model.calls == [2 * B] * 5


@pytest.mark.parametrize("granularity", ["sample", "channel"])
def test_pixelasparam_c_batched(granularity):
    model = BatchModel()
    proj = PixelAsParam("C", delta=0.8, granularity=granularity)
    ref = _run(model, CFG(5.0), False, "ddpm", projection=proj, clip=True)
    got = _run(model, CFG(5.0), True, "ddpm", projection=proj, clip=True)
    assert model.calls == [2 * B] * 5
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_learned_variance_takes_the_conditional_rows():
    model = BatchModel(learned=True)
    ref = _run(model, CFG(2.0), False, "ddpm", variance="learned-range")
    got = _run(model, CFG(2.0), True, "ddpm", variance="learned-range")
    assert model.calls == [2 * B] * 5
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_lookahead_through_both_branches_is_one_backward():
    model = BatchModel()
    grad = torch.randn(SHAPE, dtype=DT, generator=torch.Generator().manual_seed(2))

    def terms():
        return [CFG(3.0), LookAhead(grad, target=torch.tensor([1.0, -1.0, 0.5], dtype=DT), sigma=0.5)]
    ref = _run(model, terms(), False)
    assert model.backwards == 10                    # a backward through each branch's call, per step
    got = _run(model, terms(), True)
    assert model.backwards == 5                     # one backward through the batched call, per step
    assert model.calls == [2 * B] * 5
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert (got - _run(model, CFG(3.0), True)).abs().max() > 1e-3  # the guidance really acts


def test_decoded_lookahead_through_both_branches_is_one_backward():
    model = BatchModel()
    decoder = torch.nn.Conv2d(C, 3, 1).double()

    def terms():
        g = torch.randn(1, 3, H, H, dtype=DT, generator=torch.Generator().manual_seed(3))
        return [Rescale(4.0), DecodedLookAhead(decoder, g, target=1.0, beta=0.5, scaling=0.5)]
    ref = _run(model, terms(), False, "ddpm")
    got = _run(model, terms(), True, "ddpm")
    assert model.backwards == 5 and model.calls == [2 * B] * 5
    # (relative: the batched input's backward sums its two copies in another order than two calls do)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["cfg", "apg", "cfg-zero*"])
def test_graph_stepper_captures_the_batched_call(name):
    model = BatchModel()
    eager = _run(model, _terms()[name](), True)
    cache = GraphCache(emulate=True)
    got = _run(model, _terms()[name](), True, graph=cache)
    assert model.calls and set(model.calls) == {2 * B}   # captured and replayed: the batched call
    assert cache.captures >= 1
    assert torch.allclose(got, eager, rtol=0, atol=1e-12)
    # a second run with new conditioning values reuses the captures: the stacked inputs are reloaded
    cond, uncond = _inputs()
    cond["y"] = torch.tensor([3, 3, 0])
    cond["extra"]["w"] = cond["extra"]["w"] * 2
    before = cache.captures
    term = _terms()[name]()
    term.uncond = uncond
    kw = dict(schedule=gg.Schedule.linear(1000), sampler=gg.Sampler("ddim", eta=0.5), steps=5, guidance=term, cond=cond,
              x_T=torch.randn(SHAPE, dtype=DT, generator=torch.Generator().manual_seed(0)))
    replayed = gg.sample(model, SHAPE, generator=torch.Generator().manual_seed(1),
                         execution=gg.Execution(graph=cache, batch_branches=True), **kw)
    assert cache.captures == before and cache.reuses == 1
    direct = gg.sample(model, SHAPE, generator=torch.Generator().manual_seed(1),
                       execution=gg.Execution(batch_branches=True), **kw)
    assert torch.allclose(replayed, direct, rtol=0, atol=1e-12)
    assert (replayed - got).abs().max() > 1e-3       # the new labels changed the samples


def test_stacking_rules():
    y, z = torch.tensor([1, 2]), torch.tensor([0, 0])
    shared = torch.ones(5)
    out = batch_branch_inputs({"y": z, "l": (z, None), "d": {"k": z}, "s": "a", "n": None, "T": shared},
                              {"y": y, "l": (y, None), "d": {"k": y}, "s": "a", "n": None, "T": shared}, 2)
    assert out["y"].tolist() == [0, 0, 1, 2]            # unconditional rows first, as diffusers
    assert isinstance(out["l"], tuple) and out["l"][0].tolist() == [0, 0, 1, 2] and out["l"][1] is None
    assert out["d"]["k"].tolist() == [0, 0, 1, 2] and out["s"] == "a" and out["n"] is None and out["T"] is shared
    cases = [({"y": y, "s": "a"}, {"y": z, "s": "b"}, r"cond\['s'\]"),
             ({"y": y}, {}, r"only cond has \['y'\]"),
             ({"y": y}, {"y": None}, r"cond\['y'\]: a tensor in one branch"),
             ({"y": y}, {"y": torch.zeros(3, dtype=torch.long)}, r"cond\['y'\]: cond is \(2,\)"),
             ({"l": [y, y]}, {"l": [z]}, r"cond\['l'\]: 2 items"),
             ({"l": [y, 1]}, {"l": [z, 2]}, r"cond\['l'\]\[1\]"),
             ({"T": torch.ones(5)}, {"T": torch.ones(5)}, r"cond\['T'\]: shape \(5,\) has no leading batch")]
    for cond, uncond, match in cases:
        with pytest.raises(BranchInputsError, match=match):
            batch_branch_inputs(uncond, cond, 2)


def test_refusals_and_fallback():
    model = BatchModel()
    cond, uncond = _inputs()
    uncond["mode"] = "plain"
    kw = dict(schedule=gg.Schedule.linear(1000), sampler="ddim", steps=2, cond=cond)
    with pytest.raises(ValueError, match=r"execution.batch_branches=True: CFG's two branches .*cond\['mode'\]"):
        gg.sample(model, SHAPE, guidance=CFG(2.0, uncond=uncond),
                  execution=gg.Execution(batch_branches=True, dtype=DT), **kw)
    with pytest.raises(ValueError, match="execution.batch_branches: expected 'auto', True or False"):
        gg.Execution(batch_branches="yes")
    with pytest.raises(ValueError, match="execution.batch_branches: expected"):
        gg.Execution(batch_branches=1.5)
    kw["execution"] = gg.Execution(dtype=DT)   # "auto"
    # "auto": inputs that do not stack are evaluated by two calls (same output as batch_branches=False)
    model.calls.clear()
    gg.sample(model, SHAPE, guidance=CFG(2.0, uncond=uncond), **kw)
    assert model.calls == [B, B, B, B]
    model.calls.clear()
    gg.sample(model, SHAPE, guidance=CFG(2.0), **kw)   # uncond=None: model(x_t, t) with no inputs
    assert model.calls == [B, B, B, B]


def test_model_output_batch_is_checked():
    cond, uncond = _inputs()

    def bad(x, t, **kw):
        return x[: B]   # ignores the stacked batch
    with pytest.raises(ValueError, match=r"model\(cat\[x_t, x_t\].* returned shape \(3, 2, 4, 4\), expected \(6, 2, 4, 4\)"):
        gg.sample(bad, SHAPE, schedule=gg.Schedule.linear(1000), sampler="ddim", steps=2, cond=cond,
                  execution=gg.Execution(dtype=DT), guidance=CFG(2.0, uncond=uncond))
