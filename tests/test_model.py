"""The DiT, dense and KIND: shapes, the size registry, the class gate at model level."""

import re

import pytest
import torch

from kind.core.model import SIZES, DiT, ModelConfig, parse_size

NAMES = ["a", "b", "c", "d"]


def _model(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, **kw))
    with torch.no_grad():  # leave adaLN-Zero's identity start so every path carries signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batch(y):
    g = torch.Generator().manual_seed(1)
    y = torch.tensor(y)
    return (
        torch.randn(len(y), 1, 28, 28, generator=g),
        torch.randint(0, 1000, (len(y),), generator=g),
        y,
    )


@pytest.mark.parametrize("kind", [True, False])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(kind, learn_sigma):
    model = _model(kind=kind, learn_sigma=learn_sigma)
    x, t, y = _batch([0, 1, 4])
    assert model(x, t, y).shape == (3, 2 if learn_sigma else 1, 28, 28)


def test_a_sample_ignores_other_classes_tailors_and_label_rows():
    model = _model()
    x, t, y = _batch([0, 2, 1, 4, 2, 3])  # 4 = null class
    before = model(x, t, y)
    with torch.no_grad():
        model.tailors.rows[2].add_(torch.randn_like(model.tailors.rows[2]))
        model.y_embedder.table[2].add_(torch.randn_like(model.y_embedder.table[2]))
    after = model(x, t, y)
    other = y != 2
    assert torch.equal(before[other], after[other])
    assert not torch.allclose(before[~other], after[~other])


def test_sample_output_does_not_depend_on_the_batch_order():
    model = _model()
    x, t, y = _batch([3, 0, 4, 1, 0, 2])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(model(x, t, y)[perm], model(x[perm], t[perm], y[perm]))


def test_null_class_activates_no_tailor():
    model = _model()
    x, t, _ = _batch([0, 0])
    y = torch.full((2,), model.null_id)
    before = model(x, t, y)
    with torch.no_grad():
        model.tailors.rows.add_(torch.randn_like(model.tailors.rows))
    assert torch.equal(before, model(x, t, y))


def test_kind_and_dense_share_the_architecture():
    kind, dense = _model(kind=True), _model(kind=False)
    assert len(kind.kind_layers()) == 6 * SIZES["tiny"][0]
    assert not dense.kind_layers()
    names = {n.split(".tailors")[0].rsplit(".", 1)[0] for n in kind.part_state()}
    assert "blocks.0.attn.q" in names and "blocks.3.mlp.fc2" in names
    # every tailor and label row in two tensors, whatever the class count
    assert {n for n, _ in kind.named_parameters() if "tailors" in n or "y_embedder" in n} == {
        "tailors.rows",
        "y_embedder.table",
        "y_embedder.null",
    }


def test_group_map_shares_tailors_between_classes():
    model = _model(class_to_group=[0, 0, 1, 1])
    assert model.tailors.groups == [0, 1] and model.tailors.rows.shape[0] == 2


def test_unknown_class_is_refused_with_the_class_names():
    model = _model(groups=[1, 3])
    x, t, _ = _batch([0])
    with pytest.raises(ValueError, match=r"\['a'\].*holds \['b', 'd'\]"):
        model(x, t, torch.tensor([0]))


def test_a_model_without_tailors_still_refuses_classes_it_does_not_hold():
    x, t, _ = _batch([0])
    with pytest.raises(ValueError, match=r"\['a'\] are not in this model, which holds \[\]"):
        _model(groups=[])(x, t, torch.tensor([0]))  # learngenes only: the null class alone
    with pytest.raises(ValueError, match=r"\['7'\] are not in this model"):
        _model(kind=False)(x, t, torch.tensor([7]))  # an id past the dense model's classes


def test_null_tailor_groups_must_hold_the_null_group():
    with pytest.raises(ValueError, match="leaves out group 4, the null class's tailor"):
        _model(null_tailor=True, groups=[0, 1])


@pytest.mark.parametrize("kind", [True, False])
def test_a_model_cast_to_bf16_runs(kind):
    model = _model(kind=kind).to(torch.bfloat16)
    x, t, y = _batch([0, 2, 4])
    out = model(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_orthogonality_penalty_is_fp32_under_autocast():
    model = _model()
    rows = torch.tensor([0, 2])
    plain = model.orthogonality_penalty(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.orthogonality_penalty(rows), plain)


def test_adaln_can_be_decomposed_as_learngene_only():
    model = _model(decompose_adaln=True)
    layer = model.blocks[0].adaLN_modulation[-1]
    assert layer.rank_learngene == 64 and not layer.rank_tailor


@pytest.mark.parametrize(
    "name,expected",
    [
        ("DiT-B/2", ("DiT-B", 2)),
        ("DiT-XL/8", ("DiT-XL", 8)),
        ("tiny", ("tiny", 7)),
        ("mini/4", ("mini", 4)),
    ],
)
def test_size_names(name, expected):
    assert parse_size(name) == expected


@pytest.mark.parametrize("name", ["DiT-B/3", "huge", "DiT-B"])
def test_unknown_size_is_refused(name):
    with pytest.raises(ValueError, match="size"):
        parse_size(name)


def test_dit_sizes_match_the_paper():
    # (depth, hidden, heads) from Table 1 of the DiT paper; parameter count of DiT-S/2 ≈ 33M
    assert SIZES["DiT-XL"] == (28, 1152, 16) and SIZES["DiT-B"] == (12, 768, 12)
    dense = DiT(
        ModelConfig(
            size="DiT-S/2",
            kind=False,
            image_size=32,
            in_channels=4,
            class_names=[str(i) for i in range(1000)],
        )
    )
    n = sum(p.numel() for p in dense.parameters())
    assert 32e6 < n < 34e6


@pytest.mark.parametrize(
    ("saved", "needle"),
    [
        ({"class_names": [1, 2]}, "'class_names' is [1, 2], not a list[str]"),
        ({"class_names": None}, "'class_names' is None, not a list[str]"),
        ({"image_size": "28"}, "'image_size' is '28', not a int | None"),
        ({"kind": 1}, "'kind' is 1, not a bool"),
        ({"learngene_ranks": {"blocks.0.attn.q": "a"}}, "not a dict[str, int] | None"),
    ],
)
def test_a_damaged_saved_config_names_its_key(saved, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ModelConfig.from_dict({"class_names": NAMES} | saved)
    assert ModelConfig.from_dict({"class_names": NAMES, "rank_tailor": 2}).rank_tailor == 2
    with pytest.raises(ValueError, match="gives no image_size; a model needs both"):
        DiT(ModelConfig(class_names=NAMES, image_size=None))
