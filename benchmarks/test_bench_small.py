"""pytest-benchmark suites of whole guided passes at small sizes (the quick configurations of
``gradguide/bench/loop.py``): each workload in each variant, so ``--benchmark-compare`` tracks the loop
across commits. Not part of the test run (``testpaths = ["tests"]``); run with

    python -m pytest benchmarks/test_bench_small.py              # CPU: eager, fused, fused+graph
    python -m pytest benchmarks/test_bench_small.py --benchmark-json out.json

On CUDA the timed function ends with a synchronize (docs/architecture.md#benchmarks-and-results: GPU times are medians of
synchronised passes) and ``fused+graph`` replays captured steps after the warm-up round.
"""
import pytest
import torch

from gradguide.bench import loop as bench_loop

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOADS = ["sim-lookahead", "sim-unguided", "sd-cfg-lookahead", "adm64-cls-pxpA", "loop-cfg-pxpC", "loop-lookahead"]
VARIANTS = ["eager", "fused", "fused+graph"]

_BUILT = {}


def _workload(name):
    if name not in _BUILT:
        _BUILT[name] = bench_loop.build_workload(name, quick=True, device=DEVICE)
    return _BUILT[name]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", WORKLOADS)
def test_pass(benchmark, name, variant):
    w = _workload(name)
    one_pass = bench_loop.make_pass(w, variant)

    def run():
        out = one_pass()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    benchmark.group = name
    benchmark.extra_info.update(variant=variant, steps=w.steps, batch=w.batch, device=str(DEVICE))
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == w.shape and torch.isfinite(out).all()
