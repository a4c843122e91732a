"""Run metadata and result files shared by the harness's suites (ops, loop/paper, peers, gpu,
dry run, compile gates, launch counts): one place for the date, commit, machine and versions
a result file records, and for writing it as JSON + markdown."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch


def git_commit() -> str:
    """The checkout's commit (``"unknown"`` outside a git checkout or without git, e.g. an
    installed package)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def now() -> str:
    """The UTC time, ISO 8601 to the second (result files are named by its first 10 characters)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, the CPU's model name and torch's thread count otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def versions(*modules: str) -> Dict[str, Optional[str]]:
    """``{module: version}`` (``None`` where it is not installed); ``"cuda"`` is torch's CUDA."""
    out: Dict[str, Optional[str]] = {}
    for name in modules:
        if name == "cuda":
            out[name] = torch.version.cuda
            continue
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def write_report(out_dir: str, stem: str, data: dict, markdown: str, indent: int = 2) -> List[str]:
    """Write ``<out_dir>/<stem>.json`` (``data``) and ``<stem>.md``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=indent, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths


def print_report(paths: List[str], markdown: str) -> int:
    """The end of a suite's command: the files written, then the markdown; exit status 0."""
    for path in paths:
        print(path)
    print(markdown)
    return 0
