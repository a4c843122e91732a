"""scikit-learn's bundled 8×8 digits (UCI optical recognition; 1,797 images, 10 classes).

The split is fixed: stratified, 360 held-out images (36 per class), ``random_state=0``; the
remaining 1,437 train every model. Pixels (integers 0..16) are scaled to [−1, 1] and shaped
``[N, 1, 8, 8]``. The held-out images are never seen in training and are the reference set of
:mod:`gradguide.experiments.evaluation`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

HELD_OUT = 360
SPLIT_SEED = 0
NUM_CLASSES = 10


def _sklearn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError("gradguide.experiments.digits needs scikit-learn (its bundled 8x8 digits): "
                          "pip install scikit-learn") from exc
    return load_digits, train_test_split


@lru_cache(maxsize=1)
def _split():
    load_digits, train_test_split = _sklearn()
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y))
    tr, te = train_test_split(idx.numpy(), test_size=HELD_OUT, stratify=y.numpy(), random_state=SPLIT_SEED)
    tr, te = torch.as_tensor(tr).sort().values, torch.as_tensor(te).sort().values
    return x[tr], y[tr], x[te], y[te]


def load_split(part: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 8, 8] in [−1, 1], labels [N])`` of ``part``: ``"train"`` (1,437) or
    ``"heldout"`` (360)."""
    x_tr, y_tr, x_te, y_te = _split()
    if part == "train":
        return x_tr.clone(), y_tr.clone()
    if part in ("heldout", "test"):
        return x_te.clone(), y_te.clone()
    raise ValueError(f"load_split: part: expected 'train' or 'heldout', got {part!r}")
