"""What the command line writes, and where: never into the installed package, never over an
existing file without --force (refused before the work starts), one line for a missing optional
dependency, benchmark rows flagged when their repeats spread, no progress bars into a non-terminal."""
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradguide
from gradguide import cli
from gradguide.bench import meta
from gradguide.bench import ops as bench_ops
from gradguide.tools import outputs

PACKAGE = os.path.dirname(os.path.abspath(gradguide.__file__))
ROOT = os.path.dirname(PACKAGE)


def snapshot(folder=PACKAGE):
    """Every file under ``folder`` (bytecode caches left out: the interpreter writes those on
    import, not the command line): size, mtime and SHA-256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def fake_bench(monkeypatch, times_by_backend):
    """``bench --suite ops`` with synthetic timings: no kernel runs; ``_times`` returns the given
    milliseconds for each backend (and the copy), and the whole-step rows are left out."""
    def step_fn(workload, backend, operands, device):
        fn = lambda: None  # noqa: E731
        fn.backend = backend
        return fn

    def times(fn, device, reps, warmup):
        return list(times_by_backend.get(getattr(fn, "backend", "copy"), [1.0, 1.0, 1.0]))
    monkeypatch.setattr(bench_ops, "_step_fn", step_fn)
    monkeypatch.setattr(bench_ops, "_times", times)
    monkeypatch.setattr(bench_ops, "step_rows", lambda *a, **k: [])
    real = bench_ops.ops.available_backends
    monkeypatch.setattr(bench_ops.ops, "available_backends",
                        lambda dev=None: dict(real(dev), native=True))   # the synthetic run needs no extension


# -- no write into the package ------------------------------------------------------------------------

def test_commands_write_only_into_the_working_directory(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(PACKAGE, "weights", "sim_small.safetensors")
    before = snapshot()
    assert cli.main(["train-sim", "--epochs", "1", "--hidden", "8", "--depth", "1", "--no-progress"]) == 0
    assert cli.main(["demo", "--example", "mixture", "--n", "40", "--steps", "5", "--json", "mixture.json"]) == 0
    assert cli.main(["optimize", "--rounds", "1", "--batch-size", "4", "--steps", "4", "--algorithm", "1",
                     "--guidance", "G", "--no-progress", "--json", "opt.json", "--plot", "opt.png"]) == 0
    assert cli.main(["train-digits", "--models", "eval_classifier", "--steps", "2", "--no-progress"]) == 0
    assert cli.main(["evaluate", "--real", "heldout", "--json", "eval.json"]) == 0
    fake_bench(monkeypatch, {})
    assert cli.main(["bench", "--quick", "--backends", "reference,native"]) == 0
    assert cli.main(["dryrun", "--quick", "--workload", "none", "--no-combinations"]) == 0
    assert snapshot() == before                       # not one file of the package touched
    written = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    day = meta.today()
    assert {"sim_small.safetensors", "gradguide-demo.png", "mixture.json", "opt.json", "opt.png",
            os.path.join("digits-weights", "eval_classifier.safetensors"), "eval.json",
            os.path.join("benchmarks", "results", f"ops-cpu-quick-{day}.json"),
            os.path.join("benchmarks", "results", f"dryrun-quick-{day}.md")} <= written
    # loading still reads the shipped weights, which differ from the one-epoch retraining
    from gradguide.experiments import simulation
    assert simulation.SMALL_WEIGHTS == shipped
    shipped_net, mine = simulation.load_small(), simulation.load_small("sim_small.safetensors")
    assert sum(p.numel() for p in shipped_net.parameters()) != sum(p.numel() for p in mine.parameters())


@pytest.mark.parametrize("argv", [
    ["train-sim", "--epochs", "1", "--out", os.path.join(PACKAGE, "weights", "sim_small.safetensors")],
    ["train-digits", "--models", "eval_classifier", "--out", os.path.join(PACKAGE, "weights", "digits")],
    ["demo", "--plot", os.path.join(PACKAGE, "demo.png")],
    ["bench", "--quick", "--out", os.path.join(PACKAGE, "weights")],
    ["dryrun", "--quick", "--out", PACKAGE],
    ["sample", "--n", "4", "--out", os.path.join(PACKAGE, "runs")],
], ids=["train-sim", "train-digits", "demo", "bench", "dryrun", "sample"])
def test_a_path_inside_the_package_is_refused_even_with_force(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    force = ["--force"] if argv[0] != "sample" else []
    with pytest.raises(SystemExit, match="inside the installed gradguide package") as err:
        cli.main(argv + force)
    assert "\n" not in str(err.value)
    assert snapshot() == before


def test_a_working_directory_inside_the_package_is_refused(monkeypatch):
    monkeypatch.chdir(os.path.join(PACKAGE, "weights"))
    before = snapshot()
    with pytest.raises(SystemExit, match="inside the installed gradguide package"):
        cli.main(["train-sim", "--epochs", "1", "--force"])
    assert snapshot() == before


def test_library_writers_refuse_the_package(tmp_path):
    from gradguide.experiments import simulation
    from gradguide.experiments.digits import models
    net = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="inside the installed gradguide package"):
        simulation.save_small(net, {}, simulation.SMALL_WEIGHTS)
    with pytest.raises(ValueError, match="inside the installed gradguide package"):
        models.save(net, "eval_classifier", {})            # the default folder is the shipped one
    with pytest.raises(ValueError, match="inside the installed gradguide package"):
        meta.write_report(os.path.join(PACKAGE, "weights"), "x", {}, "")
    meta.write_report(str(tmp_path), "x", {"a": 1}, "md")   # outside the CLI: a library call may overwrite
    meta.write_report(str(tmp_path), "x", {"a": 2}, "md")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}


# -- --force ------------------------------------------------------------------------------------------

def test_existing_output_is_refused_before_the_work_and_replaced_with_force(tmp_path, monkeypatch, one_thread):
    from gradguide.experiments import simulation
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sim_small.safetensors"
    out.write_bytes(b"a user's file")
    calls = []
    real = simulation.train_small
    monkeypatch.setattr(simulation, "train_small", lambda **kw: calls.append(1) or real(**kw))
    with pytest.raises(SystemExit) as err:
        cli.main(["train-sim", "--epochs", "1", "--hidden", "8", "--depth", "1", "--no-progress"])
    msg = str(err.value)
    assert "sim_small.safetensors exists; pass --force" in msg and "\n" not in msg
    assert calls == [] and out.read_bytes() == b"a user's file"     # refused before training
    assert cli.main(["train-sim", "--epochs", "1", "--hidden", "8", "--depth", "1", "--no-progress", "--force"]) == 0
    assert calls == [1] and out.read_bytes() != b"a user's file"
    simulation.load_small(str(out))


def test_same_day_reports_are_not_overwritten(tmp_path, monkeypatch, capsys):
    fake_bench(monkeypatch, {})
    argv = ["bench", "--quick", "--backends", "reference", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (js,) = tmp_path.glob("ops-cpu-quick-*.json")
    first = snapshot(str(tmp_path))
    ran = []
    real_run = bench_ops.run
    monkeypatch.setattr(bench_ops, "run", lambda **kw: ran.append(1) or real_run(**kw))
    with pytest.raises(SystemExit, match=f"{js.name} exists; pass --force"):
        cli.main(argv)
    assert ran == [] and snapshot(str(tmp_path)) == first
    assert cli.main(argv + ["--note", "second run", "--force"]) == 0
    assert ran == [1] and "second run" in js.with_suffix(".md").read_text()

    # the dry run: a second report of the same day is refused before the run, as is re-rendering
    # a saved report over its markdown
    from gradguide.bench import dryrun
    dry = ["dryrun", "--quick", "--workload", "none", "--no-combinations", "--out", str(tmp_path)]
    assert cli.main(dry) == 0
    (report,) = tmp_path.glob("dryrun-quick-*.json")
    monkeypatch.setattr(dryrun.cli, "build_report", lambda *a, **k: pytest.fail("ran although refused"))
    with pytest.raises(SystemExit, match=f"{report.name} exists; pass --force"):
        cli.main(dry)
    with pytest.raises(SystemExit, match=f"{report.stem}.md exists; pass --force"):
        cli.main(["dryrun", "--from-json", str(report)])
    assert cli.main(["dryrun", "--from-json", str(report), "--force"]) == 0


def test_explicit_paths_are_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("d.json", "o.png", "e.json", "k.json"):
        (tmp_path / name).write_text("keep")
    cases = [(["demo", "--example", "mixture", "--json", "d.json"], "--json: d.json exists"),
             (["optimize", "--plot", "o.png"], "--plot: o.png exists"),
             (["evaluate", "--real", "heldout", "--json", "e.json"], "--json: e.json exists"),
             (["check-kernels", "--json", "k.json"], "--json: k.json exists")]
    # date-named and per-model outputs: refused before the workload is built or a model trained
    prof = tmp_path / "benchmarks" / "results" / f"profile-sim-lookahead-cpu-quick-{meta.today()}.png"
    weights = tmp_path / "digits-weights" / "eval_classifier.safetensors"
    for path in (prof, weights):
        path.parent.mkdir(parents=True)
        path.write_text("keep")
    cases += [(["profile", "--quick", "--no-progress"], f"{prof.name} exists"),
              (["train-digits", "--models", "eval_classifier", "--steps", "1", "--no-progress"],
               "eval_classifier.safetensors exists")]
    from gradguide.bench import loop
    from gradguide.experiments.digits import train
    monkeypatch.setattr(loop, "build_workload", lambda *a, **k: pytest.fail("built although refused"))
    monkeypatch.setattr(train, "train_model", lambda *a, **k: pytest.fail("trained although refused"))
    for argv, match in cases:
        with pytest.raises(SystemExit, match=match):
            cli.main(argv)
    assert all((tmp_path / n).read_text() == "keep" for n in ("d.json", "o.png", "e.json", "k.json"))
    assert prof.read_text() == weights.read_text() == "keep"


def test_every_writing_command_documents_force():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert ("--force" in text) == (name in cli.WRITES_FILES), name
        if name in cli.WRITES_FILES:
            assert "never into the installed gradguide package" in " ".join(text.split()), name
    assert "--no-progress" in sub.choices["bench"].format_help()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "--force" in readme and 'gradguide[diffusers]' in readme


# -- one-line optional-dependency errors ---------------------------------------------------------------

BLOCKER = textwrap.dedent("""
    import sys
    blocked = set(sys.argv[1].split(","))
    class Blocker:   # as if these distributions were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
    from gradguide.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def run_without(modules, *argv, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("GRADGUIDE_DEBUG", None)
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(modules), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("modules,argv,extra", [
    (["sklearn"], ["evaluate", "--real", "heldout"], "digits"),
    (["sklearn"], ["train-digits", "--models", "eval_classifier", "--steps", "1", "--no-progress"], "digits"),
    (["sklearn"], ["sweep-digits", "--n", "20", "--seeds", "0", "--policies", "A", "--samplers", "ddim",
                   "--cls-scales", "0", "--no-progress"], "digits"),
    (["diffusers"], ["bench", "--suite", "peers", "--quick"], "diffusers"),
    (["diffusers"], ["dryrun", "--quick", "--workload", "sd-cfg-lookahead", "--no-combinations"], "diffusers"),
], ids=["evaluate", "train-digits", "sweep-digits", "bench-peers", "dryrun-sd"])
def test_missing_optional_dependency_is_one_line(modules, argv, extra, tmp_path):
    r = run_without(modules, *argv, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"gradguide {argv[0]}: error: ") and f'pip install "gradguide[{extra}]"' in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def test_dryrun_default_runs_without_diffusers_and_names_what_it_skips(tmp_path):
    r = run_without(["diffusers"], "dryrun", "--quick", "--no-combinations", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        'gradguide dryrun: skipping sd-cfg-lookahead, adm64-cls-pxpA, sd3m-cfg, flux-dev-truecfg, flux-schnell-truecfg '
        '(they build diffusers modules): diffusers is not installed: pip install "gradguide[diffusers]"']
    (js,) = (tmp_path / "benchmarks" / "results").glob("dryrun-quick-*.json")
    report = json.loads(js.read_text())
    assert [w["name"] for w in report["workloads"]] == ["sim-lookahead"]
    assert set(report["skipped_workloads"]) == {"sd-cfg-lookahead", "adm64-cls-pxpA", "sd3m-cfg", "flux-dev-truecfg",
                                                "flux-schnell-truecfg"}
    assert "Skipped workload `sd-cfg-lookahead`" in js.with_suffix(".md").read_text()


def test_bench_paper_default_runs_without_diffusers(tmp_path):
    r = run_without(["diffusers"], "bench", "--suite", "paper", "--quick", "--variants", "eager", "--reps", "1",
                    "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        'gradguide bench: skipping sd-cfg-lookahead, adm64-cls-pxpA (they build diffusers modules): diffusers is '
        'not installed: pip install "gradguide[diffusers]"']
    (js,) = (tmp_path / "benchmarks" / "results").glob("paper-cpu-quick-*.json")
    report = json.loads(js.read_text())
    assert [w["workload"] for w in report["rows"]] == ["sim-lookahead", "sim-unguided"]
    assert set(report["skipped_workloads"]) == {"sd-cfg-lookahead", "adm64-cls-pxpA"}
    assert "skipped workload `adm64-cls-pxpA`" in js.with_suffix(".md").read_text()


def test_missing_module_follows_the_cause_chain():
    from gradguide.tools import extras
    try:
        try:
            raise ModuleNotFoundError("No module named 'sklearn.datasets'", name="sklearn.datasets")
        except ImportError as exc:
            raise ImportError("digits needs scikit-learn") from exc
    except ImportError as exc:
        assert extras.missing_module(exc) == "sklearn"
    assert extras.missing_module(ModuleNotFoundError("x", name="gradguide._C")) is None   # a bug, not an extra
    assert extras.missing_module(ValueError("x")) is None
    assert extras.message("psutil") == 'psutil is not installed: pip install "gradguide[profile]"'
    # installed, but not the version gradguide needs: said so, not "not installed"
    wrong = ImportError("cannot import name 'UNet9DModel' from 'diffusers'", name="diffusers")
    assert extras.describe(wrong) == ("diffusers is installed but does not import as gradguide needs (cannot import "
                                      "name 'UNet9DModel' from 'diffusers'): pip install \"gradguide[diffusers]\" "
                                      "installs the tested version")


# -- benchmark spread ---------------------------------------------------------------------------------

def test_spread_and_threshold():
    assert meta.spread([2.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert meta.spread([1.0]) is None and meta.spread([0.0, 0.0]) == float("inf")
    assert not meta.unstable(0.2, None) and meta.unstable(0.2, 0.3) and not meta.unstable(None)
    assert meta.spread_cell({"spread": 0.41, "unstable": True}) == "41% ⚠"
    assert meta.spread_cell({"spread": None}) == "-"


def test_bench_flags_rows_whose_repeats_spread(tmp_path, monkeypatch, capsys):
    # the loaded-machine case: native's repeats 1, 1, 100 ms (median 1) against a steady reference
    fake_bench(monkeypatch, {"reference": [1.0, 1.02, 0.99], "native": [1.0, 1.0, 100.0]})
    assert cli.main(["bench", "--quick", "--backends", "reference,native", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("ops-cpu-quick-*.json")
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert {r["backend"] for r in rows if r["unstable"]} == {"native"}
    assert all(r["spread"] == pytest.approx(0.03, abs=1e-9) for r in rows if r["backend"] == "reference")
    assert data["unstable_rows"] == len(rows) // 2 and data["spread_limit"] == meta.SPREAD_LIMIT
    table = [ln for ln in js.with_suffix(".md").read_text().splitlines() if ln.startswith("| ")][1:]
    assert len(table) == len(rows)
    assert all(ln.rstrip().endswith("⚠ |") == ("| native |" in ln) for ln in table)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradguide bench: warning: 14 of 28 rows spread more than 25%")


def test_bench_is_quiet_when_repeats_agree(tmp_path, monkeypatch, capsys):
    fake_bench(monkeypatch, {"reference": [1.0, 1.1, 0.95], "native": [0.5, 0.52, 0.49]})
    assert cli.main(["bench", "--quick", "--backends", "reference,native", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("ops-cpu-quick-*.json")
    assert not any(r["unstable"] for r in json.loads(js.read_text())["rows"])
    assert "⚠ |" not in js.with_suffix(".md").read_text()
    assert capsys.readouterr().err == ""


def test_loop_rows_flag_a_ratio_whose_baseline_spreads(monkeypatch):
    from gradguide.bench import loop

    class W:
        batch, steps = 2, 3
    timings = {"eager": [1.0, 1.6, 1.1], "fused": [0.5, 0.5, 0.51]}

    def variant(w, name, dev, reps, seed, progress):
        t = timings[name]
        return {"workload": "loop-cfg", "variant": name, "status": "ok", "pass_s": sorted(t)[1], "pass_s_all": t,
                "backend": "x", "batch": 2, "steps": 3, "per_step_ms": 1.0, "samples_per_s": 1.0,
                "peak_memory_bytes": None, "note": "", "config": {}, "params": 1}
    monkeypatch.setattr(loop, "build_workload", lambda *a, **k: W())
    monkeypatch.setattr(loop, "_run_variant", variant)
    result = loop.run("loop", workloads=["loop-cfg"], variants=["eager", "fused"], reps=3, progress=False)
    eager, fused = result["rows"]
    assert eager["unstable"] and fused["unstable"]          # fused is steady, but its ratio divides by eager
    assert fused["spread"] == pytest.approx(0.02) and result["unstable_rows"] == 2
    assert loop.markdown(result).count("⚠ |") == 2


# -- progress bars ------------------------------------------------------------------------------------

class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty,flag,bar", [(True, [], True), (False, [], False), (True, ["--no-progress"], False)],
                         ids=["terminal", "pipe", "terminal+no-progress"])
def test_bench_progress_bar_only_on_a_terminal(tty, flag, bar, tmp_path, monkeypatch):
    fake_bench(monkeypatch, {})
    err = TTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(["bench", "--quick", "--backends", "reference", "--out", str(tmp_path)] + flag) == 0
    text = err.getvalue()
    assert ("\r" in text and "bench ops" in text) == bar
    if not bar:
        assert text == ""


def test_no_carriage_returns_into_a_log(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gradguide.cli", "train-sim", "--epochs", "1", "--hidden", "8",
                        "--depth", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "\r" not in r.stdout
