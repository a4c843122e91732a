"""gradguide installed as a user installs it: a built wheel and an editable install.

The wheel is built once, with the native ops, from a copy of the package sources (``pip wheel
--no-deps --no-build-isolation``), never in the checkout. Checked here:

- the wheel holds the harness and the weights, and no top-level package but ``gradguide``
  (``kernels`` is Hugging Face's: transformers >= 5.25 requires that distribution and diffusers
  imports ``from kernels import ...`` whenever it is installed);
- ``gradguide bench|profile|dryrun`` run from the unpacked wheel with the working directory
  outside the checkout;
- the name collision: in a scratch virtual environment that sees this environment's Hugging Face
  ``kernels``, transformers and diffusers, gradguide installed from the wheel and, separately,
  editable from a copy of the checkout; from the checkout's root (which ``python -m pytest`` puts
  on ``sys.path``) and from a neutral folder, ``from diffusers import UNet2DModel``,
  ``import transformers``, the Triton-interpreted ``reduce`` and the native one all work.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import background

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HARNESS = ["gradguide/bench/loop.py", "gradguide/bench/ops.py", "gradguide/bench/profiling.py",
           "gradguide/bench/profile.py", "gradguide/bench/dryrun/__init__.py", "gradguide/bench/dryrun/fake.py",
           "gradguide/bench/meta.py", "gradguide/bench/gpu.py", "gradguide/bench/peers.py", "gradguide/cli.py",
           "gradguide/experiments/simulation.py", "gradguide/experiments/digits/models.py",
           "gradguide/tools/sharded/__init__.py", "gradguide/tools/sharded/files.py", "gradguide/kernels/fused.py"]
WEIGHTS = ["gradguide/weights/sim_small.safetensors", "gradguide/weights/digits/eps_cond.safetensors",
           "gradguide/weights/digits/eps_uncond.safetensors", "gradguide/weights/digits/eval_classifier.safetensors",
           "gradguide/weights/digits/noisy_classifier.safetensors"]


# build outputs and caches a checkout may hold; everything else is copied
_NOT_SOURCES = shutil.ignore_patterns(".git", "__pycache__", "*.so", "*.egg-info", "build", "dist", ".pytest_cache",
                                      ".hypothesis", ".benchmarks", ".venv", ".whl", "out")


@background.job("wheel")
def _build_wheel():
    """A copy of the checkout (sources only: builds and editable installs run there, never
    here) and the wheel built from it with the native ops, as ``pip wheel`` builds them; in the
    background (tests/background.py), as it compiles csrc/ once more."""
    import setuptools  # noqa: F401  (the README's commands install it; --no-build-isolation needs it)
    src = Path(background.mkdtemp("install")) / "checkout"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    dist = src.parent / "dist"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    env.pop("GRADGUIDE_NO_NATIVE", None)
    proc = background.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], env=env, timeout=1200)
    return src, dist, proc


@pytest.fixture(scope="module")
def checkout_copy():
    """The copy of the checkout the wheel was built from."""
    return _build_wheel.result()[0]


@pytest.fixture(scope="module")
def wheel():
    """``(wheel path, unpacked folder)``, built with the native ops as ``pip wheel`` builds them."""
    src, dist, proc = _build_wheel.result()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = list(dist.glob("gradguide-*.whl"))
    site = src.parent / "site"
    with zipfile.ZipFile(path) as z:
        z.extractall(site)
    return path, site


def test_wheel_installs_only_gradguide(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist()}
        natives = [n for n in z.namelist() if re.fullmatch(r"gradguide/_C\.[^/]*\.so", n)]
    assert tops == {"gradguide", f"{path.name.split('-')[0]}-{path.name.split('-')[1]}.dist-info"}, tops
    assert natives, "the wheel lacks the native ops (gradguide/_C*.so)"


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
    # resolve modules from its checkout: drop its finder, as in an environment with only the wheel
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


# Run inside the scratch environment: the Hugging Face packages that share the name space with
# gradguide import, and gradguide's kernels run, from wherever the user stands.
_COLLISION_CHECK = r"""
import importlib.util, os, sys
expected_gradguide, third_party = sys.argv[1], sys.argv[2]
spec = importlib.util.find_spec("kernels")
assert spec is not None and spec.origin.startswith(third_party), f"import kernels finds {spec and spec.origin}"
from kernels import CUDAProperties  # noqa: F401  (what diffusers imports when kernels is installed)
import transformers  # noqa: F401
from diffusers import UNet2DModel  # noqa: F401
import torch
import gradguide
from gradguide import ops
assert os.path.realpath(gradguide.__file__).startswith(os.path.realpath(expected_gradguide)), gradguide.__file__
import gradguide.kernels
assert gradguide.kernels.__file__.startswith(os.path.dirname(gradguide.__file__))
g = torch.Generator().manual_seed(0)
xs = [torch.randn(3, 5, 7, generator=g, dtype=torch.float32) for _ in range(3)]
truth = ops.reduce([x.double() for x in xs], backend="reference")
for backend in ("triton", "native"):
    got = ops.reduce(xs, backend=backend)
    for a, b in zip(got, truth):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (backend, (a - b).abs().max())
print("ok", gradguide.__file__)
"""


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory):
    """A fresh virtual environment that sees this environment's third-party packages (torch,
    triton, Hugging Face ``kernels``, transformers, diffusers) through a path line, but not its
    gradguide: an editable install's finder is started by a ``.pth`` file, which a path line
    does not run, and a path line comes after the venv's own site-packages."""
    import sysconfig
    venv = tmp_path_factory.mktemp("scratch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    third_party = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    with open(os.path.join(own, "zz_parent_environment.pth"), "w") as f:
        f.write("\n".join(third_party) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    has = subprocess.run([str(python), "-c", "import gradguide"], cwd=venv.parent, env=env, capture_output=True,
                         text=True)
    assert has.returncode != 0, "the scratch environment must start without gradguide"
    return python, own, third_party[0]


def _pip_install(python, *args, cwd):
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", GRADGUIDE_NO_NATIVE="1")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _check_from(python, cwd, expected_gradguide, third_party):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADGUIDE_NO_NATIVE")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(python), "-c", _COLLISION_CHECK, str(expected_gradguide), third_party], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"from {cwd}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


def test_no_name_collision_with_hugging_face_kernels(wheel, checkout_copy, scratch_venv, tmp_path):
    import importlib.util
    assert importlib.util.find_spec("kernels") is not None, \
        "Hugging Face's kernels is not installed here: the test extra (transformers) must bring it"
    python, own_site, third_party = scratch_venv
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    # from the wheel (the same file pip installs), native ops included
    _pip_install(python, str(wheel[0]), cwd=neutral)
    _check_from(python, neutral, os.path.join(own_site, "gradguide"), third_party)
    # from the checkout's root Python puts the root first on sys.path, so its gradguide/ is the
    # one imported (as under python -m pytest); what matters is that no folder there is `kernels`
    _check_from(python, ROOT, os.path.join(ROOT, "gradguide"), third_party)
    proc = subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "gradguide"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # editable, from a copy of the checkout; its native ops are the ones the wheel built (one compile)
    (so,) = [n for n in zipfile.ZipFile(wheel[0]).namelist() if re.fullmatch(r"gradguide/_C\.[^/]*\.so", n)]
    shutil.copy(os.path.join(wheel[1], so), checkout_copy / so)
    _pip_install(python, "-e", str(checkout_copy), cwd=neutral)
    for cwd in (checkout_copy, neutral):
        _check_from(python, cwd, checkout_copy / "gradguide", third_party)


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(pip install [^\n]*(?:gradguide demo|python -m pytest -q))\n```", text)


def test_ci_runs_the_readme_commands_from_the_lock():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    for command in commands:
        assert command in ci.splitlines(), f".ci/run lacks the README command: {command}"
        installs = [part for part in command.split("&&") if "pip install" in part]
        assert all("-c constraints.txt" in part for part in installs), command


def _requirement_name(spec):
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_lock_pins_every_dependency_and_extras_never_pin():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    lock = {}
    for line in open(os.path.join(ROOT, "constraints.txt")).read().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"constraints.txt: not an exact pin: {line}"
            lock[_requirement_name(name)] = version
    needed = project["dependencies"] + project["optional-dependencies"]["test"] + ["setuptools", "wheel"]
    missing = [spec for spec in needed if _requirement_name(spec) not in lock]
    assert not missing, f"constraints.txt lacks {missing}"
    for extra, specs in project["optional-dependencies"].items():
        pinned = [spec for spec in specs if "==" in spec or "<" in spec]
        assert not pinned, f"extra {extra!r} pins or caps {pinned}: an extra must never downgrade a user"
