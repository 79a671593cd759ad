"""One way to open training data: `open_dataset(spec)` for a bundled set, an image folder or a latent
store alike, and `class_names(spec)` that only reads names.

Every consumer (pre-training, transfer, budget matching, the demo) goes through here, so a latent
store works wherever a data spec does. The training loop reads images only through `len`,
`shape` and `get(idx, flip)`: `InMemoryImages` holds a small set as one tensor, a memory-mapped
`LatentStore` streams a large one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kind.core.images import to_model_range
from kind.data.images import DataError, dataset_classes, load_images, parse_spec
from kind.data.latents import LatentStore
from kind.data.store_format import META_FILE, is_store
from kind.data.vae import check_space, vae_space
from kind.io import CHECKSUMS, read_json


class InMemoryImages:
    """Training images held as one tensor, given in the model's range [-1, 1] in batches; a
    flip is the mirror image. Decoded image files stay uint8 and each batch is converted as it
    is drawn (the same floats as converting them all at once, in a quarter of the memory)."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # uint8, or float in [-1, 1]: [N, C, H, W]
        self.shape = tuple(images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.images[idx]  # [b, C, H, W]
        if x.dtype == torch.uint8:
            x = to_model_range(x)
        return x if flip is None else torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass
class Dataset:
    """Training data: `images` (len, shape, get), `labels` int64 [N] into `class_names`, and for a
    latent store `latent` (the VAE that decodes samples, the pixel size, the store path).
    `source` (the bundled set, folder or store the spec opened) and `sha256` (of the names,
    labels and images; "" for `from_tensors`) say which data these are, so a resumed run can
    tell that its spec now opens other data (a relative path read from another directory, a
    folder that changed)."""

    images: InMemoryImages | LatentStore
    labels: torch.Tensor
    class_names: list[str]
    latent: dict | None = None
    source: str = ""
    sha256: str = ""

    @classmethod
    def from_tensors(
        cls, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]
    ) -> Dataset:
        """A dataset from float images [N, C, H, W] in [-1, 1] (tests, callers with their own
        data, which are theirs to keep the same across a resume: no digest)."""
        return cls(InMemoryImages(images), labels, list(class_names), source="tensors")


def _digest(class_names: list[str], labels: torch.Tensor, content) -> str:
    """sha256 of class names, labels and `content` (image bytes, or a store's own checksums)."""
    h = hashlib.sha256(json.dumps(class_names).encode())
    h.update(memoryview(labels.to(torch.int64).contiguous().numpy()))
    h.update(content)
    return h.hexdigest()


def open_dataset(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    vae: str | None = None,
) -> Dataset:
    """The `split` of a data spec (bundled set, image folder, `@file` lists) as images in [-1, 1],
    or a latent store as it was encoded. `image_size`/`channels` are what the model expects (None:
    the data's own); a store cannot be resized, so a mismatch is an error. `vae` overrides the VAE
    a store records (the VAE moved to another machine); it must have the store's latent space,
    and pixel data, which no VAE decodes, refuses it."""
    if not is_store(spec):
        if vae is not None:
            raise DataError(
                f"vae {vae} is set, but {spec} is pixel data, not a latent store: only latents "
                "decode with a VAE; unset vae (drop --set vae=...)"
            )
        if channels not in (None, 1, 3):  # a latent model (4 channels: an SD VAE's)
            raise DataError(
                f"{spec} is pixel data (1 or 3 channels); the model takes {channels}-channel "
                "latents: encode the images with the VAE the model was trained with (`kind-dit "
                "encode --data SPEC --vae VAE --out STORE`) and give the store"
            )
        data = load_images(spec, split, image_size=image_size, channels=channels)
        digest = _digest(
            data.class_names, data.labels, memoryview(data.images.contiguous().numpy())
        )
        images = InMemoryImages(data.images)
        return Dataset(images, data.labels, data.class_names, None, data.dataset, digest)
    store = LatentStore(spec)
    if store.meta.get("split", split) != split:
        raise DataError(
            f"latent store {spec} holds the {store.meta['split']} split, not {split}; "
            f"encode the {split} split with `kind-dit encode --split {split}`"
        )
    if image_size not in (None, store.shape[-1]) or channels not in (None, store.shape[1]):
        c, h, w = store.shape[1:]
        wanted = (f"{channels}-channel " if channels is not None else "") + (
            f"{image_size}x{image_size}" if image_size is not None else "")  # fmt: skip
        raise DataError(
            f"latent store {spec} holds {c}-channel {h}x{w} latents; the model takes {wanted} "
            "inputs: encode the data with the model's VAE at its image size (`kind-dit encode "
            "--vae VAE --image-size N`, N = the latent size x the VAE's downsampling), or train "
            "a model of the store's size"
        )
    if vae is not None:
        vae = str(Path(vae).expanduser().resolve())
        check_space(
            store.space,
            vae_space(vae),
            f"vae {vae} is not the VAE latent store {spec} was encoded with ({store.meta['vae']})",
            "set vae to that VAE (a copy of it), or encode the images with this one "
            f"(kind-dit encode --vae {vae})",
        )
    latent = {
        "vae": vae or store.meta["vae"],
        "image_size": store.meta["image_size"],
        "store": str(store.path),
        **store.space,
    }
    # the store's checksums.json hashes its latents, labels and meta as encoded (read at open)
    recorded = store.path / CHECKSUMS
    identity = (recorded if recorded.is_file() else store.path / META_FILE).read_bytes()
    digest = _digest(store.class_names, store.labels, identity)
    return Dataset(
        store, store.labels, store.class_names, latent, str(store.path.resolve()), digest
    )


def class_names(spec: str) -> list[str]:
    """The class names a data spec or latent store holds, in label order, without reading images."""
    if is_store(spec):
        return [
            str(c)
            for c in read_json(Path(spec).expanduser() / META_FILE, "class_names")["class_names"]
        ]
    dataset, chosen = parse_spec(spec)
    return chosen if chosen is not None else dataset_classes(dataset)
