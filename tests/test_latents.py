"""The latent data path with a tiny random VAE: loading, encoding a spec into a store, reading it
back through the training loop's interface, decoding (CPU, no network, a few seconds)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kind.data.dataset import open_dataset
from kind.data.encoding import encode_to_store
from kind.data.images import BundledImage, DataError, list_images, load_images, read_image
from kind.data.latents import LatentStore
from kind.data.store_format import FORMAT, is_store
from kind.data.vae import LatentError, decode, decoder, encode, load_vae, scaling_factor
from kind.io import OutputDirError, sha256_file, verify_checksums

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8 latents
# on the CPU wherever the tests run: a GPU's TF32 convolutions would not match `encode` on the CPU
encode_cpu = functools.partial(encode_to_store, device="cpu")


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir)


def _folder(root: Path) -> Path:
    """Two RGB classes: 'a' with 6 images (one non-square), 'b' with 5 -> train 5 + 4, test 1 + 1."""
    rng = np.random.default_rng(0)
    for name, count in (("a", 6), ("b", 5)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (24, 40, 3) if (name, i) == ("a", 0) else (20, 20, 3)  # H, W, C
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


def _vae_copy(path: Path, vae_dir: Path, **change) -> Path:
    """A copy of the tiny VAE whose config.json has the keys `change` changed."""
    shutil.copytree(vae_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | change))
    return path


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, vae_dir) -> tuple[Path, Path]:
    root = _folder(tmp_path_factory.mktemp("data") / "imgs")
    out = tmp_path_factory.mktemp("stores") / "folder"
    return root, encode_cpu(str(root), out, vae_dir, SIZE, batch_size=3, workers=2)


# ---------------------------------------------------------------- the VAE


def test_load_vae_round_trips_saved_weights(vae_dir, vae):
    from diffusers import AutoencoderKL

    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert scaling_factor(vae) == pytest.approx(0.18215)
    reference = AutoencoderKL.from_pretrained(vae_dir)
    for (name, p), q in zip(vae.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in vae.parameters())


def test_load_vae_reads_the_vae_subfolder_of_a_pipeline(tmp_path, vae_dir):
    (tmp_path / "vae").symlink_to(vae_dir, target_is_directory=True)
    assert load_vae(tmp_path).config.latent_channels == 4


@pytest.mark.parametrize(
    "case", ["none", "missing", "a file", "empty", "other-model", "no-weights", "bad-config"]
)
def test_load_vae_errors_say_how_to_get_one(tmp_path, vae_dir, case):
    path = {"none": None, "missing": tmp_path / "nope", "a file": vae_dir / "config.json"}.get(
        case, tmp_path
    )
    if case == "bad-config":  # a VAE whose config has a wrong type: diffusers raises TypeError
        shutil.copytree(vae_dir, tmp_path, dirs_exist_ok=True)
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(config | {"block_out_channels": "abc"}))
    if case == "other-model":
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    if case == "no-weights":
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(LatentError, match="sd-vae-ft-ema") as err:
        load_vae(path)
    assert isinstance(err.value, ValueError) and "--vae PATH" in str(err.value)


def test_decode_returns_uint8_images(vae):
    z = torch.randn(5, 4, 8, 8)
    images = decode(vae, z, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, SIZE, SIZE)


# ---------------------------------------------------------------- data.py streaming helpers


def test_list_and_read_images_match_load_images(tmp_path):
    root = _folder(tmp_path / "imgs")
    for spec, size in ((str(root), SIZE), ("mnist:3,1", 20)):
        items, labels, names = list_images(spec, "test")
        loaded = load_images(spec, "test", image_size=size, channels=3)
        assert names == loaded.class_names and torch.equal(labels, loaded.labels)
        streamed = np.stack([read_image(it, size, 3) for it in items]).transpose(0, 3, 1, 2)
        assert np.array_equal(streamed, loaded.images.numpy())
    items, labels, _ = list_images("mnist:0-1", limit_per_class=2)
    assert all(isinstance(it, BundledImage) for it in items) and labels.tolist() == [0, 0, 1, 1]


# ---------------------------------------------------------------- encoding and reading a store


def test_folder_store_layout_and_meta(folder_store, vae_dir):
    _, out = folder_store
    latents = np.load(out / "latents.npy", mmap_mode="r")
    assert latents.dtype == np.float16 and latents.shape == (9, 2, 4, 8, 8)
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 5 + [1] * 4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["class_names"] == ["a", "b"]
    assert (meta["count"], meta["class_counts"], meta["split"]) == (9, [5, 4], "train")
    assert meta["latent_shape"] == [4, 8, 8] and meta["image_size"] == SIZE
    assert meta["vae"] == str(vae_dir.resolve()) and meta["scaling_factor"] == pytest.approx(
        0.18215
    )
    assert meta["dtype"] == "float16" and meta["posterior"] == "mean"
    assert (meta["shift_factor"], meta["latent_channels"], meta["downsampling"]) == (0.0, 4, 2)
    assert meta["vae_config_sha256"] == sha256_file(vae_dir / "config.json")
    assert verify_checksums(out)  # every file of the store, latents.npy included
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_store_holds_encodings_of_the_image_and_its_mirror(folder_store, vae):
    root, out = folder_store
    latents = np.load(out / "latents.npy").astype(np.float32)
    items, _, _ = list_images(str(root))
    assert items[0].name == "0.png" and items[0].parent.name == "a"  # the non-square one
    images = torch.from_numpy(np.stack([read_image(it, SIZE, 3) for it in items[:4]]))
    images = images.permute(0, 3, 1, 2)  # [4, H, W, 3] -> [4, 3, H, W]
    plain, mirrored = encode(vae, images).numpy(), encode(vae, images.flip(-1)).numpy()
    np.testing.assert_allclose(latents[:4, 0], plain, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(latents[:4, 1], mirrored, rtol=2e-3, atol=2e-3)
    assert np.abs(latents[:, 1] - latents[:, 0]).max() > 0.01  # the mirror is a different latent
    assert not np.allclose(latents[:4, 1], plain[..., ::-1], atol=2e-3)  # not a flipped latent


def test_latent_store_get_with_and_without_flips(folder_store):
    _, out = folder_store
    store = LatentStore(out)
    raw = np.load(out / "latents.npy").astype(np.float32)
    assert is_store(out) and not is_store(out.parent)
    assert len(store) == 9 and store.shape == (9, 4, 8, 8)
    assert store.class_names == ["a", "b"] and store.meta["split"] == "train"
    assert store.labels.dtype == torch.int64 and store.labels.tolist() == [0] * 5 + [1] * 4
    idx = torch.tensor([7, 0, 7, 3])
    x = store.get(idx)
    assert x.dtype == torch.float32 and x.shape == (4, 4, 8, 8)
    assert np.array_equal(x.numpy(), raw[[7, 0, 7, 3], 0])
    flip = torch.tensor([True, False, False, True])
    y = store.get(idx, flip)
    assert np.array_equal(y.numpy(), raw[[7, 0, 7, 3], [1, 0, 0, 1]])


def test_bundled_spec_encodes_with_limit_and_test_split(tmp_path, vae_dir):
    out = encode_cpu(
        "mnist:0-1", tmp_path / "m", vae_dir, SIZE, "test", limit_per_class=2, workers=0
    )
    store = LatentStore(out)
    assert store.shape == (4, 4, 8, 8) and store.labels.tolist() == [0, 0, 1, 1]
    assert store.class_names == ["0", "1"] and store.meta["split"] == "test"
    assert store.meta["dataset"] == "mnist" and store.meta["limit_per_class"] == 2


def test_corrupt_image_error_names_the_file_and_leaves_nothing(tmp_path, vae_dir, monkeypatch):
    import kind.data.encoding

    root = _folder(tmp_path / "imgs")
    (root / "b" / "3.png").write_bytes(b"not a png at all")
    (root / "a" / "1.png").write_bytes(b"")
    monkeypatch.setattr(kind.data.encoding, "load_vae", None)  # refused before the VAE loads
    with pytest.raises(
        DataError, match=r"2 of 9 image files cannot be read: .*a/1\.png .*b/3\.png"
    ):
        encode_cpu(str(root), tmp_path / "out", vae_dir, SIZE, batch_size=2, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_a_stopped_encode_keeps_its_rows_and_resume_makes_the_same_store(
    tmp_path, vae_dir, folder_store, monkeypatch, caplog
):
    """An image cut short after a readable header stops the encode where it is decoded: the
    rows before it stay on disk, and --resume, once the file is replaced, encodes only the rows
    not marked into the store an uninterrupted encode makes. What cannot be continued is
    refused, and a failure before the first row leaves nothing."""
    import errno

    import kind.data.encoding

    root = shutil.copytree(folder_store[0], tmp_path / "imgs")
    vae = shutil.copytree(vae_dir, tmp_path / "vae")
    out, partial = tmp_path / "out", tmp_path / ".out.partial.tmp"
    marks = partial / ".progress" / "done.bin"
    encode = functools.partial(
        encode_cpu, str(root), out, vae, image_size=SIZE, batch_size=3, workers=2
    )
    first, good = ((root / c / f).read_bytes() for c, f in (("a", "0.png"), ("b", "3.png")))
    (root / "a" / "0.png").write_bytes(first[: len(first) // 2])  # the first row
    with pytest.raises(DataError, match=r"cannot read image file .*a/0\.png"):
        encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "vae"]  # nothing to keep
    (root / "a" / "0.png").write_bytes(first)

    (root / "b" / "3.png").write_bytes(good[: len(good) // 2])  # row 8 of 9
    with pytest.raises(DataError, match=r"cannot read image file .*b/3\.png"):
        encode()
    assert not out.exists() and "6 of 9 images encoded, kept in" in caplog.text
    assert np.fromfile(marks, np.uint8).tolist() == [1] * 6 + [0] * 3
    with pytest.raises(OutputDirError, match=r"unfinished encode \(6 of 9 images.*--resume"):
        encode()  # not without --resume
    weights = vae / "diffusion_pytorch_model.safetensors"
    trained = weights.read_bytes()
    another = {"image_size": (32, "image_size 16 then, 32 now"),
               "dtype": ("bf16", "dtype 'float32' then, 'bfloat16' now"),
               "weights": (None, "the VAE's weights changed"),
               "images": (None, "other images, or in another order")}  # fmt: skip
    for case, (value, said) in another.items():
        if case == "weights":
            weights.write_bytes(trained[:-4] + b"\x00\x00\x80\x3f")  # the last float: 1.0
        if case == "images":
            shutil.copy(root / "a" / "1.png", root / "a" / "1b.png")
        args = {case: value} if value is not None else {}
        with pytest.raises(LatentError, match=f"was another job: (.*; )?{said}"):
            encode(resume=True, **args)
        weights.write_bytes(trained)
        (root / "a" / "1b.png").unlink(missing_ok=True)

    (root / "b" / "3.png").write_bytes(good)  # the same file, whole
    done = np.fromfile(marks, np.uint8)
    done[[1, 4]] = 0  # holes: rows 1 and 4 not marked (and their bytes garbage)
    done.tofile(marks)
    store = np.load(partial / "latents.npy", mmap_mode="r+")
    store[[1, 4]] = 7.0
    store.flush()
    del store
    read = []
    monkeypatch.setattr(kind.data.encoding, "read_image",
                        lambda item, *a: read.append(item) or read_image(item, *a))  # fmt: skip
    with monkeypatch.context() as full:  # the disk fills as the store's last file is written
        full.setattr(kind.data.encoding, "write_checksums",
                     lambda d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))  # fmt: skip
        with pytest.raises(OSError, match="No space left"):
            encode(resume=True)
    assert len(read) == 5 and "9 of 9 images encoded, kept in" in caplog.text
    encode(resume=True)
    assert len(read) == 5 and not partial.exists()  # every row was on disk: none read again
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in folder_store[1].iterdir()
    )
    for name in ("latents.npy", "labels.npy"):
        assert np.array_equal(np.load(out / name), np.load(folder_store[1] / name)), name
    made, want = (json.loads((d / "meta.json").read_text()) for d in (out, folder_store[1]))
    paths = {"spec": "", "dataset": "", "vae": "", "job_sha256": ""}
    assert made | paths == want | paths

    before = sha256_file(out / "latents.npy")  # a requeued job finished already: no work
    assert encode(resume="auto") == out and len(read) == 5
    assert sha256_file(out / "latents.npy") == before
    with pytest.raises(OutputDirError, match="finished latent store of another encode"):
        encode(resume="auto", image_size=32)
    with pytest.raises(LatentError, match="no unfinished encode of .*run without --resume"):
        encode_cpu(str(root), tmp_path / "new", vae, SIZE, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out", "vae"]
    encode_cpu(str(root), tmp_path / "new", vae, SIZE, batch_size=3, resume="auto")  # starts
    assert np.array_equal(np.load(tmp_path / "new" / "latents.npy"), np.load(out / "latents.npy"))


KILLED = """
import os, signal, sys
import torch
import kind.data.encoding as encoding

torch.set_num_threads(1)
encoding.SYNC_SECONDS = 0  # marks after every batch
encode, calls = encoding.encode, []
def encode_or_die(vae, images):  # killed in the VAE of the third batch, its rows read
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(vae, images)
encoding.encode = encode_or_die
encoding.encode_to_store(sys.argv[1], sys.argv[2], sys.argv[3], 16, batch_size=3, device="cpu",
                        workers=0)
"""


def test_an_encode_killed_mid_batch_resumes_into_the_same_store(tmp_path, vae_dir, folder_store):
    """SIGKILL leaves marked only the rows whose latents were on disk before (the third batch,
    killed while encoding, is not): --resume then makes the store an uninterrupted encode
    makes."""
    import subprocess
    import sys

    script, out = tmp_path / "killed.py", tmp_path / "out"
    script.write_text(KILLED)
    root = str(folder_store[0])
    done = subprocess.run([sys.executable, str(script), root, str(out), str(vae_dir)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    marks = np.fromfile(tmp_path / ".out.partial.tmp" / ".progress" / "done.bin", np.uint8)
    assert marks.tolist() == [1] * 6 + [0] * 3 and not out.exists()
    encode_cpu(root, out, vae_dir, SIZE, batch_size=3, workers=0, resume=True)
    assert np.array_equal(np.load(out / "latents.npy"), np.load(folder_store[1] / "latents.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.py", "out"]


def test_an_encode_running_into_out_keeps_a_second_one_out(tmp_path, vae_dir):
    """The unfinished store is locked while an encode writes it: another encode into the same
    --out, continuing or not, stops without touching it."""
    from kind.io import atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out, keep=lambda _: True) as tmp:  # an encode at work (in this process)
        (tmp / "latents.npy").write_bytes(b"being written")
        with pytest.raises(OutputDirError, match=r"out is being written by kind-dit process \d+"):
            encode_cpu("mnist:0", out, vae_dir, SIZE, limit_per_class=1, resume="auto")
        assert (tmp / "latents.npy").read_bytes() == b"being written"
        assert sorted(p.name for p in tmp.iterdir()) == [".progress", "latents.npy"]


def test_a_file_system_without_locks_is_warned_of_not_fatal(tmp_path, vae_dir, monkeypatch, caplog):
    """Lustre without `flock`, some FUSE mounts: flock fails with ENOSYS; the encode says it
    cannot lock and goes on (no other error in it is swallowed: EACCES still stops it)."""
    import errno

    import kind.io

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(kind.io.fcntl, "flock", no_locks)
    out = encode_cpu("mnist:0", tmp_path / "s", vae_dir, SIZE, limit_per_class=1, workers=0)
    assert len(LatentStore(out)) == 1 and "cannot be locked on this file system" in caplog.text
    monkeypatch.setattr(kind.io.fcntl, "flock",
                        lambda fd, op: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))  # fmt: skip
    with pytest.raises(OSError, match="denied"):
        encode_cpu("mnist:0", tmp_path / "t", vae_dir, SIZE, limit_per_class=1, workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_existing_output_is_refused_but_an_empty_dir_is_filled(tmp_path, vae_dir):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        encode_cpu("mnist:0", tmp_path / "full", vae_dir, SIZE, limit_per_class=1)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    encode_cpu("mnist:0", tmp_path / "empty", vae_dir, SIZE, limit_per_class=1, workers=0)
    assert len(LatentStore(tmp_path / "empty")) == 1


@pytest.mark.parametrize("inside", ["imgs/latents", "imgs/a/z", "vae/store"])
def test_a_store_inside_the_images_or_the_vae_is_refused(tmp_path, vae_dir, inside):
    """--out inside the folder being encoded would become one of its classes."""
    root = _folder(tmp_path / "imgs")
    vae = shutil.copytree(vae_dir, tmp_path / "vae")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(
        OutputDirError, match=r"inside the (image folder|VAE) .*nothing was written"
    ):
        encode_cpu(str(root), tmp_path / inside, vae, SIZE, workers=0)
    assert sorted(tmp_path.rglob("*")) == before


def test_an_interrupted_encode_is_named_not_removed(tmp_path, vae_dir, caplog):
    left = tmp_path / ".store.x1y2.tmp"  # what atomic_dir leaves when encoding is killed
    left.mkdir()
    encode_cpu("mnist:0", tmp_path / "store", vae_dir, SIZE, limit_per_class=1, workers=0)
    assert f"rm -r {left}" in caplog.text and left.is_dir()


def test_image_size_must_fit_the_vae(tmp_path, vae_dir, monkeypatch):
    import kind.data.encoding

    def unloaded(*args):
        raise AssertionError("the VAE was loaded before the size was checked")

    monkeypatch.setattr(kind.data.encoding, "load_vae", unloaded)
    for size, needle in ((15, "multiple of the VAE's downsampling factor 2"),
                         (4096, "from 1 to 2048, got 4096")):  # fmt: skip
        with pytest.raises(DataError, match=needle):
            encode_cpu("mnist:0", tmp_path / "odd", vae_dir, size, limit_per_class=1)
        assert list(tmp_path.iterdir()) == []  # no store, no temporary store file


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("no-meta", "not a latent store"),
        ("format", "kind-latents/1"),
        ("count", "damaged or incomplete"),
        ("labels", "outside 0..1"),
        ("binary", r"meta\.json is not valid JSON .*re-encode"),
        ("no-vae", r"meta\.json has no 'vae'"),
        ("shape", r"meta\.json: a malformed latent_shape \['4', 'x', 8\]"),
        ("names", r"meta\.json: a malformed class_names \['a', 'a'\]"),
        (
            "space",
            r"meta\.json: scaling_factor is 'a', not float; downsampling is 0, not int >= 1;"
            r" vae_config_sha256 is 5, not str; the store is damaged",
        ),
    ],
)
def test_damaged_store_errors(tmp_path, folder_store, damage, needle):
    """Stores written before checksums (none here): each damage is named by what it breaks."""
    out = Path(shutil.copytree(folder_store[1], tmp_path / "copy"))
    (out / "checksums.json").unlink()
    meta = json.loads((out / "meta.json").read_text())
    if damage == "no-meta":
        (out / "meta.json").unlink()
    elif damage == "labels":
        np.save(out / "labels.npy", np.full(9, 5, dtype=np.int64))
    elif damage == "binary":
        (out / "meta.json").write_bytes(b'\xff{"format"')
    else:
        changes = {"format": {"format": "x/0"}, "count": {"count": 10},
                   "shape": {"latent_shape": ["4", "x", 8]}, "names": {"class_names": ["a", "a"]},
                   "space": {"scaling_factor": "a", "downsampling": 0, "vae_config_sha256": 5}}  # fmt: skip
        meta |= changes.get(damage, {})
        if damage == "no-vae":
            del meta["vae"]
        (out / "meta.json").write_text(json.dumps(meta))
    assert is_store(out) == (damage != "no-meta")  # a damaged store is still named a store
    with pytest.raises(LatentError, match=needle):
        LatentStore(out)


def _flip_a_latent_bit(out: Path, append: bytes = b"") -> None:
    data = bytearray((out / "latents.npy").read_bytes())
    data[200] ^= 0x01
    (out / "latents.npy").write_bytes(bytes(data) + append)


DAMAGES = {
    # swapped, each still in range: only the checksum tells
    "labels": lambda out: np.save(out / "labels.npy", np.load(out / "labels.npy")[::-1].copy()),
    "meta": lambda out: (out / "meta.json").write_text(
        json.dumps(json.loads((out / "meta.json").read_text()) | {"class_names": ["b", "a"]})
    ),
    "latents": _flip_a_latent_bit,
    "appended": lambda out: _flip_a_latent_bit(out, b"xx"),
    "checksums": lambda out: (out / "checksums.json").write_text('{"sha256": ["x"]}'),
}


@pytest.mark.parametrize(
    ("damage", "large", "needle"),
    [
        ("labels", False, r"labels\.npy does not match its sha256"),
        ("meta", False, r"meta\.json does not match its sha256"),
        ("latents", False, r"latents\.npy does not match its sha256"),
        ("appended", True, r"latents\.npy has 9346 bytes, not the 9344 its header says"),
        ("latents", True, None),  # unseen: a large latents.npy is checked by its size alone
        ("checksums", False, r"sha256 is not an object .* restore it from a copy, or re-encode"),
    ],
)
def test_a_store_is_verified_against_its_checksums(
    tmp_path, folder_store, monkeypatch, damage, large, needle
):
    out = Path(shutil.copytree(folder_store[1], tmp_path / "copy"))
    DAMAGES[damage](out)
    if large:
        monkeypatch.setattr("kind.data.latents.FULL_CHECK_BYTES", 0)
    if needle is None:
        assert len(LatentStore(out)) == 9
        return
    with pytest.raises(LatentError, match=needle):
        LatentStore(out)
    (out / "checksums.json").unlink()  # a store written before checksums opens unverified
    if damage != "appended":
        assert len(LatentStore(out)) == 9


def test_a_store_in_a_combined_spec_or_a_selection_is_named(folder_store):
    _, out = folder_store
    for spec in (f"{out}:a", f"{out} + mnist:0"):
        with pytest.raises(DataError, match="is a latent store, which a data spec uses whole"):
            open_dataset(spec)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"scaling_factor": 1.0}, "scaling_factor 1.0, not 0.18215"),
        ({"latent_channels": 8}, "latent_channels 8, not 4"),
        ({"block_out_channels": [8, 16, 16]}, "downsampling 4, not 2"),
    ],
)
def test_a_vae_of_another_latent_space_is_refused(tmp_path, folder_store, vae_dir, change, needle):
    """Opening a store with another VAE, or sampling a model trained on it with one, is refused
    before the VAE is loaded, naming the value that differs."""
    other = _vae_copy(tmp_path / "other", vae_dir, **change)
    store = str(folder_store[1])
    with pytest.raises(LatentError, match=f"is not the VAE latent store .*{needle}"):
        open_dataset(store, vae=str(other))
    latent = open_dataset(store).latent
    with pytest.raises(LatentError, match=f"is not the VAE this model's .*{needle}.*--vae"):
        decoder(latent, other)


def test_a_store_of_another_size_than_the_model_names_both_and_the_fix(folder_store):
    store = str(folder_store[1])  # 4-channel 8x8 latents
    with pytest.raises(DataError, match=r"holds 4-channel 8x8 latents; the model takes 16x16 "
                                        r"inputs: encode the data .*--image-size N"):  # fmt: skip
        open_dataset(store, "train", 16)
    with pytest.raises(DataError, match="the model takes 3-channel 8x8 inputs"):
        open_dataset(store, "train", 8, 3)


def test_a_copy_of_the_vae_is_recorded_absolute_and_old_records_are_not_checked(
    tmp_path, folder_store, vae_dir, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    _vae_copy(tmp_path / "copy", vae_dir, _name_or_path="elsewhere")  # same space, other file
    latent = open_dataset(str(folder_store[1]), vae="copy").latent
    assert latent["vae"] == str(tmp_path.resolve() / "copy")
    assert latent["scaling_factor"] == pytest.approx(0.18215) and latent["latent_channels"] == 4
    assert "but config.json differs" in caplog.text  # a warning, not an error
    other = _vae_copy(tmp_path / "other", vae_dir, scaling_factor=1.0)
    assert decoder({"vae": str(other)})(torch.zeros(1, 4, 8, 8)).shape == (1, 3, SIZE, SIZE)


def test_latent_diffusion_end_to_end_encode_train_sample_decode(vae_dir, tmp_path, capsys):
    """encode -> train a few steps on the store -> sample through the CLI -> decoded images;
    resuming on a store of another VAE's latents is refused."""
    from kind.cli.main import main
    from kind.store.load import load_model

    store = tmp_path / "store"
    main(["encode", "--data", "mnist:0-1", "--vae", str(vae_dir), "--out", str(store),
          "--image-size", str(SIZE), "--device", "cpu", "--limit-per-class", "6"])  # fmt: skip
    run = tmp_path / "run"
    main(["train", "--data", str(store), "--size", "tiny/2", "--steps", "2", "--batch-size", "4",
          "--out", str(run), "--set", "train.hflip=true", "--set", "train.sample_every=0",
          "--set", "sample.steps=2", "--set", "sample.per_class=1", "--set", "train.threads=1",
          "--set", "diffusion.clip_x0=null"])  # fmt: skip
    model, _, meta = load_model(run)
    assert (model.config.in_channels, model.config.image_size) == (4, SIZE // 2)
    assert meta["latent"]["vae"] == str(Path(vae_dir).resolve())
    main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    grid = Image.open(run / "samples" / "step_0000002.png")
    assert grid.mode == "RGB" and grid.height > SIZE  # the training grid is decoded too
    shutil.rmtree(store)  # the store encoded again in its place, with another VAE
    other = _vae_copy(tmp_path / "other", vae_dir, scaling_factor=1.0)
    main(["encode", "--data", "mnist:0-1", "--vae", str(other), "--out", str(store),
          "--image-size", str(SIZE), "--device", "cpu", "--limit-per-class", "6"])  # fmt: skip
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", "--steps", "3", "--out", str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resume: latent store" in err and "scaling_factor 1.0" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_training_on_a_store_whose_vae_is_gone_stops_before_writing(vae_dir, tmp_path, capsys):
    """Grids decode with the store's VAE (on every rank): a VAE that moved stops the run at its
    start, not after the training it would throw away at the first grid."""
    from kind.cli.main import main

    vae, store, run = tmp_path / "vae", tmp_path / "store", tmp_path / "run"
    shutil.copytree(vae_dir, vae)
    main(["encode", "--data", "mnist:0", "--vae", str(vae), "--out", str(store),
          "--image-size", str(SIZE), "--device", "cpu", "--limit-per-class", "2"])  # fmt: skip
    shutil.rmtree(vae)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(store), "--size", "tiny/2", "--steps", "1",
              "--batch-size", "2", "--out", str(run)])  # fmt: skip
    assert e.value.code == 2 and "--vae PATH" in capsys.readouterr().err
    assert not run.exists()


def test_transfer_with_match_kind_on_a_latent_store(vae_dir, tmp_path, capsys):
    """docs/scale.md step 4 in miniature: a baseline at KIND's budget, trained on a latent store of
    the novel classes (its class names come from the store, no image is decoded); a store encoded
    with a VAE of another latent space than the source's is refused."""
    from kind.cli.main import main
    from kind.io import read_json
    from kind.transfer.kind import kind_budget

    source, novel = tmp_path / "source", tmp_path / "novel"
    for spec, out in (("mnist:0-1", source), ("mnist:2-4", novel)):
        main(["encode", "--data", spec, "--vae", str(vae_dir), "--out", str(out), "--image-size",
              str(SIZE), "--device", "cpu", "--limit-per-class", "4"])  # fmt: skip
    quick = ["--size", "tiny/2", "--steps", "1", "--batch-size", "4", "--set",
             "train.sample_every=0", "--set", "sample.steps=1", "--set", "sample.per_class=1",
             "--set", "train.threads=1"]  # fmt: skip
    main(["train", "--data", str(source), *quick, "--out", str(tmp_path / "kind")])
    main(
        [
            "train",
            "--data",
            str(source),
            "--model",
            "dense",
            *quick,
            "--out",
            str(tmp_path / "dense"),
        ]
    )
    main(["decompose", str(tmp_path / "kind"), "--out", str(tmp_path / "parts")])
    main(["transfer", str(tmp_path / "dense"), "--method", "lora", "--match-kind",
          str(tmp_path / "parts"), "--data", str(novel), *quick[2:], "--out", str(tmp_path / "lora")])  # fmt: skip
    meta = read_json(tmp_path / "lora" / "run.json")
    assert meta["transfer"]["budget"] == kind_budget(tmp_path / "parts", ["2", "3", "4"])
    assert meta["latent"]["store"] == str(novel)
    assert read_json(tmp_path / "lora" / "config.json")["model"]["class_names"] == ["2", "3", "4"]
    other, elsewhere = _vae_copy(tmp_path / "other", vae_dir, scaling_factor=1.0), tmp_path / "o"
    main(["encode", "--data", "mnist:2-4", "--vae", str(other), "--out", str(elsewhere),
          "--image-size", str(SIZE), "--device", "cpu", "--limit-per-class", "1"])  # fmt: skip
    for source, method in ((tmp_path / "parts", "kind"), (tmp_path / "dense", "lora")):
        with pytest.raises(SystemExit) as e:  # refused before it trains or writes anything
            main(["transfer", str(source), "--method", method, "--data", str(elsewhere),
                  *quick[2:], "--out", str(tmp_path / "mixed")])  # fmt: skip
        assert e.value.code == 2 and not (tmp_path / "mixed").exists()
        assert "scaling_factor 1.0, not 0.18215" in capsys.readouterr().err
