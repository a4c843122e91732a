"""Fuzz suite (no silent wrong result): every public op, the registered ops called directly, ``project``,
``off_support_ratio`` and ``sample`` on every available backend, valid and deliberately broken calls, classified by
:mod:`gradguide.bench.fuzz` as correct (agrees with float64) or a clean error (TypeError /
ValueError naming the argument at fault); anything else fails the test.

- CI mode (default): a few hundred derandomized cases, in this process, well under 60 s.
- Slow mode: ``GRADGUIDE_FUZZ_SLOW=1`` (≥ 10,000 cases; each in a spawned worker process, so
  a crashing native op or a hang is caught and counted instead of killing the session).
  ``GRADGUIDE_FUZZ_REPORT=path.json`` writes the counts per target and outcome.
"""
import json
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradguide import ops
from gradguide.bench import fuzz
from gradguide.samplers import SAMPLERS

# the samplers a plain Schedule runs for a step count (dpm_fast takes sigmas=[max, min] and nfe; SA-Solver its
# noise window sde_sigmas; the flow samplers a FlowSchedule and a velocity model: each has its own tests). The
# diffusers variants pndm, ipndm_diffusers and sa_solver_diffusers go through this oracle case by case in
# tests/core/test_convergence_pndm_sasolver.py (pndm needs 4 steps, these cases draw 1 to 6); a longer list
# would also re-deal CI's derandomized draws of the others
DIFFUSERS_VARIANTS = ("pndm", "ipndm_diffusers", "sa_solver_diffusers")
STEP_SAMPLERS = [s for s in SAMPLERS if s not in ("dpm_fast", "sa_solver", "sa_solver_pece") + DIFFUSERS_VARIANTS
                 and not s.startswith("flow-")]

SLOW = os.environ.get("GRADGUIDE_FUZZ_SLOW", "") not in ("", "0")
# cases per target: CI mode | slow mode (the slow total is 11,000)
EXAMPLES = {"reduce": (100, 1600), "combine": (150, 3000), "fused_combine": (100, 2000), "raw_op": (40, 600),
            "project": (60, 1300), "off_support_ratio": (60, 1000), "sample": (40, 1500)}
BACKENDS = [name for name, ok in ops.available_backends("cpu").items() if ok is True]
# the Triton interpreter costs ~0.1-1 s a call on CPU: a few cases in CI, a share in slow mode
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
COUNTS = {}
BY_BACKEND = {}
RUNNER = fuzz.IsolatedRunner(timeout=120.0) if SLOW else None


def _settings(target):
    return settings(max_examples=EXAMPLES[target][1 if SLOW else 0], derandomize=True, deadline=None,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True)


def _run(spec):
    outcome, detail = RUNNER(spec) if RUNNER is not None else fuzz.run_case(spec)
    fuzz.tally(COUNTS, spec["target"], outcome)
    fuzz.tally(BY_BACKEND, spec.get("backend", "-"), outcome)
    assert outcome in fuzz.OK, f"{outcome}: {detail}\nspec = {spec!r}"


def _backend(draw, allow_triton=True):
    pool = BACKENDS if (allow_triton and (SLOW or draw(st.integers(0, 9)) == 0)) else FAST_BACKENDS
    return draw(st.sampled_from(pool))


DTYPE_NAMES = st.sampled_from(["float32", "float32", "float64", "float16", "bfloat16"])
VALUES = st.sampled_from(["normal", "normal", "normal", "large", "tiny", "zeros", "nonfinite"])
VALID = "none"


@st.composite
def _op_base(draw, target):
    backend = _backend(draw)
    small = backend == "triton"
    b = draw(st.integers(1, 3 if small else 5))
    feat = draw(st.sampled_from([(1,), (7,), (16,), (3, 5), (2, 3, 4), (1023,)] if not small else
                                [(1,), (7,), (3, 5)]))
    per = 1
    for f in feat:
        per *= f
    groups = draw(st.sampled_from([g for g in (1, 1, 2, 3, 5) if per % g == 0]))
    return dict(target=target, backend=backend, seed=draw(st.integers(0, 2 ** 31 - 1)), dtype=draw(DTYPE_NAMES),
                b=b, feat=feat, k=draw(st.integers(1, 8)), groups=groups, values=draw(VALUES),
                noncontig=draw(st.booleans()))


OPERAND_MUTATIONS = list(fuzz.OPERAND_MUTATIONS) + ["too_many", "backend_bad"]


def _mutation(draw, choices):
    return VALID if draw(st.integers(0, 9)) < 6 else draw(st.sampled_from(choices))


@st.composite
def reduce_cases(draw):
    spec = draw(_op_base("reduce"))
    spec["mutation"] = _mutation(draw, OPERAND_MUTATIONS + ["groups_bad", "groups_nondivisor"])
    if spec["mutation"] == "groups_nondivisor" and spec["feat"] in ((1,),):
        spec["mutation"] = VALID
    return spec


CLAMPS = ["none", "none", "both", "low", "high", "inf", "ints"]
BAD_CLAMPS = ["nan_low", "nan_high", "short", "scalar", "str", "str_pair", "inverted", "tensor"]
OUTS = ["none", "none", "fresh", "noncontig", "alias", "partial"]
BAD_OUTS = ["expanded", "wrong_dtype", "wrong_shape", "not_tensor"]


def _clamp_and_out(draw, spec, mutation):
    spec["clamp"] = draw(st.sampled_from(BAD_CLAMPS)) if mutation == "clamp_bad" else draw(st.sampled_from(CLAMPS))
    lo = draw(st.floats(-3, 1, allow_nan=False))
    spec["bounds"] = (lo, lo + draw(st.floats(0, 3, allow_nan=False)))
    spec["out"] = draw(st.sampled_from(BAD_OUTS)) if mutation == "out_bad" else draw(st.sampled_from(OUTS))
    if mutation in ("clamp_bad", "out_bad"):
        spec["mutation"] = VALID   # the bad clamp/out carries the expected argument itself
    if spec["out"] == "expanded" and spec["b"] * spec["feat"][-1] == spec["b"] and len(spec["feat"]) == 1 \
            and spec["feat"][0] == 1:
        spec["out"] = "wrong_shape"   # [B, 1] expanded from [B, 1] is not an expansion


@st.composite
def combine_cases(draw):
    spec = draw(_op_base("combine"))
    mutation = _mutation(draw, OPERAND_MUTATIONS + ["coef_float", "coef_list", "coef_int", "coef_complex",
                                                    "coef_shape", "coef_meta", "clamp_bad", "out_bad"])
    spec["mutation"] = mutation
    spec["coef3"] = draw(st.booleans())
    spec["coef_dtype"] = draw(st.sampled_from(["float32", "float64", spec["dtype"]]))
    spec["coef_scale"] = draw(st.sampled_from([1.0, 1.0, 0.0, 1e-3, 50.0]))
    _clamp_and_out(draw, spec, mutation)
    return spec


@st.composite
def fused_cases(draw):
    spec = draw(_op_base("fused_combine"))
    spec["feat"] = (spec["feat"][0] * (spec["feat"][1] if len(spec["feat"]) > 1 else 1),)
    spec["groups"] = 1
    spec["values"] = draw(st.sampled_from(["normal", "normal", "large", "tiny", "nonfinite"]))
    spec["k"] = draw(st.integers(2, 8))
    spec["policy"] = draw(st.sampled_from(["cfg", "pxp-a", "pxp-b", "pxp-c", "apg", "lookahead", "tcfg", "mambo"]))
    spec["give_gram"] = draw(st.booleans())
    # a valid call with a NaN/inf in one sample's coefficient vector, scalar or given Gram matrix
    spec["poison"] = draw(st.sampled_from(["none", "none", "none", "vector", "scalar", "gram"]))
    mutation = _mutation(draw, list(fuzz.OPERAND_MUTATIONS) + ["policy_bad", "vector_missing", "vector_complex",
                                                               "vector_shape", "scalar_bad", "unexpected_param",
                                                               "gram_bad", "backend_bad", "clamp_bad", "out_bad"])
    spec["mutation"] = mutation
    _clamp_and_out(draw, spec, mutation)
    return spec


@st.composite
def raw_cases(draw):
    """A registered op (native or Triton) called directly, past gradguide.ops' checks."""
    backend = draw(st.sampled_from([b for b in BACKENDS if b in ("native", "triton")] or ["native"]))
    small = backend == "triton"
    return dict(target="raw_op", backend=backend, seed=draw(st.integers(0, 2 ** 31 - 1)), dtype=draw(DTYPE_NAMES),
                b=draw(st.integers(1, 3 if small else 4)), feat=draw(st.sampled_from([(1,), (7,), (3, 5)] if small
                                                                                     else [(1,), (7,), (3, 5), (257,)])),
                k=draw(st.integers(1, 8)), values=draw(st.sampled_from(["normal", "large"])),
                op=draw(st.sampled_from(["reduce", "combine", "fused_combine", "clip_shift"])),
                mutation=VALID if draw(st.integers(0, 9)) < 3 else draw(st.sampled_from(fuzz.RAW_MUTATIONS)))


@st.composite
def project_cases(draw):
    backend = _backend(draw)
    feat = draw(st.sampled_from([(6,), (2, 5), (3, 4, 2), (1, 1)] if backend == "triton" else
                                [(6,), (2, 5), (3, 4, 2), (1, 1), (4, 257)]))
    return dict(target="project", backend=backend, seed=draw(st.integers(0, 2 ** 31 - 1)), dtype=draw(DTYPE_NAMES),
                b=draw(st.integers(1, 4)), feat=feat, values=draw(st.sampled_from(["normal", "large", "zeros",
                                                                                   "nonfinite"])),
                relation=draw(st.sampled_from(["random", "zero", "opposite", "same"])),
                noncontig=draw(st.booleans()), delta=draw(st.sampled_from([1.0, 0.5, 0.0, 2.0])),
                granularity=draw(st.sampled_from(["sample", "channel"])), grad=draw(st.booleans()),
                mutation=_mutation(draw, ["a_not_tensor", "b_shape", "a_int", "delta_nan", "granularity_bad",
                                          "backend_bad", "a_1d"]))


@st.composite
def off_support_cases(draw):
    return dict(target="off_support_ratio", seed=draw(st.integers(0, 2 ** 31 - 1)), dtype=draw(DTYPE_NAMES),
                basis_dtype=draw(DTYPE_NAMES), b=draw(st.integers(1, 5)),
                feat=draw(st.sampled_from([(1,), (4,), (16,), (2, 8), (64,)])), d=draw(st.integers(1, 16)),
                values=draw(st.sampled_from(["normal", "large", "tiny", "zeros", "nonfinite"])),
                relation=draw(st.sampled_from(["random", "random", "off_only", "zero_row"])),
                mutation=_mutation(draw, ["x_0d", "x_empty", "x_int", "x_complex", "x_not_tensor", "basis_shape",
                                          "basis_int", "basis_empty", "basis_not_tensor"]))


@st.composite
def sample_cases(draw):
    model = draw(st.sampled_from(["mixture", "toy"]))
    guidance = draw(st.sampled_from(["none", "cfg", "classifier", "apg", "cfg-zero*", "rescale"]))
    projection = None
    if guidance == "classifier":
        projection = draw(st.sampled_from([None, "A", "B"]))
    elif guidance == "cfg":
        projection = draw(st.sampled_from([None, "C"]))
    sampler = draw(st.sampled_from(STEP_SAMPLERS))
    if guidance == "classifier" and sampler != "ddpm" and projection == "B":
        projection = "A"
    return dict(target="sample", backend=_backend(draw, allow_triton=False), seed=draw(st.integers(0, 2 ** 20)),
                dtype=draw(st.sampled_from(["float32", "float32", "float64", "float16", "bfloat16"])),
                b=draw(st.integers(1, 4)), model=model, T=draw(st.sampled_from([50, 100, 1000])),
                sampler=sampler, steps=draw(st.integers(1, 6)), eta=draw(st.sampled_from([0.0, 0.5, 1.0])),
                guidance=guidance, scale=draw(st.sampled_from([1.0, 2.0, 5.0, 0.5])) if guidance != "rescale" else 3.0,
                projection=projection,
                granularity=draw(st.sampled_from(["sample", "channel"])) if model == "toy" else "sample",
                clip=draw(st.sampled_from(["none", "none", "true", "range"])),
                mutation=_mutation(draw, ["sampler_bad", "steps_bad", "guidance_int", "clip_bad", "cond_batch",
                                          "x_T_nan", "dtype_int", "device_bad", "scale_inf", "model_int",
                                          "model_complex", "model_shape", "model_meta", "schedule_bad", "shape_bad",
                                          "backend_bad", "generator_bad", "check_finite_bad", "scale_huge"]))


@_settings("reduce")
@given(reduce_cases())
def test_fuzz_reduce(spec):
    _run(spec)


@_settings("combine")
@given(combine_cases())
def test_fuzz_combine(spec):
    _run(spec)


@_settings("fused_combine")
@given(fused_cases())
def test_fuzz_fused_combine(spec):
    _run(spec)


@pytest.mark.skipif(not any(b in BACKENDS for b in ("native", "triton")), reason="no native or Triton ops here")
@_settings("raw_op")
@given(raw_cases())
def test_fuzz_raw_op(spec):
    _run(spec)


@_settings("project")
@given(project_cases())
def test_fuzz_project(spec):
    _run(spec)


@_settings("off_support_ratio")
@given(off_support_cases())
def test_fuzz_off_support_ratio(spec):
    _run(spec)


@_settings("sample")
@given(sample_cases())
def test_fuzz_sample(spec):
    _run(spec)


def test_fuzz_harness_detects_failures(monkeypatch):
    """The classifier is not vacuous: a wrong kernel, a NaN, an unnamed error and an accepted
    bad input are each caught."""
    spec = dict(target="combine", backend="reference", seed=3, dtype="float32", b=2, feat=(7,), k=2, groups=1,
                values="normal", noncontig=False, mutation="none", coef3=False, coef_dtype="float32", coef_scale=1.0,
                clamp="none", bounds=(-1.0, 1.0), out="none")
    assert fuzz.run_case(spec) == ("correct", "")
    real = ops.combine
    monkeypatch.setattr(ops, "combine", lambda *a, **k: real(*a, **k) * 1.001)
    assert fuzz.run_case(spec)[0] == "wrong"
    monkeypatch.setattr(ops, "combine", lambda *a, **k: real(*a, **k) * float("nan"))
    assert fuzz.run_case(spec)[0] == "nan"
    monkeypatch.setattr(ops, "combine", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad input")))
    assert fuzz.run_case(dict(spec, mutation="coef_complex"))[0] == "unclean_error"
    monkeypatch.setattr(ops, "combine", real)
    monkeypatch.setattr(ops, "check_clamp", lambda clamp, name="clamp": clamp)   # the NaN rule removed
    assert fuzz.run_case(dict(spec, clamp="nan_low"))[0] in ("wrong", "unclean_error")
    assert fuzz.names_argument("operands[2]: expected", ["operands"])
    assert not fuzz.names_argument("the operands are bad", ["operands"])


@pytest.mark.skipif(not SLOW, reason="slow mode only (GRADGUIDE_FUZZ_SLOW=1)")
def test_isolated_runner_catches_crash_and_hang():
    runner = fuzz.IsolatedRunner(timeout=20.0)
    try:
        assert runner(dict(target="_crash"))[0] == "crash"
        assert runner(dict(target="_hang"))[0] == "hang"
    finally:
        runner.close()


def test_zz_report():
    """Last in this file: the counts (printed; written to GRADGUIDE_FUZZ_REPORT when set)."""
    total = sum(sum(c.values()) for c in COUNTS.values())
    report = {"mode": "slow" if SLOW else "ci", "backends": BACKENDS, "total": total, "counts": COUNTS,
              "by_backend": BY_BACKEND, "isolated": RUNNER is not None,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(json.dumps(report, indent=1))
    path = os.environ.get("GRADGUIDE_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    if RUNNER is not None:
        RUNNER.close()
    bad = {t: {o: n for o, n in c.items() if o not in fuzz.OK} for t, c in COUNTS.items()}
    assert not any(bad.values()), bad
