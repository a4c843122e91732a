"""``gradguide bench|profile|dryrun`` from a non-editable install.

A wheel is built from a copy of the package sources (``pip wheel --no-deps
--no-build-isolation``; GRADGUIDE_NO_NATIVE=1, so no compiler runs) and unpacked into a
folder, which is what ``pip install`` puts into site-packages. The harness's modules and the
weights must be in it, no module may name the checkout's ``benchmarks/`` (other than as the
default output folder), and the three commands must run from it with the working directory
outside the checkout and every gradguide/kernels module imported from the unpacked wheel.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HARNESS = ["gradguide/bench/loop.py", "gradguide/bench/ops.py", "gradguide/bench/profiling.py", "gradguide/bench/profile.py",
           "gradguide/bench/dryrun.py", "gradguide/bench/meta.py", "gradguide/bench/gpu.py",
           "gradguide/bench/peers.py", "gradguide/cli.py", "gradguide/experiments/simulation.py",
           "gradguide/experiments/digits/models.py", "gradguide/tools/sharded.py", "gradguide/kernels/fused.py"]
WEIGHTS = ["gradguide/weights/sim_small.safetensors", "gradguide/weights/digits/eps_cond.safetensors",
           "gradguide/weights/digits/eps_uncond.safetensors", "gradguide/weights/digits/eval_classifier.safetensors",
           "gradguide/weights/digits/noisy_classifier.safetensors"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``(wheel path, unpacked folder)``: the build runs on a copy, never in the checkout."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(os.path.join(ROOT, "gradguide"), src / "gradguide", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    env = dict(os.environ, GRADGUIDE_NO_NATIVE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp / "dist"), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = list((tmp / "dist").glob("gradguide-*.whl"))
    site = tmp / "site"
    with zipfile.ZipFile(path) as z:
        z.extractall(site)
    return path, site


def test_wheel_holds_the_harness_and_the_weights(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    assert not [n for n in HARNESS + WEIGHTS if n not in names]
    assert not [n for n in names if n.startswith("benchmarks/") or n.startswith("tests/")]
    # the old harness loader, or any path into the checkout's benchmarks/ (outputs go to benchmarks/results)
    assert "gradguide/harness.py" not in names
    assert not {n: re.findall(r"benchmarks/(?!results)\S*", s) for n, s in sources.items()
                if re.search(r"benchmarks/(?!results)", s)}


def test_bench_profile_dryrun_run_from_the_installed_package(wheel, tmp_path):
    _, site = wheel
    # an editable install of gradguide in this environment (the developers' set-up) would still
    # resolve modules the wheel lacks (gradguide._C: built without the native ops) from its
    # checkout: drop its finder, as in an environment that has only the wheel
    script = f"""
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import gradguide
from gradguide import cli
assert gradguide.__file__ == os.path.join({str(site)!r}, "gradguide", "__init__.py"), gradguide.__file__
common = ["--quick", "--out", "out"]
assert cli.main(["bench", "--suite", "loop", "--workloads", "loop-cfg", "--variants", "eager", "--reps", "1"] + common) == 0
assert cli.main(["profile", "--workload", "loop-cfg", "--no-projection", "--no-progress"] + common) == 0
assert cli.main(["dryrun", "--workload", "loop-cfg", "--no-combinations", "--no-progress"] + common) == 0
ours = {{m: getattr(v, "__file__", None) or "" for m, v in list(sys.modules.items())
        if m.split(".")[0] == "gradguide"}}
elsewhere = {{m: f for m, f in ours.items() if f and not f.startswith({str(site)!r})}}
assert not elsewhere, elsewhere   # nothing from the checkout (or another install)
assert "gradguide.bench.loop" in ours
print(sorted(os.listdir("out")))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = sorted(os.listdir(run_dir / "out"))
    for prefix in ("loop-cpu-quick-", "profile-loop-cfg-cpu-quick-", "dryrun-quick-"):
        assert any(n.startswith(prefix) and n.endswith(".json") for n in written), written
