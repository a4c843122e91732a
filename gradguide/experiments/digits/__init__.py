"""PixelAsParam on real data: scikit-learn's bundled 8×8 digits (docs/mathematics.md#pixelasparam, #evaluation).

- :mod:`.data` — the fixed train / held-out split, scaled to [−1, 1];
- :mod:`.models` — small conv nets with time / label embeddings: the class-conditional ε-model
  (label dropout, for CFG), the unconditional ε-model, the time-conditioned noisy classifier and
  the clean evaluation classifier; ``load(name)`` reads the shipped weights;
- :mod:`.train` — deterministic training (``gradguide train-digits``);
- :mod:`.sweep` — guidance sweeps, baseline vs PixelAsParam (``gradguide sweep-digits``).

Metrics live in :mod:`gradguide.experiments.evaluation` (``gradguide evaluate``).
"""
from .data import load_split
from .models import load, MODEL_NAMES

__all__ = ["load_split", "load", "MODEL_NAMES"]
