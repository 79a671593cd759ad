"""`kind-dit train --model kind --init-from DENSE`: a dense DiT becomes the start of KIND
pre-training (kind.core.kindify). At full learngene rank with silent tailors the start model
computes the dense one's outputs; at a lower rank each learngene is the best rank-r approximation
of its dense weight; every refusal comes before anything is written."""

import json
from dataclasses import replace

import pytest
import torch

from cli_options import SHORT
from kind.cli.main import main
from kind.core.kindify import KindifyError, kindify
from kind.core.model import DiT, ModelConfig
from kind.io import sha256_file
from kind.store.load import load_model
from kind.store.modeldir import save_model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than contending for all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense(classes=("a", "b", "c", "d")) -> DiT:
    """A tiny dense DiT with every weight random (DiT's init zeroes adaLN and the output layer,
    which would make any two models agree)."""
    torch.manual_seed(0)
    model = DiT(ModelConfig(kind=False, class_names=list(classes)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _kind_config(dense: DiT, classes, **changes) -> ModelConfig:
    return replace(dense.config, kind=True, class_names=list(classes), **changes)


def test_full_rank_kindified_model_computes_the_dense_outputs():
    dense = _dense()
    # classes by name, in another order and a subset: c -> dense row 2, a -> dense row 0
    cfg = _kind_config(dense, ["c", "a"], rank_learngene=128, rank_tailor=2, tailor_sigma=0.0,
                       decompose_adaln=True)  # fmt: skip
    model = kindify(dense, cfg).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 1000, (6,), generator=g)
    y_kind = torch.tensor([0, 1, 2, 0, 2, 1])  # 2: the KIND model's null id
    y_dense = torch.tensor([2, 0, 4, 2, 4, 0])  # the same classes in the dense model; 4: null
    with torch.no_grad():
        ours, theirs = model(x, t, y_kind), dense(x, t, y_dense)
    assert theirs.abs().max() > 0.1  # a real signal, not zeros
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_learngene_is_the_best_rank_r_approximation():
    dense = _dense()
    model = kindify(dense, _kind_config(dense, ["b", "d"], rank_learngene=0.5))
    checked = 0
    for name, layer in model.kind_layers():
        source = dense.get_submodule(name)
        u, s, vh = torch.linalg.svd(source.weight.double(), full_matrices=False)
        r = layer.rank_learngene
        assert r == min(source.weight.shape) // 2
        best = (u[:, :r] * s[:r]) @ vh[:r]
        got = layer.learngene_weight().double()
        assert ((got - best).norm() / best.norm()).item() < 1e-5
        assert torch.equal(layer.bias, source.bias)
        checked += 1
    assert checked == 4 * 6  # q, k, v, proj, fc1, fc2 of each of the 4 blocks
    # dense layers copied, label rows by name, the null row, fresh tailors
    assert torch.equal(model.x_embedder.weight, dense.x_embedder.weight)
    assert torch.equal(model.blocks[1].adaLN_modulation[-1].weight,
                       dense.blocks[1].adaLN_modulation[-1].weight)  # fmt: skip
    assert torch.equal(model.y_embedder.table, dense.y_embedder.table[[1, 3]])
    assert torch.equal(model.y_embedder.null, dense.y_embedder.null)
    assert model.tailors.rows.abs().sum() > 0


def test_kindify_refuses_what_cannot_start_the_model():
    dense = _dense()
    with pytest.raises(KindifyError, match=r"class\(es\) e are not in"):
        kindify(dense, _kind_config(dense, ["a", "e"]))
    with pytest.raises(KindifyError, match="--size tiny/7"):
        kindify(_dense(), _kind_config(dense, ["a"], size="mini"))
    with pytest.raises(KindifyError, match="model.learn_sigma=false"):
        kindify(dense, _kind_config(dense, ["a"], learn_sigma=True))
    kind = kindify(dense, _kind_config(dense, ["a"]))
    with pytest.raises(KindifyError, match="kind-dit transfer"):
        kindify(kind, _kind_config(dense, ["a"]))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kindify")


@pytest.fixture(scope="module")
def dense_run(root):
    out = root / "dense"
    main(["train", "--model", "dense", "--data", "mnist:0-2", "--size", "tiny", "--out", str(out),
          *SHORT])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def kind_run(root, dense_run):
    out = root / "kind"
    main(["train", "--model", "kind", "--init-from", str(dense_run), "--data", "mnist:0-2",
          "--out", str(out), *SHORT])  # fmt: skip
    return out


def test_train_init_from_records_the_source(dense_run, kind_run):
    record = json.loads((kind_run / "run.json").read_text())["init_from"]
    weights = dense_run / "model" / "model.safetensors"
    assert record["path"] == str(dense_run.resolve())
    assert record["weights"] == str(weights.resolve())
    assert record["sha256"] == sha256_file(weights)
    config = json.loads((kind_run / "config.json").read_text())
    assert config["train"]["init_from"] == str(dense_run) and config["model"]["kind"]
    # --resume continues from the checkpoint; the init is not redone, the record stays
    main(["train", "--out", str(kind_run), "--resume", "--steps", "3"])
    run = json.loads((kind_run / "run.json").read_text())
    assert run["init_from"] == record and run["resumed"][0]["step"] == 2


def test_train_init_from_starts_from_the_dense_weights(dense_run, tmp_path):
    """The run's first weights are the dense model's (learngenes its leading SVD triples, the
    other weights and the label rows copied): at lr 1e-30 (below every weight's last bit; 0 is
    refused) they are what it exports."""
    out = tmp_path / "still"
    main(["train", "--model", "kind", "--init-from", str(dense_run), "--data", "mnist:0-2",
          "--out", str(out), *SHORT, "--set", "train.lr=1e-30"])  # fmt: skip
    dense, kind = load_model(dense_run)[0], load_model(out)[0]
    assert torch.equal(kind.x_embedder.weight, dense.x_embedder.weight)
    assert torch.equal(kind.y_embedder.table, dense.y_embedder.table)  # the same classes here
    for name, layer in kind.kind_layers():
        u, s, vh = torch.linalg.svd(dense.get_submodule(name).weight.double(), full_matrices=False)
        r = layer.rank_learngene
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert ((layer.learngene_weight().double() - best).norm() / best.norm()) < 1e-5, name


@pytest.mark.parametrize(
    ("source", "args", "reason"),
    [
        ("kind", ["--data", "mnist:0-2"], "kind-dit transfer"),
        ("dense", ["--data", "mnist:1-3"], "class(es) 3 are not in the dense model"),
        ("dense", ["--data", "mnist:0-2", "--size", "mini"], "--size tiny/7"),
        ("missing", ["--data", "mnist:0-2"], "holds no model"),
    ],
)
def test_train_init_from_refusals_write_nothing(root, dense_run, kind_run, tmp_path, capsys,
                                                source, args, reason):  # fmt: skip
    src = {"kind": kind_run, "dense": dense_run, "missing": tmp_path / "nothing"}[source]
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "kind", "--init-from", str(src), "--out", str(out), *args,
              *SHORT])  # fmt: skip
    assert e.value.code == 2 and reason in capsys.readouterr().err
    assert not out.exists()


def test_a_model_trained_from_an_imported_dit_names_its_licence(dense_run, tmp_path):
    """The imported weights' terms (DiT's are CC BY-NC 4.0) reach the trained model's card and
    the parts decomposed from it, not only run.json."""
    dense, diffusion, _ = load_model(dense_run)
    imported = {"format": "dit-official", "from": "/w/DiT-XL-2-256x256.pt",
                "license": "cc-by-nc-4.0", "notes": ["a note"]}  # fmt: skip
    save_model_dir(tmp_path / "imp", dense, diffusion,
                   {"source": imported["from"], "imported": imported})  # fmt: skip
    out = tmp_path / "kind"
    main(["train", "--model", "kind", "--init-from", str(tmp_path / "imp"), "--data", "mnist:0-2",
          "--out", str(out), *SHORT])  # fmt: skip
    record = json.loads((out / "run.json").read_text())["init_from"]
    assert record["imported"] == {k: v for k, v in imported.items() if k != "notes"}
    main(["decompose", str(out), "--out", str(tmp_path / "parts")])
    for card in (out / "model" / "README.md", tmp_path / "parts" / "README.md"):
        text = card.read_text()
        assert f"base model {(tmp_path / 'imp').resolve()} (licence: cc-by-nc-4.0)" in text, card
