"""The mixture demo and `gradguide info` run from the command line."""
import json

import pytest

from gradguide.cli import main


def test_mixture_demo_writes_table_plot_and_json(tmp_path, capsys):
    plot, out = tmp_path / "demo.png", tmp_path / "demo.json"
    assert main(["demo", "--example", "mixture", "--n", "300", "--steps", "50", "--plot", str(plot),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "classifier s=1" in text and "CFG w=3 + PxP-C" in text
    rows = json.loads(out.read_text())["rows"]
    by = {r["method"]: r for r in rows}
    # guidance raises the target class's share well above its mixture weight 0.2
    assert by["unguided"]["class_share"] < 0.35
    assert by["classifier s=1"]["class_share"] > 0.9 and by["CFG w=3"]["class_share"] > 0.9
    assert plot.stat().st_size > 10_000


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    assert "backend reference" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        main(["fly"])
