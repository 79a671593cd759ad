"""Metric arithmetic against closed forms and hand-made cases (fast, CPU, no networks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kind.eval import metrics


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_fid_of_identical_sets_is_zero():
    x = _gaussian(500, 32, seed=0)
    scale = float(metrics.feature_statistics(x)[1].trace())
    assert abs(metrics.frechet_distance(x, x.clone())) < 1e-6 * scale


def test_fid_accepts_numpy_and_float32():
    x = _gaussian(300, 8, seed=1)
    y = _gaussian(300, 8, seed=2, shift=0.5)
    ref = metrics.frechet_distance(x, y)
    assert metrics.frechet_distance(x.numpy(), y.float()) == pytest.approx(ref, rel=1e-5)


def test_fid_matches_closed_form_for_diagonal_covariances():
    # For diagonal C1, C2: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 6
    mu1, mu2 = torch.arange(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64) * 2
    a = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.1, 4.0], dtype=torch.float64)
    b = torch.tensor([2.0, 2.0, 1.5, 0.3, 0.0, 9.0], dtype=torch.float64)  # one singular direction
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = metrics.frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_is_invariant_to_a_shared_rotation_of_full_covariances():
    # A rotated pair of diagonal Gaussians: same distance as the diagonal closed form.
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    b = torch.tensor([5.0, 1.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = metrics.frechet_distance_from_stats(
        q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T
    )
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_matches_the_eigenvalues_of_the_covariance_product_when_they_do_not_commute():
    # tr sqrt(C1 C2) = sum of sqrt(eigenvalues of C1 C2) (real, >= 0: C1 C2 is similar to
    # C1^1/2 C2 C1^1/2), computed here by numpy's general eigensolver, independently of the
    # metric's symmetric route; tr(sqrt C1 sqrt C2) agrees only when C1 and C2 commute.
    x, y = _gaussian(300, 16, seed=11), _gaussian(300, 16, seed=12) @ _gaussian(16, 16, seed=13)
    mu1, c1 = x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)
    mu2, c2 = y.mean(0).numpy(), np.cov(y.numpy(), rowvar=False)
    assert not np.allclose(c1 @ c2, c2 @ c1)
    eig = np.linalg.eigvals(c1 @ c2).real.clip(min=0)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(eig).sum()
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_are_the_mean_and_np_cov():
    x = _gaussian(40, 5, seed=14, shift=2.0)
    mu, cov = metrics.feature_statistics(x.float())
    assert np.allclose(mu.numpy(), x.float().double().numpy().mean(0), rtol=0, atol=1e-12)
    assert np.allclose(cov.numpy(), np.cov(x.float().double().numpy(), rowvar=False), atol=1e-12)


def test_fid_handles_singular_covariances_without_nan():
    # Fewer samples than dimensions: rank-deficient covariances, tiny negative eigenvalues.
    x, y = _gaussian(20, 64, seed=4), _gaussian(20, 64, seed=5)
    fd = metrics.frechet_distance(x, y)
    assert math.isfinite(fd) and fd > 0


def test_fid_of_shifted_set_is_large_and_grows_with_the_shift():
    x = _gaussian(500, 16, seed=6)
    near = metrics.frechet_distance(x, _gaussian(500, 16, seed=7, shift=0.1))
    far = metrics.frechet_distance(x, _gaussian(500, 16, seed=7, shift=5.0))
    assert far > 16 * 25 * 0.9  # |shift|^2 * D dominates
    assert far > 100 * near


def test_fid_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="widths"):
        metrics.frechet_distance(_gaussian(10, 3, 0), _gaussian(10, 4, 0))


def test_precision_recall_of_identical_sets_is_one():
    x = _gaussian(400, 16, seed=8)
    assert metrics.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_of_disjoint_sets_is_zero():
    x = _gaussian(300, 16, seed=9)
    y = _gaussian(300, 16, seed=10, shift=50.0)
    assert metrics.precision_recall(x, y, k=3) == (0.0, 0.0)


def test_precision_recall_separate_fidelity_from_diversity():
    # Fakes collapsed onto a small part of the real distribution: precise, not diverse.
    real = _gaussian(1000, 2, seed=11)
    fake = _gaussian(1000, 2, seed=12, scale=0.2)
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision > 0.95 and recall < 0.3


def test_knn_radii_on_a_hand_made_line():
    # Points 0, 1, 3, 7 on a line: sorted neighbour distances per point, self excluded.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    # k=1: nearest neighbour 1, 1, 2, 4 → squared 1, 1, 4, 16
    assert metrics.knn_radii(x, k=1).tolist() == [1.0, 1.0, 4.0, 16.0]
    # k=2: second neighbour 3, 2, 3, 6 → squared 9, 4, 9, 36
    assert metrics.knn_radii(x, k=2).tolist() == [9.0, 4.0, 9.0, 36.0]
    # Batching does not change anything.
    assert metrics.knn_radii(x, k=2, batch_size=1).tolist() == [9.0, 4.0, 9.0, 36.0]


def test_manifold_coverage_on_a_hand_made_line():
    manifold = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    radii = metrics.knn_radii(manifold, k=1)  # balls of radius 1, 1, 2, 4
    queries = torch.tensor([[-1.0], [4.5], [11.0], [11.5], [-2.0]])
    # -1: within 1 of 0 (boundary counts); 4.5: within 2 of 3; 11: within 4 of 7; others out.
    assert metrics.manifold_coverage(queries, manifold, radii) == pytest.approx(3 / 5)


def test_precision_recall_batched_equals_unbatched():
    real, fake = _gaussian(257, 8, seed=13), _gaussian(190, 8, seed=14, shift=0.7)
    assert metrics.precision_recall(real, fake, batch_size=17) == metrics.precision_recall(
        real, fake, batch_size=4096
    )


def test_inception_score_of_uniform_predictions_is_one():
    probs = torch.full((100, 10), 0.1)
    mean, std = metrics.inception_score(probs, splits=5, from_logits=False)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = metrics.inception_score(torch.zeros(100, 10), splits=1)  # equal logits
    assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_num_classes():
    probs = torch.eye(10).repeat(20, 1)  # one-hot, every class 20 times, each split balanced
    mean, std = metrics.inception_score(probs, splits=2, from_logits=False)
    assert mean == pytest.approx(10.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = metrics.inception_score(torch.eye(10).repeat(20, 1) * 1000.0, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)


def test_inception_score_of_one_confident_class_is_one():
    probs = torch.zeros(50, 10)
    probs[:, 3] = 1.0
    assert metrics.inception_score(probs, splits=1, from_logits=False)[0] == pytest.approx(1.0)


def test_inception_score_in_chunks_of_a_size_as_adms_evaluator():
    """ADM scores each 5000 samples and averages (the last chunk shorter): at 10,000 samples that
    is the mean of the two halves' scores, not one score of all (the score grows with the chunk,
    so near-equal splits agree with ADM only at 50k)."""
    logits = 4 * torch.randn(250, 30, generator=torch.Generator().manual_seed(0))
    halves = [metrics.inception_score(h, splits=1)[0] for h in (logits[:100], logits[100:200])]
    last = metrics.inception_score(logits[200:], splits=1)[0]
    mean, std = metrics.inception_score(logits, split_size=100)
    parts = torch.tensor([*halves, last], dtype=torch.float64)
    assert mean == pytest.approx(float(parts.mean()), rel=1e-12)
    assert std == pytest.approx(float(parts.std(unbiased=False)), rel=1e-9)
    assert mean > metrics.inception_score(logits, splits=5)[0]  # 50-sample chunks score lower
    with pytest.raises(ValueError, match="split_size"):
        metrics.inception_score(logits, split_size=0)


def test_inception_score_rejects_bad_splits():
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(torch.zeros(4, 3), splits=5)


def test_class_accuracy_from_indices_and_scores():
    target = torch.tensor([0, 1, 2, 2])
    assert metrics.class_accuracy(torch.tensor([0, 1, 2, 0]), target) == 0.75
    scores = np.eye(3)[[0, 1, 2, 0]]
    assert metrics.class_accuracy(scores, target) == 0.75
    assert metrics.per_class_accuracy(scores, target) == {0: 1.0, 1: 1.0, 2: 0.5}
