"""Sharded, resumable sampling of large evaluation sets, in one process or under ``torchrun``.

The run is planned by **sample index**, never by process: sample ``i`` is drawn from its own
generator seeded with :func:`sample_seed` ``(seed, i)`` (its initial noise and every step's
noise come from it, see :func:`gradguide.sample`), and samples are grouped into shards of a
fixed ``shard_size``. So the set does not depend on the number of processes, nor on which
process drew which shard, nor on the batch size (up to the model's own batch-size
invariance; the embedded analytic models are exactly invariant).

- Rank ``r`` of ``W`` draws the shards ``k`` with ``k ≡ r (mod W)`` (torch.distributed: nccl on
  GPU, gloo on CPU, initialised from ``torchrun``'s environment; one process needs none).
- Each shard is written atomically (temporary file, fsync, ``os.replace``) as
  ``shard-00012.npz`` holding ``samples``, ``indices``, ``seeds``, the run's configuration
  hash and a SHA-256 of the three arrays, checked whenever a shard is read.
- Starting again with the same ``out`` resumes: valid shards are kept, missing, truncated or
  corrupt ones are drawn again (the same samples, since each depends only on its seed).
- One run per output directory: rank 0 holds an advisory lock (``fcntl.flock`` on
  ``.gradguide-sample.lock`` in ``out``, which records the holder's pid and host) for the whole
  run; a second run on the same ``out`` is refused with an error naming the holder, or waits
  with ``wait_lock=True`` (``--wait-lock``). ``run-config.json`` is created atomically (written
  to a temporary, then hard-linked into place, which fails if another process won the race).
- Temporary files are named per process (``shard-00012.npz.tmp-HOST-PID``) and removed only
  when their owner is dead (same host, pid gone) or is this process. A failed write (full
  disk, permissions) removes its temporary and raises an ``OSError`` naming the file; the
  shards already written stay valid, so the same command resumes once the cause is fixed.
- Rank 0 then merges: ``samples.npz`` (``samples``, ``indices``, ``seeds`` in index order) and
  ``manifest.json`` (configuration, shards with their checksums, the merged file's checksum),
  after checking that every index appears once and in order.

``GRADGUIDE_EXIT_AFTER_SHARDS=k`` makes every rank exit abruptly after writing ``k`` shards in
this run: a test hook that simulates a killed job.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import numpy as np
import torch

# the package's parts, by concern: configuration and seeds (config), models and their guidance
# (models), atomic files, shards and the lock (files), the merge (merge); the run itself is here
from .config import (CONFIG, EMBEDDED_MODELS, EXIT_HOOK, LOCK, MANIFEST, MERGED, SHARD_PATTERN, SampleConfig,
                     parse_shape, plan_shards, sample_seed)
from .files import (OutputInUse, _OutputLock, _prepare_out, _remove_stale_tmp, read_shard,
                    write_shard)
from .merge import load_samples, merge
from .models import LoadedModel, _clip, _guidance, load_model

# -- distributed ------------------------------------------------------------------------------

class _Dist:
    """torch.distributed when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
        if use_cuda:
            self.device = torch.device("cuda", local if device_pref in ("auto", "cuda") else
                                       torch.device(device_pref).index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.initialised_here = False
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
                self.initialised_here = True

    def share(self, value):
        """Rank 0's ``value`` on every rank (a barrier too)."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist
            dist.destroy_process_group()


# -- the run ----------------------------------------------------------------------------------

def run(config: SampleConfig, log: Callable[[str], None] = print) -> Optional[dict]:
    """Draw (or finish drawing) ``config.n`` samples into ``config.out``; returns the manifest
    on rank 0 (``None`` on the other ranks)."""
    config.check()
    env = _Dist(config.device)
    try:
        return _run(config, env, log)
    finally:
        env.close()


def _run(config: SampleConfig, env: _Dist, log) -> Optional[dict]:
    lock, failure = None, None
    if env.rank == 0:
        try:
            lock = _prepare_out(config, log)
        except Exception as exc:
            failure = exc
    # every rank learns whether rank 0 could prepare the directory (instead of waiting forever)
    message = env.share(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise ValueError(f"out: rank 0 could not prepare {config.out!r}: {message}")
    try:
        return _draw(config, env, log)
    finally:
        if lock is not None:
            lock.release()


def _draw(config: SampleConfig, env: _Dist, log) -> Optional[dict]:
    from gradguide.config import Execution, Sampler
    from gradguide.sampling import sample
    out = config.out
    digest = config.digest()

    loaded = load_model(config)
    terms, projection = _guidance(config, loaded)
    # prediction type, variance, clipping etc. left unset come from the schedule (what from_diffusers learnt)
    sampler = Sampler(config.sampler, eta=config.eta, spacing=config.spacing, clip=_clip(config))
    execution = Execution(backend=config.backend, device=env.device)
    shards = plan_shards(config.n, config.shard_size)
    mine = [s for s in shards if s[0] % env.world == env.rank]
    exit_after = int(os.environ.get(EXIT_HOOK, "0") or 0)

    bar = None
    if env.rank == 0 and config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(shards), desc=f"sampling ({env.world} process{'es' if env.world > 1 else ''})",
                   unit="shard", disable=None)  # None: off when stderr is not a terminal
    written = redone = kept = 0
    for k, start, stop in mine:
        path = os.path.join(out, SHARD_PATTERN.format(k))
        _remove_stale_tmp(path)
        got, why = read_shard(path, start, stop, config.seed, digest)
        if got is not None:
            kept += 1
        else:
            if why != "missing":
                log(f"rank {env.rank}: shard {k} is {why}; drawing it again")
                redone += 1
            seeds = np.array([sample_seed(config.seed, i) for i in range(start, stop)], dtype=np.int64)
            parts = []
            for b0 in range(start, stop, config.batch_size):
                b1 = min(b0 + config.batch_size, stop)
                idx = np.arange(b0, b1)
                gens = [torch.Generator(env.device).manual_seed(int(s)) for s in seeds[b0 - start:b1 - start]]
                x = sample(loaded.model, (b1 - b0,) + loaded.shape, schedule=loaded.schedule, sampler=sampler,
                           steps=config.steps, guidance=terms, projection=projection,
                           cond=loaded.cond(idx, env.device), generator=gens, execution=execution)
                parts.append(x.detach().float().cpu().numpy())
            write_shard(path, np.concatenate(parts), np.arange(start, stop, dtype=np.int64), seeds, digest)
            written += 1
            if exit_after and written >= exit_after:
                log(f"rank {env.rank}: {EXIT_HOOK}={exit_after}: exiting after {written} shard(s)")
                sys.stdout.flush()
                os._exit(3)
        if bar is not None:
            bar.n = sum(os.path.exists(os.path.join(out, SHARD_PATTERN.format(s[0]))) for s in shards)
            bar.refresh()
    if bar is not None:
        bar.n = len(shards)
        bar.close()
    log(f"rank {env.rank}: {len(mine)} shard(s): {kept} kept, {written} drawn ({redone} redone)")
    env.barrier()
    manifest = merge(config, log) if env.rank == 0 else None
    env.barrier()
    return manifest


def main(args) -> int:
    """``gradguide sample``: argparse namespace -> run."""
    config = SampleConfig(out=args.out, n=args.n, model=args.model, seed=args.seed, shard_size=args.shard_size,
                          batch_size=args.batch_size, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                          eta=args.eta, cfg=args.cfg, classifier_scale=args.classifier_scale,
                          projection=args.projection, class_label=args.class_label, conditional=args.conditional,
                          shape=parse_shape(args.shape), clip=args.clip, backend=args.backend, device=args.device,
                          progress=not args.no_progress, wait_lock=args.wait_lock)
    rank = int(os.environ.get("RANK", "0"))
    manifest = run(config, log=(print if rank == 0 or args.verbose else (lambda *_: None)))
    if manifest is not None:
        print(f"wrote {manifest['n']} samples, sha256 {manifest['samples_sha256'][:16]}..., manifest "
              f"{os.path.join(config.out, MANIFEST)}")
    return 0
