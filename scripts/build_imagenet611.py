"""Build the bundled ``imagenet611`` class map and its pre-training / novel class lists.

    python scripts/build_imagenet611.py               # writes src/kind/assets/imagenet611/*
    python scripts/build_imagenet611.py --overwrite   # ... replacing the shipped files
    python scripts/build_imagenet611.py --check       # compare with the shipped files, write nothing
    python scripts/build_imagenet611.py --synsets imagenet_synsets.txt --wordnet data.noun

Why: the KIND paper (ICML 2025) merges the 1,000 ILSVRC-2012 classes through their WordNet
superclasses into 611 classes, pre-trains on 150 of them and keeps 461 as novel, but its lists
are not published. This script *reconstructs* such lists deterministically from two offline
sources, so anyone can remake (and check) the shipped files:

- WordNet 3.0's noun database ``data.noun`` (Debian/Ubuntu package ``wordnet-base``, installed at
  ``/usr/share/wordnet/data.noun``). An ILSVRC synset id ``n01440764`` is the noun synset at byte
  offset 01440764 of that file.
- The 1,000 ILSVRC-2012 synset ids, in class order: ``timm/data/_info/imagenet_synsets.txt`` from
  the ``timm`` package (found in an installed ``timm`` without importing it, or ``--synsets``;
  get the file with ``pip download --no-deps timm`` and unzip the wheel).

The merge rule:

1. Every class gets its WordNet *tree path*: from the class's synset, follow the FIRST hypernym
   pointer (the first ``@`` pointer in data-file order; if the synset has none, its first ``@i``
   instance-hypernym pointer) up to the root ``entity`` (n00001740). WordNet is a DAG (a synset
   may have several hypernyms); taking the first one makes it a tree, so every class hangs under
   exactly one chain of superclasses. The depth of a node is its distance from ``entity``.
2. Start with every class its own cluster (1,000 clusters).
3. Visit the tree's internal nodes (nodes that are ancestors of at least two classes) from the
   one with the fewest classes under it to the one with the most, ties broken by depth (deepest
   first), then by offset: the tightest superclasses first, e.g. "domestic cat" (7 breeds) before
   "feline", "feline" before "carnivore". At each node, merging every current cluster lying under
   it into one cluster lowers the count by (clusters under it - 1); do it if the count stays
   >= 611, otherwise skip the node (and go on: a larger node may still hold just 2 clusters).
   Stop when the count is exactly 611 (the greedy pass lands on it exactly for ILSVRC-2012; if a
   future input does not, the script stops with an error rather than bend the rule).
   Why this order and not deepest-first: WordNet's animal branch is far deeper than its artifact
   branch, so deepest-first spends almost every merge on animals and ends with one "carnivore"
   class of 158 synsets (every dog breed, the cats and the bears) beside 556 untouched classes;
   fewest-first merges sibling classes everywhere and no merged class exceeds 7 synsets, which is
   what "merge similar classes by superclass" asks for at this count.
4. A merged cluster is named by its *anchor*, the synset id of the superclass it was last merged
   under; a class never merged keeps its own synset id. So every class name is a WordNet id.

The split: sort the 611 names, shuffle them with ``random.Random(0)`` (``SEED``); the first 150
are the pre-training classes, the other 461 the novel ones. Each list is written sorted, one id a
line with a comment ``  # <first lemma of the name's synset> (<k> synsets)`` (``1 synset``); ``#`` comments are
skipped by the project's list reader (``kind.data.images._read_list``).

Outputs (in ``src/kind/assets/imagenet611/`` unless ``--out-dir``): ``classmap.json`` (a JSON
object {merged id: [member synset ids, sorted]}, keys sorted), ``pretrain.txt``, ``novel.txt``.
Existing files are only replaced with ``--overwrite``. Same inputs -> same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

DEFAULT_WORDNET = Path("/usr/share/wordnet/data.noun")  # Debian/Ubuntu package wordnet-base
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "kind" / "assets" / "imagenet611"
TIMM_SYNSETS = ("timm", "data/_info/imagenet_synsets.txt")  # package, file inside it
ROOT = "n00001740"  # entity.n.01
N_CLASSES = 1000  # ILSVRC-2012
N_MERGED = 611
N_PRETRAIN = 150
SEED = 0
WNID = re.compile(r"n\d{8}")
FILES = ("classmap.json", "pretrain.txt", "novel.txt")
REGENERATE = "python scripts/build_imagenet611.py --overwrite"


class BuildError(Exception):
    """A missing or malformed input, or an output that would be overwritten: said in words."""


class Synset(NamedTuple):
    """What the merge needs of one WordNet noun synset."""

    lemma: str  # first word of the synset, underscores kept
    parent: str | None  # first hypernym (``@``, else ``@i``) as ``n<offset>``; None for the root


# ---------------------------------------------------------------- inputs


def read_wordnet(path: Path) -> dict[str, Synset]:
    """Every noun synset of a WordNet 3.0 ``data.noun``: id ``n<offset>`` -> (first lemma, first
    hypernym). Checks the file's own invariant (each line's offset field is its byte offset)."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(
            f"WordNet noun database {path} not found. Install WordNet 3.0 (Debian/Ubuntu: "
            "`apt-get install wordnet-base`, which puts it at /usr/share/wordnet/data.noun) or "
            "pass its data.noun with --wordnet."
        )
    synsets: dict[str, Synset] = {}
    position = 0
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        offset, position = position, position + len(raw)
        if raw[:1] == b" ":  # the licence header
            continue
        try:
            line = raw.decode("utf-8")
            fields = line.split(" | ", 1)[0].split()
            if int(fields[0]) != offset or fields[2] != "n":
                raise ValueError("offset or part of speech")
            n_words = int(fields[3], 16)
            lemma = fields[4]
            i = 4 + 2 * n_words
            n_pointers = int(fields[i])
            pointers = [fields[i + 1 + 4 * k : i + 5 + 4 * k] for k in range(n_pointers)]
            if any(len(p) != 4 for p in pointers):
                raise ValueError("pointer count")
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise BuildError(
                f"{path}, line {number}: not a WordNet 3.0 data.noun synset line ({err}); "
                "pass an unmodified data.noun with --wordnet."
            ) from None
        hypernyms = [p for p in pointers if p[0] == "@" and p[2] == "n"]
        hypernyms = hypernyms or [p for p in pointers if p[0] == "@i" and p[2] == "n"]
        parent = "n" + hypernyms[0][1] if hypernyms else None
        synsets["n" + fields[0]] = Synset(lemma, parent)
    if ROOT not in synsets or synsets[ROOT].parent is not None:
        raise BuildError(f"{path} has no root synset entity ({ROOT}); is it WordNet 3.0?")
    return synsets


def default_synsets() -> str:
    """The ILSVRC-2012 synset list shipped in an installed ``timm``, as text. The package is
    located, not imported (importing timm pulls torch and torchvision, which this does not need)."""
    package, name = TIMM_SYNSETS
    spec = importlib.util.find_spec(package)
    for folder in (spec and spec.submodule_search_locations) or ():
        if (path := Path(folder) / name).is_file():
            return path.read_text(encoding="utf-8")
    raise BuildError(
        f"no synset list given and {package}/{name} is not available from an installed "
        "timm. Get it without installing timm: `pip download --no-deps timm -d /tmp/timm`, "
        f"`unzip /tmp/timm/timm-*.whl {package}/{name} -d /tmp/timm`, then pass "
        f"--synsets /tmp/timm/{package}/{name}."
    )


def read_synsets(text: str, where: str = "synset list") -> list[str]:
    """The 1,000 ILSVRC-2012 synset ids, one a line, checked: ``n`` + 8 digits, all distinct."""
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [s for s in ids if not WNID.fullmatch(s)]
    if bad:
        raise BuildError(f"{where}: {bad[0]!r} is not a synset id like n01440764.")
    if len(set(ids)) != len(ids) or len(ids) != N_CLASSES:
        raise BuildError(
            f"{where}: {len(set(ids))} distinct ids in {len(ids)} lines; the ILSVRC-2012 list "
            f"has {N_CLASSES} distinct ids (timm's imagenet_synsets.txt)."
        )
    return ids


# ---------------------------------------------------------------- the rule


def tree_path(wnid: str, synsets: dict[str, Synset]) -> list[str]:
    """The first-hypernym chain of a synset, root (``entity``) first, the synset itself last."""
    if wnid not in synsets:
        raise BuildError(f"synset {wnid} is not a noun synset of the WordNet data.noun given.")
    path = [wnid]
    while (parent := synsets[path[-1]].parent) is not None:
        if parent not in synsets or parent in path:
            raise BuildError(f"the hypernym chain of {wnid} breaks at {parent}; check data.noun.")
        path.append(parent)
    if path[-1] != ROOT:
        raise BuildError(f"the hypernym chain of {wnid} ends at {path[-1]}, not entity ({ROOT}).")
    return path[::-1]


def merge(
    classes: Sequence[str], synsets: dict[str, Synset], target: int = N_MERGED
) -> dict[str, list[str]]:
    """Merge classes through their first-hypernym tree, tightest superclasses first, down to
    ``target`` clusters (see the module docstring): merged name -> member ids, both sorted."""
    paths = {c: tree_path(c, synsets) for c in classes}
    under: dict[str, list[str]] = {}  # node -> the classes below it (or it), in class order
    depth: dict[str, int] = {}
    for c, path in paths.items():
        for d, node in enumerate(path):
            under.setdefault(node, []).append(c)
            depth[node] = d
    internal = sorted(
        (n for n, cs in under.items() if len(cs) >= 2),
        key=lambda n: (len(under[n]), -depth[n], int(n[1:])),
    )
    cluster = {c: c for c in classes}  # class -> its cluster's name (anchor)
    count = len(classes)
    for node in internal:
        if count == target:
            break
        names = {cluster[c] for c in under[node]}
        if len(names) < 2 or count - (len(names) - 1) < target:
            continue  # nothing to merge, or it would overshoot: skip the node
        for c in under[node]:
            cluster[c] = node
        count -= len(names) - 1
    if count != target:
        raise BuildError(
            f"greedy superclass merging ends at {count} classes, not {target}; the rule needs "
            "adapting for this input."
        )
    merged: dict[str, list[str]] = {}
    for c in sorted(classes):
        merged.setdefault(cluster[c], []).append(c)
    return dict(sorted(merged.items()))


def split(
    names: Iterable[str], n_first: int = N_PRETRAIN, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """(pre-training, novel) names: the sorted names shuffled by ``random.Random(seed)``, first
    ``n_first`` and the rest, each returned sorted."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return sorted(order[:n_first]), sorted(order[n_first:])


# ---------------------------------------------------------------- outputs


def render(classes: Sequence[str], synsets: dict[str, Synset]) -> dict[str, str]:
    """The three output files' text (file name -> text) for the given classes."""
    merged = merge(classes, synsets)
    pretrain, novel = split(merged)

    def listing(title: str, names: list[str]) -> str:
        head = (
            f"# ImageNet-611 {title}: {len(names)} of the {len(merged)} merged classes "
            f"(sorted names shuffled with random.Random({SEED}), first {N_PRETRAIN} = pre-train, "
            f"rest = novel).\n# Regenerate: {REGENERATE} (see README.md beside this file).\n"
        )
        rows = []
        for name in names:
            k = len(merged[name])
            rows.append(f"{name}  # {synsets[name].lemma} ({k} synset{'' if k == 1 else 's'})\n")
        return head + "".join(rows)

    return {
        "classmap.json": json.dumps(merged, indent=1) + "\n",
        "pretrain.txt": listing("pre-training classes", pretrain),
        "novel.txt": listing("novel classes", novel),
    }


def build(wordnet: Path = DEFAULT_WORDNET, synsets_file: Path | None = None) -> dict[str, str]:
    """Read both inputs and render the outputs (file name -> text); writes nothing."""
    if synsets_file is None:
        text, where = default_synsets(), "timm's imagenet_synsets.txt"
    else:
        if not Path(synsets_file).is_file():
            raise BuildError(
                f"synset list {synsets_file} not found; pass timm's "
                "timm/data/_info/imagenet_synsets.txt (from `pip download --no-deps timm`)."
            )
        text, where = Path(synsets_file).read_text(encoding="utf-8"), str(synsets_file)
    return render(read_synsets(text, where), read_wordnet(wordnet))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wordnet", type=Path, default=DEFAULT_WORDNET, help="WordNet 3.0 data.noun"
    )
    parser.add_argument(
        "--synsets", type=Path, help="ILSVRC-2012 synset list (default: from an installed timm)"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the files go")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out-dir; write nothing"
    )
    args = parser.parse_args(argv)
    try:
        files = build(args.wordnet, args.synsets)
        out = args.out_dir
        if args.check:
            stale = [
                n
                for n in FILES
                if not (out / n).is_file() or (out / n).read_text(encoding="utf-8") != files[n]
            ]
            if stale:
                raise BuildError(
                    f"{', '.join(stale)} in {out} differ from what the inputs give (or are "
                    f"missing); regenerate with `{REGENERATE}`."
                )
        else:
            existing = [n for n in FILES if (out / n).exists()]
            if existing and not args.overwrite:
                raise BuildError(
                    f"{', '.join(existing)} already exist in {out}; pass --overwrite to replace "
                    "them (or --check to compare)."
                )
            out.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (out / name).write_text(text, encoding="utf-8", newline="\n")
    except (BuildError, OSError, UnicodeDecodeError) as err:
        print(f"build_imagenet611: error: {err}", file=sys.stderr)
        return 1
    merged = json.loads(files["classmap.json"])
    sizes = sorted((len(v), k) for k, v in merged.items())
    singletons = sum(1 for k, _ in sizes if k == 1)
    print(
        f"{'checked' if args.check else 'wrote'} {', '.join(FILES)} in {out}: "
        f"{len(merged)} classes from {sum(k for k, _ in sizes)} synsets, {singletons} singletons, "
        f"largest {sizes[-1][1]} ({sizes[-1][0]} synsets)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
