"""The reproduction tooling: `gradguide optimize` fine-tuning options, `gradguide train-sim` network
size options, the resumable run queue (gradguide.bench.reproduce_runs) and its report."""
import json
import os
import subprocess
import sys
import time

import pytest

from gradguide.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    from gradguide.experiments.nets import count_parameters
    from gradguide.experiments.simulation import load_small
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


def _tiny_run(name):
    return {"name": name, "args": ["optimize", "--objective", "f2-b1", "--algorithm", "1", "--guidance", "G",
                                   "--rounds", "2", "--steps", "3", "--no-progress"]}


def test_queue_runs_extra_runs_records_time_and_skips_them_next_time(tmp_path):
    from gradguide.bench import reproduce_runs as rr
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([_tiny_run("tiny_a"), dict(_tiny_run("tiny_b"), after="tiny_a")]))
    argv = ["--out", str(tmp_path), "--extra", str(extra), "--only", "tiny_*", "--nice", "0"]
    assert rr.main(argv) == 0
    for name in ("tiny_a", "tiny_b"):
        rec = json.loads((tmp_path / f"{name}.time.json").read_text())
        assert rec["returncode"] == 0 and rec["wall_s"] > 0 and rec["user_s"] > 0
        run = json.loads((tmp_path / f"{name}.json").read_text())["runs"][0]
        assert run["rounds"] == 2 and len(run["log"]) == 3
    first = (tmp_path / "tiny_a.json").stat().st_mtime
    assert rr.main(argv) == 0  # both done: nothing runs again
    assert (tmp_path / "tiny_a.json").stat().st_mtime == first


def test_queue_adopts_a_live_run_of_an_earlier_queue(tmp_path, monkeypatch):
    from gradguide.bench import reproduce_runs as rr
    monkeypatch.setattr(rr, "POLL_S", 0.2)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([_tiny_run("tiny_c")]))
    out = tmp_path / "tiny_c.json"
    # an "earlier queue's" run: a process naming the run that stays alive until the queue has
    # adopted it (the first CPU reading releases it; no timing assumption on a loaded machine),
    # then writes a complete JSON and exits
    release = tmp_path / "release"
    code = ("import json, os, time\n"
            "deadline = time.time() + 120\n"
            f"while not os.path.exists({str(release)!r}) and time.time() < deadline: time.sleep(0.05)\n"
            "json.dump({'runs': [{'rounds': 2, 'log': [{'round': 2}]}]}, "
            f"open({str(out)!r}, 'w'))  # tiny_c")
    real_cpu = rr._proc_cpu

    def cpu_then_release(pid):
        value = real_cpu(pid)
        release.touch()
        return value

    monkeypatch.setattr(rr, "_proc_cpu", cpu_then_release)
    proc = subprocess.Popen([sys.executable, "-c", code])
    (tmp_path / "tiny_c.pid").write_text(json.dumps({"pid": proc.pid, "start": 0.0, "command": "x"}))
    # the stand-in is visible as alive before the queue starts (the queue's own check)
    deadline = time.time() + 30
    while rr._alive(str(tmp_path), "tiny_c") is None and time.time() < deadline:
        time.sleep(0.1)
    try:
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()[-80:]
    except OSError as exc:
        cmdline = repr(exc)
    assert rr._alive(str(tmp_path), "tiny_c") is not None, (proc.poll(), cmdline)
    try:
        assert rr.main(["--out", str(tmp_path), "--extra", str(extra), "--only", "tiny_*"]) == 0
    finally:
        proc.wait(timeout=180)
    rec = json.loads((tmp_path / "tiny_c.time.json").read_text())
    assert rec["returncode"] == 0 and "adopted" in rec["cpu_note"]
    # adopted, not run again: the JSON is still the stand-in's
    assert json.loads(out.read_text())["runs"][0]["log"] == [{"round": 2}]


def test_optimize_ft_rounds_stops_fine_tuning(tmp_path):
    run = _optimize(tmp_path, "--ft-rounds", "1")
    assert run["settings"]["ft_rounds"] == 1
    assert [r["finetuned"] for r in run["log"]] == [False, False, True, False]


def test_report_tables_from_the_committed_logs(tmp_path):
    from gradguide.bench import reproduce_report as rep
    runs, partial = rep.load_runs([os.path.join(REPO, p) for p in rep.DEFAULT_INPUTS])
    alg2 = {(r["guidance"], r["seed"]) for r in runs if r["algorithm"] == 2 and r["variant"] == "paper"
            and r["objective"] == "f1-theta2"}
    assert {("G", 1234), ("G_loss", 1234), ("G", 2345), ("G_loss", 2345)} <= alg2
    md = tmp_path / "t.md"
    assert rep.main([os.path.join(REPO, p) for p in rep.DEFAULT_INPUTS] + ["--md", str(md),
                                                                           "--figures", str(tmp_path)]) == 0
    text = md.read_text()
    assert "Algorithm 2, r_off ratio G_loss / G along the run" in text and "| 1234 |" in text
    assert (tmp_path / "repro_roff_ratio.png").stat().st_size > 10_000


def test_report_variant_names_what_differs_from_the_paper():
    from gradguide.bench.reproduce_report import variant_of
    base = {"algorithm": 2, "guidance": "G_loss", "objective": "f1-theta2", "rounds": 1200, "model": "small",
            "settings": {"ft_lr": 1e-5, "finetune": "per-round", "k_ft": 60, "delta": 0.2, "ft_rounds": None}}
    assert variant_of(base) == "paper"
    assert variant_of(dict(base, settings=dict(base["settings"], ft_lr=1e-6))) == "ft-lr 1e-06"
    assert variant_of(dict(base, settings=dict(base["settings"], ft_rounds=540))) == \
        "fine-tuning stops at round 600"
    assert variant_of(dict(base, weights="/x/sim_h256_d4.safetensors")) == "net sim_h256_d4"
