"""The bundled ImageNet-611 class map and lists (``src/kind/assets/imagenet611``), and the script
that makes them (``scripts/build_imagenet611.py``).

The counts tests read only the shipped files and never skip. The regeneration test needs WordNet
3.0's ``data.noun`` (``apt-get install wordnet-base``) and timm's ``imagenet_synsets.txt`` (an
installed ``timm``, or the file's path in ``KIND_IMAGENET_SYNSETS``); it skips when either is
missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from kind.data.images import _read_list

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "kind" / "assets" / "imagenet611"
WNID = re.compile(r"n\d{8}")


def _script():
    spec = importlib.util.spec_from_file_location(
        "build_imagenet611", ROOT / "scripts" / "build_imagenet611.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _script()


def _classmap() -> dict[str, list[str]]:
    return json.loads((ASSETS / "classmap.json").read_text())


def test_shipped_files_partition_the_1000_synsets_into_611_classes():
    merged = _classmap()
    assert len(merged) == 611
    assert list(merged) == sorted(merged)
    members = [m for ids in merged.values() for m in ids]
    assert len(members) == len(set(members)) == 1000  # every synset exactly once
    assert all(WNID.fullmatch(s) for s in [*merged, *members])
    for name, ids in merged.items():
        assert ids == sorted(ids) and ids
        if len(ids) == 1:
            assert ids == [name]  # a class never merged keeps its own id
        elif name in members:
            assert name in ids  # an anchor is never a class of another cluster

    pretrain = _read_list("@" + str(ASSETS / "pretrain.txt"))
    novel = _read_list("@" + str(ASSETS / "novel.txt"))
    assert len(pretrain) == len(set(pretrain)) == 150
    assert len(novel) == len(set(novel)) == 461
    assert pretrain == sorted(pretrain) and novel == sorted(novel)
    assert not set(pretrain) & set(novel)
    assert set(pretrain) | set(novel) == set(merged)
    assert all(WNID.fullmatch(s) for s in pretrain + novel)  # comments stripped


def test_list_comments_give_lemma_and_size():
    merged = _classmap()
    for name in ("pretrain.txt", "novel.txt"):
        for line in (ASSETS / name).read_text().splitlines():
            if line.startswith("#"):
                continue
            wnid, comment = line.split("  # ")
            lemma, count = re.fullmatch(r"(\S+) \((\d+) synsets?\)", comment).groups()
            assert int(count) == len(merged[wnid]), line


def test_merge_rule_on_a_toy_tree():
    S = build.Synset
    # entity(root) > a > {b > {c1, c2, c3}, d > {c4, c5}}, e > c6: d (2 classes) merges first,
    # then b (3), then a (5), as far as the target allows.
    synsets = {
        build.ROOT: S("entity", None),
        "n00000001": S("a", build.ROOT),
        "n00000002": S("b", "n00000001"),
        "n00000003": S("d", "n00000001"),
        "n00000004": S("e", build.ROOT),
        **{f"n0000001{i}": S(f"c{i}", "n00000002") for i in (1, 2, 3)},
        **{f"n0000001{i}": S(f"c{i}", "n00000003") for i in (4, 5)},
        "n00000016": S("c6", "n00000004"),
    }
    classes = [f"n0000001{i}" for i in range(1, 7)]
    assert build.merge(classes, synsets, target=5) == {
        "n00000003": ["n00000014", "n00000015"],
        **{c: [c] for c in ("n00000011", "n00000012", "n00000013", "n00000016")},
    }
    assert build.merge(classes, synsets, target=3) == {
        "n00000002": ["n00000011", "n00000012", "n00000013"],
        "n00000003": ["n00000014", "n00000015"],
        "n00000016": ["n00000016"],
    }
    # 3 would need b (-2) after d (-1); from 6, target 4 skips b, and a (-2 more) overshoots too
    with pytest.raises(build.BuildError, match="not 4"):
        build.merge(classes, synsets, target=4)
    pre, novel = build.split([f"x{i}" for i in range(10)], n_first=3, seed=0)
    assert (
        len(pre) == 3
        and pre == sorted(pre)
        and sorted(pre + novel) == sorted(f"x{i}" for i in range(10))
    )


def test_read_wordnet_takes_first_hypernym_else_instance_hypernym(tmp_path):
    def entry(offset: int, words: list[str], pointers: list[tuple[str, int]]) -> str:
        ws = " ".join(f"{w} 0" for w in words)
        ps = "".join(f" {sym} {off:08d} n 0000" for sym, off in pointers)
        return f"{offset:08d} 03 n {len(words):02x} {ws} {len(pointers):03d}{ps} | a gloss  \n"

    licence = "  1 licence text  \n" * 91  # header lines start with a space
    header = licence + " " * (1740 - len(licence) - 1) + "\n"  # the root sits at byte 1740
    synsets = [  # words, pointers as (symbol, index of the target in this list)
        (["entity"], [("~", 1)]),
        (["thing", "object"], [("~", 3), ("@", 0)]),
        (["place"], [("@", 0)]),
        (["Paris"], [("+", 1), ("@i", 2)]),  # an instance hypernym only
        (["town"], [("@", 2), ("@", 1), ("@i", 0)]),  # the first @ wins
    ]
    offsets, pos = [], len(header)
    for words, pointers in synsets:  # fields are fixed width: lengths do not depend on offsets
        offsets.append(pos)
        pos += len(entry(0, words, pointers))
    body = [entry(o, w, [(s, offsets[i]) for s, i in p]) for o, (w, p) in zip(offsets, synsets)]
    path = tmp_path / "data.noun"
    path.write_text(header + "".join(body))

    read = build.read_wordnet(path)
    ids = [f"n{o:08d}" for o in offsets]
    assert ids[0] == build.ROOT and read[ids[0]] == build.Synset("entity", None)
    assert read[ids[1]] == build.Synset("thing", build.ROOT)
    assert read[ids[3]] == build.Synset("Paris", ids[2])
    assert read[ids[4]] == build.Synset("town", ids[2])
    assert build.tree_path(ids[3], read) == [build.ROOT, ids[2], ids[3]]

    body[1] = body[1].replace(f"{offsets[1]:08d} 03", f"{offsets[1] + 1:08d} 03", 1)
    path.write_text(header + "".join(body))  # an offset that is not the line's byte offset
    with pytest.raises(build.BuildError, match="line 94"):
        build.read_wordnet(path)


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"n{i:08d}\n" for i in range(1000)))
    assert build.main(["--wordnet", str(tmp_path / "none"), "--synsets", str(synsets)]) == 1
    assert "wordnet-base" in capsys.readouterr().err
    assert build.main(["--synsets", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 1
    assert "pip download --no-deps timm" in capsys.readouterr().err
    synsets.write_text("n01440764\nn01440764\n")
    with pytest.raises(build.BuildError, match="distinct"):
        build.read_synsets(synsets.read_text())
    assert not list(tmp_path.glob("*.json"))


def _inputs() -> tuple[Path, Path | None]:
    """(data.noun, synset list or None for the installed timm's), or skip."""
    if not build.DEFAULT_WORDNET.is_file():
        pytest.skip(
            f"WordNet 3.0 not installed ({build.DEFAULT_WORDNET}; apt-get install wordnet-base)"
        )
    env = os.environ.get("KIND_IMAGENET_SYNSETS")
    if env:
        return build.DEFAULT_WORDNET, Path(env)
    try:
        build.default_synsets()
    except build.BuildError:
        pytest.skip(
            "timm's imagenet_synsets.txt not available (install timm or set KIND_IMAGENET_SYNSETS "
            "to the file from `pip download --no-deps timm`)"
        )
    return build.DEFAULT_WORDNET, None


def test_regenerating_gives_the_shipped_files(tmp_path, capsys, monkeypatch):
    wordnet, synsets = _inputs()
    monkeypatch.setattr(
        build, "read_wordnet", functools.lru_cache(build.read_wordnet)
    )  # parse once
    files = build.build(wordnet, synsets)
    for name in build.FILES:
        assert files[name] == (ASSETS / name).read_text(), f"{name} differs; regenerate it"

    source = ["--wordnet", str(wordnet)] + (["--synsets", str(synsets)] if synsets else [])
    out = ["--out-dir", str(tmp_path)]
    assert build.main(source + ["--check"]) == 0  # the shipped files
    assert build.main(source + out) == 0
    assert build.main(source + out) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert build.main(source + out + ["--check"]) == 0
    (tmp_path / "novel.txt").write_text("n01440764\n")
    assert build.main(source + out + ["--check"]) == 1
    assert "novel.txt" in capsys.readouterr().err
    assert build.main(source + out + ["--overwrite"]) == 0
    assert (tmp_path / "novel.txt").read_text() == files["novel.txt"]
