"""Score generated samples against the test split of a data spec: FID, precision, recall, class
accuracy (and, with Inception-V3, IS and sFID).

One code path, two entry points: :func:`evaluate` reads a sample ``.npz`` written by
``kind-dit sample`` (ADM layout: ``arr_0`` uint8 ``[N, H, W, C]``, ``labels``, ``class_names``,
generation metadata as 0-d arrays); :func:`evaluate_images` takes in-memory uint8 images, for
callers that score many sample sets (reference features are cached per network and spec).

The reference is always the *test* split, which neither the diffusion model nor the bundled feature
networks trained on. Every result records the tool version, the feature network and its weights'
sha256, both set sizes and the generation settings, so a number can be traced to its inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kind.core.images import save_npz
from kind.data.dataset import class_names as spec_classes
from kind.data.images import BUNDLED, load_images, parse_parts, parse_spec
from kind.eval import metrics
from kind.eval.features import (
    FeatureNet,
    FeatureOutput,
    load_feature_net,
    load_inception,
    resolve_inception_weights,
)
from kind.io import write_json

log = logging.getLogger(__name__)

GENERATION_KEYS = ("sampler", "steps", "cfg_scale", "seed", "checkpoint")
_SAMPLE_ARRAYS = ("arr_0", "labels", "class_names")
BUNDLED_NET = "bundled"  # the classifier of every bundled set at once, for combined specs
FEATURE_NET_CHOICES = ("auto", *BUNDLED, BUNDLED_NET, "inception")


def tool_version() -> str:
    """The installed distribution's version, else the source tree's ``kind.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("kind-dit")
    except metadata.PackageNotFoundError:
        import kind

        return getattr(kind, "__version__", "unknown")


@dataclass
class SampleSet:
    """Samples as the evaluator needs them, whatever file or caller they came from."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N] into class_names, or None if the file had none
    class_names: list[str] | None
    generation: dict = field(default_factory=dict)
    path: str | None = None


def _scalar(value: np.ndarray) -> object:
    """0-d numpy array → a JSON-friendly Python scalar."""
    item = value.item()
    return item.decode() if isinstance(item, bytes) else item


def load_samples(path: str | Path) -> SampleSet:
    """Read a sample ``.npz`` (``allow_pickle=False``) and check its layout with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # numpy's message suggests allow_pickle: not the fix
        raise ValueError(
            f"{path} is not a sample .npz (numpy: {e}); pass the samples.npz that `kind-dit "
            "sample` writes, or an ADM-layout .npz with uint8 images under 'arr_0'"
        ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not an .npz sample file with 'arr_0'")
    with npz:
        if "arr_0" not in npz.files:
            raise ValueError(
                f"{path} has no 'arr_0' array (keys: {', '.join(npz.files) or 'none'}); sample "
                "files hold uint8 images [N, H, W, C] under 'arr_0', as `kind-dit sample` and the "
                "ADM evaluator write them"
            )
        arr = npz["arr_0"]
        labels = npz["labels"] if "labels" in npz.files else None
        names = npz["class_names"] if "class_names" in npz.files else None
        generation = {
            k: _scalar(npz[k]) for k in npz.files if k not in _SAMPLE_ARRAYS and npz[k].ndim == 0
        }
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: 'arr_0' must be uint8 [N, H, W, C] with C = 1 or 3 (channels last, the ADM "
            f"layout), got {arr.dtype} {arr.shape}"
        )
    if labels is not None and names is None:
        raise ValueError(f"{path} has 'labels' but no 'class_names' to say what they mean")
    images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # NHWC → NCHW
    return SampleSet(
        images=images,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        class_names=None if names is None else [str(c) for c in names],
        generation=generation,
        path=str(path.resolve()),
    )


def auto_feature_net(ref: str) -> str:
    """The network "auto" picks for reference spec ``ref``: the dataset's own classifier when it
    names one bundled dataset, the ``bundled`` classifier (trained on all bundled sets) when it
    combines bundled datasets, else Inception-V3 (which needs local weights)."""
    datasets = {dataset for dataset, _ in parse_parts(ref)}
    if not datasets <= set(BUNDLED):
        return "inception"
    return datasets.pop() if len(datasets) == 1 else BUNDLED_NET


# Loaded networks, so that repeated in-memory evaluations do not re-read and re-hash weights.
_NET_CACHE: dict[tuple, FeatureNet] = {}


def resolve_feature_net(
    feature_net: str | FeatureNet,
    ref: str,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
) -> FeatureNet:
    """``"auto"``: see :func:`auto_feature_net`. A name picks one explicitly; an object is used as
    is (tests, callers with their own network)."""
    if not isinstance(feature_net, str):
        return feature_net
    if feature_net not in FEATURE_NET_CHOICES:
        raise ValueError(f"feature_net must be one of {FEATURE_NET_CHOICES}, got {feature_net!r}")
    if feature_net == "auto":
        feature_net = auto_feature_net(ref)
    if feature_net == "inception":
        path = resolve_inception_weights(inception_weights)  # raises with instructions
        key: tuple = ("inception", str(path.resolve()), device)
        if key not in _NET_CACHE:
            _NET_CACHE[key] = load_inception(path, device=device)
    else:
        key = ("bundled", feature_net)
        if key not in _NET_CACHE:
            _NET_CACHE[key] = load_feature_net(feature_net)
    return _NET_CACHE[key]


# Reference features per (network, weights, spec, shape): the demo evaluates many sample sets
# against one reference, and re-loading and re-featurising it each time would dominate.
_REF_CACHE: dict[tuple, tuple[FeatureOutput, int, list[str], str]] = {}


def reference_features(
    net: FeatureNet, ref: str, image_size: int, channels: int
) -> tuple[FeatureOutput, int, list[str], str]:
    """(features, image count, class names, dataset) of the test split of ``ref``, cached."""
    dataset, _ = parse_spec(ref)
    key = (net.name, net.sha256, ref.strip(), dataset, image_size, channels)
    if key not in _REF_CACHE:
        ref_set = load_images(ref, "test", image_size=image_size, channels=channels)
        feats = net.extract(ref_set.images)
        _REF_CACHE[key] = (feats, len(ref_set.labels), list(ref_set.class_names), ref_set.dataset)
    return _REF_CACHE[key]


def _check_sample_shape(images: torch.Tensor, net: FeatureNet) -> None:
    """Fail before loading the reference when the network cannot take these images."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    if net.image_shape is not None and tuple(images.shape[1:]) != tuple(net.image_shape):
        c, h, w = net.image_shape
        raise ValueError(
            f"feature network {net.name} takes images of shape [N, {c}, {h}, {w}], but the "
            f"samples are {tuple(images.shape)} (C, H, W = {tuple(images.shape[1:])}); sample at "
            f"{h}x{w} with {c} channel(s), or evaluate with the Inception network"
        )


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
    if labels is None or class_names is None:
        return None, None, "the samples carry no labels"
    if net.class_names is None:
        return None, None, f"feature network {net.name} does not classify the sample classes"
    unknown = sorted({class_names[int(i)] for i in labels.unique()} - set(net.class_names))
    if unknown:
        known = ", ".join(net.class_names)
        reason = f"sample classes {unknown} are not classes of feature network {net.name} ({known})"
        return None, None, reason
    to_net = torch.tensor([net.class_names.index(c) for c in class_names])
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
    is_splits: int = 10,
    generation: dict | None = None,
    samples_path: str | None = None,
) -> dict:
    """Score uint8 images ``[N, C, H, W]`` (``labels`` index ``class_names``) against the test
    split of ``ref``; the shared core of :func:`evaluate`. Returns the JSON-ready result dict."""
    t0 = time.perf_counter()
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

    ref_classes = spec_classes(ref)
    if labels is not None:
        used = [class_names[int(i)] for i in labels.unique()]
        missing = [c for c in used if c not in ref_classes]
        if missing:
            raise ValueError(
                f"sample classes {missing} are not in reference {ref!r} (its classes: "
                f"{', '.join(ref_classes)}); evaluate against a spec that includes them"
            )
        if set(ref_classes) - set(used):
            log.warning("reference %s has classes the samples lack: %s (FID will count it)",
                        ref, sorted(set(ref_classes) - set(used)))  # fmt: skip

    ref_feats, ref_count, _, ref_dataset = reference_features(
        net, ref, image_size=images.shape[-1], channels=images.shape[1]
    )
    feats = net.extract(images)
    fid = metrics.frechet_distance(feats.pool, ref_feats.pool)
    precision, recall = metrics.precision_recall(ref_feats.pool, feats.pool, k=k)
    acc, per_class, reason = _class_accuracy(net, feats.logits, labels, class_names)

    sfid = is_mean = is_std = None
    if feats.spatial is not None and ref_feats.spatial is not None:
        sfid = metrics.frechet_distance(feats.spatial, ref_feats.spatial)
        is_mean, is_std = metrics.inception_score(feats.logits, splits=min(is_splits, n))

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
        "reference": ref.strip(),
        "reference_dataset": ref_dataset,
        "reference_split": "test",
        "num_reference": ref_count,
        "fid": fid,
        "precision": precision,
        "recall": recall,
        "k": k,
        "class_accuracy": acc,
        "class_accuracy_note": reason,
        "per_class_accuracy": per_class,
        "sfid": sfid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "generation": {key: (generation or {})[key] for key in sorted(generation or {})},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("evaluated %d samples vs %s (%d) with %s: FID %.3f, P %.3f, R %.3f, acc %s",
             n, ref, ref_count, net.name, fid, precision, recall, acc)  # fmt: skip
    return result


def evaluate(
    samples_npz: str | Path,
    ref: str,
    feature_net: str | FeatureNet = "auto",
    k: int = 3,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    is_splits: int = 10,
) -> dict:
    """Evaluate a sample ``.npz`` against the test split of data spec ``ref``.

    ``feature_net``: "auto" (a bundled classifier for bundled data, the ``bundled`` one for combined
    bundled specs, else Inception-V3), a bundled dataset's name, "bundled", "inception", or a
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
        is_splits=is_splits,
        generation=samples.generation,
        samples_path=samples.path,
    )


def write_result(result: dict, path: str | Path) -> Path:
    """Write a result dict as JSON, atomically (temp file + rename)."""
    path = Path(path)
    write_json(path, result)
    return path


def write_adm_reference(
    spec: str,
    path: str | Path,
    split: str = "test",
    image_size: int | None = None,
    channels: int | None = 3,
) -> Path:
    """Write the ``split`` images of ``spec`` as an ADM reference batch (``arr_0`` uint8 NHWC,
    plus ``labels`` and ``class_names``), atomically, so the ADM evaluator can score the samples
    against exactly the images this tool uses.

    ``channels`` defaults to 3 because the ADM evaluator feeds ``arr_0`` to Inception as RGB; pass
    ``None`` for the dataset's native channel count.
    """
    ref = load_images(spec, split, image_size=image_size, channels=channels)
    path = Path(path)
    save_npz(path, ref.images, ref.labels.tolist(), ref.class_names, spec=ref.spec, split=split)
    log.info("wrote %d %s images of %s to %s", len(ref.labels), split, spec, path)
    return path
