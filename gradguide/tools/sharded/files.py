"""A sharded run's files (see :mod:`gradguide.tools.sharded`): atomic writes through per-process
temporaries, shards with their checksums, the output directory's lock and ``run-config.json``."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time

import numpy as np

from .config import CONFIG, LOCK, SampleConfig, sample_seed

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
