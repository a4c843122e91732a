"""Run metadata and result files shared by the harness's suites (ops, loop/paper, peers, gpu,
dry run, compile gates, launch counts): one place for the date, commit, machine and versions
a result file records, and for writing it as JSON + markdown."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..tools import outputs

# A timing whose repeats spread more than this, (max - min) / median, is flagged as untrustworthy:
# on a quiet machine repeats of these workloads agree to a few per cent, while a busy one (other
# processes on the cores) spreads them by tens of per cent and can turn a ratio upside down.
SPREAD_LIMIT = 0.25
UNSTABLE_MARK = "⚠"


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


def spread(times: Sequence[float]) -> Optional[float]:
    """``(max - min) / median`` of repeated timings; ``None`` with fewer than two (nothing to
    compare), ``inf`` for a zero median."""
    times = [float(t) for t in times]
    if len(times) < 2:
        return None
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else float("inf")


def unstable(*spreads: Optional[float], limit: float = SPREAD_LIMIT) -> bool:
    """Whether any of ``spreads`` (a row's, and the row its ratio divides by) exceeds ``limit``."""
    return any(s is not None and s > limit for s in spreads)


def spread_cell(row: dict) -> str:
    """The markdown cell of a row's ``spread`` / ``unstable`` fields: ``12%``, ``41% ⚠``, ``-``."""
    s = row.get("spread")
    text = "-" if s is None else ("inf" if s == float("inf") else f"{100 * s:.0f}%")
    return f"{text} {UNSTABLE_MARK}" if row.get("unstable") else text


def spread_note(limit: float = SPREAD_LIMIT) -> str:
    return (f"spread = (max - min) / median of the timed repeats; {UNSTABLE_MARK}: above {100 * limit:.0f}% for this "
            "row or the row its ratio divides by (a busy machine): do not quote that row's time or ratio")


def count_unstable(rows: Iterable[dict]) -> int:
    return sum(1 for r in rows if r.get("unstable"))


def warn_unstable(command: str, flagged: int, total: int, limit: float = SPREAD_LIMIT, file=None) -> None:
    """One line on stderr when ``flagged`` of ``total`` rows are unstable (none otherwise)."""
    if flagged:
        print(f"{command}: warning: {flagged} of {total} rows spread more than {100 * limit:.0f}% between repeats "
              f"(marked {UNSTABLE_MARK} in the table, 'unstable' in the JSON): the machine was busy; rerun on a "
              "quiet machine before quoting them", file=file or sys.stderr)


def device_type(device: Optional[str]) -> str:
    """The device type a suite will run on (``device`` as given on the command line)."""
    return torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")


def report_paths(out_dir: str, stem: str) -> List[str]:
    return [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]


def claim_report(out_dir: str, stem: str) -> List[str]:
    """Check before a suite runs that ``<stem>.json`` / ``.md`` may be written (the command line
    refuses to overwrite without ``--force``; see :mod:`gradguide.tools.outputs`)."""
    paths = report_paths(out_dir, stem)
    outputs.claim(*paths)
    return paths


def today() -> str:
    """The date result files are named by (UTC, as :func:`now`)."""
    return now()[:10]


def write_report(out_dir: str, stem: str, data: dict, markdown: str, indent: int = 2) -> List[str]:
    """Write ``<out_dir>/<stem>.json`` (``data``) and ``<stem>.md``; returns both paths."""
    paths = claim_report(out_dir, stem)
    os.makedirs(out_dir, exist_ok=True)
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
