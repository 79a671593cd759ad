"""The null tailor (the null class's own tailor group) and σ-training transfer (kind-sigma): the null
class's outputs change with its tailor and only with it, and docs/KIND.md invariants 1-5 still hold."""

import pytest
import torch

from kind.core.decomposition import merge, split_state
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig
from kind.data.dataset import Dataset
from kind.store.parts import decompose, load_parts
from kind.store.sizes import size_table
from kind.training.config import load_config
from kind.training.loop import train
from kind.transfer.kind import inherit_learngenes

NAMES = ["zero", "one", "two"]
NULL = 3  # the null class id of a 3-class model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiT(ModelConfig(class_names=NAMES, rank_tailor=4, null_tailor=True))
    with torch.no_grad():  # leave the identity start so every tailor matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def parts(model, tmp_path_factory):
    return decompose(model, DiffusionConfig(), tmp_path_factory.mktemp("p") / "parts")


def _batch(y, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), 1, 28, 28, generator=g)
    return x, torch.randint(0, 1000, (len(y),), generator=g), torch.tensor(y)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _perturbed(model, group):
    """A copy of `model` with tailor `group`'s factors changed in every layer."""
    other = DiT(model.config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.tailors.rows[other.tailors.groups.index(group)].add_(0.5)
    return other


def test_the_null_class_has_its_own_group_after_the_class_groups(model):
    assert model.config.null_group == 3 and model.config.held_groups == [0, 1, 2, 3]
    assert model.slot_of.tolist() == [0, 1, 2, 3]  # bank rows of classes 0-2 and the null
    assert ModelConfig(class_names=NAMES).null_group is None  # off by default: no tailor


def test_null_outputs_change_with_the_null_tailor_and_only_with_it(model):
    x, t, y = _batch([0, 1, NULL, 2, NULL])
    null = y == NULL
    with torch.no_grad():
        base = model(x, t, y)
        changed = _perturbed(model, 3)(x, t, y)  # the null tailor
        class1 = _perturbed(model, 1)(x, t, y)  # a class tailor
    assert torch.equal(changed[~null], base[~null])  # invariant 1 for every class
    assert not torch.allclose(changed[null], base[null])
    assert torch.equal(class1[null], base[null])  # no class tailor reaches the null class


def test_decompose_and_assemble_keep_the_null_tailor_exact(model, parts):
    small, _, manifest = load_parts(parts, ["two"])
    assert small.config.held_groups == [2, 3]  # the asked class and the null tailor
    assert manifest["tailors"]["3"]["classes"] == []
    x, t, y = _batch([2, NULL, 2, NULL])
    with torch.no_grad():
        assert _rel(small(x, t, y), model(x, t, y)) <= 1e-6  # invariant 3
    rows = dict((name, p) for name, p, _ in size_table(parts))
    assert rows["null tailor (the unconditional model)"] == manifest["tailors"]["3"]["params"]


def test_merged_models_fold_the_null_tailor_into_the_unconditional_network(model):
    x, t, _ = _batch([0, 0, 0])
    null = torch.full((3,), NULL)
    with torch.no_grad():
        uncond = merge(model, None)  # invariant 4, for the unconditional model
        assert _rel(uncond(x, t, torch.full((3,), uncond.null_id)), model(x, t, null)) <= 1e-5
        merged = merge(model, "one")
        got = merged(x, t, torch.tensor([0, merged.null_id, 0]))
        assert _rel(got, model(x, t, torch.tensor([1, NULL, 1]))) <= 1e-5


def test_transfer_gives_a_fresh_null_tailor_and_carries_the_learngene_only(model, parts):
    new, _ = inherit_learngenes(parts, ["cat", "dog"], null_tailor=True, carry_tailors=True)
    learngene, source_tailors = split_state(model)
    own = new.part_state()
    for name, tensor in learngene.items():  # invariant 5
        assert torch.equal(own[name], tensor), name
    assert new.config.null_group == 2 and new.config.held_groups == [0, 1, 2]
    null_key = "blocks.0.attn.q.tailors.2.U"  # the new null tailor: fresh, not the source's
    assert not any(torch.equal(own[null_key], t[k]) for t in source_tailors.values() for k in t)
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    assert "tailors.rows" in trainable and "blocks.0.attn.q.U" not in trainable


def test_a_transfer_without_a_null_tailor_from_a_source_with_one_is_warned_about(parts, caplog):
    """The source's learngenes alone never were its unconditional model: guiding with them is
    allowed (an ablation) but said."""
    inherit_learngenes(parts, ["cat"], null_tailor=True)
    assert "pre-trained with a null tailor" not in caplog.text
    inherit_learngenes(parts, ["cat"])
    assert "pre-trained with a null tailor" in caplog.text and "--null-tailor" in caplog.text


def test_kind_sigma_trains_the_learngene_singular_values_only(parts):
    new, _ = inherit_learngenes(parts, ["cat"], train_sigma=True)
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    layers = [n for n, _ in new.kind_layers()]
    assert {f"{n}.S" for n in layers} <= trainable
    assert not any(f"{n}.{f}" in trainable for n in layers for f in ("U", "V"))
    plain, _ = inherit_learngenes(parts, ["cat"])
    n_sigma = sum(p.numel() for p in new.parameters() if p.requires_grad)
    n_plain = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert n_sigma - n_plain == sum(layer.rank_learngene for _, layer in new.kind_layers())


def test_a_step_without_the_null_class_leaves_the_null_tailor_unchanged(parts, tmp_path, caplog):
    """Invariant 2 for the null tailor: it is updated only by null-class (label-dropout) samples."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    data = Dataset.from_tensors(images, torch.tensor([0, 1] * 4), ["cat", "dog"])
    trained = {}
    for dropout in (0.0, 0.5):
        model, diffusion = inherit_learngenes(parts, ["cat", "dog"], null_tailor=True)
        cfg = load_config(overrides={"train": {"steps": 2, "batch_size": 8, "weight_decay": 0.1,
                                               "class_dropout": dropout, "sample_every": 0,
                                               "threads": 1}})  # fmt: skip
        cfg.model, cfg.diffusion = model.config, diffusion
        start = model.part_state()
        train(cfg, tmp_path / f"d{dropout}", model=model, data=data)
        trained[dropout] = (start, model.part_state())
    assert caplog.text.count("train.class_dropout is 0: it stays as initialised") == 1
    start, end = trained[0.0]
    null = [k for k in end if ".tailors.2." in k]
    assert null and all(torch.equal(start[k], end[k]) for k in null)
    assert not torch.equal(start["blocks.0.attn.q.tailors.0.U"], end["blocks.0.attn.q.tailors.0.U"])
    start, end = trained[0.5]
    assert not all(torch.equal(start[k], end[k]) for k in null)
