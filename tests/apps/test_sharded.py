"""Sharded, resumable sampling (``gradguide sample``): torchrun with gloo gives the same samples
as one process; a killed run resumes to the same set; corrupt shards are detected and redone."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gradguide.tools import sharded
from gradguide.cli import main as cli_main

N, SHARD, STEPS = 40, 8, 10          # 5 shards: ranks of 2 get 3 and 2
ARGS = ["--shard-size", str(SHARD), "--steps", str(STEPS), "--seed", "7", "--no-progress"]


def _config(out, **kw):
    base = dict(out=str(out), n=N, shard_size=SHARD, batch_size=5, steps=STEPS, seed=7, progress=False)
    base.update(kw)
    return sharded.SampleConfig(**base)


def _torchrun(out, extra_env=None, batch=3):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "gradguide.cli", "sample", "--num-samples", str(N), "--out", str(out), "--batch-size", str(batch),
           *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    manifest = sharded.run(_config(out), log=lambda *_: None)
    return out, manifest, sharded.load_samples(str(out))


def test_plan_and_seeds():
    assert sharded.plan_shards(10, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    seeds = [sharded.sample_seed(0, i) for i in range(1000)] + [sharded.sample_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert sharded.sample_seed(3, 5) == sharded.sample_seed(3, 5)


def test_reference_run_manifest(reference):
    out, manifest, arrays = reference
    assert arrays["samples"].shape == (N, 2) and np.isfinite(arrays["samples"]).all()
    assert np.array_equal(arrays["indices"], np.arange(N))
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{k:05d}.npz" for k in range(5)]
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["samples_sha256"] == manifest["samples_sha256"] and on_disk["n"] == N
    # seeds are per sample: the first 5 samples drawn alone are the reference's first 5
    alone = _config(out.parent / "alone", n=5, shard_size=5, batch_size=2)
    sharded.run(alone, log=lambda *_: None)
    assert np.array_equal(sharded.load_samples(alone.out)["samples"], arrays["samples"][:5])


def test_batch_size_does_not_change_samples(reference, tmp_path):
    sharded.run(_config(tmp_path, batch_size=8), log=lambda *_: None)
    assert np.array_equal(sharded.load_samples(str(tmp_path))["samples"], reference[2]["samples"])


def test_torchrun_two_processes_equal_one(reference, tmp_path):
    proc = _torchrun(tmp_path / "tr")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = sharded.load_samples(str(tmp_path / "tr"))
    assert np.array_equal(got["samples"], reference[2]["samples"])
    assert np.array_equal(got["seeds"], reference[2]["seeds"])
    manifest = json.load(open(tmp_path / "tr" / "manifest.json"))
    assert manifest["samples_sha256"] == reference[1]["samples_sha256"]


def test_killed_run_resumes_to_the_same_samples(reference, tmp_path):
    out = tmp_path / "killed"
    proc = _torchrun(out, {sharded.EXIT_HOOK: "1"})
    assert proc.returncode != 0
    shards = sorted(p for p in os.listdir(out) if p.startswith("shard-") and p.endswith(".npz"))
    assert 1 <= len(shards) < 5 and not (out / "samples.npz").exists()
    before = {p: (out / p).stat().st_mtime_ns for p in shards}
    # resume in one process with another batch size: the kept shards are not redrawn
    messages = []
    sharded.run(_config(out, batch_size=4), log=messages.append)
    assert any(f"{len(shards)} kept, {5 - len(shards)} drawn (0 redone)" in m for m in messages), messages
    assert all((out / p).stat().st_mtime_ns == t for p, t in before.items())
    assert np.array_equal(sharded.load_samples(str(out))["samples"], reference[2]["samples"])


def test_corrupt_and_truncated_shards_are_redone(reference, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference[0], out)
    os.remove(out / "samples.npz")
    # shard 1: truncated; shard 3: a valid npz whose samples no longer match the checksum
    data = (out / "shard-00001.npz").read_bytes()
    (out / "shard-00001.npz").write_bytes(data[: len(data) // 2])
    with np.load(out / "shard-00003.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["samples"] = arrays["samples"].copy()
    arrays["samples"][0, 0] += 1.0
    np.savez(out / "shard-00003.npz", **arrays)
    (out / "shard-00002.npz.tmp-12345").write_bytes(b"half-written")   # a killed writer's leftover
    messages = []
    sharded.run(_config(out), log=messages.append)
    text = "\n".join(messages)
    assert "shard 1 is unreadable" in text and "shard 3 is checksum mismatch" in text
    assert "3 kept, 2 drawn (2 redone)" in text
    assert not (out / "shard-00002.npz.tmp-12345").exists()
    assert np.array_equal(sharded.load_samples(str(out))["samples"], reference[2]["samples"])
    # a corrupt merged file is caught when loading
    with np.load(out / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["samples"] = arrays["samples"] * 2
    np.savez(out / "samples.npz", **arrays)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sharded.load_samples(str(out))


def test_other_configuration_in_out_dir_is_refused(reference, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    with pytest.raises(ValueError, match="another configuration.*seed"):
        sharded.run(_config(out, seed=8), log=lambda *_: None)


def test_cli_user_model_and_guidance(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from gradguide import Schedule\n"
        "from gradguide.experiments.demo_mixture import default_mixture\n"
        "def build():\n"
        "    gm = default_mixture(Schedule.linear(1000))\n"
        "    return {'model': gm, 'schedule': gm.schedule, 'shape': (2,), 'cond': {'y': torch.tensor([1])}}\n")
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["sample", "--model", "my_models:build", "--n", "12", "--out", "user", "--cfg", "3",
                   "--projection", "C", "--batch-size", "6", *ARGS])
    assert rc == 0
    user = sharded.load_samples("user")["samples"]
    rc = cli_main(["sample", "--model", "mixture", "--class-label", "1", "--n", "12", "--out", "embedded", "--cfg",
                   "3", "--projection", "C", "--batch-size", "4", *ARGS])
    assert rc == 0
    assert np.array_equal(user, sharded.load_samples("embedded")["samples"])
    # class 1 of the mixture sits at (2, 1)
    assert np.abs(user.mean(0) - np.array([2.0, 1.0])).max() < 0.5


def test_cli_errors_name_the_argument(tmp_path):
    with pytest.raises(SystemExit, match="projection: policy C"):
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "x"), "--projection", "C"])
    with pytest.raises(SystemExit, match="shard_size"):
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "x"), "--shard-size", "0"])
    with pytest.raises(SystemExit, match="model: cannot load"):
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "x"), "--model", "no_such_module:f"])


# -- one writer per output directory, atomic files, clean OS errors ----------------

import errno
import socket
import textwrap
import time


def _hold_lock(out, seconds):
    """A separate process that holds ``out``'s lock for ``seconds`` (prints once it holds it)."""
    code = textwrap.dedent(f"""
        import sys, time
        from gradguide.tools import sharded
        lock = sharded._OutputLock({str(out)!r}, False, print)
        print("locked", flush=True)
        time.sleep({seconds})
        lock.release()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = _hold_lock(out, 60)
    try:
        with pytest.raises(sharded.OutputInUse, match=rf"out: .* in use by another gradguide sample run "
                                                      rf"\(pid {holder.pid} on host {socket.gethostname()}"):
            sharded.run(_config(out, n=8), log=lambda *_: None)
        with pytest.raises(SystemExit, match=rf"in use .*pid {holder.pid}.*--wait-lock") as info:
            cli_main(["sample", "--n", "8", "--out", str(out), *ARGS])
        assert "\n" not in str(info.value)
        assert not any(p.startswith("shard-") for p in os.listdir(out))   # nothing drawn
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the directory is usable again
    manifest = sharded.run(_config(out, n=8), log=lambda *_: None)
    assert manifest["n"] == 8


def test_wait_lock_waits_for_the_holder(tmp_path):
    out = tmp_path / "wait"
    out.mkdir()
    holder = _hold_lock(out, 3)
    messages = []
    start = time.monotonic()
    manifest = sharded.run(_config(out, n=8, wait_lock=True), log=messages.append)
    assert holder.wait() == 0 and manifest["n"] == 8
    assert time.monotonic() - start > 1.0
    assert any("waiting for it to finish" in m and f"pid {holder.pid}" in m for m in messages), messages


def test_run_config_creation_is_atomic(tmp_path, monkeypatch):
    """Another process creating run-config.json between our check and our write: ours does not
    overwrite it; it is compared instead (here: another seed, refused)."""
    out = tmp_path / "race"
    out.mkdir()
    real_link = os.link

    def racing_link(src, dst):
        with open(dst, "w") as f:
            json.dump(_config(out, seed=99).hashed(), f)
        return real_link(src, dst)
    monkeypatch.setattr(sharded.os, "link", racing_link)
    with pytest.raises(ValueError, match="another configuration.*seed"):
        sharded.run(_config(out), log=lambda *_: None)
    assert json.load(open(out / "run-config.json"))["seed"] == 99
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_damaged_run_config_names_the_file(tmp_path):
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "run-config.json").write_text('{"seed": 7,')
    with pytest.raises(SystemExit, match=r"error: out: .*run-config.json is damaged"):
        cli_main(["sample", "--n", "8", "--out", str(out), *ARGS])


def test_temporaries_are_removed_only_when_their_owner_is_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    path = tmp_path / "shard-00000.npz"
    names = {"dead": f"shard-00000.npz.tmp-{here}-{dead.pid}", "legacy_dead": f"shard-00000.npz.tmp-{dead.pid}",
             "mine": f"shard-00000.npz.tmp-{here}-{os.getpid()}", "live": f"shard-00000.npz.tmp-{here}-{os.getppid()}",
             "other_host": f"shard-00000.npz.tmp-some-other-host-{dead.pid}",
             "other_shard": f"shard-00001.npz.tmp-{here}-{dead.pid}"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    sharded._remove_stale_tmp(str(path))
    left = {k for k, name in names.items() if (tmp_path / name).exists()}
    assert left == {"live", "other_host", "other_shard"}


def test_full_disk_is_one_clean_error_and_resumable(reference, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real_savez = np.savez
    calls = {"n": 0}

    def savez_until_full(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 3:          # the third shard: half written, then the disk is full
            f.write(b"PK\x03\x04 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, **arrays)
    monkeypatch.setattr(sharded.np, "savez", savez_until_full)
    with pytest.raises(SystemExit) as info:
        cli_main(["sample", "--n", str(N), "--out", str(out), "--batch-size", "5", *ARGS])
    line = str(info.value)
    assert "\n" not in line and "No space left on device" in line and str(out / "shard-00002.npz") in line, line
    left = sorted(os.listdir(out))
    assert left == [".gradguide-sample.lock", "run-config.json", "shard-00000.npz", "shard-00001.npz"], left
    monkeypatch.setattr(sharded.np, "savez", real_savez)   # space freed: the same command resumes
    messages = []
    sharded.run(_config(out), log=messages.append)
    assert any("2 kept, 3 drawn (0 redone)" in m for m in messages), messages
    assert np.array_equal(sharded.load_samples(str(out))["samples"], reference[2]["samples"])


def test_unwritable_outputs_are_one_clean_line(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    for out, reason in [(tmp_path / "a_file", "File exists"), (tmp_path / "a_file" / "sub", "Not a directory")]:
        with pytest.raises(SystemExit) as info:
            cli_main(["sample", "--n", "4", "--out", str(out), *ARGS])
        line = str(info.value)
        assert "\n" not in line and reason in line and str(out) in line, line
    # a directory we may not write into (simulated: this test may run as root, which ignores modes)
    real_open = open

    def read_only(path, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(sharded.files, "open", read_only, raising=False)
    with pytest.raises(SystemExit) as info:
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "ro"), *ARGS])
    line = str(info.value)
    assert "\n" not in line and "Permission denied" in line and "run-config.json" in line, line
    assert not [p for p in os.listdir(tmp_path / "ro") if ".tmp-" in p]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_for_real(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match="Permission denied"):
            cli_main(["sample", "--n", "4", "--out", str(out), *ARGS])
    finally:
        out.chmod(0o755)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError):
        cli_main(["--debug", "sample", "--n", "4", "--out", str(tmp_path / "a_file"), *ARGS])
    monkeypatch.setenv("GRADGUIDE_DEBUG", "1")
    with pytest.raises(OSError):
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "a_file"), *ARGS])


@pytest.mark.parametrize("argv,match", [
    (["--device", "gpu"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--clip", "abc"], "clip: expected 'auto', 'none' or a positive number"),
    (["--clip", "-1"], "clip: expected"),
    (["--clip", "nan"], "clip: expected"),
    (["--steps", "0"], "steps: expected a positive integer"),
    (["--backend", "magic"], "backend: expected one of"),
    (["--cfg", "inf"], "CFG: scale: expected a finite number"),
    (["--n", "0"], "n: expected a positive integer"),
    (["--shape", "3,x"], "shape: expected comma-separated sizes"),
])
def test_cli_option_errors_are_one_line_naming_the_option(tmp_path, argv, match):
    base = ["sample", "--n", "4", "--out", str(tmp_path / "x"), "--steps", "3", "--no-progress"]
    with pytest.raises(SystemExit, match=match) as info:
        cli_main(base + argv)
    assert "\n" not in str(info.value) and str(info.value).startswith("gradguide sample: error: ")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error")
def test_cli_cuda_on_a_cpu_build(tmp_path):
    with pytest.raises(SystemExit, match="device: 'cuda' requested, but CUDA is not available"):
        cli_main(["sample", "--n", "4", "--out", str(tmp_path / "x"), "--device", "cuda", "--no-progress"])
