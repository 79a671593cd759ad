"""Data specs, bundled sets, image folders and their errors (CPU, no network, a few seconds)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kind.core.images import GRID_CLASSES, GRID_PER_CLASS, save_grid, to_model_range, to_uint8
from kind.data.dataset import class_names
from kind.data.images import (
    BUNDLED,
    DataError,
    ImageSet,
    dataset_classes,
    list_images,
    load_images,
    parse_spec,
    read_image,
    split_spec,
)

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGITS = [str(d) for d in range(10)]
LETTERS = list("ABCDEFGHIJKLMNOPQRSTUVWX")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("mnist", ("mnist", None)),
        ("animals", ("animals", None)),
        ("mnist:0-5", ("mnist", ["0", "1", "2", "3", "4", "5"])),
        ("mnist:6,7,8,9", ("mnist", ["6", "7", "8", "9"])),
        ("mnist:9,2", ("mnist", ["9", "2"])),  # spec order, not dataset order
        ("mnist: 3 , 0-1", ("mnist", ["3", "0", "1"])),  # ranges and names mix; spaces ignored
        ("mnist:4-4", ("mnist", ["4"])),
        ("animals:cat,dog", ("animals", ["cat", "dog"])),
        ("animals:cow-elephant", ("animals", ["cow", "dog", "elephant"])),
        ("glyphs:W-X,A", ("glyphs", ["W", "X", "A"])),
        ("mnist:0-1 + animals:cat", ("mnist + animals", ["0", "1", "cat"])),
        ("glyphs:B+mnist:9", ("glyphs + mnist", ["B", "9"])),  # spaces optional
        ("mnist:0 + mnist:1", ("mnist + mnist", ["0", "1"])),  # one dataset twice is fine
    ],
)
def test_parse_spec_expands_names_and_ranges(spec, expected):
    assert parse_spec(spec) == expected


def test_bundled_class_order():
    assert BUNDLED == ("mnist", "animals", "glyphs")
    assert dataset_classes("mnist") == DIGITS
    assert dataset_classes("animals") == ANIMALS
    assert dataset_classes("glyphs") == LETTERS


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("mnist:5-0", "bad range '5-0'"),
        ("mnist:0-12", "bad range '0-12'"),
        ("mnist:0,3,0", "'0' is listed twice"),
        ("mnist:0-3,2", "'2' is listed twice"),
        ("mnist:", "empty class name"),
        ("mnist:1,,2", "empty class name"),
    ],
)
def test_parse_spec_rejects_bad_selections(spec, needle):
    with pytest.raises(DataError, match=needle):
        parse_spec(spec)


def test_unknown_class_is_named_with_the_available_ones():
    with pytest.raises(DataError) as err:
        parse_spec("animals:cat,unicorn")
    message = str(err.value)
    assert "'unicorn'" in message and "bear, bird, cat" in message
    assert isinstance(err.value, ValueError)


def test_unknown_dataset_lists_bundled_names_and_accepts_folders(tmp_path):
    with pytest.raises(DataError) as err:
        parse_spec(str(tmp_path / "nope") + ":cat")
    message = str(err.value)
    assert "nope" in message and "mnist, animals" in message and "folder" in message
    with pytest.raises(DataError, match="fashion"):
        load_images("fashion")


# ---------------------------------------------------------------- bundled sets


def test_mnist_0_5_counts_labels_and_shapes():
    train, test = load_images("mnist:0-5"), load_images("mnist:0-5", split="test")
    assert isinstance(train, ImageSet)
    assert train.images.shape == (2400, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (600, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (2400,)
    assert torch.bincount(train.labels).tolist() == [400] * 6
    assert torch.bincount(test.labels).tolist() == [100] * 6
    assert train.class_names == ["0", "1", "2", "3", "4", "5"]
    assert (train.spec, train.dataset, len(train)) == ("mnist:0-5", "mnist", 2400)
    assert train.images.max() == 255 and train.images.min() == 0


def test_mnist_6_9_labels_index_the_spec_order():
    data = load_images("mnist:9,6,7,8")
    assert data.class_names == ["9", "6", "7", "8"]
    assert data.labels.unique().tolist() == [0, 1, 2, 3]
    assert torch.bincount(data.labels).tolist() == [400] * 4
    # label 0 must be the digit 9: its images equal the source rows of digit 9, train split
    with resources.as_file(resources.files("kind") / "assets" / "mnist.npz") as path:
        with np.load(path, allow_pickle=False) as npz:
            nines = npz["images"][npz["labels"] == 9]
    expected = nines[np.arange(500) % 5 != 4]
    assert np.array_equal(data.images[data.labels == 0, 0].numpy(), expected)


def test_animals_counts_and_class_order():
    train, test = load_images("animals"), load_images("animals", "test")
    assert train.class_names == ANIMALS
    assert train.images.shape == (8000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [800] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    cats = load_images("animals:cat")
    assert torch.equal(cats.images, train.images[train.labels == ANIMALS.index("cat")])


def test_split_is_every_fifth_image_disjoint_and_deterministic():
    with resources.as_file(resources.files("kind") / "assets" / "mnist.npz") as path:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    zeros = images[labels == 0]  # [500, 28, 28], source order
    test = load_images("mnist:0", "test")
    assert np.array_equal(test.images[:, 0].numpy(), zeros[4::5])
    train = load_images("mnist:0")
    assert len(train) + len(test) == 500
    train_rows = {im.tobytes() for im in train.images.numpy()}
    assert not any(im.tobytes() in train_rows for im in test.images.numpy())
    again = load_images("mnist:0")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_glyphs_counts_split_and_frame():
    train, test = load_images("glyphs"), load_images("glyphs", "test")
    assert train.class_names == LETTERS and train.dataset == "glyphs"
    assert train.images.shape == (24 * 240, 1, 28, 28) and test.images.shape == (24 * 60, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [240] * 24
    assert torch.bincount(test.labels).tolist() == [60] * 24
    both = torch.cat([train.images, test.images])
    assert both.max() == 255  # white letters on black, like mnist
    frame = torch.cat([both[..., 0, :], both[..., -1, :], both[..., :, 0], both[..., :, -1]], -1)
    assert frame.max() == 0  # every letter lies inside the frame with a black margin
    assert (both > 127).flatten(1).sum(1).min() >= 20  # and none is (nearly) empty


def test_glyphs_are_far_from_digits():
    def mean_image(spec: str, split: str = "train") -> torch.Tensor:
        return load_images(spec, split).images.float().mean(0)  # [1, 28, 28]

    digits = mean_image("mnist")
    within = (digits - mean_image("mnist", "test")).norm()  # same domain, other images
    assert (mean_image("glyphs") - digits).norm() > 5 * within


def test_glyphs_can_be_remade_from_the_build_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import build_glyphs

    with resources.as_file(resources.files("kind") / "assets" / "glyphs.npz") as path:
        with np.load(path, allow_pickle=False) as npz:
            images, names = npz["images"], npz["class_names"].tolist()
    assert names == build_glyphs.CLASSES == LETTERS
    for k, i in ((0, 0), (8, 123), (23, 299)):  # "A" first, "I" 124th, "X" last
        remade = build_glyphs.render(k, i)
        assert remade.dtype == np.uint8 and remade.shape == (28, 28)
        assert np.array_equal(remade, images[k * build_glyphs.PER_CLASS + i]), (k, i)
    assert not np.array_equal(build_glyphs.render(0, 0, seed=1), images[0])  # the seed matters


def test_bundled_resize_and_rgb():
    data = load_images("mnist:3", image_size=16, channels=3)
    assert data.images.shape == (400, 3, 16, 16) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # grey repeated into RGB
    native = load_images("mnist:3").images.float().mean()
    assert abs(data.images.float().mean() - native) < 10  # same content, just smaller


# ---------------------------------------------------------------- combined specs


def test_combined_spec_concatenates_the_parts_in_order():
    for split, (n_digit, n_cat) in (("train", (400, 800)), ("test", (100, 200))):
        data = load_images("mnist:0-1 + animals:cat", split)
        assert data.class_names == ["0", "1", "cat"] and data.dataset == "mnist + animals"
        assert data.images.shape == (2 * n_digit + n_cat, 1, 28, 28)
        assert torch.bincount(data.labels).tolist() == [n_digit, n_digit, n_cat]
        assert data.labels.tolist() == sorted(data.labels.tolist())  # 0s, then 1s, then 2s
        digits, cats = load_images("mnist:0-1", split), load_images("animals:cat", split)
        assert torch.equal(data.images, torch.cat([digits.images, cats.images]))


def test_combined_spec_lists_the_images_it_loads():
    spec = "glyphs:Q + mnist:7"
    items, labels, names = list_images(spec, "test")
    data = load_images(spec, "test")
    assert names == data.class_names == ["Q", "7"] and torch.equal(labels, data.labels)
    for j in (0, 59, 60, len(items) - 1):
        assert np.array_equal(read_image(items[j], 28, 1)[..., 0], data.images[j, 0].numpy())


def test_combined_spec_class_names_without_images():
    assert class_names("mnist + animals:cat,dog") == DIGITS + ["cat", "dog"]
    assert class_names("animals:dog+glyphs:A-C") == ["dog", "A", "B", "C"]
    assert dataset_classes("mnist + glyphs") == DIGITS + LETTERS


def test_combined_spec_refuses_a_class_in_two_parts(folder):
    with pytest.raises(DataError) as err:
        parse_spec("animals:cat,dog + mnist:3 + animals:bird,cat")
    message = str(err.value)
    assert "'cat' is in part 1" in message and "part 3" in message and "unique" in message
    with pytest.raises(DataError, match="'cat' is in part 1"):
        load_images(f"animals:cow,cat + {folder}")  # the folder has a class "cat" too


def test_combined_spec_with_an_unknown_part_names_it():
    with pytest.raises(DataError, match="combined data spec.*'fashion'"):
        load_images("mnist:0 + fashion")


def test_combined_spec_with_a_folder_uses_folder_defaults(folder):
    data = load_images(f"{folder}:cat + mnist:0", "test")
    assert data.class_names == ["cat", "0"] and data.images.shape == (1 + 100, 3, 32, 32)
    assert data.dataset == f"{folder.resolve()} + mnist"
    assert data.images[0, :, 0, 0].tolist() == [200, 0, 0]  # red cat
    assert torch.equal(data.images[1:, 0], data.images[1:, 2])  # grey digits as RGB
    small = load_images(f"{folder}:cat + mnist:0", "test", image_size=28, channels=1)
    assert small.images.shape == (101, 1, 28, 28)
    assert torch.equal(small.images[1:], load_images("mnist:0", "test").images)


def test_plus_inside_a_folder_path_or_class_name(tmp_path, monkeypatch):
    for i in range(5):
        _write(tmp_path / "a+b" / "c++" / f"{i}.png", (8, 8), (0, 0, 255))
    monkeypatch.chdir(tmp_path)
    assert split_spec("a+b") == ["a+b"] and split_spec("a+b:c++") == ["a+b:c++"]
    assert split_spec("a+b + mnist:0") == ["a+b", "mnist:0"]
    assert load_images("a+b:c++").class_names == ["c++"]
    assert load_images("mnist:0+a+b").class_names == ["0", "c++"]


# ---------------------------------------------------------------- image folders


def _write(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """cat: 6 red RGB 40x30 pngs; dog: 5 grey 20x20 jpgs (name order 'a'..'e'); bird: 10 gif."""
    root = tmp_path / "pets"
    for i in range(6):
        _write(root / "cat" / f"c{i}.png", (40, 30), (200, 0, 0))
    for i, name in enumerate("edcba"):  # written in reverse to check sorting by name
        _write(root / "dog" / f"{name}.JPG", (20, 20), 10 + 40 * i, mode="L")
    for i in range(10):
        _write(root / "bird" / f"b{i:02d}.gif", (28, 28), 128, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_images_beside_the_class_folders_are_named_in_a_warning(folder, caplog):
    _write(folder / "stray.png", (20, 20), 10, mode="L")
    assert dataset_classes(str(folder)) == ["bird", "cat", "dog"]
    dataset_classes(str(folder))
    assert caplog.text.count("1 image(s) beside its class sub-folders") == 1  # once a folder


def test_a_users_meta_json_does_not_make_an_image_folder_a_store(folder):
    """A user's own meta.json, not UTF-8 (one program's notes): the folder is images, as before."""
    from kind.data.dataset import open_dataset

    (folder / "meta.json").write_text('{"source": "my camera"}', encoding="utf-16")
    assert open_dataset(str(folder)).class_names == ["bird", "cat", "dog"]


def test_a_vae_for_pixel_data_is_refused():
    from kind.data.dataset import open_dataset

    with pytest.raises(DataError, match="mnist:0 is pixel data.*unset vae"):
        open_dataset("mnist:0", vae="some/vae")
    # a latent model (4 channels) given pixel data: the fix is to encode them
    with pytest.raises(DataError, match="takes 4-channel latents: encode the images"):
        open_dataset("mnist:0", "train", 8, 4)


def test_folder_classes_counts_and_defaults(folder):
    assert dataset_classes(str(folder)) == ["bird", "cat", "dog"]
    train, test = load_images(str(folder)), load_images(str(folder), "test")
    assert train.dataset == str(folder.resolve())
    assert train.class_names == ["bird", "cat", "dog"]
    assert train.images.shape == (8 + 5 + 4, 3, 32, 32)  # defaults: 32x32 RGB
    assert torch.bincount(train.labels).tolist() == [8, 5, 4]
    assert torch.bincount(test.labels).tolist() == [2, 1, 1]


def test_a_folder_set_stays_uint8_and_gives_the_model_range_in_batches(folder, monkeypatch):
    import kind.data.images
    from kind.data.dataset import open_dataset

    data = open_dataset(str(folder), image_size=8)
    assert data.images.images.dtype == torch.uint8  # a quarter of float32's memory
    idx, flip = torch.tensor([3, 0, 9]), torch.tensor([True, False, True])
    floats = to_model_range(load_images(str(folder), image_size=8).images)
    want = torch.where(flip.view(-1, 1, 1, 1), floats[idx].flip(-1), floats[idx])
    assert torch.equal(data.images.get(idx, flip), want)
    # a set larger than half the machine's memory is refused before any image is decoded
    monkeypatch.setattr(kind.data.images, "physical_memory", lambda: 2 * 17 * 3 * 8 * 8 - 2)
    monkeypatch.setattr(kind.data.images, "_read_image", None)  # never called
    with pytest.raises(DataError, match=r"17 images at 8x8 .* encode them to a latent store"):
        open_dataset(str(folder), image_size=8)


def test_folder_selection_order_and_sorted_file_split(folder):
    data = load_images(f"{folder}:dog,cat", "test", image_size=8)
    assert data.class_names == ["dog", "cat"] and data.labels.tolist() == [0, 1]
    # dog files sorted by name: a..e; 'e' (index 4) is the test image, written with grey 10
    assert data.images[0].unique().tolist() == [10]
    assert data.images[1, :, 0, 0].tolist() == [200, 0, 0]  # red cat, RGB


def test_folder_resize_crop_and_channels(folder):
    grey = load_images(f"{folder}:cat", image_size=12, channels=1)
    assert grey.images.shape == (5, 1, 12, 12)
    red_as_l = round(200 * 299 / 1000)  # Pillow's L = R*299/1000 + G*587/1000 + B*114/1000
    assert grey.images.unique().tolist() == [red_as_l]
    rgb = load_images(f"{folder}:dog", image_size=20, channels=3)
    assert rgb.images.shape == (4, 3, 20, 20)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1])  # grey -> RGB repeats


def test_non_square_folder_image_is_centre_cropped(tmp_path):
    root = tmp_path / "stripes"
    image = np.zeros((10, 30, 3), np.uint8)  # H 10, W 30: left/right thirds white, centre black
    image[:, :10] = image[:, 20:] = 255
    for i in range(5):
        (root / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "x" / f"{i}.png")
    data = load_images(str(root), image_size=10)
    assert data.images.shape == (4, 3, 10, 10)
    assert data.images.max() == 0  # only the black centre survives the crop


def test_directory_beats_bundled_name(tmp_path, monkeypatch):
    for i in range(5):
        _write(tmp_path / "mnist" / "only" / f"{i}.png", (8, 8), (0, 0, 255))
    monkeypatch.chdir(tmp_path)
    assert parse_spec("mnist") == (str((tmp_path / "mnist").resolve()), None)
    assert load_images("mnist").class_names == ["only"]


def test_corrupt_image_names_the_file(folder):
    bad = folder / "cat" / "c3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError) as err:
        load_images(f"{folder}:cat")
    assert str(bad) in str(err.value) and "remove or replace" in str(err.value)


def test_truncated_image_names_the_file(folder):
    bad = folder / "bird" / "b03.gif"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(DataError, match="b03.gif"):
        load_images(f"{folder}:bird")


def test_empty_class_folder(folder):
    (folder / "fish").mkdir()
    (folder / "fish" / "readme.txt").write_text("no images here")
    assert "fish" in dataset_classes(str(folder))
    load_images(f"{folder}:cat")  # other classes still load
    with pytest.raises(DataError, match="fish.*no image files"):
        load_images(str(folder))


def test_folder_of_images_without_class_folders_is_one_class(tmp_path):
    for i in range(5):
        _write(tmp_path / "faces" / f"{i}.png", (8, 8), (i, 2, 3))
    train, test = load_images(str(tmp_path / "faces")), load_images(str(tmp_path / "faces"), "test")
    assert train.class_names == test.class_names == ["faces"]
    assert train.labels.tolist() == [0] * 4 and test.images[0, 0, 0, 0] == 4  # every 5th: test
    assert parse_spec(f"{tmp_path / 'faces'}:faces")[1] == ["faces"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders and no images"):
        load_images(str(tmp_path / "empty"))


# ---------------------------------------------------------------- class maps


def test_class_map_merges_folders_into_classes(folder, tmp_path):
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"pet": ["dog", "cat"], "bird": ["bird"]}))
    assert dataset_classes(f"{folder}%{cmap}") == ["pet", "bird"]  # the map's order
    train = load_images(f"{folder}%{cmap}", image_size=8)
    assert train.class_names == ["pet", "bird"]
    # pet = dog's 5 files then cat's 6, split every 5th over the 11: 9 train, 2 test
    assert torch.bincount(train.labels).tolist() == [9, 8]
    test = load_images(f"{folder}%{cmap}:pet", "test", image_size=8)
    assert test.images[0].unique().tolist() == [10]  # dog 'e' is the 5th of pet's files
    assert test.images[1, :, 0, 0].tolist() == [200, 0, 0]  # a cat: the 10th
    items, labels, names = list_images(f"{folder}%{cmap}:bird,pet")
    assert names == ["bird", "pet"] and torch.bincount(labels).tolist() == [8, 9]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[1, 2]", "JSON object of classes"),
        ('{"a": []}', "JSON object of classes"),
        ('{"a": ["dog"], "b": ["dog"]}', "folder 'dog' is in class 'a' and class 'b'"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_class_maps_are_named(folder, tmp_path, content, needle):
    cmap = tmp_path / "map.json"
    cmap.write_text(content)
    with pytest.raises(DataError, match=needle):
        parse_spec(f"{folder}%{cmap}")


def test_class_map_errors_name_missing_maps_and_folders(folder, tmp_path):
    with pytest.raises(DataError, match="class map after '%'"):
        parse_spec(f"{folder}%{tmp_path / 'nothing.json'}")
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"fish": ["trout", "carp"], "cat": ["cat"]}))
    load_images(f"{folder}%{cmap}:cat")  # only the classes used must exist
    with pytest.raises(DataError, match="merges folders missing.*trout, carp"):
        load_images(f"{folder}%{cmap}:fish")


# ---------------------------------------------------------------- arguments and value ranges


@pytest.mark.parametrize(
    "kwargs", [{"split": "val"}, {"split": "Train"}, {"channels": 2}, {"image_size": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(DataError):
        load_images("mnist:0", **kwargs)


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [0, 128, 255]  # clamp, round
    with pytest.raises(TypeError):
        to_model_range(y)


def test_class_list_file(tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_text("# digits to keep\n6\n\n8  # eight\n")
    assert parse_spec(f"mnist:@{listing},9") == ("mnist", ["6", "8", "9"])
    with pytest.raises(DataError, match="does not exist"):
        parse_spec(f"mnist:@{tmp_path / 'missing.txt'}")
    with pytest.raises(DataError, match="is a directory; give the path of a text file"):
        parse_spec(f"mnist:@{tmp_path}")
    (tmp_path / "latin1.txt").write_bytes(b"\xff6\n")
    with pytest.raises(DataError, match="latin1.txt .* cannot be read as UTF-8 text"):
        parse_spec(f"mnist:@{tmp_path / 'latin1.txt'}")


def test_bundled_imagenet611_map_and_lists_read_by_name(tmp_path):
    (tmp_path / "train").mkdir()
    dataset, pretrain = parse_spec(f"{tmp_path / 'train'}%imagenet611:@imagenet611-pretrain")
    assert dataset == f"{(tmp_path / 'train').resolve()}%imagenet611"
    _, novel = parse_spec(f"{tmp_path / 'train'}%imagenet611:@imagenet611-novel")
    assert len(pretrain) == 150 and len(novel) == 461 and not set(pretrain) & set(novel)
    assert len(dataset_classes(dataset)) == 611
    with pytest.raises(DataError, match="merges folders missing"):  # no synset folders here
        load_images(f"{tmp_path / 'train'}%imagenet611:{pretrain[0]}")


def test_a_grid_previews_the_first_classes_and_samples_only(tmp_path):
    """FID-50K's 50 samples of 1,000 classes in full would be a 3-gigapixel PNG."""
    from PIL import Image

    from kind.cli.sample import DESCRIPTION

    classes, per_class = GRID_CLASSES + 6, GRID_PER_CLASS + 4
    # image i: one gray level, its class c and its place k in the class: 2 + c + 70 k
    ids = torch.arange(classes * per_class)
    levels = (2 + ids // per_class + 70 * (ids % per_class)).clamp(max=255).to(torch.uint8)
    images = levels[:, None, None, None].expand(-1, 1, 4, 4).contiguous()
    save_grid(images, per_class, tmp_path / "g.png")
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "g.png")).copy())
    assert grid.shape == (GRID_CLASSES * 6 + 2, GRID_PER_CLASS * 6 + 2)  # 4 px and 2 px padding
    cells = grid[2::6, 2::6]  # the top-left pixel of each cell: [rows, columns]
    c, k = torch.meshgrid(torch.arange(GRID_CLASSES), torch.arange(GRID_PER_CLASS), indexing="ij")
    assert torch.equal(cells, (2 + c + 70 * k).clamp(max=255).to(torch.uint8))
    assert f"first {GRID_PER_CLASS} samples of the first {GRID_CLASSES} classes" in DESCRIPTION


def test_sixteen_bit_greyscale_scans_keep_their_grey_levels(tmp_path, caplog):
    """A 16-bit PNG (MRI slices, microscopy) maps 0..65535 onto 0..255, where Pillow's convert
    clipped it white; 12-bit scans in 16-bit files, nearly black so, are warned about;
    floating-point pixels, which have no known range, are refused by name."""
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))  # [32, 32]
    (tmp_path / "scans" / "mri").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "scans" / "mri" / "a.png")
    data = load_images(str(tmp_path / "scans"), "train", image_size=32, channels=1)
    got = data.images[0, 0].numpy().astype(int)  # [32, 32]
    assert np.abs(got - np.round(ramp / 257)).max() <= 1 and got[0, 0] == 0 and got[0, -1] == 255
    assert "nearly black" not in caplog.text
    from kind.data.images import _warn_narrow

    _warn_narrow.cache_clear()  # once a process: not yet in this one, whatever ran before
    (tmp_path / "twelve" / "mri").mkdir(parents=True)
    Image.fromarray(ramp // 16).save(tmp_path / "twelve" / "mri" / "a.png")  # 0..4095
    load_images(str(tmp_path / "twelve"), "train", image_size=32, channels=1)
    assert "12-bit scans saved in 16-bit files?" in caplog.text
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "scans" / "mri" / "b.tiff")
    with pytest.raises(DataError, match=r"b\.tiff .*floating-point pixels"):  # TIFFs are read too
        load_images(str(tmp_path / "scans"), "train", image_size=32, channels=1)
