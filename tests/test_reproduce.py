"""The reproduction tooling: `gradguide optimize` fine-tuning options, `gradguide train-sim` network
size options, the resumable run queue (gradguide.bench.reproduce_runs) and its report."""
import json
import os
import subprocess
import sys

import pytest

from gradguide.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _optimize(tmp_path, *extra):
    path = tmp_path / "run.json"
    code = cli_main(["optimize", "--algorithm", "2", "--guidance", "G_loss", "--rounds", "3", "--steps", "4",
                     "--k-ft", "1", "--no-progress", "--json", str(path), *extra])
    assert code == 0
    return json.loads(path.read_text())["runs"][0]


def test_optimize_history_options_reach_the_run(tmp_path):
    run = _optimize(tmp_path, "--finetune", "history", "--history", "2", "--history-decay", "0.5", "--ft-steps", "2")
    s = run["settings"]
    assert (s["finetune"], s["history"], s["history_decay"], s["ft_steps"]) == ("history", 2, 0.5, 2)
    # k_ft = 1: fine-tuned on z_1 before drawing z_2 (and on z_2 before z_3)
    assert [r["finetuned"] for r in run["log"]] == [False, False, True, True]
    assert run["weights"] is None


@pytest.mark.parametrize("flag", ["--history", "--ft-steps"])
def test_optimize_rejects_non_positive_counts(tmp_path, flag):
    with pytest.raises(SystemExit, match=flag):
        cli_main(["optimize", "--algorithm", "2", "--rounds", "1", flag, "0", "--no-progress"])


def test_train_sim_width_and_depth_round_trip(tmp_path):
    from gradguide.nets import count_parameters
    from gradguide.simulation import load_small
    out = tmp_path / "w.safetensors"
    assert cli_main(["train-sim", "--hidden", "24", "--depth", "2", "--epochs", "1", "--no-progress",
                     "--out", str(out)]) == 0
    net = load_small(str(out))
    assert (net.hidden, net.depth) == (24, 2)
    # inp (64 + 32 emb -> 24), one hidden 24 -> 24, out 24 -> 64
    assert count_parameters(net) == (96 * 24 + 24) + (24 * 24 + 24) + (24 * 64 + 64)
    with pytest.raises(SystemExit, match="--hidden"):
        cli_main(["train-sim", "--hidden", "0", "--out", str(out)])


def test_queue_lists_runs_and_skips_finished_ones(tmp_path):
    from gradguide.bench import reproduce_runs as rr
    names = [r.name for r in rr.runs()]
    assert len(names) == len(set(names))
    for r in rr.runs():  # dependencies point at earlier runs
        assert r.after is None or names.index(r.after) < names.index(r.name)
    first = names[0]
    (tmp_path / f"{first}.time.json").write_text(json.dumps({"returncode": 0}))
    (tmp_path / f"{names[1]}.time.json").write_text(json.dumps({"returncode": 1}))  # failed: run again
    out = subprocess.run([sys.executable, "-m", "gradguide.bench.reproduce_runs", "--out", str(tmp_path), "--list"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.splitlines()
    state = {line.split()[1]: line.split()[0] for line in out}
    assert state[first] == "done" and state[names[1]] == "pending"
    assert sum(v == "done" for v in state.values()) == 1
