"""Metric arithmetic on features and class scores, independent of which network made them.

Every number `kind-dit evaluate` reports is computed here, so the bundled 28×28 classifier and
Inception-V3 (the ADM evaluator suite: FID, sFID, IS, precision, recall) share one implementation.
Functions take feature matrices ``[N, D]`` (torch or numpy) and return plain Python floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _as_float64(x: ArrayLike) -> torch.Tensor:
    """Features as a float64 CPU tensor: FID subtracts large, nearly equal traces, so fp32 is not
    enough, and numpy inputs (ADM reference batches) must work too."""
    t = torch.as_tensor(x)
    return t.detach().to(device="cpu", dtype=torch.float64)


def _check_2d(name: str, x: torch.Tensor, min_rows: int = 2) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")


def feature_statistics(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` in float64 (``np.cov``'s convention, as in
    the FID reference code), so statistics can be cached and compared with published ones."""
    f = _as_float64(features)
    _check_2d("features", f)
    mu = f.mean(dim=0)  # [D]
    centred = f - mu  # [N, D]
    cov = centred.T @ centred / (f.shape[0] - 1)  # [D, D]
    return mu, cov


def _sqrt_psd(sym: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Rounding leaves tiny negative eigenvalues on singular covariances (fewer samples than
    dimensions, dead ReLU units); they are clamped to zero rather than turned into NaNs.
    """
    sym = (sym + sym.T) / 2
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_stats(
    mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike
) -> float:
    """Fréchet distance between the Gaussians N(mu1, cov1) and N(mu2, cov2).

    Reference: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
    Local Nash Equilibrium" (FID); Dowson & Landau 1982 for the closed form
    ``|mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1 C2)^½)``.

    ``tr((C1 C2)^½)`` equals ``tr((C1^½ C2 C1^½)^½)``, and the latter is a symmetric PSD matrix, so
    a symmetric eigendecomposition suffices: no scipy ``sqrtm``, no complex parts to discard, and
    no ``eps`` offset for singular covariances.
    """
    m1, m2 = _as_float64(mu1), _as_float64(mu2)
    c1, c2 = _as_float64(cov1), _as_float64(cov2)
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.numel(), m1.numel()):
        raise ValueError(
            f"mismatched statistics: mu {tuple(m1.shape)} / {tuple(m2.shape)}, "
            f"cov {tuple(c1.shape)} / {tuple(c2.shape)}"
        )
    sqrt_c1 = _sqrt_psd(c1)  # [D, D]
    middle = sqrt_c1 @ c2 @ sqrt_c1  # [D, D], symmetric PSD
    middle = (middle + middle.T) / 2
    tr_covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = m1 - m2
    fd = diff.dot(diff) + c1.trace() + c2.trace() - 2 * tr_covmean
    # Identical sets give ±1e-12-scale rounding; a negative distance would only confuse readers.
    return max(float(fd), 0.0)


def frechet_distance(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID (or sFID, or FD in any feature space) between two feature sets ``[N1, D]``, ``[N2, D]``.

    Reference: Heusel et al. 2017 (FID); Nash et al. 2021 (sFID: the same distance on spatial
    features). The feature network decides which of the two it is.
    """
    mu1, cov1 = feature_statistics(features1)
    mu2, cov2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature widths differ: {mu1.numel()} vs {mu2.numel()}")
    return frechet_distance_from_stats(mu1, cov1, mu2, cov2)


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[Na, Nb]``; clamped since the expansion can dip below zero."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_(min=0)


def knn_radii(features: ArrayLike, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set, ``[N]``.

    Reference: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models": the radius of the hypersphere around each point that defines the
    estimated manifold. The point itself (distance 0) is not counted as a neighbour. Rows are
    processed in batches so 10k × 10k never sits in memory at once.
    """
    f = _as_float64(features)
    _check_2d("features", f, min_rows=k + 1)
    radii = torch.empty(f.shape[0], dtype=torch.float64)
    for start in range(0, f.shape[0], batch_size):
        d = _pairwise_sq_dists(f[start : start + batch_size], f)  # [B, N]
        # k+1 smallest include the point itself at index 0.
        radii[start : start + batch_size] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def manifold_coverage(
    queries: ArrayLike, manifold: ArrayLike, radii: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of ``queries`` inside at least one hypersphere (centre ``manifold[j]``, squared
    radius ``radii[j]``) — the shared step of k-NN precision and recall (Kynkäänniemi et al. 2019).
    """
    q, m = _as_float64(queries), _as_float64(manifold)
    inside = 0
    for start in range(0, q.shape[0], batch_size):
        d = _pairwise_sq_dists(q[start : start + batch_size], m)  # [B, M]
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake manifold).

    Reference: Kynkäänniemi et al. 2019; k = 3 as there and in the ADM evaluator (Dhariwal &
    Nichol 2021). Precision measures fidelity, recall measures diversity, separately, which FID
    folds into one number.
    """
    r, f = _as_float64(real), _as_float64(fake)
    _check_2d("real", r, min_rows=k + 1)
    _check_2d("fake", f, min_rows=k + 1)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature widths differ: {r.shape[1]} vs {f.shape[1]}")
    precision = manifold_coverage(f, r, knn_radii(r, k, batch_size), batch_size)
    recall = manifold_coverage(r, f, knn_radii(f, k, batch_size), batch_size)
    return precision, recall


def inception_score(
    scores: ArrayLike, splits: int = 10, from_logits: bool = True, split_size: int | None = None
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over chunks of the samples.

    Reference: Salimans et al. 2016, "Improved Techniques for Training GANs". Chunks are
    contiguous: ``splits`` near-equal ones, as in the reference code, or, with ``split_size``,
    consecutive chunks of that many samples (the last one shorter), as ADM's evaluator takes
    them (5000): the score of a chunk grows with its size, so the two agree only at 50k samples.
    ``scores`` is ``[N, C]`` logits (``from_logits``) or probabilities. It is 1 for uniform
    predictions and C for confident ones spread evenly over C classes.
    """
    s = _as_float64(scores)
    _check_2d("scores", s, min_rows=1)
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be at least 1, got {split_size}")
        splits = -(-s.shape[0] // split_size)
    if not 1 <= splits <= s.shape[0]:
        raise ValueError(f"splits must be in [1, {s.shape[0]}], got {splits}")
    if from_logits:
        log_p = torch.log_softmax(s, dim=1)  # [N, C]
    else:
        if (s < 0).any():
            raise ValueError("probabilities must be non-negative (pass from_logits=True?)")
        log_p = torch.log(s / s.sum(dim=1, keepdim=True))  # [N, C]; log(0) = -inf, handled below
    values = []
    chunks = log_p.split(split_size) if split_size is not None else log_p.tensor_split(splits)
    for chunk in chunks:
        p = chunk.exp()  # [n, C]
        log_py = torch.log(p.mean(dim=0, keepdim=True))  # [1, C]
        # xlogy-style: terms with p = 0 contribute 0, never NaN.
        kl = torch.where(p > 0, p * (chunk - log_py), torch.zeros_like(p)).sum(dim=1)
        values.append(math.exp(float(kl.mean())))
    vals = torch.tensor(values, dtype=torch.float64)
    std = float(vals.std(unbiased=False)) if len(values) > 1 else 0.0
    return float(vals.mean()), std


def _predictions(pred: ArrayLike) -> torch.Tensor:
    """Accept class indices ``[N]`` or scores ``[N, C]`` (argmax taken)."""
    t = torch.as_tensor(pred).detach().cpu()
    if t.ndim == 2:
        return t.argmax(dim=1)
    if t.ndim != 1:
        raise ValueError(f"predictions must be [N] indices or [N, C] scores, got {tuple(t.shape)}")
    return t.long()


def class_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of samples a classifier assigns to the class they were generated for.

    The conditional-generation accuracy used for class-conditional models (e.g. Classification
    Accuracy Score's simpler sibling in Ravuri & Vinyals 2019): it is what tells whether the class
    gate, not just image quality, works.
    """
    p, t = _predictions(pred), torch.as_tensor(target).detach().cpu().long()
    if p.shape != t.shape or p.numel() == 0:
        raise ValueError(f"need equal, non-empty shapes: pred {tuple(p.shape)}, target {t.shape}")
    return float((p == t).double().mean())


def per_class_accuracy(pred: ArrayLike, target: ArrayLike) -> dict[int, float]:
    """:func:`class_accuracy` restricted to each target class present, keyed by class index, so a
    single class that the model fails on is not hidden by the average."""
    p, t = _predictions(pred), torch.as_tensor(target).detach().cpu().long()
    if p.shape != t.shape:
        raise ValueError(f"need equal shapes: pred {tuple(p.shape)}, target {tuple(t.shape)}")
    return {int(c): float((p[t == c] == c).double().mean()) for c in torch.unique(t)}
