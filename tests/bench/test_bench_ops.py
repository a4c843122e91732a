"""``gradguide bench --suite ops --quick`` writes valid JSON and markdown."""
import json

import pytest

from gradguide import cli, ops


def test_bench_ops_quick_writes_json(tmp_path, capsys):
    backends = "reference,native" if ops.available_backends("cpu")["native"] is True else "reference"
    assert cli.main(["bench", "--suite", "ops", "--quick", "--out", str(tmp_path), "--backends", backends,
                     "--threads", "2"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["suite"] == "ops" and data["quick"] and data["copy_bandwidth_gb_per_s"] > 0
    assert data["versions"]["torch"] and data["device"] and data["commit"]
    workloads = {r["workload"] for r in data["rows"]}
    assert workloads == {"reduce+combine", "cfg", "pxp-a", "pxp-b", "pxp-c", "apg", "lookahead"}
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["bytes_moved"] > 0 and row["gb_per_s"] > 0
        assert row["speedup_vs_eager"] > 0
        assert row["backend"] in backends.split(",")
    assert "| workload |" in (tmp_path / files[1]).read_text()


def test_bench_rejects_unknown_backend(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        cli.main(["bench", "--quick", "--out", str(tmp_path), "--backends", "reference,gpu-magic"])
