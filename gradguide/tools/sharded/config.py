"""A sharded run's configuration (see :mod:`gradguide.tools.sharded`): what it hashes, the
per-sample seeds and the plan of shards."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional, Tuple

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
