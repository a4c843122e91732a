"""Metric code of gradguide.experiments.evaluation on known cases."""
import numpy as np
import pytest
import torch

from gradguide.experiments.evaluation import fid_from_features, frechet_distance, gaussian_fit, precision_recall


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_fid_of_a_set_against_itself_is_zero():
    f = _rng().normal(size=(400, 16)) @ _rng(1).normal(size=(16, 16))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    # diagonal covariances: W2^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, -1.0, 2.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    r = _rng(3)
    m1, m2 = r.normal(size=(6, 6)), r.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = r.normal(size=6), r.normal(size=6)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)  # symmetric


def test_fid_of_two_gaussian_samples_approaches_the_closed_form():
    r = _rng(4)
    n, d = 200_000, 3
    x = r.normal(size=(n, d))                      # N(0, I)
    y = r.normal(size=(n, d)) * 2.0 + 1.0          # N(1, 4 I)
    expected = d * 1.0 + d * (1.0 - 2.0) ** 2      # |mu|^2 + sum (1 - 2)^2
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.02)


def test_identical_sets_give_precision_and_recall_one():
    f = _rng(5).normal(size=(300, 8))
    pr = precision_recall(f, f.copy(), k=3)
    assert pr == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_detect_a_missing_mode_and_off_manifold_samples():
    r = _rng(6)
    real = np.concatenate([r.normal(size=(200, 2)), r.normal(size=(200, 2)) + 20.0])
    only_one_mode = r.normal(size=(400, 2))            # covers half the real data
    pr = precision_recall(real, only_one_mode, k=3)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.6
    far = r.normal(size=(400, 2)) + 100.0              # nowhere near the real data
    assert precision_recall(real, far, k=3) == {"precision": 0.0, "recall": 0.0}


def test_gaussian_fit_and_errors():
    mu, cov = gaussian_fit(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(cov, [[2.0, 2.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match=r"features shaped \[N, D\]"):
        gaussian_fit(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_fit(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="k: expected"):
        precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match="differ in dimension"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
