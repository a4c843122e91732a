"""Run metadata shared by the harness's result files."""
from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    """The checkout's commit (``"unknown"`` outside a git checkout or without git)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
