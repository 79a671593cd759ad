"""The reference a sample set is scored against: the real images, as feature statistics.

A reference is either a data spec, by default its *test* split (which neither the diffusion model
nor the bundled feature networks trained on; "train" or "all", train + test, on request), or a
reference statistics ``.npz``: an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``
and the images ``arr_0``), a clean-fid statistics file (``mu``, ``sigma``) of its
``legacy_tensorflow`` mode, or one that :func:`write_adm_reference` wrote. (clean-fid's default
"clean" statistics resize with PIL's antialiased bicubic, where this tool's Inception, as ADM's,
resizes TensorFlow's way: FID against them would measure the two resizes too.)

Statistics files exist because the field's numbers are made against them: papers report FID-50K
(50,000 samples) against ADM's reference batches, whose statistics are what make two papers'
numbers comparable, and one file, featurised once from a large split, is then reused for every
sample set instead of loading and featurising the split each time. FID and sFID come from the
stored statistics, as in ADM's evaluator; precision and recall need per-image features, so they
need the file's images.

Whichever kind, :func:`spec_reference` and :func:`file_reference` give the evaluator one record,
:class:`Reference`; the features of a spec's split (and of a file's images) are cached per
network, because a demo scores many sample sets against one reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kind.core.images import save_npz
from kind.data.images import ImageSet, load_images, parse_spec
from kind.data.store_format import META_FILE, is_store
from kind.eval import metrics
from kind.eval.features import (
    FeatureNet,
    FeatureOutput,
    auto_feature_net,
    feature_net_choice,
    fits,
    resolve_feature_net,
)
from kind.eval.npz import name_list, nchw, open_npz, scalars, tool_version
from kind.io import read_json, sha256_file

log = logging.getLogger(__name__)

REF_SPLITS = ("train", "test", "all")  # "all": train + test of the spec, concatenated here
REF_WRITE_HINT = "kind-dit evaluate --write-ref OUT.npz --ref SPEC --feature-net NET"
_REFERENCE_ARRAYS = ("arr_0", "labels", "class_names", "mu", "sigma", "mu_s", "sigma_s")
_REFERENCE_KINDS = (
    "an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0), a clean-fid statistics file "
    "(mu, sigma) or one written by `kind-dit evaluate --write-ref`"
)


def check_image_spec(ref: str) -> None:
    """Refuse a latent store as a reference: FID compares images, and a store holds latents
    (which reading it as an image folder would call a folder without images)."""
    if is_store(ref):
        spec = read_json(Path(ref).expanduser() / META_FILE).get("spec", "the images' spec")
        raise ValueError(
            f"{ref} is a latent store (kind-dit encode), and a reference must be images: pass "
            f"the spec it was encoded from ({spec}), or a reference .npz"
        )


def check_ref_split(split: str) -> None:
    """Refuse a split the reference of a data spec cannot be."""
    if split not in REF_SPLITS:
        raise ValueError(f"reference split must be one of {', '.join(REF_SPLITS)}, got {split!r}")


# ----------------------------------------------------------------------------- data specs


# Reference features per (network, weights, spec, split, shape): the demo evaluates many sample
# sets against one reference, and re-loading and re-featurising it each time would dominate.
# Reference statistics files cache the features of their images here too, keyed by the file's hash.
_REF_CACHE: dict[tuple, tuple[FeatureOutput, int, list[str], str]] = {}


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
    check_ref_split(split)
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
    check_ref_split(split)
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


# ----------------------------------------------------------------------------- statistics files


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
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the reference images: its images', else the size the file records."""
        if self.images is not None:
            return tuple(self.images.shape[-2:])
        recorded = self.meta.get("image_size")
        return None if recorded is None else (int(recorded), int(recorded))

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
    with open_npz(
        path,
        what="reference statistics",
        expected="an .npz with 'mu' and 'sigma'",
        hint=_REFERENCE_KINDS,
    ) as npz:
        mu, sigma = _read_stat_pair(path, npz, "mu", "sigma")
        mu_s, sigma_s = _read_stat_pair(path, npz, "mu_s", "sigma_s")
        arr = npz["arr_0"] if "arr_0" in npz.files else None
        names = npz["class_names"] if "class_names" in npz.files else None
        meta = scalars(npz, _REFERENCE_ARRAYS)
        keys = ", ".join(npz.files) or "none"
    if mu is None and arr is None:
        raise ValueError(
            f"{path} holds neither statistics ('mu', 'sigma') nor reference images ('arr_0') "
            f"(keys: {keys}); pass {_REFERENCE_KINDS}"
        )
    images = None
    if arr is not None:
        images = nchw(arr)
        if images is None:
            raise ValueError(
                f"{path}: 'arr_0' must be square uint8 reference images [N, H, W, C] with C = 1 "
                f"or 3 (the ADM layout), got {arr.dtype} {arr.shape}"
            )
    return ReferenceStats(
        path=path.resolve(),
        sha256=sha256_file(path),
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
        images=images,
        class_names=name_list(path, names),
        meta=meta,
    )


def check_stats_size(stats: ReferenceStats, samples: torch.Tensor) -> None:
    """Refuse a reference of another resolution than the samples [N, C, H, W] (when the file
    says its size): both sets are resized to the feature network's input, so FID between two
    resolutions measures the resize as much as the model, and looks plausible while it does."""
    size, (h, w) = stats.image_size, samples.shape[-2:]
    if size is None or size == (h, w):
        return
    raise ValueError(
        f"the samples are {h}x{w} but the reference {stats.path} holds {size[0]}x{size[1]} "
        "images, and a score across resolutions measures the resize as much as the model; "
        f"write a reference at the samples' size (kind-dit evaluate --write-ref OUT.npz --ref "
        f"SPEC --image-size {h}), or draw the samples at {size[0]}x{size[1]}"
    )


def auto_feature_net_for_stats(stats: ReferenceStats) -> str:
    """ "auto" for a statistics file: the network it records (files this tool wrote, with any
    --feature-net), else the one "auto" picks for the spec it records, else Inception-V3, the
    network of ADM's and clean-fid's statistics."""
    recorded = feature_net_choice(stats.meta.get("feature_net"))
    if recorded is not None:
        return recorded
    spec = stats.meta.get("spec")
    if isinstance(spec, str):
        try:
            return auto_feature_net(spec)
        except (ValueError, OSError):  # a spec from another machine: fall through
            pass
    return "inception"


def check_stats_fit(
    stats: ReferenceStats, net: FeatureNet, pool_dim: int, spatial_dim: int | None
) -> None:
    """Refuse statistics another network made: the recorded weights' hash, else the dimension."""
    recorded = stats.meta.get("feature_net_sha256")
    if recorded is not None and str(recorded) != net.sha256:
        choice = feature_net_choice(stats.meta.get("feature_net"))
        flag = f"--feature-net {choice}" if choice else "the --feature-net it was written with"
        raise ValueError(
            f"{stats.path} holds statistics of feature network {stats.meta.get('feature_net')} "
            f"(weights sha256 {str(recorded)[:16]}…), but the samples are scored with {net.name} "
            f"(sha256 {net.sha256[:16]}…), and statistics of another network make FID "
            f"meaningless; pass {flag}, or write the reference again with this network: "
            f"{REF_WRITE_HINT}"
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
    if fits(net, images):
        return images
    c, h, w = net.image_shape
    if tuple(images.shape[2:]) != (h, w):
        return None
    if c == 1 and images.shape[1] == 3 and bool((images == images[:, :1]).all()):
        return images[:, :1].contiguous()
    if c == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    return None


# ----------------------------------------------------------------------------- the record


@dataclass
class Reference:
    """What the metrics need of a reference, whichever kind it is."""

    pool: tuple[torch.Tensor, torch.Tensor]  # (mu [D], sigma [D, D]) float64
    spatial: tuple[torch.Tensor, torch.Tensor] | None  # sFID statistics, or None
    features: FeatureOutput | None  # per-image features (precision, recall); None: statistics only
    count: int | None
    class_names: list[str] | None
    record: dict  # the reference_* fields of the result
    notes: dict = field(default_factory=dict)  # metric -> why it is None


def _statistics(feats: FeatureOutput) -> tuple[tuple, tuple | None]:
    """(pool, spatial) statistics, each (mean, covariance) float64, spatial None when the network
    has none: what a spec's reference and a written reference file both hold."""
    pool = metrics.feature_statistics(feats.pool)
    return pool, None if feats.spatial is None else metrics.feature_statistics(feats.spatial)


def spec_reference(
    net: FeatureNet, ref: str, split: str, image_size: int, channels: int
) -> Reference:
    """The ``split`` of data spec ``ref``, featurised by ``net`` at the samples' size."""
    feats, count, names, dataset = reference_features(net, ref, image_size, channels, split)
    if count < 2:  # a folder class of under 10 images has one test image
        raise ValueError(
            f"the {split} split of reference {ref.strip()} holds {count} image(s), too few for "
            "feature statistics; use --ref-split all (train and test) or a larger reference"
        )
    record = {
        "reference": ref.strip(),
        "reference_type": "data spec",
        "reference_image_size": [image_size, image_size],  # loaded at the samples' size
        "reference_dataset": dataset,
        "reference_split": split,
        "reference_sha256": None,
    }
    return Reference(*_statistics(feats), feats, count, names, record)


def file_reference(stats: ReferenceStats, net: FeatureNet) -> Reference:
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
        "reference_image_size": None if stats.image_size is None else list(stats.image_size),
        "reference_dataset": stats.meta.get("dataset"),
        "reference_split": stats.meta.get("split"),
        "reference_sha256": stats.sha256,
    }
    return Reference(pool, spatial, feats, stats.count, stats.class_names, record, notes)


# ----------------------------------------------------------------------------- writing one


def _size_refusal(net: FeatureNet, what: str) -> str:
    _, h, w = net.image_shape
    return (
        f"feature network {net.name} takes {h}x{w} images, so {what} would give statistics of "
        "other images than the file holds; leave --image-size out, or use --feature-net "
        "inception (which resizes)"
    )


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

    The file is a ``--ref`` for :func:`~kind.eval.evaluate.evaluate`: written once from a large
    split, reused for every sample set. ``feature_net`` as in :func:`~kind.eval.evaluate.evaluate`;
    None writes the images only. ADM's own evaluator reads ``mu``..``sigma_s`` when a file has
    them, so for it write with Inception (all four keys, as ADM's batches) or with
    ``feature_net=None``; a file written with a bundled classifier holds that network's statistics
    and is for this tool only.

    ``channels`` defaults to 3 because the ADM evaluator feeds ``arr_0`` to Inception as RGB; pass
    ``None`` for the dataset's native channel count. An existing ``path`` is replaced only with
    ``overwrite``.
    """
    path = Path(path)
    if reference_file(spec) is not None:
        raise ValueError(f"{spec} is already a statistics file; write a reference from a data spec")
    check_image_spec(spec)
    check_ref_split(split)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of the .npz file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass --overwrite to replace it, or choose another path"
        )
    # the network first: missing weights, or a size it cannot take, stop before the split is
    # loaded (minutes at ImageNet scale). A network of a fixed size takes another channel count
    # by a reload at its own shape (grey as RGB); another size would give statistics of other
    # images than the file holds.
    net = None if feature_net is None else resolve_feature_net(feature_net, spec,
                                                                inception_weights, device)  # fmt: skip
    size = None if net is None or net.image_shape is None else net.image_shape[1:]
    if size is not None and image_size not in (None, size[0]):
        raise ValueError(_size_refusal(net, f"--image-size {image_size}"))
    ref = _load_reference_images(spec, split, image_size, channels)
    if size is not None and tuple(ref.images.shape[-2:]) != size:
        h, w = ref.images.shape[-2:]
        raise ValueError(_size_refusal(net, f"{spec}'s {h}x{w} images"))
    stats: dict = {}
    if net is not None:
        if fits(net, ref.images):
            feats = net.extract(ref.images)
        else:
            c, h, _ = net.image_shape  # the network's own shape, as evaluation loads the spec
            feats = reference_features(net, spec, h, c, split)[0]
        (mu, sigma), spatial = _statistics(feats)
        stats = {"mu": mu.numpy(), "sigma": sigma.numpy(), "feature_net": net.name,
                 "feature_net_sha256": net.sha256}  # fmt: skip
        if spatial is not None:
            stats.update(mu_s=spatial[0].numpy(), sigma_s=spatial[1].numpy())
    meta = {"spec": ref.spec, "dataset": ref.dataset, "split": split,
            "image_size": ref.images.shape[-1], "tool": f"kind-dit {tool_version()}",
            **stats}  # fmt: skip
    save_npz(path, ref.images, ref.labels.tolist(), ref.class_names, **meta)
    log.info("wrote %d %s images of %s at %dx%d%s to %s", len(ref.labels), split, spec,
             *ref.images.shape[-2:], f" with {stats['feature_net']} statistics" if stats else "",
             path)  # fmt: skip
    return path
