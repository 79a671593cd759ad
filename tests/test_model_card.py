"""Model cards: every model directory, run export and parts directory carries a README.md with
YAML front matter (Hugging Face style), left out of the directory's checksums (a user may edit
it), and the directory still loads."""

import json

import pytest
import yaml

from cli_options import SHORT
from kind.cli.main import main
from kind.io import verify_checksums
from kind.store.load import load_model
from kind.store.modeldir import write_card

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    main(["train", "--data", "mnist:0-2", "--size", "tiny", "--out", str(root / "run"), *SHORT])
    main(["decompose", str(root / "run"), "--out", str(root / "parts")])
    main(["assemble", str(root / "parts"), "--classes", "1,2", "--out", str(root / "asm")])
    return root


def _card(directory):
    text = (directory / "README.md").read_text()
    empty, head, body = text.split("---\n", 2)
    assert empty == ""
    return yaml.safe_load(head), body


@pytest.mark.parametrize(
    "where, names",
    [("run/model", ["0", "1", "2"]), ("parts", ["0", "1", "2"]), ("asm", ["1", "2"])],
)
def test_card_front_matter_and_body(root, where, names):
    front, body = _card(root / where)
    assert front["library_name"] == "kind-dit"
    assert front["license"] == "other" and "mnist:0-2" in front["license_note"]
    assert front["datasets"] == ["mnist:0-2"]
    assert {"kind-dit", "diffusion", "dit", "kind", "learngene"} <= set(front["tags"])
    assert f"classes ({len(names)}): " + ", ".join(f"`{n}`" for n in names) in body
    assert "kind-dit sample DIR" in body and "kind.store.load import load_model" in body
    assert "learngene" in body and "dense DiT of the same size" in body
    assert "training steps: 2" in body


def test_cards_can_be_edited_and_directories_still_load(root):
    for where in ("run/model", "asm"):
        sums = json.loads((root / where / "checksums.json").read_text())["sha256"]
        assert "README.md" not in sums and "model.safetensors" in sums
        assert verify_checksums(root / where)
        load_model(root / where)
    load_model(root / "parts", ["1"])
    (root / "asm" / "README.md").write_text("edited by its user")
    load_model(root / "asm")  # the weights are still verified; the card is the user's


def test_a_readme_already_there_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    write_card(tmp_path, "card")
    assert (tmp_path / "README.md").read_text() == "mine"
