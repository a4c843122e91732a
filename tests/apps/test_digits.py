"""PixelAsParam on the 8x8 digits — data split, shipped models, guidance behaving as
guidance with every policy, real conflicts in the telemetry, the CLI and a tiny sweep."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="gradguide.experiments.digits needs scikit-learn (pip install scikit-learn)")

from gradguide.experiments.digits import data, models, sweep  # noqa: E402
from gradguide.experiments.evaluation import DigitsEvaluator  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return sweep.Models()


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_split_is_fixed_stratified_and_disjoint():
    x, y = data.load_split("train")
    xh, yh = data.load_split("heldout")
    assert x.shape == (1437, 1, 8, 8) and xh.shape == (360, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert yh.bincount().min() >= 35 and yh.bincount().max() <= 37
    # no held-out image is a training image at the same index of the original data set
    from sklearn.datasets import load_digits
    full = torch.tensor(load_digits().images, dtype=torch.float32).view(-1, 64) / 8 - 1
    as_rows = {tuple(r) for r in x.view(-1, 64).tolist()}
    assert len(as_rows) > 1400
    assert torch.equal(data.load_split("train")[0], x)  # deterministic
    assert full.shape[0] == x.shape[0] + xh.shape[0]
    with pytest.raises(ValueError, match="part"):
        data.load_split("validation")


def test_shipped_weights_are_small_and_record_their_training():
    total = sum(os.path.getsize(models.weights_path(n)) for n in models.MODEL_NAMES)
    assert total < 2 * 1024 * 1024
    for name in models.MODEL_NAMES:
        info = models.load(name).info
        assert info["name"] == name and info["seed"] == 0 and info["steps"] > 0


def test_evaluation_classifier_is_accurate_on_held_out_digits(evaluator):
    x, y = data.load_split("heldout")
    acc = float((evaluator.classifier(x).argmax(1) == y).float().mean())
    assert acc >= 0.95
    assert acc == pytest.approx(models.load("eval_classifier").info["heldout_accuracy"], abs=1e-6)
    # real training digits against the held-out reference: the floor of the metrics
    xt, yt = data.load_split("train")
    m = evaluator(xt, yt)
    assert m["accuracy"] > 0.98 and m["precision"] > 0.8 and m["recall"] > 0.8


def test_train_is_deterministic():
    a, info_a = models_train("eval_classifier")
    b, _ = models_train("eval_classifier")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert "heldout_accuracy" in info_a


def models_train(name):
    from gradguide.experiments.digits.train import train_model
    return train_model(name, steps=15, seed=3, progress=False, log=lambda *_: None)


# the unguided point (scale 0 / w = 1) and a guided point with PixelAsParam, same noise
GUIDED = {"A": (0.0, 10.0), "B": (0.0, 10.0), "C": (1.0, 3.0)}


@pytest.mark.parametrize("policy", ["A", "B", "C"])
def test_guidance_raises_accuracy_with_pixelasparam(shipped, evaluator, policy):
    unguided, guided = GUIDED[policy]
    n, steps = 80, 20
    x0, labels, _ = sweep.sample_point(shipped, policy, unguided, False, "ddpm", steps, n, seed=11)
    x1, _, tel = sweep.sample_point(shipped, policy, guided, True, "ddpm", steps, n, seed=11, telemetry=True)
    assert torch.isfinite(x1).all() and float(x1.abs().max()) <= 1.0 + 1e-5
    acc0 = evaluator(x0, labels)["accuracy"]
    acc1 = evaluator(x1, labels)["accuracy"]
    margin = {"A": 0.02, "B": 0.4, "C": 0.02}[policy]
    assert acc1 >= acc0 + margin, (policy, acc0, acc1)
    # telemetry: real conflicts between guidance and denoising at some steps
    pair = "cond/cfg" if policy == "C" else "den/cls"
    assert len(tel[pair]["conflict_share"]) == steps
    assert max(tel[pair]["conflict_share"]) > 0.0


def test_quick_sweep_and_report(tmp_path):
    out = str(tmp_path / "sweep")
    kw = dict(policies=("A",), samplers=("ddim",), cls_scales=(0.0, 5.0), seeds=(0, 1), n=30, steps={"ddim": 5},
              progress=False)
    runs = sweep.run_sweep(out, **kw)
    # unguided baseline + guided baseline + guided PxP, x 2 seeds
    assert len(runs) == 6 and len(os.listdir(os.path.join(out, "runs"))) == 6
    again = sweep.run_sweep(out, **kw)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in runs]  # resumed from the files
    agg = sweep.aggregate(runs)
    assert agg[("A", "ddim", True, 0.0)]["fid"][2] == 2  # the unguided point counts for both arms
    table = sweep.report(out, str(tmp_path / "fig"))
    assert "| A | 5 | PixelAsParam |" in table
    assert sorted(os.listdir(tmp_path / "fig")) == ["digits-fid-acc-ddim.png", "digits-pr-ddim.png",
                                                     "digits-telemetry-ddim.png"]


def test_cli_evaluate(tmp_path, capsys):
    from gradguide.cli import main
    x, y = data.load_split("train")
    path = tmp_path / "s.npz"
    np.savez(path, samples=x[:200].numpy(), labels=y[:200].numpy())
    assert main(["evaluate", str(path), "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 200 and m["accuracy"] > 0.95 and m["fid"] >= 0
    with pytest.raises(SystemExit, match="expected 8x8 digits"):
        np.savez(tmp_path / "bad.npz", samples=np.zeros((10, 3, 8, 8)))
        main(["evaluate", str(tmp_path / "bad.npz")])
    with pytest.raises(SystemExit, match="either a samples file or --real"):
        main(["evaluate"])
