"""Sharded, resumable sampling (``gradguide sample``): torchrun with gloo gives the same samples
as one process; a killed run resumes to the same set; corrupt shards are detected and redone."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gradguide import sharded
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
        "from gradguide.demo_mixture import default_mixture\n"
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
