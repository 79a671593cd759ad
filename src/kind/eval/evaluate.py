"""Score generated samples against a reference: FID, precision, recall, class accuracy (and,
with Inception-V3, IS and sFID).

One code path, two entry points: :func:`evaluate` reads a sample ``.npz`` written by
``kind-dit sample`` (ADM layout: ``arr_0`` uint8 ``[N, H, W, C]``, ``labels``, ``class_names``,
generation metadata as 0-d arrays); :func:`evaluate_images` takes in-memory uint8 images, for
callers that score many sample sets (reference features are cached per network and spec).

The reference is either a data spec, by default its *test* split (which neither the diffusion model
nor the bundled feature networks trained on; ``ref_split`` picks ``train`` or ``all``), or a
reference statistics ``.npz``: an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``
and the images ``arr_0``), a clean-fid statistics file (``mu``, ``sigma``), or one that
:func:`write_adm_reference` wrote. FID and sFID then come from the stored statistics, as in ADM's
evaluator; precision and recall need reference images and are None without them.

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

from kind.core.images import save_npz
from kind.data.dataset import class_names as spec_classes
from kind.data.images import BUNDLED, ImageSet, load_images, parse_parts, parse_spec
from kind.eval import metrics
from kind.eval.features import (
    FeatureNet,
    FeatureOutput,
    load_feature_net,
    load_inception,
    resolve_inception_weights,
)
from kind.io import sha256_file, write_json

log = logging.getLogger(__name__)

GENERATION_KEYS = ("sampler", "steps", "cfg_scale", "seed", "checkpoint")
_SAMPLE_ARRAYS = ("arr_0", "labels", "class_names")
BUNDLED_NET = "bundled"  # the classifier of every bundled set at once, for combined specs
FEATURE_NET_CHOICES = ("auto", *BUNDLED, BUNDLED_NET, "inception")
REF_SPLITS = ("train", "test", "all")  # "all": train + test of the spec, concatenated here
FID_SAMPLES = 50_000  # the field's convention: FID-50K (ADM, DiT) against the reference batch
REF_WRITE_HINT = "kind-dit evaluate --write-ref OUT.npz --ref SPEC --feature-net NET"


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


# ----------------------------------------------------------------------------- references


# Reference features per (network, weights, spec, split, shape): the demo evaluates many sample
# sets against one reference, and re-loading and re-featurising it each time would dominate.
# Reference statistics files cache the features of their images here too, keyed by the file's hash.
_REF_CACHE: dict[tuple, tuple[FeatureOutput, int, list[str], str]] = {}


def _check_ref_split(split: str) -> None:
    if split not in REF_SPLITS:
        raise ValueError(f"reference split must be one of {', '.join(REF_SPLITS)}, got {split!r}")


def _concat_features(a: FeatureOutput, b: FeatureOutput) -> FeatureOutput:
    spatial = None if a.spatial is None or b.spatial is None else torch.cat([a.spatial, b.spatial])
    return FeatureOutput(torch.cat([a.pool, b.pool]), torch.cat([a.logits, b.logits]), spatial)


def reference_features(
    net: FeatureNet, ref: str, image_size: int, channels: int, split: str = "test"
) -> tuple[FeatureOutput, int, list[str], str]:
    """(features, image count, class names, dataset) of the ``split`` of data spec ``ref``, cached.

    ``split`` "all" is train + test, in that order: the two splits' features (each cached)
    concatenated, since the data layer names only "train" and "test".
    """
    _check_ref_split(split)
    if split == "all":
        train = reference_features(net, ref, image_size, channels, "train")
        test = reference_features(net, ref, image_size, channels, "test")
        return _concat_features(train[0], test[0]), train[1] + test[1], train[2], train[3]
    dataset, _ = parse_spec(ref)
    key = (net.name, net.sha256, ref.strip(), dataset, split, image_size, channels)
    if key not in _REF_CACHE:
        ref_set = load_images(ref, split, image_size=image_size, channels=channels)
        feats = net.extract(ref_set.images)
        _REF_CACHE[key] = (feats, len(ref_set.labels), list(ref_set.class_names), ref_set.dataset)
    return _REF_CACHE[key]


def _load_reference_images(
    spec: str, split: str, image_size: int | None, channels: int | None
) -> ImageSet:
    """The ``split`` images of ``spec``; "all" is train then test (the order of
    :func:`reference_features`)."""
    _check_ref_split(split)
    if split != "all":
        return load_images(spec, split, image_size=image_size, channels=channels)
    train, test = (load_images(spec, s, image_size=image_size, channels=channels)
                   for s in ("train", "test"))  # fmt: skip
    return ImageSet(
        images=torch.cat([train.images, test.images]),
        labels=torch.cat([train.labels, test.labels]),
        class_names=train.class_names,
        spec=train.spec,
        dataset=train.dataset,
    )


_STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))  # (mean, covariance): pool, spatial (sFID)
_REFERENCE_ARRAYS = ("arr_0", "labels", "class_names", "mu", "sigma", "mu_s", "sigma_s")
_REFERENCE_KINDS = (
    "an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0), a clean-fid statistics file "
    "(mu, sigma) or one written by `kind-dit evaluate --write-ref`"
)


@dataclass
class ReferenceStats:
    """A reference statistics ``.npz`` as the evaluator reads it; any part may be absent."""

    path: Path
    sha256: str
    mu: np.ndarray | None  # [D] float64, pool features (FID)
    sigma: np.ndarray | None  # [D, D]
    mu_s: np.ndarray | None  # [S] float64, spatial features (sFID)
    sigma_s: np.ndarray | None  # [S, S]
    images: torch.Tensor | None  # uint8 [N, C, H, W] (ADM's arr_0), None for statistics only
    class_names: list[str] | None
    meta: dict = field(default_factory=dict)  # 0-d entries: spec, split, feature_net, ...

    @property
    def count(self) -> int | None:
        """Number of reference images, when the file says (its images, or a recorded count)."""
        if self.images is not None:
            return int(self.images.shape[0])
        recorded = self.meta.get("num_reference")
        return None if recorded is None else int(recorded)


def reference_file(ref: str | Path) -> Path | None:
    """The path when ``ref`` names a reference statistics file (it ends in ``.npz``), else None:
    a data spec. A ``.npz`` that does not exist is an error, not a data spec."""
    path = Path(str(ref).strip()).expanduser()
    if path.suffix.lower() != ".npz" or path.is_dir():
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics file not found: {path}; a --ref ending in .npz must be an "
            f"existing file: {_REFERENCE_KINDS} (otherwise pass a data spec)"
        )
    return path


def _read_stat_pair(path: Path, npz: np.lib.npyio.NpzFile, mean: str, cov: str):
    """(mean [D], covariance [D, D]) as float64, checked; (None, None) when the file has neither."""
    has_mean, has_cov = mean in npz.files, cov in npz.files
    if not has_mean and not has_cov:
        return None, None
    if has_mean != has_cov:
        present, absent = (mean, cov) if has_mean else (cov, mean)
        raise ValueError(
            f"{path} has {present!r} but not {absent!r}; statistics come in pairs (mean and "
            "covariance): write the file again"
        )
    mu, sigma = npz[mean], npz[cov]
    floats = np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)
    if not floats or mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{path}: expected {mean} a float vector [D] and {cov} a float matrix [D, D], found "
            f"{mean} {mu.dtype} {tuple(mu.shape)} and {cov} {sigma.dtype} {tuple(sigma.shape)}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: {mean}/{cov} hold NaN or infinite values; write them again")
    return mu.astype(np.float64), sigma.astype(np.float64)


def read_reference_stats(path: str | Path) -> ReferenceStats:
    """Read a reference statistics ``.npz`` (``allow_pickle=False``) and check its layout: ``mu``
    ``[D]`` with ``sigma`` ``[D, D]``, optionally ``mu_s``/``sigma_s`` (sFID), optionally the
    reference images ``arr_0`` (uint8 ``[N, H, W, C]``), at least statistics or images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # numpy's message suggests allow_pickle: not the fix
        raise ValueError(
            f"{path} is not a reference statistics .npz (numpy: {e}); pass {_REFERENCE_KINDS}"
        ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not an .npz with 'mu' and 'sigma'")
    with npz:
        mu, sigma = _read_stat_pair(path, npz, "mu", "sigma")
        mu_s, sigma_s = _read_stat_pair(path, npz, "mu_s", "sigma_s")
        arr = npz["arr_0"] if "arr_0" in npz.files else None
        names = npz["class_names"] if "class_names" in npz.files else None
        meta = {
            k: _scalar(npz[k]) for k in npz.files if k not in _REFERENCE_ARRAYS and npz[k].ndim == 0
        }
        keys = ", ".join(npz.files) or "none"
    if mu is None and arr is None:
        raise ValueError(
            f"{path} holds neither statistics ('mu', 'sigma') nor reference images ('arr_0') "
            f"(keys: {keys}); pass {_REFERENCE_KINDS}"
        )
    images = None
    if arr is not None:
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(
                f"{path}: 'arr_0' must be uint8 reference images [N, H, W, C] with C = 1 or 3 "
                f"(the ADM layout), got {arr.dtype} {arr.shape}"
            )
        images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # → NCHW
    return ReferenceStats(
        path=path.resolve(),
        sha256=sha256_file(path),
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
        images=images,
        class_names=None if names is None else [str(c) for c in names],
        meta=meta,
    )


def _auto_for_stats(stats: ReferenceStats) -> str:
    """ "auto" for a statistics file: the network "auto" picks for the spec it records (files this
    tool wrote), else Inception-V3, the network of ADM's and clean-fid's statistics."""
    spec = stats.meta.get("spec")
    if isinstance(spec, str):
        try:
            return auto_feature_net(spec)
        except (ValueError, OSError):  # a spec from another machine: fall through
            pass
    return "inception"


def _check_stats_fit(
    stats: ReferenceStats, net: FeatureNet, pool_dim: int, spatial_dim: int | None
) -> None:
    """Refuse statistics another network made: the recorded weights' hash, else the dimension."""
    recorded = stats.meta.get("feature_net_sha256")
    if recorded is not None and str(recorded) != net.sha256:
        raise ValueError(
            f"{stats.path} holds statistics of feature network {stats.meta.get('feature_net')} "
            f"(weights sha256 {str(recorded)[:16]}…), but the samples are scored with {net.name} "
            f"(sha256 {net.sha256[:16]}…), and statistics of another network make FID "
            "meaningless; pass the --feature-net the file was written with, or write the "
            f"reference again with this network: {REF_WRITE_HINT}"
        )
    spaces = (("mu", "sigma", pool_dim, "pool"), ("mu_s", "sigma_s", spatial_dim, "spatial"))
    for mean, cov, dim, what in spaces:
        mu, sigma = getattr(stats, mean), getattr(stats, cov)
        if mu is None or dim is None or mu.shape[0] == dim:
            continue
        raise ValueError(
            f"{stats.path}: found {mean} {tuple(mu.shape)} and {cov} {tuple(sigma.shape)}, but "
            f"feature network {net.name} gives {dim}-dimensional {what} features (expected "
            f"{mean} [{dim}] and {cov} [{dim}, {dim}]): the statistics were made with another "
            "network. ADM and clean-fid statistics are Inception-V3 features (pool 2048, sFID "
            f"spatial 2023): score them with --feature-net inception; or write the reference "
            f"with this network: {REF_WRITE_HINT}"
        )


def _fit_to_net(images: torch.Tensor, net: FeatureNet) -> torch.Tensor | None:
    """Reference images in the shape ``net`` takes: as they are, grey RGB (equal channels, as
    :func:`write_adm_reference` writes grey data) as one channel, or one channel as RGB; None if
    they cannot be made to fit without resampling."""
    if net.image_shape is None or tuple(images.shape[1:]) == tuple(net.image_shape):
        return images
    c, h, w = net.image_shape
    if tuple(images.shape[2:]) != (h, w):
        return None
    if c == 1 and images.shape[1] == 3 and bool((images == images[:, :1]).all()):
        return images[:, :1].contiguous()
    if c == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    return None


@dataclass
class _Reference:
    """What the metrics need of a reference, whichever kind it is."""

    pool: tuple[torch.Tensor, torch.Tensor]  # (mu [D], sigma [D, D]) float64
    spatial: tuple[torch.Tensor, torch.Tensor] | None  # sFID statistics, or None
    features: FeatureOutput | None  # per-image features (precision, recall); None: statistics only
    count: int | None
    class_names: list[str] | None
    record: dict  # the reference_* fields of the result
    notes: dict = field(default_factory=dict)  # metric -> why it is None


def _spec_reference(
    net: FeatureNet, ref: str, split: str, image_size: int, channels: int
) -> _Reference:
    feats, count, names, dataset = reference_features(net, ref, image_size, channels, split)
    spatial = None if feats.spatial is None else metrics.feature_statistics(feats.spatial)
    record = {
        "reference": ref.strip(),
        "reference_type": "data spec",
        "reference_dataset": dataset,
        "reference_split": split,
        "reference_sha256": None,
    }
    return _Reference(metrics.feature_statistics(feats.pool), spatial, feats, count, names, record)


def _file_reference(stats: ReferenceStats, net: FeatureNet) -> _Reference:
    """Each statistic from the file when it has it, else from its images (``arr_0``) when the
    network can take them, else absent with a note saying why."""
    notes: dict[str, str] = {}
    feats = None
    if stats.images is not None:
        fitted = _fit_to_net(stats.images, net)
        if fitted is None:
            notes["precision_recall"] = (
                f"the reference images in {stats.path} are {tuple(stats.images.shape[1:])} "
                f"(C, H, W), which feature network {net.name} (it takes {net.image_shape}) "
                "cannot score"
            )
        else:
            key = ("file", net.name, net.sha256, str(stats.path), stats.sha256)
            if key not in _REF_CACHE:
                _REF_CACHE[key] = (net.extract(fitted), len(fitted), [], str(stats.path))
            feats = _REF_CACHE[key][0]
    else:
        notes["precision_recall"] = (
            f"the reference {stats.path} holds statistics only (no images under 'arr_0'), and "
            "precision and recall need per-image reference features"
        )
    if stats.mu is not None:
        pool = (torch.from_numpy(stats.mu), torch.from_numpy(stats.sigma))
    elif feats is not None:
        pool = metrics.feature_statistics(feats.pool)
    else:
        raise ValueError(
            f"{stats.path} holds no statistics ('mu', 'sigma') and its images cannot be scored: "
            f"{notes['precision_recall']}"
        )
    spatial = None
    if stats.mu_s is not None:
        spatial = (torch.from_numpy(stats.mu_s), torch.from_numpy(stats.sigma_s))
    elif feats is not None and feats.spatial is not None:
        spatial = metrics.feature_statistics(feats.spatial)
    else:
        notes["sfid"] = (
            f"the reference {stats.path} holds no spatial statistics ('mu_s', 'sigma_s') and no "
            "images this network can score to compute them from"
        )
    record = {
        "reference": str(stats.path),
        "reference_type": "statistics file",
        "reference_dataset": stats.meta.get("dataset"),
        "reference_split": stats.meta.get("split"),
        "reference_sha256": stats.sha256,
    }
    return _Reference(pool, spatial, feats, stats.count, stats.class_names, record, notes)


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


# ----------------------------------------------------------------------------- evaluation


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
    ref_split: str | None = None,
) -> dict:
    """Score uint8 images ``[N, C, H, W]`` (``labels`` index ``class_names``) against ``ref``;
    the shared core of :func:`evaluate`. Returns the JSON-ready result dict.

    ``ref``: a data spec, whose ``ref_split`` ("test" when None, "train", or "all") is the
    reference, or a reference statistics ``.npz`` (see :func:`read_reference_stats`; then
    ``ref_split`` must be None, the file's set was fixed when it was written).
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
        if isinstance(feature_net, str) and feature_net == "auto":
            feature_net = _auto_for_stats(stats)
    split = "test" if ref_split is None else ref_split
    _check_ref_split(split)
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

    ref_name = ref.strip() if stats is None else str(stats.path)
    ref_classes = spec_classes(ref) if stats is None else stats.class_names
    if labels is not None and ref_classes is not None:
        used = [class_names[int(i)] for i in labels.unique()]
        missing = [c for c in used if c not in ref_classes]
        if missing:
            raise ValueError(
                f"sample classes {missing} are not in reference {ref_name!r} (its classes: "
                f"{', '.join(ref_classes)}); evaluate against a reference that includes them"
            )
        if set(ref_classes) - set(used):
            log.warning("reference %s has classes the samples lack: %s (FID will count it)",
                        ref_name, sorted(set(ref_classes) - set(used)))  # fmt: skip

    if stats is not None:
        probe = net.extract(images[:2])  # the network's feature widths, before the long part
        spatial_dim = None if probe.spatial is None else probe.spatial.shape[1]
        _check_stats_fit(stats, net, probe.pool.shape[1], spatial_dim)
        reference = _file_reference(stats, net)
    else:
        reference = _spec_reference(net, ref, split, images.shape[-1], images.shape[1])
    feats = net.extract(images)
    fid = metrics.frechet_distance_from_stats(*metrics.feature_statistics(feats.pool),
                                              *reference.pool)  # fmt: skip
    notes = dict(reference.notes)
    precision = recall = None
    if reference.features is not None:
        precision, recall = metrics.precision_recall(reference.features.pool, feats.pool, k=k)
    acc, per_class, reason = _class_accuracy(net, feats.logits, labels, class_names)

    sfid = is_mean = is_std = None
    spaces = [("pool (FID)", feats.pool.shape[1])]
    if feats.spatial is None:
        notes["sfid"] = f"feature network {net.name} has no spatial features (sFID needs Inception)"
    else:
        is_mean, is_std = metrics.inception_score(feats.logits, splits=min(is_splits, n))
        if reference.spatial is not None:
            spatial = metrics.feature_statistics(feats.spatial)
            sfid = metrics.frechet_distance_from_stats(*spatial, *reference.spatial)
            spaces.append(("spatial (sFID)", feats.spatial.shape[1]))
    for metric in ("precision_recall", "sfid"):
        if metric in notes and (metric != "sfid" or feats.spatial is not None):
            log.info("%s not computed: %s", metric.replace("_", " and "), notes[metric])
    warnings = _small_set_warnings(n, reference.count, spaces)
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
    is_splits: int = 10,
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
        is_splits=is_splits,
        generation=samples.generation,
        samples_path=samples.path,
        ref_split=ref_split,
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
    feature_net: str | FeatureNet | None = "auto",
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Write the ``split`` images of ``spec`` ("train", "test" or "all") as an ADM reference
    batch, atomically: ``arr_0`` uint8 NHWC, ``labels``, ``class_names``, and the feature
    statistics of the set under ADM's keys, ``mu``/``sigma`` (pool features) and, with Inception,
    ``mu_s``/``sigma_s`` (sFID's spatial features), with the network's name and weights' sha256.

    The file is a ``--ref`` for :func:`evaluate`: written once from a large split, reused for every
    sample set. ``feature_net`` as in :func:`evaluate`; None writes the images only. ADM's own
    evaluator reads ``mu``..``sigma_s`` when a file has them, so for it write with Inception (all
    four keys, as ADM's batches) or with ``feature_net=None``; a file written with a bundled
    classifier holds that network's statistics and is for this tool only.

    ``channels`` defaults to 3 because the ADM evaluator feeds ``arr_0`` to Inception as RGB; pass
    ``None`` for the dataset's native channel count. An existing ``path`` is replaced only with
    ``overwrite``.
    """
    path = Path(path)
    if reference_file(spec) is not None:
        raise ValueError(f"{spec} is already a statistics file; write a reference from a data spec")
    _check_ref_split(split)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass --overwrite to replace it, or choose another path"
        )
    ref = _load_reference_images(spec, split, image_size, channels)
    stats: dict = {}
    if feature_net is not None:
        net = resolve_feature_net(feature_net, spec, inception_weights, device)
        if net.image_shape is not None and tuple(ref.images.shape[1:]) != tuple(net.image_shape):
            c, h, _ = net.image_shape  # the network's own shape, as evaluation loads the spec
            feats = reference_features(net, spec, h, c, split)[0]
        else:
            feats = net.extract(ref.images)
        mu, sigma = metrics.feature_statistics(feats.pool)
        stats = {"mu": mu.numpy(), "sigma": sigma.numpy(), "feature_net": net.name,
                 "feature_net_sha256": net.sha256}  # fmt: skip
        if feats.spatial is not None:
            mu_s, sigma_s = metrics.feature_statistics(feats.spatial)
            stats.update(mu_s=mu_s.numpy(), sigma_s=sigma_s.numpy())
    meta = {"spec": ref.spec, "dataset": ref.dataset, "split": split,
            "tool": f"kind-dit {tool_version()}", **stats}  # fmt: skip
    save_npz(path, ref.images, ref.labels.tolist(), ref.class_names, **meta)
    log.info("wrote %d %s images of %s%s to %s", len(ref.labels), split, spec,
             f" with {stats['feature_net']} statistics" if stats else "", path)  # fmt: skip
    return path
