"""Where the command line may write, and when it may replace a file.

Two rules, one place, applied by every ``gradguide`` subcommand that writes files:

- **Never into the installed package.** Outputs go to the working directory (or ``--out``);
  a path inside the ``gradguide`` package folder (its shipped weights, its code) is refused,
  ``--force`` or not, so a retraining run cannot replace the weights every other command loads.
- **Never over an existing file without ``--force``.** A command that would replace a file
  refuses before it starts its work and names the file; ``--force`` replaces it. A file the
  same command wrote earlier in the same run (a log it rewrites as it goes) is its own.

Library calls are not affected (the checks are active inside :func:`guard`, which the command
line enters), except the package rule, which :func:`claim` applies always.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional, Set

# None: not under the command line (library call); else (force, paths claimed so far)
_STATE: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("gradguide_outputs", default=None)


class OutputExists(FileExistsError):
    """An output file exists and the command was not given ``--force``."""


def package_dir() -> str:
    """The real path of the installed ``gradguide`` package folder."""
    return os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inside_package(path: str) -> bool:
    """Whether ``path`` (existing or not, symlinks resolved) lies in the package folder."""
    pkg = package_dir()
    real = os.path.realpath(os.path.abspath(path))
    return real == pkg or real.startswith(pkg + os.sep)


@contextlib.contextmanager
def guard(force: bool) -> Iterator[None]:
    """The command line's scope: inside it :func:`claim` refuses existing files unless ``force``."""
    token = _STATE.set((bool(force), set()))
    try:
        yield
    finally:
        _STATE.reset(token)


def active() -> bool:
    return _STATE.get() is not None


def claim(*paths: str, option: str = "--out") -> None:
    """Check that each path may be written (see the module docstring); call it before the work
    that produces the file, and again where the file is written. ``option`` names the argument
    that chooses the path, for the message. Raises ``ValueError`` (inside the package) or
    :class:`OutputExists` (a ``FileExistsError``)."""
    state = _STATE.get()
    for path in paths:
        if inside_package(path):
            raise ValueError(f"{option}: {path} is inside the installed gradguide package ({package_dir()}); "
                             "the command line never writes there: choose a path outside it (the default is the "
                             "working directory)")
        if state is None:
            continue
        force, claimed = state
        real = os.path.realpath(os.path.abspath(path))
        if real in claimed:
            continue
        if os.path.lexists(path) and not force:
            raise OutputExists(f"{option}: {path} exists; pass --force to overwrite it, or choose another path")
        claimed.add(real)


def claimed() -> Set[str]:
    """The paths claimed so far in this command (for tests)."""
    state = _STATE.get()
    return set(state[1]) if state else set()
