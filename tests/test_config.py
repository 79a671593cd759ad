"""Configuration: files, --set overrides, and clear errors for wrong keys and types."""

from pathlib import Path

import pytest

from kind.core.diffusion import DiffusionConfig
from kind.core.gated import resolve_rank
from kind.training.config import load_config, parse_overrides, read_group_file

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
CONFIGS = [p for p in CONFIGS if "groups" not in p.name]


def test_overrides_parse_yaml_scalars():
    ov = parse_overrides(["train.lr=3e-4", "model.kind=false", "diffusion.min_snr_gamma=null",
                          "data=mnist:6,7"])  # fmt: skip
    assert ov == {"train": {"lr": 3e-4}, "model": {"kind": False},
                  "diffusion": {"min_snr_gamma": None}, "data": "mnist:6,7"}  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size > 0 and cfg.sample.steps > 0


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rate'.*\blr\b"):
        load_config(overrides={"train": {"learning_rate": 1}})


def test_a_saved_diffusion_config_with_an_unknown_key_names_it():
    with pytest.raises(ValueError, match=r"unknown diffusion config keys \['bogus'\]"):
        DiffusionConfig.from_dict({"prediction": "eps", "bogus": 1})
    with pytest.raises(ValueError, match="a mapping of settings"):
        DiffusionConfig.from_dict([1])
    assert DiffusionConfig.from_dict({"prediction": "eps"}).prediction == "eps"


def test_wrong_type_is_refused():
    with pytest.raises(ValueError, match="train.steps.*expects a int"):
        load_config(overrides={"train": {"steps": "many"}})
    with pytest.raises(ValueError, match="diffusion.prediction must be one of"):
        load_config(overrides={"diffusion": {"prediction": "x0"}})
    # a field whose default is None takes its annotated type only (any value passed before)
    for key, value, kind in [("learngene_ranks", [1], r"dict\[str, int\] \| None"),
                             ("class_to_group", {"a": 1}, r"list\[int\] \| None")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"'model.{key}' expects a {kind}, got"):
            load_config(overrides={"model": {key: value}})
    ov = {"train": {"micro_batch_size": 2, "grad_clip": 1}, "model": {"class_to_group": [0, 0]}}
    cfg = load_config(overrides=ov)
    assert cfg.train.micro_batch_size == 2 and type(cfg.train.grad_clip) is float


def test_ints_widen_to_floats():
    assert load_config(overrides={"train": {"lr": 1}}).train.lr == 1.0


def test_a_tailor_rank_given_as_a_float_or_a_fraction_saves_and_resumes():
    """`transfer --rank-tailor 4` saves 4.0, which the resume reads back as its base; a fraction
    of min(in, out) is a rank too (both were refused as "expects a int")."""
    for rank in (4.0, 0.25, 2):
        saved = load_config(overrides={"model": {"rank_tailor": rank}}).to_dict()
        assert load_config(base=saved).model.rank_tailor == rank
    with pytest.raises(ValueError, match=r"model.rank_tailor = 2.5 is out of range.*whole count"):
        load_config(overrides={"model": {"rank_tailor": 2.5}})
    # the learngene's rank too (2.5 trained with 2 silently), and each rank by its key
    for model, message in [({"rank_learngene": 2.5}, r"model.rank_learngene = 2.5 .*whole count"),
                           ({"rank_learngene": -1}, r"model.rank_learngene = -1.0 .* >= 0"),
                           ({"rank_tailor": 200}, r"model.rank_tailor = 200.0 .*up to 128 \(the "
                                                  "width of size tiny"),
                           ({"rank_learngene": 0.003}, r"0.003 .* rounds to none")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_config(overrides={"model": model})
    assert resolve_rank(2.5, 64, 32) == 2  # a model an older version saved with 2.5 still loads


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_without_a_dot_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n")
    assert load_config(tmp_path / "c.yaml").train.lr == 1e-4


def test_a_group_file_that_is_not_a_path_or_not_there_is_named(tmp_path):
    with pytest.raises(ValueError, match="'group_file' expects a str | None, got 5"):
        load_config(overrides={"group_file": 5})
    with pytest.raises(FileNotFoundError, match="group_file .*nope.yaml does not exist"):
        read_group_file(str(tmp_path / "nope.yaml"), ["a"])
