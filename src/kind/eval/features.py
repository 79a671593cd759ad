"""Feature networks that turn uint8 images into the features and logits the metrics consume, and
the names a user picks them by.

Two kinds, one interface (:class:`FeatureNet`):

* a small CNN classifier per bundled 28×28 dataset, trained once by
  ``scripts/build_feature_nets.py`` and shipped as safetensors (Inception-V3 learnt its features
  on 299×299 photographs, not 28×28 silhouettes, and needs torchvision, an optional extra);
* Inception-V3 with the 2015 TensorFlow FID weights (torch-fidelity's port), for real images at
  scale, giving the ADM evaluator's pool, spatial (sFID) and logit features. It is loaded only from
  a local weights file: nothing here downloads.

:func:`resolve_feature_net` turns a ``--feature-net`` name ("auto" included) into a loaded network,
once per process: a demo scores many sample sets, and re-reading and re-hashing the weights for
each would be wasted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from kind.core.images import to_model_range
from kind.data.images import BUNDLED, parse_parts
from kind.io import (
    atomic_save_tensors,
    read_json,
    read_tensors,
    sha256_file,
    tensor_sha256,
    write_json,
)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMALL_CNN_ARCH = "kind-smallcnn-v1"
BUILD_SCRIPT = "python scripts/build_feature_nets.py"

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_NAME
)
INCEPTION_ENV = "KIND_INCEPTION_WEIGHTS"
INCEPTION_FLAG = "--inception-weights"
INCEPTION_INSTALL = "pip install 'kind-dit[inception]'"
SFID_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv (17×17 → 2023 dims)
BUNDLED_NET = "bundled"  # the classifier of every bundled set at once, for combined specs
FEATURE_NET_CHOICES = ("auto", *BUNDLED, BUNDLED_NET, "inception")


@dataclass
class FeatureOutput:
    """What a feature network returns for a batch of images."""

    pool: torch.Tensor  # [N, D] float32: features for FID, precision, recall
    logits: torch.Tensor  # [N, C] float32: class scores for accuracy and IS
    spatial: torch.Tensor | None = None  # [N, S] float32: sFID features (Inception only)


class FeatureNet(Protocol):
    """Anything that maps uint8 ``[N, C, H, W]`` images to :class:`FeatureOutput`.

    ``class_names`` is None when the logits are not over the sample classes (Inception's 1008
    ImageNet outputs): class accuracy is then not defined. ``sha256`` identifies the weights so a
    reported FID can be tied to the exact network that produced it.
    """

    name: str
    sha256: str
    class_names: list[str] | None
    image_shape: tuple[int, int, int] | None  # (C, H, W) required, or None if any size works

    def extract(self, images: torch.Tensor, batch_size: int = 256) -> FeatureOutput: ...


def fits(net: FeatureNet, images: torch.Tensor) -> bool:
    """Whether ``net`` takes ``images`` ``[N, C, H, W]`` as they are: they have its
    ``image_shape``, or it names none (any size works)."""
    return net.image_shape is None or tuple(images.shape[1:]) == tuple(net.image_shape)


def _check_images(images: torch.Tensor, shape: tuple[int, int, int] | None, who: str) -> None:
    """Reject wrong dtype/shape early with a message that says what was expected."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images)
        )
        raise ValueError(f"{who} expects uint8 images [N, C, H, W], got {got}")
    if shape is not None and tuple(images.shape[1:]) != shape:
        c, h, w = shape
        raise ValueError(
            f"{who} expects images of shape [N, {c}, {h}, {w}], got {tuple(images.shape)}; "
            "evaluate samples at the resolution and channel count the network was trained on, "
            "or use the Inception feature network"
        )


@contextlib.contextmanager
def _native_convolutions() -> Iterator[None]:
    """Turn oneDNN off for a block and restore the previous setting (``mkldnn.flags`` would also
    reset its other flags to their defaults)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class SmallCNN(nn.Module):
    """A VGG-style classifier for 28×28 single-channel images, small enough to train in about a
    minute on two CPU cores and ship in the package (~100k parameters)."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128, in_channels: int = 1):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, 16),
            *block(16, 32),
            nn.MaxPool2d(2),  # 28 → 14
            *block(32, 48),
            *block(48, 64),
            nn.MaxPool2d(2),  # 14 → 7
            *block(64, 96),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # [N, 96]
        )
        self.embed = nn.Sequential(nn.Linear(96, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float ``[N, 1, 28, 28]`` in [-1, 1] → (penultimate features ``[N, D]``, logits)."""
        feats = self.embed(self.body(x))  # [N, D]
        return feats, self.head(feats)  # [N, D], [N, C]


@dataclass
class BundledFeatureNet:
    """A trained :class:`SmallCNN` plus the metadata that makes its numbers reproducible."""

    module: SmallCNN
    name: str
    sha256: str
    class_names: list[str]
    dataset: str = ""
    meta: dict = field(default_factory=dict)
    image_shape: tuple[int, int, int] | None = (1, 28, 28)

    @classmethod
    def from_module(
        cls, module: SmallCNN, class_names: list[str], name: str = "custom"
    ) -> BundledFeatureNet:
        """Wrap an in-memory network (a freshly trained or randomly initialised one); the sha256
        of its parameters stands in for a file hash so cached reference features stay apart."""
        h = hashlib.sha256()
        for key, value in sorted(module.state_dict().items()):
            h.update(f"{key}:{tensor_sha256(value)}".encode())
        module.eval().requires_grad_(False)
        return cls(module=module, name=name, sha256=h.hexdigest(), class_names=list(class_names))

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 512) -> FeatureOutput:
        """Penultimate features and logits for uint8 ``[N, 1, 28, 28]`` images, in eval mode."""
        _check_images(images, self.image_shape, f"feature net {self.name!r}")
        self.module.eval()
        feats, logits = [], []
        # Native convolutions: with oneDNN, the same images gave features differing in the last
        # bits from one call to the next; a metric should give the same digits for the same
        # samples.
        with _native_convolutions():
            for start in range(0, images.shape[0], batch_size):
                f, lg = self.module(to_model_range(images[start : start + batch_size]))
                feats.append(f)  # [B, D]
                logits.append(lg)  # [B, C]
        return FeatureOutput(pool=torch.cat(feats), logits=torch.cat(logits))


def feature_net_paths(dataset: str, assets: Path | None = None) -> tuple[Path, Path]:
    """Where the weights and JSON sidecar of a bundled dataset's feature net live."""
    root = ASSETS if assets is None else Path(assets)
    return root / f"featnet_{dataset}.safetensors", root / f"featnet_{dataset}.json"


def save_feature_net(
    module: SmallCNN, dataset: str, class_names: list[str], meta: dict, assets: Path | None = None
) -> dict:
    """Write weights (safetensors) and sidecar (JSON with the weights' sha256); return the sidecar.

    The sidecar is written after the weights so that a crash never leaves a sidecar pointing at
    weights that do not exist.
    """
    weights, sidecar = feature_net_paths(dataset, assets)
    # One metadata key only: safetensors writes the metadata map in a per-process random order,
    # so two keys made the file's bytes (and sha256) differ between identical runs.
    atomic_save_tensors(weights, module.state_dict(), {"architecture": SMALL_CNN_ARCH})
    info = {
        "architecture": SMALL_CNN_ARCH,
        "dataset": dataset,
        "class_names": list(class_names),
        "feature_dim": module.head.in_features,
        "sha256": sha256_file(weights),
        **meta,
    }
    write_json(sidecar, info)
    return info


def load_feature_net(dataset: str, assets: Path | None = None) -> BundledFeatureNet:
    """The bundled classifier for ``dataset`` (a bundled set, or "bundled": all of them), checked
    against its sha256."""
    weights, sidecar = feature_net_paths(dataset, assets)
    if not weights.exists() or not sidecar.exists():
        raise FileNotFoundError(
            f"no bundled feature network for dataset {dataset!r} (looked for {weights} and "
            f"{sidecar.name}); build it with `{BUILD_SCRIPT} --datasets {dataset}`"
        )
    info = read_json(sidecar, "sha256", "architecture", "class_names", "feature_dim")
    digest = sha256_file(weights)
    if digest != info.get("sha256"):
        raise ValueError(
            f"{weights} has sha256 {digest}, its sidecar says {info.get('sha256')}: the file was "
            f"changed or truncated; rebuild it with `{BUILD_SCRIPT} --datasets {dataset}`"
        )
    if info.get("architecture") != SMALL_CNN_ARCH:
        raise ValueError(f"{sidecar}: unknown architecture {info.get('architecture')!r}")
    module = SmallCNN(num_classes=len(info["class_names"]), feature_dim=info["feature_dim"])
    module.load_state_dict(read_tensors(weights))
    module.eval().requires_grad_(False)
    log.debug("loaded feature net %s (sha256 %s)", weights, digest[:16])
    return BundledFeatureNet(
        module=module,
        name=f"{SMALL_CNN_ARCH}-{dataset}",
        sha256=digest,
        class_names=list(info["class_names"]),
        dataset=dataset,
        meta=info,
    )


# ----------------------------------------------------------------------------- Inception-V3


def resolve_inception_weights(path: str | Path | None) -> Path:
    """The Inception weights file to use: the explicit path, else ``$KIND_INCEPTION_WEIGHTS``.

    Raises with instructions when neither is given or the file is missing, because the library
    underneath would otherwise silently try to download it.
    """
    if path is None or str(path) == "":
        path = os.environ.get(INCEPTION_ENV) or None
    if path is None:
        raise FileNotFoundError(
            "Inception-V3 metrics (FID/sFID/IS/precision/recall on real images) need the FID "
            f"Inception weights {INCEPTION_WEIGHTS_NAME}, and nothing here downloads. Fetch it "
            f"once from {INCEPTION_WEIGHTS_URL}, put it anywhere (e.g. ~/.cache/kind/), and pass "
            f"its path with {INCEPTION_FLAG} PATH (or set {INCEPTION_ENV}=PATH)"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights file not found: {p} (given via {INCEPTION_FLAG} or "
            f"{INCEPTION_ENV}); expected {INCEPTION_WEIGHTS_NAME} from {INCEPTION_WEIGHTS_URL}"
        )
    return p


def _import_inception_class() -> type:
    """torch-fidelity's Inception port, imported late: it pulls torchvision, which is an optional
    extra and does not import at all beside some CPU torch wheels."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # ImportError, or RuntimeError from a mismatched torchvision
        raise ImportError(
            "Inception-V3 metrics need torch-fidelity (and a torchvision matching your torch): "
            f"{INCEPTION_INSTALL}. Import failed with: {type(err).__name__}: {err}"
        ) from err
    return FeatureExtractorInceptionV3


@dataclass
class InceptionFeatureNet:
    """Inception-V3 (TF 2015 FID weights) giving ADM-evaluator features.

    pool: 2048-d ``pool_3`` (FID, precision, recall); spatial: the first 7 channels of
    ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``, 17×17), flattened in NHWC order as
    ADM does (sFID); logits: the 1008 unbiased logits (IS, as ADM and torch-fidelity compute it).
    """

    module: nn.Module
    name: str
    sha256: str
    class_names: list[str] | None = None
    image_shape: tuple[int, int, int] | None = None
    device: str = "cpu"

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 64) -> FeatureOutput:
        """Features for uint8 ``[N, 1 or 3, H, W]`` images (resized to 299 inside the network)."""
        _check_images(images, None, "Inception-V3")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"Inception-V3 takes 1- or 3-channel images, got {images.shape[1]}")
        captured: list[torch.Tensor] = []
        hook = self.module.Mixed_6d.branch1x1.register_forward_hook(
            lambda _m, _i, out: captured.append(out[:, :SFID_CHANNELS].clone())
        )
        pools, logits, spatial = [], [], []
        try:
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(self.device)
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)  # grayscale → RGB, as the ADM evaluator does
                pool, logit = self.module(x)  # [B, 2048], [B, 1008]
                pools.append(pool.float().cpu())
                logits.append(logit.float().cpu())
                sp = captured.pop()  # [B, 7, 17, 17]
                spatial.append(sp.permute(0, 2, 3, 1).flatten(1).float().cpu())  # [B, 2023]
        finally:
            hook.remove()
        return FeatureOutput(torch.cat(pools), torch.cat(logits), torch.cat(spatial))


def load_inception(
    weights_path: str | Path | None = None, device: str = "cpu"
) -> InceptionFeatureNet:
    """Inception-V3 from a local weights file; errors name the file, the flag and the pip extra."""
    path = resolve_inception_weights(weights_path)
    cls = _import_inception_class()
    module = cls("inception-v3-compat", ["2048", "logits_unbiased"], str(path))
    module.eval().requires_grad_(False).to(device)
    log.info("loaded Inception-V3 from %s on %s", path, device)
    return InceptionFeatureNet(
        module=module,
        name="inception-v3-tf-2015-12-05 (torch-fidelity)",
        sha256=sha256_file(path),
        device=device,
    )


# ----------------------------------------------------------------------------- networks by name


def auto_feature_net(ref: str) -> str:
    """The network "auto" picks for reference spec ``ref``: the dataset's own classifier when it
    names one bundled dataset, the ``bundled`` classifier (trained on all bundled sets) when it
    combines bundled datasets, else Inception-V3 (which needs local weights)."""
    datasets = {dataset for dataset, _ in parse_parts(ref)}
    if not datasets <= set(BUNDLED):
        return "inception"
    return datasets.pop() if len(datasets) == 1 else BUNDLED_NET


def feature_net_choice(name: object) -> str | None:
    """The --feature-net value that loads the network called `name` (as a statistics file
    records it: `kind-smallcnn-v1-mnist` -> mnist), or None for a network of no choice."""
    if not isinstance(name, str):
        return None
    if name.startswith("inception-v3"):
        return "inception"
    choice = name.removeprefix(f"{SMALL_CNN_ARCH}-")
    return choice if choice != name and choice in FEATURE_NET_CHOICES else None


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
