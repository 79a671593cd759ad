"""A rehearsal of the paper's protocol (docs/scale.md) in miniature, through the command line:
an ImageNet-shaped folder of synset directories merged by a class map, latents from a tiny random
VAE, pre-training on the "pre-train" list, decomposition, transfer of the learngenes to the
"novel" list and to a class-less folder, sampling, and evaluation against reference statistics
that `evaluate` wrote itself. Slow: it trains three (tiny) models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kind.cli.main import main
from kind.data.latents import LatentStore
from kind.io import read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SIZE = 16  # pixels; the tiny VAE halves them: 8x8 latents
SYNSETS = [f"n0000000{i}" for i in range(1, 7)]
CLASS_MAP = {"n0100": ["n00000001", "n00000002"], "n00000003": ["n00000003"],
             "n0200": ["n00000004", "n00000005"], "n00000006": ["n00000006"]}  # fmt: skip
PRETRAIN, NOVEL = ["n0100", "n00000003"], ["n0200", "n00000006"]


def _images(folder: Path, count: int, base: int, rng) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.clip(base + rng.integers(-20, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.JPEG")


@pytest.fixture
def imagenet(tmp_path) -> dict[str, Path]:
    """train/ of 6 synset folders (5 images each), a class map merging 4 of them into 2 classes,
    the pre-train and novel lists, and a class-less folder of 10 'faces'."""
    rng = np.random.default_rng(0)
    for i, synset in enumerate(SYNSETS):
        _images(tmp_path / "imagenet" / "train" / synset, 5, 30 + 40 * i, rng)
    _images(tmp_path / "faces", 10, 200, rng)
    (tmp_path / "map.json").write_text(json.dumps(CLASS_MAP))
    (tmp_path / "pretrain.txt").write_text("".join(f"{c}  # pre-train\n" for c in PRETRAIN))
    (tmp_path / "novel.txt").write_text("".join(f"{c}\n" for c in NOVEL))
    return {"root": tmp_path, "train": tmp_path / "imagenet" / "train"}


def test_protocol_rehearsal(imagenet, vae_dir, tiny_inception):
    root, train = imagenet["root"], imagenet["train"]
    spec = f"{train}%{root / 'map.json'}"
    stores = {}
    for name, data in (("pretrain", f"{spec}:@{root / 'pretrain.txt'}"),
                       ("novel", f"{spec}:@{root / 'novel.txt'}"), ("faces", str(root / "faces"))):  # fmt: skip
        stores[name] = root / "latents" / name
        main(["encode", "--data", data, "--vae", str(vae_dir), "--out", str(stores[name]),
              "--image-size", str(SIZE), "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert LatentStore(stores["pretrain"]).class_names == PRETRAIN  # merged names travel
    assert LatentStore(stores["novel"]).class_names == NOVEL
    assert LatentStore(stores["faces"]).class_names == ["faces"]  # class-less: one class
    # the merged class holds both synsets' train images: 2 x 4
    assert torch.bincount(LatentStore(stores["pretrain"]).labels).tolist() == [8, 4]

    quick = ["--steps", "2", "--batch-size", "4", "--set", "train.sample_every=0",
             "--set", "sample.steps=2", "--set", "sample.per_class=1", "--set", "train.threads=1",
             "--set", "diffusion.clip_x0=null"]  # fmt: skip
    main(["train", "--data", str(stores["pretrain"]), "--size", "tiny/2", *quick,
          "--out", str(root / "kind")])  # fmt: skip
    main(["decompose", str(root / "kind"), "--out", str(root / "parts")])
    for name, extra in (("novel", []), ("faces", ["--null-tailor"])):  # diffusion: the source's
        main(["transfer", str(root / "parts"), "--data", str(stores[name]), *extra, *quick[:-2],
              "--out", str(root / f"to-{name}")])  # fmt: skip
        config = read_json(root / f"to-{name}" / "config.json")
        assert config["model"]["class_names"] == (NOVEL if name == "novel" else ["faces"])
        main(["sample", str(root / f"to-{name}"), "--n", "3", "--steps", "2",
              "--out", str(root / f"samples-{name}")])  # fmt: skip
        samples = np.load(root / f"samples-{name}" / "samples.npz")
        assert samples["arr_0"].shape[1:] == (SIZE, SIZE, 3)

    # reference statistics of the novel classes (every image: train + test), written once by the
    # evaluator, then the transferred model's samples scored against the file
    from kind.eval import evaluate as ev
    from kind.eval import reference

    ref = reference.write_adm_reference(
        f"{spec}:@{root / 'novel.txt'}",
        root / "novel-ref.npz",
        split="all",
        image_size=SIZE,
        feature_net=tiny_inception,
    )
    with np.load(ref, allow_pickle=False) as npz:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(npz.files)
    result = ev.evaluate(
        root / "samples-novel" / "samples.npz", str(ref), feature_net=tiny_inception
    )
    assert result["reference_type"] == "statistics file" and result["num_reference"] == 15
    assert result["fid"] > 0 and result["sfid"] > 0
    assert any("fewer" in w for w in result["warnings"])  # 6 samples, 15 references: tiny sets
