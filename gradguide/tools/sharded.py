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

import dataclasses
import errno
import hashlib
import importlib
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

SHARD_PATTERN = "shard-{:05d}.npz"
MERGED = "samples.npz"
MANIFEST = "manifest.json"
CONFIG = "run-config.json"
LOCK = ".gradguide-sample.lock"
EXIT_HOOK = "GRADGUIDE_EXIT_AFTER_SHARDS"
EMBEDDED_MODELS = ("mixture", "subspace")
# configuration keys that cannot change the samples: they stay out of the run's hash
_NOT_HASHED = ("out", "batch_size", "progress", "device", "wait_lock")


@dataclasses.dataclass
class SampleConfig:
    """Everything a sharded run needs; every field but those in ``_NOT_HASHED`` fixes the samples."""
    out: str
    n: int
    model: str = "mixture"
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 500
    sampler: str = "ddpm"
    steps: Optional[int] = 100
    spacing: str = "adm"
    eta: Optional[float] = None   # the sampler's η; None: its own (0 for DDIM, 1 for the ancestral/SDE ones)
    cfg: Optional[float] = None
    classifier_scale: Optional[float] = None
    projection: Optional[str] = None
    class_label: Optional[int] = None
    conditional: bool = False
    shape: Optional[Tuple[int, ...]] = None
    clip: Optional[str] = "auto"
    backend: str = "auto"
    device: str = "auto"
    progress: bool = True
    wait_lock: bool = False

    def check(self) -> "SampleConfig":
        for name in ("n", "shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.projection not in (None, "A", "B", "C"):
            raise ValueError(f"projection: expected A, B or C, got {self.projection!r}")
        if self.projection == "C" and self.cfg is None:
            raise ValueError("projection: policy C projects classifier-free guidance; give --cfg too")
        if self.projection in ("A", "B") and self.classifier_scale is None:
            raise ValueError(f"projection: policy {self.projection} projects classifier guidance; "
                             "give --classifier-scale too")
        if self.model not in EMBEDDED_MODELS and ":" not in self.model:
            raise ValueError(f"model: expected one of {EMBEDDED_MODELS} or 'module:function', got {self.model!r}")
        _check_device_pref(self.device)
        if self.clip not in (None, "auto", "none"):
            try:
                r = float(self.clip)
            except (TypeError, ValueError):
                r = float("nan")
            if not (r > 0 and r != float("inf")):
                raise ValueError(f"clip: expected 'auto', 'none' or a positive number r (clips x0 to [-r, r]), "
                                 f"got {self.clip!r}")
        return self

    def hashed(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in _NOT_HASHED:
            d.pop(key)
        if d["shape"] is not None:
            d["shape"] = list(d["shape"])
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True).encode()).hexdigest()


def _check_device_pref(device: str) -> None:
    """``--device``: 'auto', 'cpu', 'cuda' or 'cuda:N' (and CUDA must exist for the last two)."""
    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested, but CUDA is not available here")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``: a 63-bit value mixed from ``(seed, index)`` by NumPy's
    SeedSequence, so nearby seeds and indices give unrelated streams."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(index,)).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & (2 ** 63 - 1))


def plan_shards(n: int, shard_size: int) -> List[Tuple[int, int, int]]:
    """``(shard, start, stop)`` for every shard; fixed by ``n`` and ``shard_size`` alone."""
    return [(k, start, min(start + shard_size, n)) for k, start in enumerate(range(0, n, shard_size))]


# -- models -----------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """A model and what the run needs around it."""
    model: Callable
    schedule: Any
    shape: Tuple[int, ...]
    cond: Callable[[np.ndarray, torch.device], dict]      # sample indices -> model inputs
    classifier: Optional[Callable] = None                 # log p(y | x_t), [B]
    uncond: Optional[dict] = None                         # CFG's unconditional inputs


def load_model(config: SampleConfig) -> LoadedModel:
    """The embedded analytic models or a user's ``module:function``.

    The function is called with no arguments and returns a model, a ``(model, schedule)``
    pair (e.g. :func:`gradguide.from_diffusers`), or a dict with keys ``model``, and
    optionally ``schedule`` (default: linear, T = 1000), ``shape`` (one sample's shape),
    ``cond`` (a dict of tensors with leading dimension 1, broadcast, or ``n``, indexed by
    sample), ``uncond`` (CFG's unconditional inputs) and ``classifier``
    (``log p(y | x_t, t, **cond)``).
    """
    from ..schedules import Schedule
    if config.model == "mixture":
        from ..experiments.demo_mixture import TARGET_CLASS, default_mixture
        gm = default_mixture(Schedule.linear(1000))
        label = TARGET_CLASS if config.class_label is None else config.class_label
        if not 0 <= label < gm.num_classes:
            raise ValueError(f"class_label: the mixture has classes 0..{gm.num_classes - 1}, got {label}")
        conditional = config.conditional or config.cfg is not None or config.projection == "A"
        model = gm if conditional else (lambda x, t, **_: gm(x, t))
        cond = lambda idx, device: {"y": torch.full((len(idx),), label, dtype=torch.int64, device=device)}
        return LoadedModel(model, gm.schedule, (gm.dim,), cond,
                           classifier=lambda x, t, y: gm.log_prob_class(x, t, y))
    if config.model == "subspace":
        from ..experiments.analytic import SubspaceGaussian
        sg = SubspaceGaussian.random(Schedule.cosine(200), D=64, d=16, seed=0)
        return LoadedModel(sg, sg.schedule, (64,), lambda idx, device: {})
    return _load_user(config)


def _load_user(config: SampleConfig) -> LoadedModel:
    from ..schedules import Schedule
    module_name, _, func_name = config.model.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"model: expected 'module:function', got {config.model!r}")
    if os.getcwd() not in sys.path:  # let users point at a file in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model: cannot load {config.model!r}: {exc}") from exc
    got = func()
    spec: Dict[str, Any]
    if isinstance(got, dict):
        spec = dict(got)
    elif isinstance(got, tuple) and len(got) == 2:
        spec = {"model": got[0], "schedule": got[1]}
    else:
        spec = {"model": got}
    unknown = set(spec) - {"model", "schedule", "shape", "cond", "uncond", "classifier"}
    if unknown or "model" not in spec or not callable(spec["model"]):
        raise ValueError(f"model: {config.model!r} must return a model, (model, schedule) or a dict with a callable "
                         f"'model' and optional schedule/shape/cond/uncond/classifier; got keys {sorted(spec)}")
    model = spec["model"]
    schedule = spec.get("schedule") or Schedule.linear(1000)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"model: {config.model!r} returned a schedule of type {type(schedule).__name__}, "
                        "expected a gradguide.Schedule")
    shape = config.shape or spec.get("shape") or getattr(model, "sample_shape", None)
    if shape is None:
        raise ValueError(f"shape: {config.model!r} gives no sample shape; pass --shape, e.g. --shape 3,32,32")
    shape = tuple(int(s) for s in shape)
    user_cond = spec.get("cond") or {}

    def cond(idx: np.ndarray, device) -> dict:
        out = {}
        for key, value in user_cond.items():
            value = torch.as_tensor(value)
            if value.shape[0] == 1:
                value = value.expand(len(idx), *value.shape[1:])
            elif value.shape[0] == config.n:
                value = value[torch.as_tensor(idx)]
            else:
                raise ValueError(f"cond[{key!r}]: leading dimension must be 1 or n = {config.n}, got {value.shape[0]}")
            out[key] = value.to(device)
        return out
    return LoadedModel(model, schedule, shape, cond, classifier=spec.get("classifier"), uncond=spec.get("uncond"))


def _guidance(config: SampleConfig, loaded: LoadedModel):
    from .guidance_spec import build
    if config.classifier_scale is not None and loaded.classifier is None:
        raise ValueError(f"classifier_scale: model {config.model!r} has no classifier")
    spec = [("cfg", config.cfg)] if config.cfg is not None else []
    spec += [("classifier", config.classifier_scale)] if config.classifier_scale is not None else []
    return build(spec, config.projection, uncond=loaded.uncond, classifier=loaded.classifier)


def _clip(config: SampleConfig):
    """``Sampler.clip``: ``None`` for "auto" (the schedule's, e.g. a diffusers scheduler's
    ``clip_sample``), ``False`` for off, else the symmetric range."""
    if config.clip in (None, "none"):
        return False
    if config.clip == "auto":
        return None
    r = float(config.clip)  # validated by SampleConfig.check
    return (-r, r)


# -- shards on disk ---------------------------------------------------------------------------

def _checksum(samples: np.ndarray, indices: np.ndarray, seeds: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (samples, indices, seeds):
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    """A temporary next to ``path``, named after this process (host and pid) so that a cleaner
    can tell whether its owner is still alive."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def _write_atomically(path: str, mode: str, write) -> None:
    """Write through a per-process temporary, fsync, ``os.replace``. On failure (full disk,
    permissions) the temporary is removed and an ``OSError`` naming ``path`` is raised."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", path) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _atomic_savez(path: str, **arrays) -> None:
    _write_atomically(path, "wb", lambda f: np.savez(f, **arrays))


def _atomic_write_text(path: str, text: str) -> None:
    _write_atomically(path, "w", lambda f: f.write(text))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_shard(path: str, samples: np.ndarray, indices: np.ndarray, seeds: np.ndarray, digest: str) -> str:
    checksum = _checksum(samples, indices, seeds)
    _atomic_savez(path, samples=samples, indices=indices, seeds=seeds, sha256=np.array(checksum),
                  config=np.array(digest))
    return checksum


def read_shard(path: str, start: int, stop: int, seed: int, digest: str):
    """The shard's arrays and checksum, or ``None`` (with the reason) when it is missing,
    truncated, corrupt, from another configuration or not the expected samples."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("samples", "indices", "seeds", "sha256", "config")}
    except Exception as exc:  # a truncated or damaged zip raises many different types
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if str(arrays["config"]) != digest:
        return None, "written by a run with another configuration"
    if not np.array_equal(arrays["indices"], np.arange(start, stop, dtype=np.int64)):
        return None, "wrong sample indices"
    if not np.array_equal(arrays["seeds"], np.array([sample_seed(seed, i) for i in range(start, stop)],
                                                    dtype=np.int64)):
        return None, "wrong seeds"
    checksum = _checksum(arrays["samples"], arrays["indices"], arrays["seeds"])
    if checksum != str(arrays["sha256"]):
        return None, "checksum mismatch"
    return (arrays["samples"], arrays["indices"], arrays["seeds"], checksum), "ok"


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
    from ..config import Execution, Sampler
    from ..sampling import sample
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


class OutputInUse(ValueError):
    """Another ``gradguide sample`` run holds the output directory's lock."""


class _OutputLock:
    """Advisory lock on ``out`` for the whole run (rank 0). ``flock`` locks are released by the
    kernel when the holder dies, so a killed run never leaves the directory locked."""

    def __init__(self, out: str, wait: bool, log):
        self.path = os.path.join(out, LOCK)
        self.fd = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; say so instead of pretending
            log(f"out: advisory locks need fcntl (POSIX); {out} is not protected against a second run")
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not wait:
                os.close(self.fd)
                self.fd = None
                raise OutputInUse(f"out: {out!r} is in use by another gradguide sample run ({holder}); wait for "
                                  "it to finish, pass --wait-lock (wait_lock=True) to wait, or choose another --out")
            log(f"out: {out!r} is in use by another run ({holder}); waiting for it to finish (--wait-lock)")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown: it is still starting"

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _prepare_out(config: SampleConfig, log) -> _OutputLock:
    """Rank 0: create ``out``, take its lock, check or create ``run-config.json``."""
    out = config.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"out: cannot create the output directory {out}: {exc.strerror or exc}",
                      out) from exc
    if not os.path.isdir(out):
        raise OSError(errno.ENOTDIR, f"out: {out} exists and is not a directory", out)
    try:
        lock = _OutputLock(out, config.wait_lock, log)
    except OSError as exc:
        raise OSError(exc.errno, f"out: cannot create the lock file in {out}: {exc.strerror or exc}",
                      os.path.join(out, LOCK)) from exc
    try:
        _check_config_file(out, config)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_config_file(out: str, config: SampleConfig) -> None:
    path = os.path.join(out, CONFIG)
    mine = config.hashed()
    if not os.path.exists(path):
        # atomic create: a complete temporary hard-linked into place; the link fails if the
        # file appeared in the meantime, and then the file that won is compared below
        tmp = _tmp_name(path)
        try:
            _atomic_write_text(tmp, json.dumps(mine, indent=2, sort_keys=True))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.__cause__.strerror if exc.__cause__ else exc}",
                          path) from exc
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as exc:  # no hard links on this file system: exclusive create instead
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", path) from exc
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(mine, indent=2, sort_keys=True))
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            _remove_quietly(tmp)
    try:
        with open(path) as f:
            theirs = json.load(f)
        if not isinstance(theirs, dict):
            raise ValueError(f"expected a JSON object, got {type(theirs).__name__}")
    except ValueError as exc:
        raise ValueError(f"out: {path} is damaged ({exc}); it records the configuration of the run in {out!r}: "
                         "delete it only if the shards there are not wanted, or choose another --out") from None
    if theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"out: {out!r} holds a run with another configuration (differs in {', '.join(diff)}); "
                         "use a new output directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def _remove_stale_tmp(path: str) -> None:
    """Remove ``path``'s temporaries whose owner is dead (same host, pid gone) or is this
    process; a live process's temporary, or one from another host, is left alone."""
    folder, name = os.path.split(path)
    here = socket.gethostname()
    for entry in os.listdir(folder or "."):
        if not entry.startswith(name + ".tmp-"):
            continue
        host, _, pid = entry[len(name) + len(".tmp-"):].rpartition("-")
        if not pid.isdigit() or host not in ("", here):
            continue
        if int(pid) == os.getpid() or not _pid_alive(int(pid)):
            _remove_quietly(os.path.join(folder, entry))


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


def parse_shape(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"shape: expected comma-separated sizes such as 3,32,32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape: expected positive sizes, got {text!r}")
    return shape


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
