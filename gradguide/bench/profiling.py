"""Memory of a guided sampling run, per phase and over time (the measurements of
``gradguide profile``, whose command is :mod:`gradguide.bench.profile`).

Where the memory of a guided step goes (numbers a user can reproduce):

- **forward** — the model's calls (and a classifier's forward);
- **backward** — the autograd vector-Jacobian products: G_loss's ``∇_{x_t}(gᵀx̂_0)`` through the
  denoiser (Guo et al., NeurIPS 2024, Definition 1), the classifier's ``∇ log p_φ(y|x_t)``
  (Dhariwal & Nichol 2021), DPS's residual gradient;
- **guidance** — everything else in a step: the reduce/combine passes (docs/architecture.md, reduce to combine),
  the coefficient programs (PixelAsParam projections, CFG/APG weights), the sampler's update
  and the noise;
- **setup** — ``sample``'s validation, scalar tables and initial noise, up to the first model call;
- **graph pool** — on CUDA with ``graph=True``: the memory the captured steps keep reserved
  (their private pool), measured as the growth of the allocator's reserved bytes across the
  capturing pass, and the peak while replaying.

Sources, each where it exists: torch's CUDA allocator (``max_memory_allocated`` with
``reset_peak_memory_stats`` at every phase boundary — host-side calls, no device sync), NVML
(``nvidia-ml-py``, optional; the device is matched to torch's by UUID, polled in a thread;
it reads *device-wide* used memory, every process included) and, on any device, the process
resident set size (``psutil`` when installed, else ``/proc/self/statm``, else the
``getrusage`` high-water mark, which cannot go down). Polled sources are sampled every
``interval`` seconds in a daemon thread and also synchronously at every phase boundary.

Phases are marked without touching the sampler: the model (and classifier) callables are
wrapped, and an identity autograd function around each call marks where the backward pass
enters and leaves it. A replayed CUDA graph runs no host code, so its steps show as one
"graph replay" phase.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

PHASES = ("setup", "forward", "backward", "guidance")


# -- memory sources ----------------------------------------------------------------------------

class RSSReader:
    """Current resident set size of this process, in bytes."""

    def __init__(self, method: str = "auto"):
        if method not in ("auto", "psutil", "statm", "getrusage"):
            raise ValueError(f"RSSReader: method: expected 'auto', 'psutil', 'statm' or 'getrusage', got {method!r}")
        self.method = method
        self._proc = None
        if method in ("auto", "psutil"):
            try:
                import psutil
                self._proc = psutil.Process()
                self.method = "psutil"
            except ImportError:
                if method == "psutil":
                    raise RuntimeError("RSSReader: method='psutil' but psutil is not installed "
                                       "(pip install psutil)") from None
                self.method = "statm"
        if self.method == "statm" and not os.path.exists("/proc/self/statm"):
            self.method = "getrusage"
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @property
    def is_high_water_mark(self) -> bool:
        return self.method == "getrusage"

    def __call__(self) -> int:
        if self.method == "psutil":
            return int(self._proc.memory_info().rss)
        if self.method == "statm":
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        # ru_maxrss is KiB on Linux, bytes on macOS; it is the peak so far, never the current value
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _uuid_key(value) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    value = str(value).lower()
    for prefix in ("gpu-", "mig-"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    return value


class NVMLReader:
    """Device-wide used memory from NVML for the GPU torch calls ``device``, matched by UUID.

    ``available`` is False (and ``reason`` says why) when nvidia-ml-py is missing, NVML does not
    initialise, or no NVML device has torch's UUID (e.g. a MIG slice: NVML's per-device memory
    would not be the slice's)."""

    def __init__(self, device: torch.device):
        self.available, self.reason, self._handle, self._nvml = False, "", None, None
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            want = _uuid_key(torch.cuda.get_device_properties(index).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                if _uuid_key(pynvml.nvmlDeviceGetUUID(handle)) == want:
                    self._handle, self._nvml, self.available = handle, pynvml, True
                    self.uuid = want
                    return
            self.reason = f"no NVML device has torch's UUID {want}"
        except Exception as exc:  # NVML raises its own error types; report, never crash a profile
            self.reason = f"NVML unavailable: {exc}"

    def __call__(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


class MemorySampler:
    """Polls memory sources in a daemon thread; ``samples`` holds ``(t, {source: bytes})``.

    Sources: ``"rss"`` always; ``"nvml"`` where :class:`NVMLReader` finds the device;
    ``"cuda_allocated"``/``"cuda_reserved"`` on CUDA (torch's allocator counters)."""

    def __init__(self, device, interval: float = 0.005, rss_method: str = "auto", nvml: bool = True):
        if interval <= 0:
            raise ValueError(f"MemorySampler: interval: expected seconds > 0, got {interval!r}")
        self.device = torch.device(device)
        self.interval = interval
        self.readers: Dict[str, Callable[[], int]] = {}
        self.rss = RSSReader(rss_method)
        self.readers["rss"] = self.rss
        self.nvml = NVMLReader(self.device) if nvml else None
        if self.nvml is not None and self.nvml.available:
            self.readers["nvml"] = self.nvml
        if self.device.type == "cuda":
            self.readers["cuda_allocated"] = lambda: torch.cuda.memory_allocated(self.device)
            self.readers["cuda_reserved"] = lambda: torch.cuda.memory_reserved(self.device)
        self.samples: List[tuple] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def read(self) -> dict:
        """Take one sample now (also stored)."""
        values = {name: reader() for name, reader in self.readers.items()}
        with self._lock:
            self.samples.append((time.perf_counter() - self.t0, values))
        return values

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.read()

    def start(self) -> "MemorySampler":
        self._stop.clear()
        self.read()
        self._thread = threading.Thread(target=self._loop, name="gradguide-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.read()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def peak(self, source: str, start: float = 0.0, end: float = float("inf")) -> Optional[int]:
        """Largest sampled value of ``source`` between ``start`` and ``end`` (seconds since t0)."""
        with self._lock:
            values = [v[source] for t, v in self.samples if start <= t <= end and source in v]
        return max(values) if values else None

    def now(self) -> float:
        return time.perf_counter() - self.t0


# -- phases -------------------------------------------------------------------------------------

class PhaseTracker:
    """Per-phase peak memory and time. Phases nest (forward/backward inside a step's guidance
    phase); an inner phase's time and memory count for it alone.

    On CUDA the allocator's peak is reset at every boundary and read at the next one, so each
    interval's peak is attributed to the phase active in it. Polled sources are attributed by
    timestamp."""

    def __init__(self, device, sampler: Optional[MemorySampler] = None):
        self.device = torch.device(device)
        self.sampler = sampler
        self.stack: List[str] = []
        self.intervals: List[tuple] = []     # (phase, start, end)
        self.cuda_peak: Dict[str, int] = {}
        self.counts: Dict[str, int] = {}
        self._since = None

    def _boundary(self) -> None:
        """Close the current interval (attributed to the phase on top of the stack)."""
        now = self.sampler.now() if self.sampler is not None else time.perf_counter()
        if self.sampler is not None:
            self.sampler.read()
        if self.stack and self._since is not None:
            phase = self.stack[-1]
            self.intervals.append((phase, self._since, now))
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.cuda_peak[phase] = max(self.cuda_peak.get(phase, 0), peak)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._since = now

    def enter(self, phase: str) -> None:
        self._boundary()
        self.stack.append(phase)
        self.counts[phase] = self.counts.get(phase, 0) + 1

    def exit(self, phase: str) -> None:
        if not self.stack or self.stack[-1] != phase:
            # an unbalanced mark (e.g. a backward that never reached a model input): close up to it
            if phase not in self.stack:
                return
            while self.stack[-1] != phase:
                self._boundary()
                self.stack.pop()
        self._boundary()
        self.stack.pop()

    def close(self) -> None:
        while self.stack:
            self.exit(self.stack[-1])

    def summary(self) -> Dict[str, dict]:
        out = {}
        seen = {p for p, _, _ in self.intervals}
        names = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))
        for phase in names:
            spans = [(s, e) for p, s, e in self.intervals if p == phase]
            row = {"count": self.counts.get(phase, 0), "time_s": sum(e - s for s, e in spans)}
            if phase in self.cuda_peak:
                row["peak_cuda_allocated_bytes"] = self.cuda_peak[phase]
            if self.sampler is not None:
                for source in self.sampler.readers:
                    if source in ("cuda_allocated", "cuda_reserved"):
                        continue  # the allocator's own peak (above) is exact; polling would miss spikes
                    peaks = [self.sampler.peak(source, s, e) for s, e in spans]
                    peaks = [p for p in peaks if p is not None]
                    row[f"peak_{source}_bytes"] = max(peaks) if peaks else None
            out[phase] = row
        return out


class _Mark(torch.autograd.Function):
    """Identity whose backward marks a phase boundary (``enter`` or ``exit`` of "backward")."""

    @staticmethod
    def forward(ctx, x, tracker, action):
        ctx.tracker, ctx.action = tracker, action
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.action == "enter":
            ctx.tracker.enter("backward")
        else:
            ctx.tracker.exit("backward")
        return grad, None, None


def phased(fn: Callable, tracker: PhaseTracker) -> Callable:
    """Wrap ``fn(x, t, **kw)`` (a model or a classifier's log-prob) so its call is a "forward"
    phase and the backward pass through it a "backward" phase."""
    if not callable(fn):
        raise TypeError(f"phased: fn: expected a callable, got {type(fn).__name__}")

    def call(x, *args, **kwargs):
        if tracker.stack and tracker.stack[-1] == "setup":
            # the first model call ends the sampler's setup (validation, tables, initial noise)
            tracker.exit("setup")
            tracker.enter("guidance")
        marked = _Mark.apply(x, tracker, "exit") if x.requires_grad else x
        tracker.enter("forward")
        try:
            out = fn(marked, *args, **kwargs)
        finally:
            tracker.exit("forward")
        if isinstance(out, torch.Tensor) and out.requires_grad and x.requires_grad:
            out = _Mark.apply(out, tracker, "enter")
        return out
    return call


class PhasedModel(torch.nn.Module):
    """A module version of :func:`phased` (keeps ``parameters()`` visible, e.g. for Algorithm 2)."""

    def __init__(self, model, tracker: PhaseTracker):
        super().__init__()
        self.model = model
        self._call = phased(model, tracker)

    def forward(self, x, t, **cond):
        return self._call(x, t, **cond)


# -- a profiled run -------------------------------------------------------------------------------

def profile_sampling(make_run: Callable[[Callable[[Callable], Callable]], dict], device, *, graph: bool = False,
                     trace: Optional[str] = None, interval: float = 0.005, rss_method: str = "auto",
                     progress: bool = True) -> dict:
    """Profile one guided sampling pass, phase by phase.

    ``make_run(wrap)`` returns the keyword arguments of :func:`gradguide.sample` (``model``,
    ``shape`` and the rest) after passing every callable that should be marked — the model, a
    classifier's log-prob — through ``wrap``. Returns a dict: per-phase peaks and times, the
    sampled timeline, and (CUDA with ``graph=True``) the graph pool.
    """
    import gradguide
    dev = torch.device(device)
    result = {"device_type": dev.type, "phases": {}, "graph": None, "trace": None}
    sampler = MemorySampler(dev, interval=interval, rss_method=rss_method)
    result["sources"] = sorted(sampler.readers)
    result["rss_method"] = sampler.rss.method
    result["nvml"] = ("available (UUID " + sampler.nvml.uuid + ")") if sampler.nvml is not None and \
        sampler.nvml.available else (sampler.nvml.reason if sampler.nvml is not None else "off")
    tracker = PhaseTracker(dev, sampler)
    steps_done = []

    def callback(record):
        # a step ends: close it and open the next step's default phase
        tracker.exit("guidance")
        steps_done.append(sampler.now())
        tracker.enter("guidance")

    def run_pass(kwargs, cb=None):
        kwargs = dict(kwargs)
        model, shape = kwargs.pop("model"), kwargs.pop("shape")
        out = gradguide.sample(model, shape, diagnostics=gradguide.Diagnostics(callback=cb, progress=progress),
                               **kwargs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    with sampler:
        base = sampler.read()
        result["baseline"] = base
        kwargs = make_run(lambda fn: phased(fn, tracker))
        steps_start = sampler.now()
        tracker.enter("setup")
        out = run_pass(kwargs, callback)
        tracker.close()
        result["phases"] = tracker.summary()
        result["step_ends_s"] = steps_done
        result["pass_s"] = sampler.now() - steps_start
        result["finite"] = bool(torch.isfinite(out).all())
        del out
        if graph:
            result["graph"] = _graph_pass(make_run, dev, sampler, run_pass)
        result["timeline"] = [{"t": t, **v} for t, v in sampler.samples]
        result["marks"] = [{"phase": p, "start": s, "end": e} for p, s, e in tracker.intervals]
    if trace:
        result["trace"] = _trace(make_run, dev, trace, run_pass)
    return result


def _with_graph(kwargs: dict, cache) -> dict:
    """A workload's sample() arguments with ``cache`` as the execution's graph."""
    import dataclasses

    from ..config import Execution
    kwargs["execution"] = dataclasses.replace(kwargs.get("execution") or Execution(), graph=cache)
    return kwargs


def _graph_pass(make_run, dev, sampler, run_pass) -> dict:
    """A pass with ``graph=GraphCache()``: on CUDA the capture's pool and the replay peak; on a
    CPU the documented eager fallback (recorded, not measured as a graph)."""
    import warnings

    from ..graphs import GraphCache
    cache = GraphCache()
    kwargs = _with_graph(make_run(lambda fn: fn), cache)
    if dev.type != "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = sampler.now()
            run_pass(kwargs)
        return {"captured": False, "captures": cache.captures, "pass_s": sampler.now() - start,
                "note": "; ".join(str(w.message) for w in caught) or "no CUDA device: eager"}
    torch.cuda.synchronize(dev)
    reserved0 = torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = sampler.now()
    run_pass(kwargs)          # captures each step variant, then replays
    capture_s = sampler.now() - start
    pool = torch.cuda.memory_reserved(dev) - reserved0
    capture_peak = torch.cuda.max_memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    kwargs = _with_graph(make_run(lambda fn: fn), cache)
    start = sampler.now()
    run_pass(kwargs)          # replay only: the same signature reuses the captures
    return {"captured": True, "captures": cache.captures, "reuses": cache.reuses,
            "graph_pool_reserved_bytes": pool, "capture_pass_peak_cuda_allocated_bytes": capture_peak,
            "replay_pass_peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "capture_pass_s": capture_s, "replay_pass_s": sampler.now() - start,
            "replay_window": [start, sampler.now()]}


def _trace(make_run, dev, path: str, run_pass) -> str:
    """A torch.profiler chrome trace (CPU, plus CUDA where present) of one pass, with memory."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    kwargs = make_run(lambda fn: fn)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        run_pass(kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prof.export_chrome_trace(path)
    return path


def plot(result: dict, path: str, title: str = "") -> str:
    """Memory over the run: every polled source, with forward/backward phases shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timeline = result["timeline"]
    fig, ax = plt.subplots(figsize=(9, 4))
    sources = [s for s in result["sources"] if s != "cuda_reserved"] + \
        (["cuda_reserved"] if "cuda_reserved" in result["sources"] else [])
    for source in sources:
        ts = [p["t"] for p in timeline if source in p]
        ax.plot(ts, [p[source] / 2 ** 20 for p in timeline if source in p], label=source, lw=1)
    colors = {"forward": "tab:blue", "backward": "tab:red"}
    shown = set()
    for mark in result["marks"]:
        if mark["phase"] in colors:
            label = mark["phase"] if mark["phase"] not in shown else None
            shown.add(mark["phase"])
            ax.axvspan(mark["start"], mark["end"], color=colors[mark["phase"]], alpha=0.12, lw=0, label=label)
    if result.get("graph") and result["graph"].get("replay_window"):
        s, e = result["graph"]["replay_window"]
        ax.axvspan(s, e, color="tab:green", alpha=0.12, lw=0, label="graph replay")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("MiB")
    ax.set_title(title or "gradguide profile: memory over a sampling run")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
