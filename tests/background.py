"""Expensive preparations that depend on nothing else in the session (building the wheel,
compiling the Triton kernels for CUDA targets) run on one background thread, one after
another, while the rest of the suite runs: the test session itself keeps one core busy, so on a
machine with two or more the preparations overlap with it instead of adding to it. What they
compute is unchanged; a test that needs one waits for it.

A preparation is declared with :func:`job` next to the tests that use it, naming the fixture
that returns its result; ``conftest.py`` starts the jobs that the selected tests need when
collection ends (in the order the tests need them) and moves those tests to the end of the
session, so that the jobs have the rest of the suite to finish in. Run alone, a job simply
runs when its fixture asks for it.
"""
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Dict, List

_JOBS: Dict[str, "Job"] = {}        # fixture name -> job
_LIVE: List[subprocess.Popen] = []  # subprocesses of running jobs (killed if the session ends first)
_TEMP: List[str] = []               # folders the jobs made (removed when the session ends)
_LOCK = threading.Lock()


class Job:
    def __init__(self, fixture: str, fn: Callable):
        self.fixture, self.fn = fixture, fn
        self.claimed = False   # by the background thread or by a test that runs it itself
        self.done = threading.Event()
        self.value = self.error = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:   # re-raised in the test that needs the result
            self.error = exc
        finally:
            self.done.set()

    def result(self):
        """The job's result: waits for its background run, or runs it here if that has not begun
        (not started, or still queued behind another job)."""
        with _LOCK:
            inline, self.claimed = not self.claimed, True
        if inline:
            self.run()
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def job(fixture: str):
    """Declare ``fn`` (no arguments) as the background job behind fixture ``fixture``; returns
    the :class:`Job` (its ``result()`` is what the fixture returns)."""
    def register(fn):
        _JOBS[fixture] = Job(fixture, fn)
        return _JOBS[fixture]
    return register


def run(cmd, timeout=None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` that
    the session can stop: a job still running when the session ends (``-x``, Ctrl-C) is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    with _LOCK:
        _LIVE.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        with _LOCK:
            _LIVE.remove(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mkdtemp(prefix: str) -> str:
    """A temporary folder removed when the session ends."""
    path = tempfile.mkdtemp(prefix=f"gradguide-test-{prefix}-")
    _TEMP.append(path)
    return path


def jobs() -> Dict[str, Job]:
    return dict(_JOBS)


def start(selected: List[Job]) -> None:
    """Run ``selected`` one after another on one background thread (a test that needs a job
    still queued runs it itself)."""
    def loop():
        # lower this thread's priority (Linux: per thread), and so its subprocesses': the test
        # session's own threads come first, so an OpenMP team in a test is not left waiting on a
        # thread the scheduler gave to a compiler
        try:
            os.nice(10)
        except (AttributeError, OSError):
            pass
        for j in selected:
            with _LOCK:
                mine, j.claimed = not j.claimed, True
            if mine:
                j.run()
    threading.Thread(target=loop, name="background-jobs", daemon=True).start()


def stop() -> None:
    """End of session: kill what still runs, remove the temporary folders."""
    with _LOCK:
        live = list(_LIVE)
    for proc in live:
        if proc.poll() is None:
            proc.kill()
    for path in _TEMP:
        shutil.rmtree(path, ignore_errors=True)
