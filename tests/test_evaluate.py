"""End-to-end evaluation: sample files in, result JSON out; feature nets and their error paths.

Nothing downloads: the end-to-end run uses a randomly initialised network injected as an object,
the quality checks use the bundled mnist network shipped in ``kind/assets``.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kind.data.images import dataset_classes, load_images
from kind.eval import evaluate as ev
from kind.eval import features, reference
from kind.eval.npz import open_npz, scalars
from kind.io import sha256_file

MNIST = [str(d) for d in range(10)]
REQUIRED_KEYS = {
    "tool", "feature_net", "feature_net_sha256", "samples", "num_samples", "sample_shape",
    "samples_per_class", "reference", "reference_dataset", "reference_split", "num_reference",
    "fid", "precision", "recall", "k", "class_accuracy", "class_accuracy_note",
    "per_class_accuracy", "sfid", "inception_score", "inception_score_std", "generation",
    "seconds", "reference_type", "reference_sha256", "precision_recall_note", "sfid_note",
    "warnings",
}  # fmt: skip


def write_samples(path: Path, images: torch.Tensor, labels, class_names, **meta) -> Path:
    """Write the `kind-dit sample` layout: arr_0 uint8 NHWC, labels, class_names, 0-d metadata."""
    np.savez(
        path,
        arr_0=images.permute(0, 2, 3, 1).numpy(),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=np.asarray(class_names, dtype=str),
        **{k: np.asarray(v) for k, v in meta.items()},
    )
    return path


def noise_images(n: int, seed: int, size: int = 28, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture
def random_net() -> features.BundledFeatureNet:
    torch.manual_seed(0)
    return features.BundledFeatureNet.from_module(features.SmallCNN(), MNIST, name="random-cnn")


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    # every test starts with empty caches of networks and reference features
    monkeypatch.setattr(reference, "_REF_CACHE", {})
    monkeypatch.setattr(features, "_NET_CACHE", {})


def test_evaluate_end_to_end_writes_every_required_field(tmp_path, random_net):
    labels = [0, 1] * 20
    npz = write_samples(
        tmp_path / "samples.npz", noise_images(40, seed=0), labels, ["0", "1"],
        sampler="ddim", steps=50, cfg_scale=1.5, seed=7, checkpoint="runs/x/ckpt.pt",
    )  # fmt: skip
    result = ev.evaluate(npz, "mnist:0-1", feature_net=random_net, k=3)
    out = ev.write_result(result, tmp_path / "out" / "result.json")
    loaded = json.loads(out.read_text())

    assert REQUIRED_KEYS <= set(loaded)
    assert loaded["tool"].startswith("kind-dit evaluate ")
    assert loaded["feature_net"] == "random-cnn" and len(loaded["feature_net_sha256"]) == 64
    assert loaded["num_samples"] == 40 and loaded["sample_shape"] == [1, 28, 28]
    assert loaded["reference"] == "mnist:0-1" and loaded["reference_split"] == "test"
    assert loaded["num_reference"] == len(load_images("mnist:0-1", "test").labels) == 200
    assert loaded["samples_per_class"] == {"0": 20, "1": 20}
    assert loaded["generation"] == {
        "sampler": "ddim", "steps": 50, "cfg_scale": 1.5, "seed": 7, "checkpoint": "runs/x/ckpt.pt",
    }  # fmt: skip
    assert loaded["fid"] >= 0 and 0 <= loaded["precision"] <= 1 and 0 <= loaded["recall"] <= 1
    assert 0 <= loaded["class_accuracy"] <= 1 and set(loaded["per_class_accuracy"]) == {"0", "1"}
    assert loaded["sfid"] is None and loaded["inception_score"] is None  # not the Inception path
    assert loaded["reference_type"] == "data spec" and loaded["reference_sha256"] is None
    assert len(loaded["warnings"]) == 1 and "40 samples" in loaded["warnings"][0]  # 40 < 128 dims
    assert loaded["samples"] == str(npz.resolve())
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp file left behind


def test_in_memory_and_file_evaluation_agree_and_reference_is_cached(
    tmp_path, random_net, monkeypatch
):
    images, labels = noise_images(30, seed=1), torch.tensor([0, 1, 1] * 10)
    from_memory = ev.evaluate_images(images, labels, ["0", "1"], "mnist:0-1", random_net)

    calls = []
    monkeypatch.setattr(
        reference, "load_images", lambda *a, **kw: calls.append(a) or load_images(*a, **kw)
    )
    npz = write_samples(tmp_path / "s.npz", images, labels, ["0", "1"])
    from_file = ev.evaluate(npz, "mnist:0-1", feature_net=random_net)
    assert calls == []  # the reference features came from the cache
    for key in ("fid", "precision", "recall", "class_accuracy", "num_reference"):
        assert from_file[key] == from_memory[key]  # bit-equal: one code path, stable kernels


def test_real_images_score_well_and_noise_scores_badly_with_the_bundled_net(tmp_path):
    # Real vs real: the train split of mnist:0-1 against its test split (different images).
    real = load_images("mnist:0-1", "train")
    real_npz = write_samples(tmp_path / "real.npz", real.images, real.labels, real.class_names)
    good = ev.evaluate(real_npz, "mnist:0-1")  # "auto" picks the bundled mnist network
    assert good["feature_net"] == "kind-smallcnn-v1-mnist"
    assert good["class_accuracy"] >= 0.98
    assert good["precision"] > 0.8 and good["recall"] > 0.8

    # The test images themselves: identical to the reference, so FID ~ 0 and P = R = 1.
    test = load_images("mnist:0-1", "test")
    same = ev.evaluate(write_samples(tmp_path / "t.npz", test.images, test.labels, ["0", "1"]),
                       "mnist:0-1")  # fmt: skip
    assert same["fid"] < 1e-6 and same["precision"] == same["recall"] == 1.0

    shifted = torch.roll(real.images, shifts=(6, 6), dims=(2, 3))  # off-centre digits
    noise = noise_images(len(real.labels), seed=2)
    results = {}
    for name, imgs in (("shifted", shifted), ("noise", noise)):
        npz = write_samples(tmp_path / f"{name}.npz", imgs, real.labels, real.class_names)
        results[name] = ev.evaluate(npz, "mnist:0-1")
    assert good["fid"] * 5 < results["shifted"]["fid"] < results["noise"]["fid"]
    assert results["noise"]["precision"] < 0.05 and results["noise"]["recall"] < 0.05

    # Collapsed samples, four test images 50 times each: every sample is a reference image
    # (precision 1), and they cover little of the reference (recall low), not the other way.
    pick = torch.tensor([0, 1, 2, 3]).repeat_interleave(50)
    collapsed = write_samples(tmp_path / "collapsed.npz", test.images[pick], test.labels[pick],
                              ["0", "1"])  # fmt: skip
    few = ev.evaluate(collapsed, "mnist:0-1")
    assert few["precision"] == 1.0 and few["recall"] < 0.2


def test_sample_classes_unknown_to_the_network_give_null_accuracy_with_a_reason(random_net):
    net = features.BundledFeatureNet.from_module(features.SmallCNN(), ["a", "b"] * 5, name="ab")
    result = ev.evaluate_images(noise_images(10, 3), torch.zeros(10, dtype=torch.long), ["0"],
                                "mnist:0-1", net)  # fmt: skip
    assert (
        result["class_accuracy"] is None
        and "not classes of feature network" in (result["class_accuracy_note"])
    )
    assert "mnist:0-1 has classes the samples lack: ['1']" in result["warnings"][0]


def test_a_model_class_the_network_lacks_but_no_sample_asked_for_is_no_matter(tmp_path, random_net):
    """`kind-dit sample --classes 0,1` of a digits + animals model writes all its class names;
    only the sampled ones need the network's (it stopped on "'bear' is not in list")."""
    npz = write_samples(tmp_path / "s.npz", noise_images(8, 4), [0, 1] * 4, ["0", "1", "bear"])
    result = ev.evaluate(npz, "mnist:0-1", feature_net=random_net)
    assert result["class_accuracy"] is not None and set(result["per_class_accuracy"]) <= {"0", "1"}


def test_npz_without_arr_0_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'.*keys: images"):
        ev.evaluate(path, "mnist:0-1")


def test_channels_first_npz_is_refused(tmp_path):
    path = tmp_path / "nchw.npz"
    np.savez(path, arr_0=np.zeros((4, 1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        ev.load_samples(path)


def test_non_square_or_cut_short_npz_is_refused_by_name(tmp_path):
    """A non-square set would meet a square reference at its width; a member whose data is cut
    short named the file nowhere."""
    path = tmp_path / "wide.npz"
    np.savez(path, arr_0=np.zeros((4, 28, 14, 1), np.uint8))
    with pytest.raises(ValueError, match="must be square"):
        ev.load_samples(path)
    full = tmp_path / "full.npz"
    np.savez(full, arr_0=np.zeros((64, 28, 28, 1), np.uint8))
    with zipfile.ZipFile(full) as z:
        member = z.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:  # an intact zip, a short member
        z.writestr("arr_0.npy", member[: len(member) // 2])
    with pytest.raises(ValueError, match=r"short\.npz is a damaged sample \.npz"):
        ev.load_samples(tmp_path / "short.npz")


def test_sample_class_not_in_reference_is_refused(tmp_path, random_net):
    npz = write_samples(tmp_path / "s.npz", noise_images(8, 4), [0, 1] * 4, ["0", "7"])
    with pytest.raises(ValueError, match=r"sample classes \['7'\] are not in reference"):
        ev.evaluate(npz, "mnist:0-1", feature_net=random_net)


def test_unconditional_samples_score_against_the_whole_reference(tmp_path, random_net):
    """`kind-dit sample --unconditional` labels its samples with the null class, which no
    reference holds: they are scored unlabelled (FID as any unlabelled set), and a set that
    mixes them with conditional samples is refused."""
    images = noise_images(8, 4)
    unlabelled = ev.evaluate_images(images, None, None, "mnist:0-1", random_net)
    npz = write_samples(tmp_path / "u.npz", images, [2] * 8, ["0", "1", "<null>"])
    result = ev.evaluate(npz, "mnist:0-1", feature_net=random_net)
    assert result["fid"] == pytest.approx(unlabelled["fid"], rel=1e-6)
    assert (
        result["class_accuracy"] is None
        and "unconditional samples" in (result["class_accuracy_note"])
    )
    assert result["samples_per_class"] is None
    mixed = write_samples(tmp_path / "m.npz", images, [0, 2] * 4, ["0", "1", "<null>"])
    with pytest.raises(ValueError, match="4 of the 8 samples are unconditional"):
        ev.evaluate(mixed, "mnist:0-1", feature_net=random_net)


def test_wrong_image_shape_for_the_bundled_net_is_refused(tmp_path):
    npz = write_samples(tmp_path / "s.npz", noise_images(8, 5, size=32), [0] * 8, ["0"])
    with pytest.raises(ValueError, match=r"takes images of shape \[N, 1, 28, 28\]"):
        ev.evaluate(npz, "mnist:0-1")


def test_inception_without_weights_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    npz = write_samples(tmp_path / "s.npz", noise_images(8, 6), [0] * 8, ["0"])
    with pytest.raises(FileNotFoundError) as err:
        ev.evaluate(npz, "mnist:0-1", feature_net="inception")
    message = str(err.value)
    assert features.INCEPTION_WEIGHTS_NAME in message and features.INCEPTION_WEIGHTS_URL in message
    assert "--inception-weights" in message and features.INCEPTION_ENV in message


def test_auto_on_an_image_folder_needs_inception_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        features.resolve_feature_net("auto", str(tmp_path / "folder"))


def test_inception_weights_path_that_does_not_exist_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        features.load_inception(missing)
    monkeypatch.setenv(features.INCEPTION_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        features.load_inception(None)


def test_inception_library_missing_names_the_pip_command(tmp_path, monkeypatch):
    weights = tmp_path / features.INCEPTION_WEIGHTS_NAME
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r"pip install 'kind-dit\[inception\]'"):
        features.load_inception(weights)


def test_bundled_feature_nets_load_with_their_metadata():
    nets = (("mnist", 0.97), ("animals", 0.9), ("glyphs", 0.95), ("bundled", 0.93))
    for dataset, acc in nets:
        net = features.load_feature_net(dataset)
        sidecar = json.loads(features.feature_net_paths(dataset)[1].read_text())
        assert (
            net.sha256 == sidecar["sha256"] == sha256_file(features.feature_net_paths(dataset)[0])
        )
        spec = "mnist + animals + glyphs" if dataset == "bundled" else dataset
        assert net.class_names == load_images(spec, "test").class_names
        assert sidecar["test_accuracy"] >= acc and "build_feature_nets.py" in sidecar["command"]
        assert features.feature_net_paths(dataset)[0].stat().st_size < 1_000_000


def test_auto_picks_the_bundled_net_for_combined_bundled_refs(tmp_path, monkeypatch):
    assert features.auto_feature_net("glyphs:A-C") == "glyphs"
    assert features.auto_feature_net("mnist:0 + mnist:1") == "mnist"  # still one dataset
    assert features.auto_feature_net("mnist:0-1 + animals:cat") == "bundled"
    assert {"glyphs", "bundled"} <= set(features.FEATURE_NET_CHOICES)
    net = features.resolve_feature_net("auto", "animals:cat + glyphs")
    assert net.name == "kind-smallcnn-v1-bundled"
    letters = [chr(c) for c in range(ord("A"), ord("X") + 1)]
    assert net.class_names == MNIST + dataset_classes("animals") + letters
    (tmp_path / "folder" / "cat").mkdir(parents=True)  # a folder part: Inception, as for folders
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        features.resolve_feature_net("auto", f"mnist:0 + {tmp_path / 'folder'}")


def test_combined_reference_is_scored_with_the_bundled_net(tmp_path):
    # The train images of a combined spec against its test split: "auto" must pick the bundled
    # net, and that net must classify digits, animals and letters in one argmax.
    spec = "mnist:0-1 + animals:cat + glyphs:A"
    real = load_images(spec, "train")
    npz = write_samples(tmp_path / "real.npz", real.images, real.labels, real.class_names)
    result = ev.evaluate(npz, spec)
    assert result["feature_net"] == "kind-smallcnn-v1-bundled"
    assert result["reference_dataset"] == "mnist + animals + glyphs"
    assert result["num_reference"] == 100 + 100 + 200 + 60
    assert result["class_accuracy"] >= 0.95 and set(result["per_class_accuracy"]) >= {"A", "cat"}


def test_missing_or_tampered_feature_net_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_feature_nets.py --datasets mnist"):
        features.load_feature_net("mnist", assets=tmp_path)
    torch.manual_seed(0)
    features.save_feature_net(features.SmallCNN(), "mnist", MNIST, {}, assets=tmp_path)
    assert features.load_feature_net("mnist", assets=tmp_path).class_names == MNIST
    weights = features.feature_net_paths("mnist", tmp_path)[0]
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        features.load_feature_net("mnist", assets=tmp_path)


def test_adm_reference_batch_has_the_adm_layout(tmp_path):
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref_mnist01")  # no suffix added
    assert path.exists() and path.name == "ref_mnist01"
    with np.load(path, allow_pickle=False) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (200, 28, 28, 3)
        assert npz["labels"].tolist() == [0] * 100 + [1] * 100
        assert npz["class_names"].tolist() == ["0", "1"]
    test = load_images("mnist:0-1", "test")
    assert np.array_equal(np.load(path)["arr_0"][..., 0], test.images[:, 0].numpy())


class FakeInception(torch.nn.Module):
    """Stands in for torch-fidelity's Inception: same call signature, same ``Mixed_6d.branch1x1``
    hook point, random weights, tiny."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.Mixed_6d = torch.nn.Module()
        self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 9, 3, stride=2, padding=1)  # 34 → 17
        self.pool = torch.nn.Linear(9, 16)
        self.fc = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.interpolate(x.float() / 128 - 1, size=(34, 34), mode="bilinear")
        h = torch.relu(self.Mixed_6d.branch1x1(x))  # [B, 9, 17, 17]
        pool = self.pool(h.mean(dim=(2, 3)))  # [B, 16]
        return pool, self.fc(pool)  # [B, 16], [B, 12]


def test_inception_path_reports_sfid_and_inception_score(tmp_path):
    net = features.InceptionFeatureNet(module=FakeInception(), name="fake", sha256="f" * 64)
    seen = []  # the hook point's outputs [B, 9, 17, 17], seen from outside
    watch = net.module.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    out = net.extract(noise_images(5, seed=7), batch_size=2)  # grey → RGB, batched
    watch.remove()
    assert out.pool.shape == (5, 16) and out.logits.shape == (5, 12)
    assert out.spatial.shape == (5, features.SFID_CHANNELS * 17 * 17)  # 2023, as ADM's sFID
    assert net.module.Mixed_6d.branch1x1._forward_hooks == {}  # hook removed afterwards
    # ADM flattens the first 7 channels position by position (NHWC): the 7 channels at the
    # top-left cell first, then those of the cell to its right
    conv = torch.cat(seen)[:, : features.SFID_CHANNELS]  # [5, 7, 17, 17]
    assert torch.equal(out.spatial[:, :7], conv[:, :, 0, 0])
    assert torch.equal(out.spatial[:, 7:14], conv[:, :, 0, 1])

    real = load_images("mnist:0-1", "train")
    result = ev.evaluate_images(real.images[:60], real.labels[:60], real.class_names,
                                "mnist:0-1", net)  # fmt: skip
    assert result["sfid"] > 0 and 1.0 <= result["inception_score"] <= 12.0
    assert result["inception_score_split_size"] == 5000 and result["inception_score_std"] == 0
    assert result["class_accuracy"] is None and "does not classify" in result["class_accuracy_note"]


def test_sample_metadata_becomes_json_whatever_its_type(tmp_path):
    """0-d entries of a sample file go into the result JSON: numbers JSON cannot hold and dates
    as their text, bytes decoded, so the file's metadata never fails the write at the end."""
    meta = {"seed": np.array(3), "cfg": np.array(1.5), "ok": np.array(True), "who": np.array("me"),
            "z": np.array(1 + 2j), "nan": np.array(np.nan), "when": np.array(np.datetime64("2026-12-07")),
            "raw": np.array(b"\xff\xfe")}  # fmt: skip
    np.savez(tmp_path / "m.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8), **meta)
    with open_npz(tmp_path / "m.npz", "sample", "", "") as npz:
        got = scalars(npz, ("arr_0",))
    assert got == {"seed": 3, "cfg": 1.5, "ok": True, "who": "me", "z": "(1+2j)", "nan": "nan",
                   "when": "2026-12-07", "raw": "\ufffd\ufffd"}  # fmt: skip
    json.dumps(got, allow_nan=False)
