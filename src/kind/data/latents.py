"""A latent store on disk, and how training reads it: memory-mapped, verified on opening.

A store is a directory (made by `kind.data.encoding`)::

    latents.npy     float16 [N, 2, C, h, w]; [:, 0] the image, [:, 1] its horizontal mirror
    labels.npy      int64 [N], index into class_names
    meta.json       format "kind-latents/1", class names, spec, split, sizes, the VAE's path and
                    latent space (SPACE_KEYS, the sha256 of its config.json)
    checksums.json  sha256 of the three (stores made before it existed open unverified)

``get`` returns float32 latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kind.data.store_format import FORMAT, LABELS_FILE, LATENTS_FILE, META_FILE
from kind.data.vae import CONFIG_SHA, SPACE_KEYS, LatentError, latent_problem
from kind.io import is_a, read_json, verify_checksums

FULL_CHECK_BYTES = 1 << 30  # latents.npy up to this size is hashed on every open (about 1 s)


def _is_int(value, least: int) -> bool:
    return is_a(value, int) and value >= least


class LatentStore:
    """A latent store opened read-only and memory-mapped, with the training loop's data interface
    (``len``, ``shape``, ``get``; see ``kind.train.InMemoryImages``): ``get`` reads only the
    rows a batch needs, so a 21 GB ImageNet store costs no RAM beyond the page cache.

    Opening verifies the store against the checksums.json that encoding wrote: meta.json and
    labels.npy by sha256 (small), latents.npy by sha256 up to FULL_CHECK_BYTES and above that by
    its size only. Hashing took 0.8 s a GB on the development machine (`kind.io.sha256_file` of a
    300 MB file in the page cache), more from disk, on every open by every rank: an ImageNet
    store (21 GB) would cost each run and rank 17 s or more; its size still catches the common
    damage, a partial copy. Its bit flips are caught by checking it in full, once, by hand:
    ``python -c "from kind.io import verify_checksums; print(verify_checksums('STORE'))"``
    prints True when every file matches, False for a store without checksums.json, and raises
    naming the first file that differs. A store written before checksums were recorded opens
    unverified."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise LatentError(
                f"{self.path} is not a latent store (no {META_FILE}); make one with "
                "kind.data.encoding.encode_to_store (`kind-dit encode`)."
            )
        latents_file = self.path / LATENTS_FILE
        large = latents_file.is_file() and latents_file.stat().st_size > FULL_CHECK_BYTES
        try:
            verify_checksums(self.path, unhashed=(LATENTS_FILE,) if large else ())
        except (OSError, ValueError) as err:
            raise LatentError(
                f"{err}. Latent store {self.path} cannot be used as it is: restore it from a "
                "copy, or re-encode it"
            ) from err
        try:
            meta = read_json(meta_file)
        except (OSError, ValueError) as err:
            raise LatentError(f"{err}: re-encode the store.") from err
        if meta.get("format") != FORMAT:
            raise LatentError(
                f"{meta_file} has format {meta.get('format')!r}, not {FORMAT!r}; re-encode "
                "the data with this version of kind."
            )
        self.meta: dict = self._checked(meta)
        self.class_names: list[str] = [str(c) for c in meta["class_names"]]
        self._latents = self._load(LATENTS_FILE, mmap=True)  # [N, 2, C, h, w]
        labels = self._load(LABELS_FILE, mmap=False)  # [N]
        n, shape = meta["count"], tuple(meta["latent_shape"])
        if self._latents.shape != (n, 2, *shape) or self._latents.dtype.kind != "f":
            raise LatentError(
                f"{latents_file} holds {self._latents.dtype} "
                f"{self._latents.shape}, but {META_FILE} says float {(n, 2, *shape)}; the "
                "store is damaged or incomplete: re-encode it."
            )
        size = self._latents.offset + self._latents.nbytes
        if latents_file.stat().st_size != size:  # a partial copy: all a large one is checked by
            raise LatentError(
                f"{latents_file} has {latents_file.stat().st_size} bytes, not the {size} its "
                "header says; the store is damaged: restore it from a copy, or re-encode it."
            )
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise LatentError(
                f"{self.path / LABELS_FILE} holds {labels.dtype} {labels.shape}, expected int64 "
                f"({n},); the store is damaged: re-encode it."
            )
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise LatentError(
                f"{self.path / LABELS_FILE} has labels outside 0..{len(self.class_names) - 1}; "
                "the store is damaged: re-encode it."
            )
        self.labels = torch.from_numpy(labels.astype(np.int64))  # int64 [N]
        self.shape: tuple[int, int, int, int] = (n, *shape)  # (N, C, h, w)
        # the VAE's latent space the store was encoded in (latent_channels: older stores lack it)
        self.space = {k: meta[k] for k in (*SPACE_KEYS, CONFIG_SHA) if k in meta}
        self.space.setdefault("latent_channels", shape[0])

    def _checked(self, meta: dict) -> dict:
        """``meta`` when every key reading a store needs is there and well-formed, else a
        LatentError naming the key (a store written by hand, or its meta.json edited)."""
        needed = ("count", "class_names", "latent_shape", "image_size", "vae")
        missing = [k for k in needed if k not in meta]
        if missing:
            raise LatentError(
                f"{self.path / META_FILE} has no {', '.join(map(repr, missing))}; the store is "
                "damaged: re-encode it."
            )
        shape = meta["latent_shape"]
        ok = {
            "count": _is_int(meta["count"], 0),
            "class_names": is_a(meta["class_names"], list[str])
            and len(set(meta["class_names"])) == len(meta["class_names"]),  # one name a class
            "latent_shape": isinstance(shape, list)
            and len(shape) == 3
            and all(_is_int(s, 1) for s in shape),
            "image_size": _is_int(meta["image_size"], 1),
            "vae": isinstance(meta["vae"], str),
        }
        bad = [f"a malformed {k} {meta[k]!r}" for k, good in ok.items() if not good]
        # the latent space's keys, kinds as in a model's record
        space = latent_problem({k: v for k, v in meta.items() if k not in ok}, prefix="")
        if bad or space:
            raise LatentError(
                f"{self.path / META_FILE}: {'; '.join(bad + [space] * bool(space))}; the store "
                "is damaged: re-encode it."
            )
        return meta

    def _load(self, name: str, mmap: bool) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise LatentError(
                f"cannot read {self.path / name} ({err}); the store is damaged or incomplete: "
                "re-encode it."
            ) from err

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"LatentStore({str(self.path)!r}, shape={self.shape}, classes={len(self.class_names)})"
        )

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [b, C, h, w] latents of rows ``idx`` (int64 [b]); where ``flip`` (bool [b]) is
        True, the encoding of the mirrored image."""
        rows = torch.as_tensor(idx, dtype=torch.int64).cpu().numpy()  # [b]
        copy = (
            np.zeros(len(rows), dtype=np.int64)
            if flip is None
            else torch.as_tensor(flip, dtype=torch.bool).cpu().numpy().astype(np.int64)
        )  # [b]: 0 the image, 1 its mirror
        order = np.argsort(rows, kind="stable")  # ascending rows read the file forwards
        picked = np.empty((len(rows), *self.shape[1:]), dtype=self._latents.dtype)
        picked[order] = self._latents[rows[order], copy[order]]  # [b, C, h, w]
        return torch.from_numpy(picked).float()
