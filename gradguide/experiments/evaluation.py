"""Sample-quality metrics on small data (docs/mathematics.md#evaluation): accuracy under an evaluation classifier,
classifier-FID and k-NN precision / recall.

- **Fréchet distance** between Gaussian fits ``N(μ1, Σ1)``, ``N(μ2, Σ2)`` (Heusel et al. 2017,
  Eq. 6; Dowson & Landau 1982): ``‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}``.
  The trace of the matrix square root is computed from the eigenvalues of the symmetric PSD
  matrix ``Σ1^{1/2} Σ2 Σ1^{1/2}`` (same spectrum as ``Σ1 Σ2``), in float64 — no complex
  ``sqrtm`` round-off.
- **Classifier-FID**: the Fréchet distance of the evaluation classifier's penultimate features
  (here 64-dimensional) of generated vs real images, in place of Inception features.
- **Precision / recall** (Kynkäänniemi et al. 2019, §2): each real feature has a ball reaching its
  k-th nearest real neighbour (k = 3); precision is the share of generated samples inside some
  real ball, recall the share of real samples inside some generated ball (radii from the
  generated set). A point on a ball's boundary counts as inside, so identical sets give 1 and 1.

:func:`evaluate_digits` applies all of them to 8×8 digit samples against the held-out digits.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
import torch


def _as_2d(name: str, a) -> np.ndarray:
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected features shaped [N, D], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: features contain NaN or inf")
    return a


def gaussian_fit(features) -> tuple:
    """``(μ, Σ)`` of features ``[N, D]`` (unbiased covariance, N ≥ 2), float64."""
    f = _as_2d("gaussian_fit: features", features)
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_fit: features: need at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, m in (("mu2", mu2),):
        if m.shape != (d,):
            raise ValueError(f"frechet_distance: {name}: expected shape ({d},), got {m.shape}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"frechet_distance: {name}: expected shape ({d}, {d}), got {s.shape}")
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def fid_from_features(real, fake) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``[N, D]``."""
    return frechet_distance(*gaussian_fit(real), *gaussian_fit(fake))


def _kth_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(f, f)
    # k-th nearest neighbour excluding the point itself (index 0 of the sorted row is the self-distance 0)
    return d.kthvalue(k + 1, dim=1).values


def precision_recall(real, fake, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls, ``k`` = 3."""
    r = torch.as_tensor(_as_2d("precision_recall: real", real))
    g = torch.as_tensor(_as_2d("precision_recall: fake", fake))
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"precision_recall: real and fake features differ in dimension ({r.shape[1]} vs {g.shape[1]})")
    if not isinstance(k, int) or k < 1 or k >= min(len(r), len(g)):
        raise ValueError(f"precision_recall: k: expected an integer 1 <= k < min(N_real, N_fake) = "
                         f"{min(len(r), len(g))}, got {k!r}")
    r_rad, g_rad = _kth_radius(r, k), _kth_radius(g, k)
    cross = torch.cdist(g, r)  # [N_fake, N_real]
    precision = (cross <= r_rad.unsqueeze(0)).any(dim=1).double().mean()
    recall = (cross <= g_rad.unsqueeze(1)).any(dim=0).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


class DigitsEvaluator:
    """Metrics of 8×8 digit samples against a real reference set (default: the 360 held-out
    digits), all through the shipped evaluation classifier. Reference features are computed once."""

    def __init__(self, classifier=None, reference: str = "heldout", k: int = 3):
        from .digits import data, models
        self.classifier = classifier if classifier is not None else models.load("eval_classifier")
        self.k = k
        x_ref, self.y_ref = data.load_split(reference)
        self.ref_features = self.features(x_ref)
        self.ref_stats = gaussian_fit(self.ref_features)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(_digits_shape(x).float()).double().numpy()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """``{"n", "fid", "precision", "recall"}`` plus ``"accuracy"`` when ``labels`` (the target
        classes) are given: the share the evaluation classifier assigns to its target."""
        x = _digits_shape(x).float()
        feats = self.features(x)
        out: Dict[str, float] = {"n": int(x.shape[0])}
        if labels is not None:
            labels = torch.as_tensor(labels).long().view(-1)
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"evaluate: labels: expected {x.shape[0]} labels, got {labels.shape[0]}")
            out["accuracy"] = float((self.classifier(x).argmax(1) == labels).float().mean())
        out["fid"] = frechet_distance(*self.ref_stats, *gaussian_fit(feats))
        out.update(precision_recall(self.ref_features, feats, self.k))
        return out


def _digits_shape(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 2 and x.shape[1] == 64:
        x = x.view(-1, 1, 8, 8)
    if x.dim() == 3 and tuple(x.shape[1:]) == (8, 8):
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"evaluate: samples: expected 8x8 digits shaped [N, 1, 8, 8], [N, 8, 8] or [N, 64] "
                         f"in [-1, 1], got {tuple(x.shape)}")
    return x


def evaluate_digits(x, labels=None, reference: str = "heldout") -> Dict[str, float]:
    """One-shot :class:`DigitsEvaluator` call."""
    return DigitsEvaluator(reference=reference)(x, labels)


# -- CLI ----------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("samples", nargs="?", default=None,
                   help="a .npz or .pt file of 8x8 digit samples in [-1, 1] (key 'samples' or 'x'; shape "
                        "[N,1,8,8], [N,8,8] or [N,64]); optional target labels under 'labels' or 'y'")
    p.add_argument("--real", choices=["train", "heldout"], default=None,
                   help="evaluate a real split instead of a file (a reference point: the train split scores "
                        "the floor real data reaches)")
    p.add_argument("--label", type=int, default=None, help="one target class for all samples (accuracy)")
    p.add_argument("--reference", choices=["heldout", "train"], default="heldout",
                   help="real reference set (default: the 360 held-out digits)")
    p.add_argument("--json", default=None, help="also write the metrics as JSON to this path")


def _load_samples(path: str):
    if not os.path.exists(path):
        raise SystemExit(f"gradguide evaluate: samples: no file at {path}")
    if path.endswith(".pt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        obj = obj if isinstance(obj, dict) else {"samples": obj}
    else:
        obj = dict(np.load(path))
    x = next((obj[k] for k in ("samples", "x") if k in obj), None)
    if x is None:
        raise SystemExit(f"gradguide evaluate: samples: {path} has no 'samples' or 'x' array (keys: {sorted(obj)})")
    y = next((obj[k] for k in ("labels", "y") if k in obj), None)
    return torch.as_tensor(np.asarray(x)), None if y is None else torch.as_tensor(np.asarray(y))


def run_cli(args) -> int:
    from ..tools import outputs
    if (args.samples is None) == (args.real is None):
        raise SystemExit("gradguide evaluate: give either a samples file or --real train|heldout")
    if args.json:
        outputs.claim(args.json, option="--json")
    from .digits import data
    if args.real is not None:
        x, y = data.load_split(args.real)
        source = f"real:{args.real}"
    else:
        x, y = _load_samples(args.samples)
        source = args.samples
    if args.label is not None:
        if not 0 <= args.label < data.NUM_CLASSES:
            raise SystemExit(f"gradguide evaluate: --label: expected 0..{data.NUM_CLASSES - 1}, got {args.label}")
        y = torch.full((x.shape[0],), args.label)
    try:
        metrics = DigitsEvaluator(reference=args.reference)(x, y)
    except ValueError as exc:
        raise SystemExit(f"gradguide evaluate: {exc}") from None
    metrics = {"source": source, "reference": args.reference, **metrics}
    for key, value in metrics.items():
        print(f"{key:>10s}: {value:.4f}" if isinstance(value, float) else f"{key:>10s}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0
