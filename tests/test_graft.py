"""`kind-dit graft`: a KIND transfer run's new classes join the parts it came from. The grafted
parts serve the new classes exactly as the run did and the old ones exactly as the parts did;
every refusal comes before anything is written and leaves PARTS and RUN untouched."""

import json
import shutil

import numpy as np
import pytest
import torch

from cli_options import SHORT, TRANSFER_SHORT
from kind.cli.main import main
from kind.core.decomposition import PartsError
from kind.io import OutputDirError, sha256_file, tensor_sha256
from kind.store.graft import graft
from kind.store.load import load_model
from kind.store.parts import load_parts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("graft")


@pytest.fixture(scope="module")
def parts(root):
    main(["train", "--data", "mnist:0-1", "--size", "tiny", "--out", str(root / "src"), *SHORT])
    main(["decompose", str(root / "src"), "--out", str(root / "parts")])
    return root / "parts"


def _transfer(parts, out, data, *extra):
    main(["transfer", str(parts), "--data", data, "--out", str(out), *TRANSFER_SHORT, *extra])
    return out


@pytest.fixture(scope="module")
def run(parts, root):
    return _transfer(parts, root / "run", "mnist:6,7")


@pytest.fixture(scope="module")
def grafted(parts, run, root):
    main(["graft", str(parts), str(run), "--out", str(root / "grafted")])
    return root / "grafted"


def _snapshot(*dirs):
    """sha256 of every file under `dirs`: what a refusal must leave as it was."""
    return {p: sha256_file(p) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def _samples(source, classes, out, *extra):
    main(["sample", str(source), "--classes", classes, "--n", "2", "--steps", "2", "--seed", "3",
          "--cfg-scale", "2", "--out", str(out), *extra])  # fmt: skip
    return np.load(out / "samples.npz")["arr_0"]


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 1000, (n,), generator=g)


def test_grafted_parts_serve_the_new_classes_exactly_as_the_run(run, grafted, tmp_path):
    main(["assemble", str(grafted), "--classes", "7", "--out", str(tmp_path / "seven")])
    own = _samples(run, "7", tmp_path / "s_run", "--sampler", "ddpm")
    for source in (grafted, tmp_path / "seven"):
        assert np.array_equal(
            _samples(source, "7", tmp_path / f"s_{source.name}", "--sampler", "ddpm"), own
        )
    # outputs, not only uint8 images: bit for bit, the null class (guidance) included
    run_model, _, _ = load_model(run)
    small, _, _ = load_parts(grafted, ["6"])
    x, t = _batch(4)
    y_run = torch.tensor([0, 0, 2, 2])  # class "6" and the run's null id
    y_new = torch.tensor([2, 2, 4, 4])  # class "6" after "0", "1"; the grafted null id
    with torch.no_grad():
        assert torch.equal(small(x, t, y_new), run_model(x, t, y_run))


def test_grafted_parts_keep_the_old_classes_bit_for_bit(parts, grafted, tmp_path):
    for name in ("learngene.safetensors", "tailor_0000.safetensors", "tailor_0001.safetensors"):
        assert sha256_file(grafted / name) == sha256_file(parts / name)
    before, _, _ = load_parts(parts, ["1"])
    after, _, _ = load_parts(grafted, ["1"])
    x, t = _batch(4)
    with torch.no_grad():
        assert torch.equal(after(x, t, torch.tensor([1, 1, 4, 4])),
                           before(x, t, torch.tensor([1, 1, 2, 2])))  # fmt: skip
    main(["assemble", str(grafted), "--classes", "0,1", "--out", str(tmp_path / "old")])
    assert np.array_equal(
        _samples(tmp_path / "old", "0,1", tmp_path / "s_old"),
        _samples(parts, "0,1", tmp_path / "s_parts"),
    )


def test_grafted_manifest_names_every_class_and_verifies(parts, run, grafted):
    manifest = json.loads((grafted / "manifest.json").read_text())
    assert [(c["id"], c["name"], c["group"]) for c in manifest["classes"]] == [
        (0, "0", 0), (1, "1", 1), (2, "6", 2), (3, "7", 3)
    ]  # fmt: skip
    assert manifest["model"]["class_names"] == ["0", "1", "6", "7"]
    assert {g: t["classes"] for g, t in manifest["tailors"].items()} == {
        "0": [0], "1": [1], "2": [2], "3": [3]
    }  # fmt: skip
    assert manifest["grafted"] == [
        {"run": str(run.resolve()), "method": "kind", "classes": ["6", "7"], "groups": [2, 3]}
    ]
    for entry in [manifest["learngene"], *manifest["tailors"].values()]:
        assert sha256_file(grafted / entry["file"]) == entry["sha256"]
    model, _, _ = load_parts(grafted)  # every part, checked against the manifest
    assert model.config.class_names == ["0", "1", "6", "7"]


def test_grafting_onto_the_parts_of_an_assembled_model(parts, run, grafted, tmp_path):
    """Parts decomposed from a model assembled for class "1" hold that class alone; grafted, they
    hold it and the run's classes, each computing what the fully grafted parts compute."""
    main(["assemble", str(parts), "--classes", "1", "--out", str(tmp_path / "one")])
    main(["decompose", str(tmp_path / "one"), "--out", str(tmp_path / "p1")])
    model, _, _ = load_parts(graft(tmp_path / "p1", run, tmp_path / "g"))
    assert [model.config.class_names[c] for c in model.config.held_classes] == ["1", "6", "7"]
    full, _, _ = load_parts(grafted, ["1", "6", "7"])
    x, t = _batch(4)
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), full(x, t, y))


def test_a_run_with_tailor_groups_grafts(parts, root, tmp_path, caplog):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"8": "round", "9": "round"}))
    run = _transfer(parts, root / "grouped", "mnist:8,9", "--set", f"group_file={groups}",
                    "--set", "sample.cfg_scale=3")  # fmt: skip
    out = graft(parts, run, tmp_path / "g")
    # one sample section a deployment: PARTS's; the run's other guidance scale is named
    assert "cfg_scale 1.5 here, 3.0 in the run" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["class_to_group"] == [0, 1, 2, 2]
    assert manifest["tailors"]["2"]["classes"] == [2, 3]
    assert np.array_equal(_samples(out, "9", tmp_path / "s_g"), _samples(run, "9", tmp_path / "s"))


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--train-learngenes"], r"trained its learngenes \(--train-learngenes\)"),
        (["--method", "kind-sigma"], r"singular values σ \(--method kind-sigma\)"),
    ],
)
def test_a_run_that_trained_its_learngenes_is_refused(parts, root, tmp_path, capsys, flags, reason):
    run = _transfer(parts, root / f"trained{len(flags)}", "mnist:8", *flags)
    before = _snapshot(parts, run)
    with pytest.raises(PartsError, match=f"learngene differs.*{reason}.*kind-dit decompose RUN"):
        graft(parts, run, tmp_path / "out")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["graft", str(parts), str(run), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "learngene differs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and _snapshot(parts, run) == before


def test_a_class_name_already_in_parts_is_refused(run, grafted, tmp_path):
    with pytest.raises(PartsError, match=r"class name\(s\) \['6', '7'\].*already exist"):
        graft(grafted, run, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_non_empty_out_is_refused_and_nothing_is_touched(parts, run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my file")
    before = _snapshot(parts, run, out)
    with pytest.raises(OutputDirError, match="not empty"):
        graft(parts, run, out)
    with pytest.raises(PartsError, match="inside PARTS"):
        graft(parts, run, parts / "sub")
    assert _snapshot(parts, run, out) == before and not (parts / "sub").exists()


def test_runs_that_are_no_kind_transfer_are_refused(parts, run, root, tmp_path):
    with pytest.raises(PartsError, match="pre-training run, not a transfer"):
        graft(parts, root / "src", tmp_path / "a")
    baseline = shutil.copytree(run, tmp_path / "lora")  # a baseline's record, KIND weights aside
    record = json.loads((baseline / "run.json").read_text())
    record["transfer"]["method"] = "lora"
    (baseline / "run.json").write_text(json.dumps(record))
    with pytest.raises(PartsError, match="'lora' transfer of a dense DiT"):
        graft(parts, baseline, tmp_path / "b")
    (baseline / "run.json").write_text(json.dumps(record | {"transfer": "kind"}))  # hand-edited
    with pytest.raises(ValueError, match="run.json: transfer is 'kind', not a JSON object"):
        graft(parts, baseline, tmp_path / "b")
    with pytest.raises(PartsError, match="not a run directory"):
        graft(parts, parts, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_a_null_tailor_or_another_tailor_rank_is_refused(parts, root, tmp_path):
    null = _transfer(parts, root / "null", "mnist:8", "--null-tailor")
    with pytest.raises(PartsError, match=r"null class a tailor of its own \(--null-tailor\)"):
        graft(parts, null, tmp_path / "a")
    rank = _transfer(parts, root / "rank", "mnist:8", "--rank-tailor", "1")
    with pytest.raises(PartsError, match=r"rank_tailor \(run 1.0, parts 2.0\).*--rank-tailor"):
        graft(parts, rank, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tensor_sha256_tells_bits_apart():
    zero = torch.zeros(3)
    assert tensor_sha256(zero) == tensor_sha256(zero.clone())
    assert tensor_sha256(zero) != tensor_sha256(-zero)  # torch.equal calls these equal
    assert tensor_sha256(zero) != tensor_sha256(zero.double())
    assert tensor_sha256(zero) != tensor_sha256(zero.reshape(1, 3))
