"""Reference statistics files (ADM / clean-fid / written by `kind-dit evaluate --write-ref`) as
`--ref`, the reference split of a data spec, and the small-set warning.

Everything is CPU and local: the bundled mnist network, a randomly initialised one, and a tiny
stand-in for Inception that has the spatial (sFID) hook point.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from kind.cli.main import main
from kind.data.images import load_images
from kind.eval import evaluate as ev
from kind.eval import features, metrics, reference
from test_evaluate import write_samples  # the `kind-dit sample` layout, written once

MNIST = [str(d) for d in range(10)]


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(reference, "_REF_CACHE", {})
    monkeypatch.setattr(features, "_NET_CACHE", {})


@pytest.fixture(scope="module")
def shifted() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every 4th train image of mnist:0-1 (200: more than the mnist network's 128 feature
    dimensions), shifted a little: samples close to, not at, the data."""
    real = load_images("mnist:0-1", "train")
    images = torch.roll(real.images[::4], shifts=(2, 2), dims=(2, 3))
    return images.contiguous(), real.labels[::4].contiguous(), real.class_names


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_written_reference_gives_the_same_scores_as_the_spec(tmp_path, shifted):
    images, labels, names = shifted
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz")  # auto: mnist's network
    with np.load(path, allow_pickle=False) as npz:
        assert npz["mu"].shape == (128,) and npz["sigma"].shape == (128, 128)
        assert "mu_s" not in npz.files  # the bundled classifier has no spatial features
        assert str(npz["feature_net_sha256"]) == features.load_feature_net("mnist").sha256
        assert npz["arr_0"].shape == (200, 28, 28, 3) and str(npz["split"]) == "test"

    direct = ev.evaluate_images(images, labels, names, "mnist:0-1")
    from_file = ev.evaluate_images(images, labels, names, str(path))  # "auto" from its spec
    assert direct["fid"] > 0.1 and rel(from_file["fid"], direct["fid"]) < 1e-3
    # the file holds the images too, so precision and recall are computed from them
    assert from_file["precision"] == direct["precision"] and from_file["recall"] == direct["recall"]
    assert from_file["num_reference"] == direct["num_reference"] == 200
    assert (
        from_file["reference_type"] == "statistics file" and direct["reference_type"] == "data spec"
    )
    assert (
        from_file["reference"] == str(path.resolve()) and len(from_file["reference_sha256"]) == 64
    )
    assert from_file["reference_split"] == "test" and from_file["reference_dataset"] == "mnist"


def test_statistics_only_file_gives_fid_and_says_why_precision_is_missing(
    tmp_path, shifted, caplog
):
    images, labels, names = shifted
    written = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz")
    with np.load(written, allow_pickle=False) as npz:  # clean-fid keeps mu and sigma only
        np.savez(tmp_path / "cleanfid.npz", mu=npz["mu"], sigma=npz["sigma"])
    direct = ev.evaluate_images(images, labels, names, "mnist:0-1")
    with caplog.at_level(logging.INFO, logger="kind.eval.evaluate"):
        result = ev.evaluate_images(
            images, labels, names, str(tmp_path / "cleanfid.npz"), feature_net="mnist"
        )
    assert rel(result["fid"], direct["fid"]) < 1e-3
    assert result["precision"] is None and result["recall"] is None
    assert "statistics only" in result["precision_recall_note"]
    assert "statistics only" in caplog.text
    assert result["num_reference"] is None and result["reference_split"] is None
    assert result["class_accuracy"] == direct["class_accuracy"]  # sample-side metrics unaffected


def test_bare_statistics_file_defaults_to_inception(tmp_path, shifted, monkeypatch):
    # ADM and clean-fid statistics are Inception features: "auto" must not guess a bundled net
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    images, labels, names = shifted
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        ev.evaluate_images(images, labels, names, str(tmp_path / "adm.npz"))


def test_sfid_statistics_round_trip_on_the_spatial_features(tmp_path, shifted, tiny_inception):
    net = tiny_inception
    images, labels, names = shifted
    images, labels = images[:120], labels[:120]
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz", feature_net=net)
    with np.load(path, allow_pickle=False) as npz:
        spatial = features.SFID_CHANNELS * 4 * 4  # first 7 channels, flattened, as ADM's sFID
        assert npz["mu_s"].shape == (spatial,) and npz["sigma_s"].shape == (spatial, spatial)
        assert npz["mu"].shape == (16,)
        # an ADM-style statistics file: the four arrays, no images
        np.savez(tmp_path / "adm.npz", **{k: npz[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
        np.savez(tmp_path / "pool_only.npz", mu=npz["mu"], sigma=npz["sigma"])

    direct = ev.evaluate_images(images, labels, names, "mnist:0-1", net)
    for name in ("ref.npz", "adm.npz"):
        result = ev.evaluate_images(images, labels, names, str(tmp_path / name), net)
        assert direct["sfid"] > 0 and rel(result["sfid"], direct["sfid"]) < 1e-3, name
        assert rel(result["fid"], direct["fid"]) < 1e-3, name
        assert result["inception_score"] == direct["inception_score"]
    pool_only = ev.evaluate_images(images, labels, names, str(tmp_path / "pool_only.npz"), net)
    assert pool_only["sfid"] is None and "no spatial statistics" in pool_only["sfid_note"]
    assert rel(pool_only["fid"], direct["fid"]) < 1e-3


def test_a_reference_of_another_resolution_is_refused(tmp_path, shifted, tiny_inception):
    """Samples at 32x32 against a 28x28 reference file: both would be resized to the network's
    input and scored, a plausible number that measures the resize; refused, naming the fix. The
    file's size is its images', else the size it records (a statistics-only copy)."""
    images, labels, names = shifted
    images, labels = images[:40], labels[:40]
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz", feature_net=None)
    with np.load(path, allow_pickle=False) as npz:  # statistics only, its size recorded
        np.savez(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16),
                 image_size=npz["image_size"])  # fmt: skip
    same = ev.evaluate_images(images, labels, names, str(path), tiny_inception)
    assert same["reference_image_size"] == [28, 28]
    larger = torch.nn.functional.interpolate(images.float(), size=32).round().to(torch.uint8)
    for name in ("ref.npz", "stats.npz"):
        with pytest.raises(
            ValueError, match=r"samples are 32x32 but .* holds 28x28.*--image-size 32"
        ):
            ev.evaluate_images(larger, labels, names, str(tmp_path / name), tiny_inception)


def test_frechet_from_spatial_stats_matches_the_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 40, generator=g), torch.randn(250, 40, generator=g) * 1.3 + 0.2
    stats = (*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    from_stats = metrics.frechet_distance_from_stats(*(s.numpy() for s in stats))
    assert rel(from_stats, metrics.frechet_distance(a, b)) < 1e-9


def test_statistics_of_another_dimension_are_refused_with_the_shapes(tmp_path, shifted):
    images, labels, names = shifted
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError) as err:
        ev.evaluate_images(images, labels, names, str(other), feature_net="mnist")
    message = str(err.value)
    assert "other.npz" in message and "mu (64,)" in message and "sigma (64, 64)" in message
    assert "mu [128]" in message and "another network" in message and "--write-ref" in message


def test_auto_scores_a_statistics_file_with_the_network_it_was_written_with(tmp_path, shifted):
    """--feature-net bundled for an mnist reference: "auto" reads the network the file records
    (it took the spec's mnist network, and the refusal named a value --feature-net refuses)."""
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz", feature_net="bundled")
    images, labels, names = shifted
    assert ev.evaluate_images(images, labels, names, str(path))["feature_net"].endswith("bundled")
    with pytest.raises(ValueError, match="pass --feature-net bundled, or write"):
        ev.evaluate_images(images, labels, names, str(path), feature_net="mnist")


def test_statistics_of_another_network_are_refused(tmp_path, shifted):
    torch.manual_seed(0)
    random_net = features.BundledFeatureNet.from_module(features.SmallCNN(), MNIST, "random-cnn")
    path = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz", feature_net=random_net)
    images, labels, names = shifted
    with pytest.raises(ValueError, match="statistics of feature network random-cnn"):
        ev.evaluate_images(images, labels, names, str(path), feature_net="mnist")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"mu": np.zeros(128)}, "has 'mu' but not 'sigma'"),
        ({"mu": np.zeros(128), "sigma": np.zeros((128, 64))}, r"sigma float64 \(128, 64\)"),
        ({"mu": np.full(128, np.nan), "sigma": np.eye(128)}, "NaN"),
        ({"images": np.zeros((4, 28, 28, 1), np.uint8)}, "neither statistics.*keys: images"),
        (
            {"mu": np.array([0, "a"], dtype=object), "sigma": np.eye(2)},
            "bad.npz holds an array of Python objects",
        ),
    ],
)
def test_malformed_statistics_files_are_refused(tmp_path, shifted, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    images, labels, names = shifted
    with pytest.raises(ValueError, match=match):
        ev.evaluate_images(images, labels, names, str(tmp_path / "bad.npz"), feature_net="mnist")


def test_a_reference_smaller_than_k_plus_one_is_named_with_the_fix(tmp_path, shifted):
    images, labels, names = shifted
    np.savez(tmp_path / "two.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"two\.npz holds 2 images.*k \+ 1 = 4.*smaller --k"):
        ev.evaluate_images(images, None, None, str(tmp_path / "two.npz"), feature_net="mnist")


def test_a_folder_reference_of_one_test_image_is_named_with_the_fix(tmp_path, shifted):
    """Five images: the test split (every 5th) holds one ("features needs at least 2 rows")."""
    from PIL import Image

    (tmp_path / "fold" / "a").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(
            tmp_path / "fold" / "a" / f"{i}.png"
        )
    images = shifted[0]
    with pytest.raises(ValueError, match=r"test split of reference .*fold holds 1 image\(s\), too "
                                         r"few .* --ref-split all"):  # fmt: skip
        ev.evaluate_images(images, None, None, str(tmp_path / "fold"), feature_net="mnist")


def test_a_latent_store_as_reference_names_the_image_spec_it_came_from(tmp_path, shifted):
    from kind.data.store_format import FORMAT, META_FILE

    store = tmp_path / "store"
    store.mkdir()
    (store / META_FILE).write_text(json.dumps({"format": FORMAT, "spec": "mnist:0-1"}))
    images, labels, names = shifted
    with pytest.raises(ValueError, match=r"store is a latent store .*encoded from \(mnist:0-1\)"):
        ev.evaluate_images(images, labels, names, str(store), feature_net="mnist")
    with pytest.raises(ValueError, match="is a latent store"):
        reference.write_adm_reference(str(store), tmp_path / "ref.npz")


def test_missing_npz_reference_is_a_missing_file_not_a_data_spec(tmp_path, shifted):
    images, labels, names = shifted
    with pytest.raises(FileNotFoundError, match="reference statistics file not found"):
        ev.evaluate_images(images, labels, names, str(tmp_path / "nowhere.npz"))


def test_small_sets_are_recorded_as_warnings(shifted, caplog):
    images, labels, names = shifted
    with caplog.at_level(logging.WARNING, logger="kind.eval.evaluate"):
        small = ev.evaluate_images(images[:40], labels[:40], names, "mnist:0-1 ")
    # 40 samples < 128 dimensions; the 200 reference images are not
    lack, warning = small["warnings"]
    assert "has classes the samples lack: ['1']" in lack  # the first 40 are all zeros
    assert "sample set" in warning and "40 samples" in warning and "200 reference" in warning
    assert "128 dimensions" in warning and "50,000" in warning
    assert warning in caplog.text

    one_class = ev.evaluate_images(images[:40], torch.zeros(40, dtype=torch.long), names, "mnist:0")
    assert len(one_class["warnings"]) == 2  # and the 100 test images of one class
    assert (
        "reference set" in one_class["warnings"][1] and "100 reference" in one_class["warnings"][1]
    )

    assert ev.evaluate_images(images, labels, names, "mnist:0-1")["warnings"] == []


def test_reference_split_picks_train_test_or_all(tmp_path, shifted):
    images, labels, names = shifted
    results = {
        split: ev.evaluate_images(images, labels, names, "mnist:0-1", ref_split=split)
        for split in ("train", "test", "all")
    }
    assert {s: r["num_reference"] for s, r in results.items()} == {
        "train": 800, "test": 200, "all": 1000,
    }  # fmt: skip
    assert all(r["reference_split"] == s for s, r in results.items())
    assert results["train"]["fid"] != results["test"]["fid"]
    assert ev.evaluate_images(images, labels, names, "mnist:0-1")["num_reference"] == 200

    path = reference.write_adm_reference("mnist:0-1", tmp_path / "all.npz", split="all")
    from_file = ev.evaluate_images(images, labels, names, str(path))
    assert from_file["reference_split"] == "all" and from_file["num_reference"] == 1000
    assert rel(from_file["fid"], results["all"]["fid"]) < 1e-3
    with pytest.raises(ValueError, match="--ref-split picks a split of a data-spec reference"):
        ev.evaluate_images(images, labels, names, str(path), ref_split="train")
    with pytest.raises(ValueError, match="reference split must be one of"):
        ev.evaluate_images(images, labels, names, "mnist:0-1", ref_split="val")


def test_a_reference_the_network_cannot_take_is_refused_before_loading(tmp_path, monkeypatch):
    """--image-size 64 for the 28x28 mnist network wrote 64x64 images with 28x28 statistics (a
    file no evaluation could use); refused, as a directory path is, before the split loads."""
    monkeypatch.setattr(reference, "_load_reference_images", None)  # never reached
    with pytest.raises(ValueError, match="takes 28x28 images, so --image-size 64 would give"):
        reference.write_adm_reference("mnist:0-1", tmp_path / "r.npz", image_size=64,
                                      feature_net="mnist")  # fmt: skip
    with pytest.raises(IsADirectoryError, match="is a directory; give the path of the .npz"):
        reference.write_adm_reference("mnist:0-1", tmp_path, overwrite=True)
    assert not list(tmp_path.iterdir())


def test_write_adm_reference_never_replaces_a_file_unasked(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        reference.write_adm_reference("mnist:0-1", path)
    assert path.read_bytes() == b"mine"
    reference.write_adm_reference("mnist:0-1", path, overwrite=True, feature_net=None)
    with np.load(path, allow_pickle=False) as npz:
        assert "arr_0" in npz.files and "mu" not in npz.files  # images only, as before


def test_cli_writes_a_reference_and_scores_against_it(tmp_path, shifted, capsys):
    images, labels, names = shifted
    samples = write_samples(tmp_path / "samples.npz", images, labels, names)
    ref = tmp_path / "ref-train.npz"
    main(["evaluate", "--write-ref", str(ref), "--ref", "mnist:0-1", "--ref-split", "train"])
    assert ref.is_file() and str(ref) in capsys.readouterr().out
    main(["evaluate", str(samples), "--ref", str(ref)])
    result = json.loads((tmp_path / "samples.eval.json").read_text())
    assert result["reference_split"] == "train" and result["num_reference"] == 800
    assert result["reference_type"] == "statistics file" and result["warnings"] == []

    main(["evaluate", str(samples), "--ref", "mnist:0-1", "--ref-split", "all", "--out",
          str(tmp_path / "all.json")])  # fmt: skip
    assert json.loads((tmp_path / "all.json").read_text())["num_reference"] == 1000

    bad = [
        (["--write-ref", str(ref), "--ref", "mnist:0-1"], "exists; pass --overwrite"),
        (["--write-ref", str(tmp_path / "r.stats"), "--ref", "mnist:0-1"], "name it *.npz"),
        ([str(samples), "--write-ref", str(tmp_path / "x.npz"), "--ref", "mnist:0-1"], "drop"),
        (["--ref", "mnist:0-1"], "give the samples .npz"),
        (
            [str(samples), "--ref", str(ref), "--ref-split", "test", "--overwrite"],
            "statistics file",
        ),
    ]
    for args, message in bad:
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_fid_comes_from_the_files_stored_statistics_not_its_images(tmp_path, shifted):
    """ADM's batches hold statistics of their full set beside a few images: FID must use the
    stored mu and sigma (a file whose mu is moved off its images' own mean shows which)."""
    images, labels, names = shifted
    written = reference.write_adm_reference("mnist:0-1", tmp_path / "ref.npz")
    with np.load(written, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["mu"] = arrays["mu"] + 0.5
    np.savez(tmp_path / "moved.npz", **arrays)
    net = features.load_feature_net("mnist")
    stats = metrics.feature_statistics(net.extract(images).pool)
    expected = metrics.frechet_distance_from_stats(*stats, torch.from_numpy(arrays["mu"]),
                                                   torch.from_numpy(arrays["sigma"]))  # fmt: skip
    result = ev.evaluate_images(images, labels, names, str(tmp_path / "moved.npz"))
    assert rel(result["fid"], float(expected)) < 1e-3
    assert rel(result["fid"], ev.evaluate_images(images, labels, names, str(written))["fid"]) > 0.1


def test_a_spec_reference_converted_to_the_samples_shape_is_warned_about(shifted, tiny_inception):
    """Grey copies of a colour set would match grey samples perfectly: a data-spec reference
    loaded at other channels or another size than the data's own is said in the result."""
    images, labels, names = shifted
    rgb = images.repeat(1, 3, 1, 1)
    small = torch.nn.functional.interpolate(images.float(), size=(14, 14)).to(torch.uint8)
    for samples, needle in ((rgb, "converted from its 1 channel(s) to the samples' 3"),
                            (small, "resized from its 28x28 images to the samples' 14x14")):  # fmt: skip
        result = ev.evaluate_images(samples, labels, names, "mnist:0-1", feature_net=tiny_inception)
        assert any(needle in w for w in result["warnings"]), result["warnings"]
    plain = ev.evaluate_images(images, labels, names, "mnist:0-1", feature_net=tiny_inception)
    assert not any("converted" in w or "resized" in w for w in plain["warnings"])
    flat = ev.evaluate_images((images > 127).to(torch.uint8), labels, names, "mnist:0-1",
                              feature_net=tiny_inception)  # fmt: skip
    assert any("cast to uint8" in w for w in flat["warnings"])
