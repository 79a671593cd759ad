"""Baselines for novel classes: what trains, budget matching, export equivalence, Heur-LG's split,
and a real training run whose exported model loads back as a plain DiT."""

import shutil

import pytest
import torch

from cli_options import TRANSFER_SHORT
from kind.cli.main import main
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig, count_params
from kind.data.dataset import Dataset
from kind.store.load import load_model
from kind.store.modeldir import load_model_dir, save_model_dir
from kind.training.config import load_config
from kind.training.loop import train
from kind.transfer.baselines import RECIPES, adapt, export, size_for_budget, target_shapes
from kind.transfer.registry import METHODS
from kind.transfer.run import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["six", "seven", "eight", "nine"]
# KIND's transfer budget for a tiny model (hidden 128, depth 4, r_T 8): per class 4 blocks of
# 4 square tailors (8 x 257) + fc1, fc2 tailors (8 x 641 each), plus the class's label row.
KIND_BUDGET = len(NEW) * (4 * (4 * 8 * 257 + 2 * 8 * 641) + 128)

# which parameters each method trains, besides the new label rows (always)
TRAINS = {
    "full": lambda n: True,
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "pissa": lambda n: ".lora_A." in n or ".lora_B." in n,
    "oft": lambda n: ".oft_R." in n,
    "svdiff": lambda n: n.endswith(".delta"),
    "difffit": lambda n: n.endswith((".bias", ".gamma")),
    "heurlg": lambda n: True,
    "scratch": lambda n: True,
}
# methods that start from the source's function (everything inherited, adapters start as identity)
STARTS_AT_SOURCE = ("full", "lora", "pissa", "oft", "svdiff", "difffit")


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = DiT(ModelConfig(kind=False, class_names=[str(i) for i in range(6)]))
    with torch.no_grad():  # leave DiT's identity start so every block matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _batch(y, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(y)
    x = torch.randn(len(y), 1, 28, 28, generator=g)
    return x, torch.randint(0, 1000, (len(y),), generator=g), y


MIXED = [0, 1, 4, 2, 3, 4, 1]  # the new classes and the null class (4)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", RECIPES)
def test_adapted_model_runs_a_mixed_batch_of_new_classes_and_null(source, method):
    adapted = adapt(method, source, NEW, budget=KIND_BUDGET)
    assert adapted.model.config.class_names == NEW and not adapted.model.config.kind
    assert adapted.model.null_id == len(NEW)
    out = adapted.model(*_batch(MIXED))
    assert out.shape == (len(MIXED), 1, 28, 28) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", RECIPES)
def test_only_the_intended_parameters_train(source, method):
    adapted = adapt(method, source, NEW, budget=KIND_BUDGET)
    named = dict(adapted.model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    rows = {"y_embedder.table"}
    assert trained == {n for n in named if n in rows or TRAINS[method](n)}
    assert trained > rows  # something besides the label rows trains
    assert ("y_embedder.null" in trained) == (TRAINS[method]("y_embedder.null"))
    assert adapted.trainable == sum(named[n].numel() for n in trained)


def test_parameter_efficient_counts_for_the_kind_budget(source):
    counts = {m: adapt(m, source, NEW, budget=KIND_BUDGET).trainable for m in RECIPES}
    rows = len(NEW) * 128
    assert counts["lora"] == counts["pissa"] == 32 * 4 * (4 * 256 + 2 * 640) + rows
    assert counts["oft"] == 4 * (5 * 128 + 512) * 127 // 2 + rows  # block size 128
    assert counts["svdiff"] == 4 * 6 * 128 + rows  # fixed by the shapes
    n_dense = sum(p.numel() for p in adapt("full", source, NEW).model.parameters())
    assert counts["full"] == counts["heurlg"] == counts["scratch"] == n_dense
    lora = adapt("lora", source, NEW)
    assert count_params(export(lora.model)) == n_dense  # adapters merge away


def test_a_larger_budget_picks_a_larger_lora_rank_within_one_rank_step(source):
    shapes, rows = target_shapes(source), len(NEW) * 128
    step = sum(i + o for i, o in shapes)  # parameters one rank adds
    small, large = KIND_BUDGET // 3, KIND_BUDGET
    r_small, r_large = (size_for_budget("lora", shapes, b, rows) for b in (small, large))
    assert r_small < r_large
    for budget, rank in ((small, r_small), (large, r_large)):
        adapted = adapt("lora", source, NEW, budget=budget)
        assert f"rank {rank} " in adapted.detail
        assert abs(adapted.trainable - budget) <= step / 2


def test_the_label_rows_count_toward_the_budget_when_they_outweigh_a_rank_step(source):
    """At the paper's scale the new classes' label rows (461 × 1024) weigh about one LoRA rank
    step of DiT-L: left out of the sizing, the rank would overshoot the budget."""
    many = [f"c{i}" for i in range(160)]
    step = sum(i + o for i, o in target_shapes(source))
    assert len(many) * 128 > 2 * step  # the case: the rows outweigh two rank steps
    budget = len(many) * 128 + 8 * step
    adapted = adapt("lora", source, many, budget=budget)
    assert abs(adapted.trainable - budget) <= step / 2


def test_oft_rotations_stay_orthogonal_far_from_the_start(source):
    """OFT rotates each layer's input in orthogonal blocks, so every weight keeps its singular
    values however far training moves the generators (peft's default truncated Neumann series
    moved them far off at generator entries of 0.1, block size 128)."""
    adapted = adapt("oft", source, NEW, budget=10**9)  # the largest block size, 128
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if TRAINS["oft"](n):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    rotated, before = adapted.export(adapted.model).state_dict(), source.state_dict()
    layers = [k for k, w in before.items() if k.startswith("blocks.") and w.ndim == 2
              and not torch.equal(w, rotated[k])]  # fmt: skip
    assert len(layers) == 4 * 6  # q, k, v, proj, fc1, fc2 of the 4 blocks
    for k in layers:
        s0, s1 = (torch.linalg.svdvals(w.double()) for w in (before[k], rotated[k]))
        torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5 * s0.max().item(), msg=k)


def test_oft_block_size_divides_every_input_width(source):
    shapes = target_shapes(source)
    for budget in (1, KIND_BUDGET // 10, KIND_BUDGET, 10 * KIND_BUDGET):
        b = size_for_budget("oft", shapes, budget, 0)
        assert all(i % b == 0 for i, _ in shapes)


@pytest.mark.parametrize("method", RECIPES)
def test_source_model_is_left_untouched(source, method):
    before = {k: v.clone() for k, v in source.state_dict().items()}
    requires = {n: p.requires_grad for n, p in source.named_parameters()}
    adapted = adapt(method, source, NEW, budget=KIND_BUDGET)
    _perturb(adapted.model)
    adapted.export(adapted.model)
    after = source.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert requires == {n: p.requires_grad for n, p in source.named_parameters()}


@pytest.mark.parametrize("method", STARTS_AT_SOURCE)
def test_adaptation_starts_from_the_source_function(source, method):
    # the null row is inherited and every adapter starts as the identity, so the unconditional
    # model is the source's until training moves it
    adapted = adapt(method, source, NEW, budget=KIND_BUDGET).model.eval()
    x, t, _ = _batch([0] * 4)
    out = adapted(x, t, torch.full((4,), len(NEW)))
    ref = source(x, t, torch.full((4,), source.null_id))
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("method", RECIPES)
def test_export_computes_what_the_adapted_model_computes(source, method):
    adapted = adapt(method, source, NEW, budget=KIND_BUDGET)
    _perturb(adapted.model)  # non-trivial adapters, scales and shifts
    model = adapted.model.eval()
    dense = adapted.export(model)
    assert type(dense) is DiT and dense.config == model.config
    assert dense.state_dict().keys() == DiT(model.config).state_dict().keys()
    batch = _batch(MIXED)
    with torch.no_grad():
        assert _rel(dense(*batch), model(*batch)) <= 1e-5
    assert model(*batch).requires_grad  # the adapted model itself still trains


def test_heurlg_inherits_embedders_and_first_half_and_reinitialises_the_rest(source):
    model = adapt("heurlg", source, NEW).model
    own, src = model.state_dict(), source.state_dict()
    for name in ("x_embedder.weight", "t_embedder.mlp.0.weight", "y_embedder.null"):
        assert torch.equal(own[name], src[name]), name
    for name in own:
        if name.startswith(("blocks.0.", "blocks.1.")):
            assert torch.equal(own[name], src[name]), name
        elif name.startswith(("blocks.2.", "blocks.3.", "final_layer.")):
            assert not torch.equal(own[name], src[name]), name
    # DiT's init: adaLN-Zero, so a re-initialised block starts as the identity
    assert not model.blocks[2].adaLN_modulation[-1].weight.any()
    assert not model.final_layer.linear.weight.any()


def test_unknown_method_and_kind_source_are_refused(source):
    with pytest.raises(ValueError, match="unknown baseline 'adalora'.*lora"):
        adapt("adalora", source, NEW)
    with pytest.raises(ValueError, match="dense DiT.*inherit_learngenes"):
        adapt("lora", DiT(ModelConfig(class_names=["a"], rank_tailor=2)), NEW)


def test_lora_run_writes_a_plain_model_that_loads_back(source, tmp_path):
    adapted = adapt("lora", source, NEW, budget=KIND_BUDGET)
    cfg = load_config(
        overrides={
            "data": "mnist:6-9",
            "train": {
                "steps": 2,
                "batch_size": 8,
                "log_every": 1,
                "sample_every": 0,
                "checkpoint_every": 2,
                "warmup_steps": 1,
                "threads": 1,
            },
            "sample": {"steps": 2, "per_class": 1},
        }
    )
    cfg.model = adapted.model.config
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.arange(16) % len(NEW)
    before = {n: p.clone() for n, p in adapted.model.named_parameters()}
    result = train(
        cfg,
        tmp_path / "run",
        model=adapted.model,
        data=Dataset.from_tensors(images, labels, NEW),
        export=adapted.export,
    )
    moved = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(adapted.model.get_parameter(n).requires_grad for n in moved)
    loaded, _, _ = load_model_dir(tmp_path / "run" / "model")
    assert type(loaded) is DiT and loaded.config.class_names == NEW
    batch = _batch(MIXED)
    with torch.no_grad():
        assert _rel(loaded(*batch), result.model(*batch)) <= 1e-5


BASELINES = [m.name for m in METHODS.values() if not m.is_kind]
UNSIZED = [m.name for m in METHODS.values() if not m.is_kind and not m.budgeted]


@pytest.mark.parametrize("method", BASELINES)
def test_train_learngenes_is_refused_for_a_baseline(method, tmp_path):
    with pytest.raises(ValueError, match=f"--train-learngenes .*baseline '{method}' has none"):
        prepare(tmp_path / "dense", NEW, method, train_learngenes=True)


@pytest.mark.parametrize("method", BASELINES)
def test_a_group_file_is_refused_for_a_baseline(method, tmp_path):
    """It groups KIND's tailors; a baseline run would record it as its own and ignore it, and a
    comparison with a grouped KIND run would look matched when it was not."""
    with pytest.raises(ValueError, match=f"group_file groups KIND's tailors; baseline '{method}'"):
        prepare(tmp_path / "dense", NEW, method, class_to_group=[0] * len(NEW))


def test_a_budget_is_recorded_where_it_sized_the_adapter_and_refused_elsewhere(source, tmp_path):
    """The API as the CLI: a budget for a method it would not size is refused (the run would
    have recorded nothing of a budget it was given and ignored)."""
    save_model_dir(tmp_path / "dense", source, DiffusionConfig())
    assert prepare(tmp_path / "dense", NEW, "lora", budget=KIND_BUDGET).meta["budget"] == (
        KIND_BUDGET
    )
    with pytest.raises(ValueError, match="--method full trains what its architecture fixes"):
        prepare(tmp_path / "dense", NEW, "full", budget=KIND_BUDGET)


def _transfer_refused(tmp_path, capsys, *options):
    """The error line of a `kind-dit transfer` refused with `options`, before it wrote anything."""
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as e:
        main(["transfer", str(tmp_path / "dense"), "--data", "mnist:6", "--out", str(out),
              *TRANSFER_SHORT, *options])  # fmt: skip
    assert e.value.code == 2 and not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("method", UNSIZED)
def test_a_budget_for_a_baseline_it_does_not_size_is_refused(method, tmp_path, capsys):
    for option in (["--budget", "1000"], ["--match-kind", str(tmp_path / "parts")]):
        err = _transfer_refused(tmp_path, capsys, "--method", method, *option)
        assert f"{option[0]} sizes the adapter of methods lora, pissa, oft" in err, err
        assert f"--method {method} trains" in err


def test_budget_and_match_kind_together_are_refused(tmp_path, capsys):
    err = _transfer_refused(tmp_path, capsys, "--method", "lora", "--budget", "1000",
                            "--match-kind", str(tmp_path / "parts"))  # fmt: skip
    assert "--budget 1000 and --match-kind" in err and "pass one of them" in err, err


def test_an_unfinished_adapter_transfer_says_how_to_finish_it(source, tmp_path):
    """Its checkpoints hold peft's form, which only the transfer reads: `sample` of the run
    before its model/ is written names the run, the method and the resume (it said the weights
    were "saved for a different configuration")."""
    save_model_dir(tmp_path / "dense", source, DiffusionConfig())
    main(["transfer", str(tmp_path / "dense"), "--method", "lora", "--data", "mnist:6",
          "--out", str(tmp_path / "t"), *TRANSFER_SHORT])  # fmt: skip
    shutil.rmtree(tmp_path / "t" / "model")  # as if it had been stopped before its export
    with pytest.raises(ValueError, match=r"t is an unfinished `lora` transfer.*--resume --out"):
        load_model(tmp_path / "t")
