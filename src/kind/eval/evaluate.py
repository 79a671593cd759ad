"""Score generated samples against a reference: FID, precision, recall, class accuracy (and,
with Inception-V3, IS and sFID).

One code path, two entry points: :func:`evaluate` reads a sample ``.npz`` written by
``kind-dit sample`` (ADM layout: ``arr_0`` uint8 ``[N, H, W, C]``, ``labels``, ``class_names``,
generation metadata as 0-d arrays); :func:`evaluate_images` takes in-memory uint8 images, for
callers that score many sample sets (reference features are cached per network and spec).

The reference is a data spec's split or a reference statistics ``.npz``
(:mod:`kind.eval.reference`); the network that scores both sides is picked by name in
:mod:`kind.eval.features`, and the arithmetic is :mod:`kind.eval.metrics`.

Every result records the tool version, the feature network and its weights' sha256, both set sizes,
the reference split and the generation settings, so a number can be traced to its inputs, and a
``warnings`` list (for instance a set smaller than the feature dimension, whose covariance is
rank-deficient).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kind.core.seeds import NULL_CLASS
from kind.data.dataset import class_names as spec_classes
from kind.data.images import BUNDLED_SIZE, default_shape
from kind.eval import metrics
from kind.eval.features import FeatureNet, fits, resolve_feature_net
from kind.eval.npz import name_list, nchw, open_npz, scalars, tool_version
from kind.eval.reference import (
    auto_feature_net_for_stats,
    check_image_spec,
    check_ref_split,
    check_stats_fit,
    check_stats_size,
    file_reference,
    read_reference_stats,
    reference_file,
    spec_reference,
)
from kind.io import write_json

log = logging.getLogger(__name__)

_SAMPLE_ARRAYS = ("arr_0", "labels", "class_names")
FID_SAMPLES = 50_000  # the field's convention: FID-50K (ADM, DiT) against the reference batch
IS_SPLIT_SIZE = 5_000  # ADM's evaluator: the Inception Score of each 5000 samples, averaged


@dataclass
class SampleSet:
    """Samples as the evaluator needs them, whatever file or caller they came from."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N] into class_names, or None if the file had none
    class_names: list[str] | None
    generation: dict = field(default_factory=dict)
    path: str | None = None


def load_samples(path: str | Path) -> SampleSet:
    """Read a sample ``.npz`` (``allow_pickle=False``) and check its layout with clear errors."""
    path = Path(path)
    with open_npz(
        path,
        what="sample",
        expected="an .npz sample file with 'arr_0'",
        hint="the samples.npz that `kind-dit sample` writes, or an ADM-layout .npz with uint8 "
        "images under 'arr_0'",
    ) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(
                f"{path} has no 'arr_0' array (keys: {', '.join(npz.files) or 'none'}); sample "
                "files hold uint8 images [N, H, W, C] under 'arr_0', as `kind-dit sample` and the "
                "ADM evaluator write them"
            )
        arr = npz["arr_0"]
        labels = npz["labels"] if "labels" in npz.files else None
        names = npz["class_names"] if "class_names" in npz.files else None
        generation = scalars(npz, _SAMPLE_ARRAYS)
    images = nchw(arr)
    if images is None:
        raise ValueError(
            f"{path}: 'arr_0' must be square uint8 images [N, H, W, C] with C = 1 or 3 (channels "
            f"last, the ADM layout), got {arr.dtype} {arr.shape}"
        )
    if labels is not None and names is None:
        raise ValueError(f"{path} has 'labels' but no 'class_names' to say what they mean")
    if labels is not None and labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be integer class ids, got {labels.dtype}")
    return SampleSet(
        images=images,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        class_names=name_list(path, names),
        generation=generation,
        path=str(path.resolve()),
    )


def _converted(ref: str, channels: int, size: int) -> list[str]:
    """Warnings for a data-spec reference loaded at the samples' channels or size other than the
    data's own: the score then compares against converted images (grey copies of colour data
    match grey samples perfectly), not what a statistics file of the data holds."""
    own_size, own_channels = default_shape(ref)
    warnings = []
    if channels != own_channels:
        warnings.append(
            f"reference {ref.strip()} was converted from its {own_channels} channel(s) to the "
            f"samples' {channels}: the score compares against converted images, not the data's "
            "own (a reference written with --write-ref keeps them)"
        )
    if own_size == BUNDLED_SIZE and size != own_size:  # a folder's images have no one size
        warnings.append(
            f"reference {ref.strip()} was resized from its {own_size}x{own_size} images to the "
            f"samples' {size}x{size}: the score measures the resize as much as the model"
        )
    return warnings


def _range_warnings(images: torch.Tensor) -> list[str]:
    """Images whose values are all 0 or 1 are most likely [0, 1] floats cast to uint8."""
    if images.numel() and int(images.max()) <= 1:
        return ["the samples' values are all 0 or 1: images in [0, 1] cast to uint8? sample "
                "files hold uint8 values 0..255"]  # fmt: skip
    return []


def _small_set_warnings(n: int, n_ref: int | None, spaces: list[tuple[str, int]]) -> list[str]:
    """One warning per set with fewer rows than a feature dimension (its covariance is then
    rank-deficient, and the Fréchet distance depends strongly on the set size)."""
    ref_text = "an unknown number of" if n_ref is None else str(n_ref)
    warnings = []
    for who, count in (("sample set", n), ("reference set", n_ref)):
        short = [(name, dim) for name, dim in spaces if count is not None and count < dim]
        if not short:
            continue
        dims = " and ".join(f"the {dim} dimensions of the {name} features" for name, dim in short)
        warnings.append(
            f"the {who} has fewer rows than {dims} ({n} samples, {ref_text} reference images): "
            "its covariance is rank-deficient and FID is unreliable; compare only numbers made "
            f"with the same set sizes (the field reports FID-50K: {FID_SAMPLES:,} samples)"
        )
    return warnings


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _check_sample_shape(images: torch.Tensor, net: FeatureNet) -> None:
    """Fail before loading the reference when the network cannot take these images."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    if not fits(net, images):
        c, h, w = net.image_shape
        raise ValueError(
            f"feature network {net.name} takes images of shape [N, {c}, {h}, {w}], but the "
            f"samples are {tuple(images.shape)} (C, H, W = {tuple(images.shape[1:])}); sample at "
            f"{h}x{w} with {c} channel(s), or evaluate with the Inception network"
        )


def _conditional(labels: torch.Tensor, class_names: list[str]) -> torch.Tensor | None:
    """`labels`, or None for unconditional samples (`kind-dit sample --unconditional` labels
    them with the null class): they are scored against the whole reference, with no class of
    their own to check. A set mixing both is refused, as its FID would mix two models."""
    null = torch.tensor([name == NULL_CLASS for name in class_names])[labels]  # [N]
    if not null.any():
        return labels
    if not null.all():
        raise ValueError(
            f"{int(null.sum())} of the {len(labels)} samples are unconditional ({NULL_CLASS}) "
            "and the rest are not; score the two sets apart"
        )
    return None


def _class_accuracy(
    net: FeatureNet,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    class_names: list[str] | None,
) -> tuple[float | None, dict[str, float] | None, str | None]:
    """(accuracy, per-class accuracy by name, reason when not defined).

    Predictions are the argmax over *all* the network's classes, not only the sampled ones: a
    sample of "3" that looks like an "8" is wrong even when "8" was not generated.
    """
    if class_names is None:
        return None, None, "the samples carry no labels"
    if labels is None:  # `_conditional`: all labelled with the null class
        return None, None, f"unconditional samples ({NULL_CLASS}): no class to check"
    if net.class_names is None:
        return None, None, f"feature network {net.name} does not classify the sample classes"
    unknown = sorted({class_names[int(i)] for i in labels.unique()} - set(net.class_names))
    if unknown:
        known = ", ".join(net.class_names)
        reason = f"sample classes {unknown} are not classes of feature network {net.name} ({known})"
        return None, None, reason
    # the file names all of its model's classes; only the sampled ones need the network's
    to_net = torch.tensor([net.class_names.index(c) if c in net.class_names else -1
                           for c in class_names])  # fmt: skip
    target = to_net[labels]  # [N] in the network's class indices
    acc = metrics.class_accuracy(logits, target)
    per = metrics.per_class_accuracy(logits, target)
    return acc, {net.class_names[i]: v for i, v in per.items()}, None


def evaluate_images(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    class_names: list[str] | None,
    ref: str,
    feature_net: str | FeatureNet = "auto",
    k: int = 3,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    is_split_size: int = IS_SPLIT_SIZE,
    generation: dict | None = None,
    samples_path: str | None = None,
    ref_split: str | None = None,
) -> dict:
    """Score uint8 images ``[N, C, H, W]`` (``labels`` index ``class_names``) against ``ref``;
    the shared core of :func:`evaluate`. Returns the JSON-ready result dict.

    ``ref``: a data spec, whose ``ref_split`` ("test" when None, "train", or "all") is the
    reference, or a reference statistics ``.npz`` (see
    :func:`~kind.eval.reference.read_reference_stats`; then ``ref_split`` must be None, the file's
    set was fixed when it was written).
    """
    t0 = time.perf_counter()
    stats_path = reference_file(ref)
    stats = None
    if stats_path is not None:
        if ref_split is not None:
            raise ValueError(
                f"--ref-split picks a split of a data-spec reference, but {stats_path} is a "
                "statistics file, whose reference set was fixed when it was written; drop "
                "--ref-split, or pass the data spec"
            )
        stats = read_reference_stats(stats_path)
        check_stats_size(stats, images)
        if isinstance(feature_net, str) and feature_net == "auto":
            feature_net = auto_feature_net_for_stats(stats)
    else:
        check_image_spec(ref)
    split = "test" if ref_split is None else ref_split
    check_ref_split(split)
    net = resolve_feature_net(feature_net, ref, inception_weights, device)
    _check_sample_shape(images, net)
    n = images.shape[0]
    if n < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} samples, got {n}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must be [N] = [{n}], got {tuple(labels.shape)}")
        if class_names is None:
            raise ValueError("labels need class_names to say which class each index means")
        if int(labels.min()) < 0 or int(labels.max()) >= len(class_names):
            raise ValueError(
                f"labels must index class_names ({len(class_names)} names), got values "
                f"{labels.unique().tolist()}"
            )
        labels = _conditional(labels, class_names)

    ref_name = ref.strip() if stats is None else str(stats.path)
    ref_classes = spec_classes(ref) if stats is None else stats.class_names
    coverage: list[str] = []  # the reference's classes the samples lack, for the warnings
    if labels is not None and ref_classes is not None:
        used = [class_names[int(i)] for i in labels.unique()]
        missing = [c for c in used if c not in ref_classes]
        if missing:
            raise ValueError(
                f"sample classes {missing} are not in reference {ref_name!r} (its classes: "
                f"{', '.join(ref_classes)}); evaluate against a reference that includes them"
            )
        if set(ref_classes) - set(used):
            lacking = sorted(set(ref_classes) - set(used))
            coverage.append(f"reference {ref_name} has classes the samples lack: {lacking} "
                            "(FID counts the difference)")  # fmt: skip

    if stats is not None:
        probe = net.extract(images[:2])  # the network's feature widths, before the long part
        spatial_dim = None if probe.spatial is None else probe.spatial.shape[1]
        check_stats_fit(stats, net, probe.pool.shape[1], spatial_dim)
        reference = file_reference(stats, net)
    else:
        reference = spec_reference(net, ref, split, images.shape[-1], images.shape[1])
        coverage += _converted(ref, images.shape[1], images.shape[-1])
    feats = net.extract(images)
    fid = metrics.frechet_distance_from_stats(*metrics.feature_statistics(feats.pool),
                                              *reference.pool)  # fmt: skip
    notes = dict(reference.notes)
    precision = recall = None
    if reference.features is not None:
        if reference.features.pool.shape[0] < k + 1:
            raise ValueError(
                f"the reference {ref_name} holds {reference.features.pool.shape[0]} images, and "
                f"precision and recall need k + 1 = {k + 1}; give a larger reference (--ref-split "
                "all for a data spec's every image) or a smaller --k"
            )
        precision, recall = metrics.precision_recall(reference.features.pool, feats.pool, k=k)
    acc, per_class, reason = _class_accuracy(net, feats.logits, labels, class_names)

    sfid = is_mean = is_std = None
    spaces = [("pool (FID)", feats.pool.shape[1])]
    if feats.spatial is None:
        notes["sfid"] = f"feature network {net.name} has no spatial features (sFID needs Inception)"
    else:
        is_mean, is_std = metrics.inception_score(feats.logits, split_size=is_split_size)
        if reference.spatial is not None:
            spatial = metrics.feature_statistics(feats.spatial)
            sfid = metrics.frechet_distance_from_stats(*spatial, *reference.spatial)
            spaces.append(("spatial (sFID)", feats.spatial.shape[1]))
    for metric in ("precision_recall", "sfid"):
        if metric in notes and (metric != "sfid" or feats.spatial is not None):
            log.info("%s not computed: %s", metric.replace("_", " and "), notes[metric])
    warnings = coverage + _range_warnings(images) + _small_set_warnings(n, reference.count, spaces)
    for warning in warnings:
        log.warning("%s", warning)

    counts = None
    if labels is not None:
        counts = {class_names[int(c)]: int((labels == c).sum()) for c in labels.unique()}
    result = {
        "tool": f"kind-dit evaluate {tool_version()}",
        "feature_net": net.name,
        "feature_net_sha256": net.sha256,
        "samples": samples_path,
        "num_samples": n,
        "sample_shape": list(images.shape[1:]),
        "samples_per_class": counts,
        **reference.record,
        "num_reference": reference.count,
        "fid": fid,
        "precision": precision,
        "recall": recall,
        "precision_recall_note": notes.get("precision_recall"),
        "k": k,
        "class_accuracy": acc,
        "class_accuracy_note": reason,
        "per_class_accuracy": per_class,
        "sfid": sfid,
        "sfid_note": notes.get("sfid"),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_split_size": is_split_size if is_mean is not None else None,
        "warnings": warnings,
        "generation": {key: (generation or {})[key] for key in sorted(generation or {})},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    shown = (fid, _fmt(precision), _fmt(recall), acc)
    log.info("evaluated %d samples vs %s (%s) with %s: FID %.3f, P %s, R %s, acc %s",
             n, ref_name, reference.count, net.name, *shown)  # fmt: skip
    return result


def evaluate(
    samples_npz: str | Path,
    ref: str,
    feature_net: str | FeatureNet = "auto",
    k: int = 3,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    is_split_size: int = IS_SPLIT_SIZE,
    ref_split: str | None = None,
) -> dict:
    """Evaluate a sample ``.npz`` against ``ref``: a data spec (its ``ref_split``: "test" by
    default, "train" or "all") or a reference statistics ``.npz``.

    ``feature_net``: "auto" (a bundled classifier for bundled data, the ``bundled`` one for combined
    bundled specs, else Inception-V3; for a statistics file, what its recorded spec implies, else
    Inception-V3), a bundled dataset's name, "bundled", "inception", or a
    :class:`~kind.eval.features.FeatureNet`. ``inception_weights``: local
    path of the FID Inception weights (or ``$KIND_INCEPTION_WEIGHTS``); nothing downloads.
    """
    samples = load_samples(samples_npz)
    return evaluate_images(
        samples.images,
        samples.labels,
        samples.class_names,
        ref,
        feature_net=feature_net,
        k=k,
        inception_weights=inception_weights,
        device=device,
        is_split_size=is_split_size,
        generation=samples.generation,
        samples_path=samples.path,
        ref_split=ref_split,
    )


def write_result(result: dict, path: str | Path) -> Path:
    """Write a result dict as JSON, atomically (temp file + rename)."""
    path = Path(path)
    write_json(path, result)
    return path
