"""The CPU suites that back figures the README quotes: ``gradguide bench --suite precision`` and
``--suite native-bandwidth`` (quick configurations)."""
import json

import pytest
import torch

from gradguide import cli, ops, sampling
from gradguide.bench import native_bandwidth, precision


def test_precision_quick_case_within_tolerance_and_noise_restored():
    draw = sampling._noise
    result = precision.run(["reference"], quick=True)
    assert sampling._noise is draw   # the suite's float64 noise is undone after each run
    [row] = result["rows"]
    assert row["backend"] == "reference" and row["case"].startswith("classifier + B, eta 0")
    # like with like within the tests' 1e-4, and above zero (the two runs really differ in dtype)
    assert 0 < row["like"] < 1e-4
    assert 0 < row["floor"] < 1e-3


def test_precision_cases_are_the_pinned_ones():
    names = [name for name, _, _ in precision.cases()]
    assert len(names) == 2 + len(precision.HYPOTHESIS_DRAWS) + 2
    for _, _, kw in precision.cases():
        # every case has a projection or a two-branch guider: the inner products the fix is about
        assert kw.get("projection") is not None or kw["guidance"]


def test_precision_cli_writes_its_report(tmp_path):
    assert cli.main(["bench", "--suite", "precision", "--quick", "--backends", "reference", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    [md] = list(tmp_path.glob("precision-cpu-*-quick.md"))
    [js] = list(tmp_path.glob("precision-cpu-*-quick.json"))
    assert "gradguide bench --suite precision --quick" in md.read_text()
    assert len(json.loads(js.read_text())["rows"]) == 1


@pytest.mark.skipif(ops.available_backends("cpu")["native"] is not True, reason="native extension not built")
def test_native_bandwidth_quick(tmp_path):
    torch_threads = torch.get_num_threads()
    try:
        assert cli.main(["bench", "--suite", "native-bandwidth", "--quick", "--threads", "1", "--reps", "1",
                         "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    [js] = list(tmp_path.glob("native-bandwidth-cpu-*-quick.json"))
    data = json.loads(js.read_text())
    [res] = data["results"]
    assert res["size"] == "SD latent B=1"
    rows = {r["pass"]: r for r in res["rows"]}
    assert rows["copy_ (existing dst)"]["copy_fraction"] == pytest.approx(1.0)
    assert 0 < rows["reduce+combine"]["copy_fraction"] and res["speedup_vs_eager"] > 0


def test_native_bandwidth_refuses_unknown_sizes(tmp_path):
    with pytest.raises(SystemExit, match="--sizes"):
        cli.main(["bench", "--suite", "native-bandwidth", "--sizes", "huge", "--out", str(tmp_path)])
    assert set(native_bandwidth.SIZES) == {"adm256-b64", "sd-b1"}


def test_precision_suite_runs_the_cases_the_tests_hold():
    # the suite defines its cases itself (the package cannot import tests/); they must stay the
    # tests' cases: same model, classifier and settings give the same samples
    import importlib.util
    from pathlib import Path
    import gradguide as gg
    # the core tests' module, by its path (this file may run without tests/core on sys.path)
    spec = importlib.util.spec_from_file_location("core_test_precision",
                                                  Path(__file__).resolve().parents[1] / "core" / "test_precision.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    for seed, eta, scale in [(0, 0.0, 1.5)] + precision.HYPOTHESIS_DRAWS[:1]:
        ours, theirs = precision.classifier_case(eta, seed, scale), tp.issue_case(eta, seed, scale)
        theirs.pop("fused")
        x_T = torch.randn(precision.SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        a, b = (gg.sample(x_T=x_T, generator=torch.Generator().manual_seed(seed + 1), **kw) for kw in (ours, theirs))
        assert torch.equal(a, b)
