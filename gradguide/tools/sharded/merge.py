"""Merging a sharded run (see :mod:`gradguide.tools.sharded`): every shard verified into
``samples.npz`` and ``manifest.json``; reading the merged file back."""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict

import numpy as np
import torch

from .config import MANIFEST, MERGED, SHARD_PATTERN, SampleConfig, plan_shards
from .files import _atomic_savez, _atomic_write_text, _checksum, read_shard

def merge(config: SampleConfig, log: Callable[[str], None] = print) -> dict:
    """Rank 0: read every shard, verify it and the order and count of indices, and write
    ``samples.npz`` and ``manifest.json`` atomically."""
    import gradguide
    digest = config.digest()
    shards = plan_shards(config.n, config.shard_size)
    samples, indices, seeds, entries = [], [], [], []
    for k, start, stop in shards:
        name = SHARD_PATTERN.format(k)
        got, why = read_shard(os.path.join(config.out, name), start, stop, config.seed, digest)
        if got is None:
            raise RuntimeError(f"merge: shard {name} is {why}; run the same command again to redo it")
        s, i, sd, checksum = got
        samples.append(s)
        indices.append(i)
        seeds.append(sd)
        entries.append({"file": name, "start": start, "stop": stop, "sha256": checksum})
    samples, indices, seeds = np.concatenate(samples), np.concatenate(indices), np.concatenate(seeds)
    if not np.array_equal(indices, np.arange(config.n)):
        raise RuntimeError("merge: the shards do not hold every sample index exactly once and in order")
    checksum = _checksum(samples, indices, seeds)
    _atomic_savez(os.path.join(config.out, MERGED), samples=samples, indices=indices, seeds=seeds,
                  sha256=np.array(checksum), config=np.array(digest))
    manifest = {"format": "gradguide-samples/1", "n": config.n, "sample_shape": list(samples.shape[1:]),
                "dtype": str(samples.dtype), "config": config.hashed(), "config_sha256": digest,
                "seed_rule": "sample_seed(seed, i): NumPy SeedSequence(entropy=seed, spawn_key=(i,)), 63 bits",
                "samples_file": MERGED, "samples_sha256": checksum, "shards": entries,
                "gradguide": gradguide.__version__, "torch": torch.__version__,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write_text(os.path.join(config.out, MANIFEST), json.dumps(manifest, indent=2))
    log(f"merged {config.n} samples from {len(shards)} shard(s) into {os.path.join(config.out, MERGED)}")
    return manifest


def load_samples(out: str, verify: bool = True) -> Dict[str, np.ndarray]:
    """The merged ``samples``, ``indices`` and ``seeds`` of a finished run, checksum-verified."""
    with np.load(os.path.join(out, MERGED), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if verify and _checksum(arrays["samples"], arrays["indices"], arrays["seeds"]) != str(arrays["sha256"]):
        raise ValueError(f"{os.path.join(out, MERGED)}: checksum mismatch (the file is corrupt)")
    return arrays
