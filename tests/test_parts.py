"""Decompose, assemble, merge and transfer: docs/KIND.md invariants 3, 4 and 5, and damaged parts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kind.core.decomposition import PartsError, merge, resolve_classes, split_state
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig
from kind.core.sampling import generate
from kind.io import OutputDirError
from kind.store.load import load_model
from kind.store.parts import assemble, decompose, load_learngene, load_parts
from kind.store.sizes import size_table
from kind.transfer.kind import inherit_learngenes, kind_budget
from kind.transfer.run import prepare

NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, rank_tailor=4))
    with torch.no_grad():  # leave the identity start so every class's tailors matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def parts(source, tmp_path_factory):
    return decompose(source, DiffusionConfig(), tmp_path_factory.mktemp("p") / "parts")


def _batch(y, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(y)
    x = torch.randn(len(y), 1, 28, 28, generator=g)
    return x, torch.randint(0, 1000, (len(y),), generator=g), y


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_assembled_model_equals_the_full_model_on_its_classes(source, parts):
    small, _, _ = load_parts(parts, ["one", "three"])
    x, t, y = _batch([1, 3, 4, 3, 1, 4])  # 4 = null
    assert _rel(small(x, t, y), source(x, t, y)) <= 1e-6
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for p in source.parameters())
    assert n_small < n_full


def test_assembled_model_refuses_other_classes(parts):
    small, _, _ = load_parts(parts, ["one"])
    x, t, _ = _batch([0])
    with pytest.raises(ValueError, match=r"\['zero'\].*holds \['one'\]"):
        small(x, t, torch.tensor([0]))
    with pytest.raises(PartsError, match="unknown class.*'seven'"):
        load_parts(parts, ["seven"])


def test_a_class_by_its_id_when_no_class_name_is_a_number(parts):
    """ImageNet's `--classes 207`, and the way to pick a name with a comma in it; a model whose
    names are numbers (MNIST's) reads a number as a name only."""
    small, _, _ = load_parts(parts, ["3", "one"])  # NAMES: zero .. three
    assert small.config.held_classes == [1, 3]
    with pytest.raises(PartsError, match=r"unknown class.*'7'.*\(or their class ids\)"):
        load_parts(parts, ["7"])
    digits = DiT(ModelConfig(class_names=["5", "6", "7"], rank_tailor=2))
    assert resolve_classes(digits.config, ["7"]) == [2]
    with pytest.raises(PartsError, match=r"unknown class.*'0'.*holds \['5', '6', '7'\]$"):
        resolve_classes(digits.config, ["0"])


def test_same_seed_gives_the_same_samples_from_parts_and_full_model(source, parts):
    small, diffusion, _ = load_parts(parts, ["two"])
    kw = dict(seed=3, steps=3, cfg_scale=2.0, sampler="ddpm")
    assert torch.equal(
        generate(source, diffusion, [2, 2], **kw), generate(small, diffusion, [2, 2], **kw)
    )
    with pytest.raises(ValueError, match="label list is empty"):
        generate(small, diffusion, [], **kw)


def test_a_class_draws_the_same_samples_whatever_else_is_drawn(source, parts):
    """A sample's noise is seeded by (seed, class, its index among the class's samples), not by
    its place in the list: class three alone, among other classes, and from a model assembled
    for it and one other class. (Up to one level of rounding: another batch shape may round
    the same numbers differently.)"""
    small, diffusion, _ = load_parts(parts, ["one", "three"])
    kw = dict(seed=3, steps=3, cfg_scale=2.0, sampler="ddpm")
    alone = generate(source, diffusion, [3, 3], **kw).int()
    for model, labels, rows in ((source, [1, 3, 0, 3], [1, 3]), (source, [3, 2, 3], [0, 2]),
                                (small, [1, 1, 3, 3], [2, 3])):  # fmt: skip
        drawn = generate(model, diffusion, labels, **kw).int()[rows]
        assert (drawn - alone).abs().max() <= 1, labels
    assert (alone[0] - alone[1]).abs().max() > 100  # a class's samples do not share their noise


def test_merged_class_model_matches_the_factored_model(source):
    merged = merge(source, "two")
    assert not merged.cond.kind_layers()
    x, t, _ = _batch([0, 0, 0])
    assert (
        _rel(merged(x, t, torch.tensor([0, 0, 0])), source(x, t, torch.tensor([2, 2, 2]))) <= 1e-5
    )
    null = torch.full((3,), source.null_id)
    assert _rel(merged(x, t, torch.full((3,), merged.null_id)), source(x, t, null)) <= 1e-5
    uncond = merge(source, None)
    assert _rel(uncond(x, t, torch.full((3,), uncond.null_id)), source(x, t, null)) <= 1e-5
    assert merge(source, "2").config.class_names == ["two"]  # by its id: named by its name


def test_merged_model_directory_round_trip(parts, source, tmp_path):
    out = assemble(parts, None, tmp_path / "m", merge_class="three")
    model, _, meta = load_model(out)
    assert meta["merged"] == "three"
    x, t, _ = _batch([0, 0])
    assert _rel(model(x, t, torch.tensor([0, 1])), source(x, t, torch.tensor([3, 4]))) <= 1e-5


def test_transfer_carries_the_learngene_bit_for_bit_and_nothing_class_specific(source, parts):
    model, _ = inherit_learngenes(parts, ["cat", "dog", "cow"])
    learngene, source_tailors = split_state(source)
    own = model.part_state()
    for name, tensor in learngene.items():
        assert torch.equal(own[name], tensor), name
    # no tensor of any new group is any source group's (names carry the group number, so values
    # are compared across all groups), and no label row is a source class's
    theirs = [t for group in source_tailors.values() for t in group.values()]
    for g, tensors in split_state(model)[1].items():
        for name, tensor in tensors.items():
            assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in theirs), (
                g, name)  # fmt: skip
    assert model.y_embedder.table.shape[0] == 3
    for row in model.y_embedder.table:
        assert not any(torch.equal(row, old) for old in source.y_embedder.table), row
    for name, p in model.named_parameters():
        specific = name in ("tailors.rows", "y_embedder.table")
        assert p.requires_grad == specific, name
    unfrozen, _ = inherit_learngenes(parts, ["cat"], train_learngenes=True)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_fresh_tailors_start_outside_the_transferred_learngene(parts):
    """KIND.md's initialisation: a new tailor's directions lie outside its layer's learngene
    subspace, the transferred one (not the random one the model was built with)."""
    model, _ = inherit_learngenes(parts, ["p", "q"])
    chunks = model.tailors.rows.detach().split(model.tailors.widths, dim=1)
    checked = 0
    for _, layer in model.gated:
        U, _, V = layer.unpack(chunks[layer.bank_slot])  # [G, out, r], [G, r], [G, in, r]
        if layer.rank_learngene + U.shape[0] * layer.rank_tailor > min(V.shape[1], U.shape[1]):
            continue  # no room outside the subspace
        for tailor, learngene in ((U, layer.U), (V, layer.V)):
            basis = torch.linalg.qr(learngene.detach().double())[0]  # [out, r_G]
            assert (basis.T @ tailor.double()).abs().max() < 1e-6  # [G, r_G, r]
        checked += 1
    assert checked


def test_a_transfer_trains_exactly_the_new_tailors_and_label_rows(parts):
    """The budget the baselines match (`kind_budget`): each new group's tailor row, every new
    class's label row, nothing else; counted by hand from the layers' shapes."""
    names = ["p", "q", "r"]
    model, _ = inherit_learngenes(parts, names)
    row = sum(m.rank_tailor * (m.in_features + m.out_features + 1) for _, m in model.gated)
    by_hand = len(set(model.config.tau)) * row + len(names) * model.x_embedder.out_channels
    assert kind_budget(parts, names) == prepare(parts, names).meta["trainable_params"] == by_hand


def test_learngene_of_another_shape_is_refused(parts):
    other = DiT(ModelConfig(class_names=["a"], rank_learngene=0.25))
    with pytest.raises(PartsError, match="shape.*learngene rank"):
        load_learngene(other, parts)


@pytest.mark.parametrize("damage", ["truncate", "swap", "delete", "flip"])
def test_damaged_part_file_is_refused(parts, tmp_path, damage):
    copy = shutil.copytree(parts, tmp_path / "copy")
    target = copy / "tailor_0001.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "swap":
        shutil.copy(copy / "tailor_0002.safetensors", target)
    elif damage == "delete":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(PartsError, match="tailor_0001.safetensors"):
        load_parts(copy, ["one"])
    load_parts(copy, ["two"])  # the intact parts still load


def test_a_part_file_replaced_after_its_hash_is_not_loaded_unverified(parts, tmp_path, monkeypatch):
    """A long-lived reader (`kind-dit serve` loads tailors hours after start) hashes a file, then
    reads it: another file renamed over it in between must not be what is loaded."""
    import kind.store.parts

    copy = shutil.copytree(parts, tmp_path / "copy")
    target = copy / "tailor_0001.safetensors"
    changed = {k: v + 1 for k, v in load_file(target).items()}  # the same part, other values
    save_file(changed, tmp_path / "new", metadata={"part": "1"})
    hashed = kind.store.parts.sha256_file

    def then_replaced(path):
        digest = hashed(path)
        if path == target:  # the verified file hashed, another renamed over it
            (tmp_path / "new").rename(target)
        return digest

    monkeypatch.setattr(kind.store.parts, "sha256_file", then_replaced)
    with pytest.raises(PartsError, match="tailor_0001.safetensors changed while it was read"):
        load_parts(copy, ["one"])


def test_manifest_records_sizes_and_classes(parts):
    manifest = json.loads((parts / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == NAMES
    assert manifest["tailors"]["2"]["classes"] == [2]
    for entry in [manifest["learngene"], *manifest["tailors"].values()]:
        assert (parts / entry["file"]).stat().st_size == entry["bytes"]
        assert entry["params"] > 0 and len(entry["sha256"]) == 64


def test_size_table_grows_with_classes_and_adds_up(parts, source):
    rows = {name: (params, size) for name, params, size in size_table(parts)}
    one, two, every = (rows[f"assembled: {k} tailor group(s)"][0] for k in ("1", "2", "all"))
    assert rows["learngene"][0] < one < two < every
    assert every == sum(p.numel() for p in source.parameters())


def test_decompose_will_not_overwrite(parts, source):
    with pytest.raises(OutputDirError, match="not empty"):
        decompose(source, DiffusionConfig(), parts)


def test_a_model_whose_parts_would_be_refused_is_not_decomposed(tmp_path):
    """Class names that repeat (a name picks its tailor): refused before anything is written,
    not written and then refused by every command that reads the parts."""
    twice = DiT(ModelConfig(class_names=["a", "b", "a"], rank_tailor=2))
    with pytest.raises(PartsError, match=r"cannot be decomposed: .*\['a'\] more than once"):
        decompose(twice, DiffusionConfig(), tmp_path / "parts")
    assert not list(tmp_path.iterdir())


def test_transfer_can_give_new_tailors_another_rank(parts, source):
    model, _ = inherit_learngenes(parts, ["cat"], rank_tailor=2)
    assert model.blocks[0].attn.q.rank_tailor == 2
    learngene = split_state(source)[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in learngene.items())
    with pytest.raises(PartsError, match="source's tailor rank"):
        inherit_learngenes(parts, ["cat"], rank_tailor=2, carry_tailors=True)


def test_carried_tailors_start_from_the_source(parts, source):
    model, _ = inherit_learngenes(parts, ["a", "b"], carry_tailors=True)
    own, src = model.part_state(), source.part_state()
    assert torch.equal(own["blocks.1.mlp.fc2.tailors.1.V"], src["blocks.1.mlp.fc2.tailors.1.V"])
    assert not torch.equal(own["y_embedder.rows.1"], src["y_embedder.rows.1"])


def test_parts_of_an_assembled_model_hold_exactly_its_classes(source, parts, tmp_path):
    """Decomposing an assembled model gives parts of its classes alone: they assemble (every
    class they hold, by default) to the assembled model bit for bit, with its tailor files'
    bytes, and refuse the classes it dropped by name."""
    small, diffusion, _ = load_parts(parts, ["one", "three"])
    sub = decompose(small, diffusion, tmp_path / "sub")
    again, _, manifest = load_parts(sub)
    assert again.config.held_classes == [1, 3]
    x, t, y = _batch([1, 3, 4, 3])
    assert torch.equal(again(x, t, y), small(x, t, y))
    for g in ("1", "3"):
        assert (
            manifest["tailors"][g]["sha256"]
            == json.loads((parts / "manifest.json").read_text())["tailors"][g]["sha256"]
        )
    with pytest.raises(PartsError, match=r"unknown class.*'zero'.*holds \['one', 'three'\]"):
        load_parts(sub, ["zero"])


def _edit_manifest(parts, tmp_path, edit):
    """A copy of `parts` whose manifest `edit` (a function of the parsed manifest) changed."""
    copy = shutil.copytree(parts, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_class_whose_tailor_the_parts_lack_is_refused_by_name(parts, tmp_path):
    """Parts an older kind-dit decomposed from an assembled model list every class in their
    model config but hold only some tailors: the others are refused by name, the held ones load."""

    def drop_zero(manifest):
        del manifest["tailors"]["0"]
        manifest["classes"] = manifest["classes"][1:]

    copy = _edit_manifest(parts, tmp_path, drop_zero)
    with pytest.raises(PartsError, match=r"no tailor for 'zero'; .*\['one', 'two', 'three'\]"):
        load_parts(copy)
    load_parts(copy, ["one", "two"])


def _set(path, value):
    """A manifest edit setting the value at `path` (keys)."""

    def edit(manifest):
        *head, last = path
        for key in head:
            manifest = manifest[key]
        manifest[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            _set(["model", "class_to_group"], [0, 1, 2, 7]),
            "class 3 as 'three' in group 3, its model",
        ),
        (
            _set(["model", "class_names"], ["zero", "one", "two", "one"]),
            r"\['one'\] more than once",
        ),
        (_set(["model", "class_to_group"], [0, 1, 2]), "one group for each of 4 classes"),
        (_set(["model", "depth"], 3), "unknown model config keys"),
        (_set(["tailors", "1", "sha256"], None), "tailor 1 entry lacks a valid sha256"),
        (_set(["learngene", "file"], "../learngene.safetensors"), "not a file of the directory"),
        (_set(["tailors", "x"], {}), "tailor x entry lacks a valid file"),
        (_set(["classes"], [{"id": 9}]), "class id 9, not one class"),
        (_set(["latent"], "x"), "latent is 'x', not a JSON object"),
        (_set(["grafted"], {}), r"grafted is \{\}, not a JSON array"),
        (_set(["tailors", "1", "classes"], [9]), r"tailor entry 1 lists class\(es\) \[9\]"),
        (_set(["tailors", "1", "classes"], [2]), r"\[2\], not classes of group 1"),
        (_set(["tailors", "1", "classes"], ["1"]), "not a group number with a list of class ids"),
        (_set(["model", "class_names"], [0, 1, 2, 3]), "'class_names' is .*not a list.str."),
    ],
)
def test_a_damaged_manifest_is_refused_naming_the_problem(parts, tmp_path, edit, problem):
    copy = _edit_manifest(parts, tmp_path, edit)
    with pytest.raises(PartsError, match=f"manifest.json: .*{problem}.*the file is damaged"):
        load_parts(copy, ["three"])


def test_a_transfer_start_leaves_the_callers_random_stream_alone(parts):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    inherit_learngenes(parts, ["p"], seed=1)
    assert torch.equal(torch.rand(3), expected)
