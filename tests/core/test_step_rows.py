"""The eager loop's per-step host path (gradguide/sampling.py ``_StepRows``): an eager step reads
its tables' row ``i`` (views) instead of indexing them with the device step index, and makes a
non-contiguous batched model output contiguous once; both give the indexed step's results bit for
bit, and the ops a step dispatches show which path ran."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradguide as gg
from gradguide import sampling
from gradguide.graphs import GraphCache

from helpers import SCHEDULE

B, SHAPE = 2, (2, 3, 8, 8)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def permuted_model(x, t, y=None):
    """A model whose output is channel-major (batch inner), like an einsum's: not contiguous."""
    w = torch.linspace(0.5, 1.0, x.shape[1], dtype=x.dtype)
    bias = 0.1 if y is None else 0.1 + 0.01 * y.to(x.dtype).view(1, -1, 1, 1)
    h = torch.tanh(x).transpose(0, 1).contiguous()   # [C, B, H, W] in memory
    out = h * w.view(-1, 1, 1, 1) + bias * t.to(x.dtype).view(1, -1, 1, 1) / 1000
    return out.transpose(0, 1)   # [B, C, H, W] with strides (HW, B·HW, W, 1)


def _run(guidance, sampler="ddim", **execution):
    return sampling.prepare_run(permuted_model, SHAPE, schedule=SCHEDULE, sampler=sampler, steps=6, guidance=guidance,
                                cond={"y": torch.arange(B)}, execution=gg.Execution(**execution))


@pytest.mark.parametrize("guidance", [(), gg.CFG(3.0, uncond={"y": torch.zeros(B, dtype=torch.long)})],
                         ids=["unguided", "cfg-batched"])
@pytest.mark.parametrize("fused", [True, False])
def test_eager_rows_equal_the_indexed_step_bit_for_bit(guidance, fused):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    indexed, eager = _run(guidance, fused=fused), _run(guidance, fused=fused)
    sampling._stepper(eager, False)   # the eager stepper gives its run the per-step rows
    assert indexed.step_rows is None and eager.step_rows is not None
    assert (eager.plan is not None) == fused
    for i in range(len(indexed.tables.timesteps)):
        noise = torch.randn(SHAPE, generator=g) if indexed.tables.draws_noise[i] else None
        a, _, _ = sampling.step(indexed, x, i, indexed.step_ids[i:i + 1], {}, noise, False)
        b, _, _ = sampling.step(eager, x, i, None, {}, noise, False)
        assert torch.equal(a, b), i


def test_an_eager_fused_step_indexes_and_copies_nothing_per_step():
    cfg = gg.CFG(3.0, uncond={"y": torch.zeros(B, dtype=torch.long)})
    indexed, eager = _run(cfg), _run(cfg)
    sampling._stepper(eager, False)
    assert eager.batched is not None and eager.plan is not None
    x = torch.randn(SHAPE)
    counts = {}
    for name, run, idx in (("indexed", indexed, indexed.step_ids[2:3]), ("eager", eager, None)):
        with Ops() as ops:
            sampling.step(run, x, 2, idx, {}, None, False)
        counts[name] = ops.count
    # the indexed step: a column and the timesteps by index_select, cat of t for the 2B call; the
    # eager step: views of its rows. Both stack x for the 2B call in one copy and copy the
    # non-contiguous 2B output once (not per branch)
    assert counts["indexed"]["index_select"] == 2 and counts["eager"]["index_select"] == 0
    assert counts["indexed"]["cat"] == 1 and counts["eager"]["cat"] == 0          # only cat([t, t])
    with Ops() as model_ops:   # the model's own copies
        permuted_model(torch.cat([x, x]), torch.ones(2 * B), torch.arange(2 * B))
    assert counts["indexed"]["clone"] - model_ops.count["clone"] == 2
    assert counts["eager"]["clone"] - model_ops.count["clone"] == 2
    assert counts["eager"]["detach"] == 0 and counts["eager"]["fused_combine"] == 1


def test_sample_is_unchanged_by_the_eager_rows_and_the_model_gets_the_same_timesteps():
    seen = []

    def model(x, t, y=None):
        seen.append(t.clone())
        return permuted_model(x, t, y)
    cfg = gg.CFG(3.0, uncond={"y": torch.zeros(B, dtype=torch.long)})
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kw = dict(schedule=SCHEDULE, sampler="ddim", steps=6, guidance=cfg, cond={"y": torch.arange(B)}, x_T=x_T)
    eager = gg.sample(model, SHAPE, **kw)
    eager_t, seen[:] = list(seen), []
    graphed = gg.sample(model, SHAPE, execution=gg.Execution(graph=GraphCache(emulate=True)), **kw)  # idx path
    assert torch.equal(eager, graphed)
    # each step's 2B call: [t] * 2B, contiguous, as cat([t, t]); the same values as the indexed path
    assert all(t.shape == (2 * B,) and t.is_contiguous() for t in eager_t)
    assert all(torch.equal(a, b) for a, b in zip(eager_t, seen[-len(eager_t):]))


def test_the_test_model_output_is_not_contiguous():
    out = permuted_model(torch.randn(4, 3, 8, 8), torch.ones(4), torch.arange(4))
    assert not out.is_contiguous() and not out[2:].is_contiguous()
