"""Learngenes and tailors as parts on disk: decompose a KIND model into files, load and assemble
models from them.

A *parts directory* holds one safetensors file with the learngenes (every gated layer's learngene
factors, every class-agnostic parameter, the null label row), one small safetensors file per tailor
group (its factors in every layer plus its classes' label rows), and `manifest.json` (model and
diffusion config, class names and ids, τ, and per file its parameter count, bytes and sha256).
Loading checks every file it reads against the manifest, so a missing, truncated or swapped file is
an error, never a silently different model.

From parts: `load_parts` builds the model that holds the learngenes plus the tailors of the classes
a deployment needs (for those classes exactly the full model's outputs, docs/KIND.md invariant 3);
`assemble` writes it, or one class merged into a dense DiT (`kind.core.decomposition.merge`), as a
model directory; `load_learngene` is where a transfer starts (`kind.transfer.kind`), and
`kind.store.graft` adds a transfer's new classes to the parts it started from.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kind.core.decomposition import BANKS, PartsError, merge, resolve_classes, split_state
from kind.core.diffusion import DiffusionConfig
from kind.core.gated import KindLinear
from kind.core.model import Attention, DiT, ModelConfig, count_params, load_state
from kind.io import (
    atomic_dir,
    atomic_save_tensors,
    check_new_dir,
    is_a,
    kind_problem,
    read_json,
    read_tensors,
    sha256_file,
    write_json,
)
from kind.store.card import manifest_sizes, model_card
from kind.store.modeldir import save_model_dir, write_card
from kind.store.runs import run_provenance

FORMAT = "kind-parts/1"
MANIFEST, LEARNGENE_FILE = "manifest.json", "learngene.safetensors"


def tailor_file(group: int) -> str:
    return f"tailor_{group:04d}.safetensors"


def count_tensors(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def write_part(directory: Path, name: str, key: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one part file (labelled `key`) into `directory`; its manifest entry."""
    path = Path(directory) / name
    atomic_save_tensors(path, tensors, {"part": key})
    return {
        "file": name,
        "params": count_tensors(tensors),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def decompose(
    model: DiT, diffusion: DiffusionConfig, out: str | Path, extra: dict | None = None
) -> Path:
    """Write `model`'s learngenes and tailors as a parts directory `out` (which must not exist)."""
    cfg = model.config
    problem = _config_problem(cfg)  # what reading the parts back would refuse: refused unwritten
    if problem:
        raise PartsError(f"this model cannot be decomposed: {problem}; give each class its own "
                         "name and group (class_names, class_to_group in its model.json)")  # fmt: skip
    out = check_new_dir(out)
    learngene, tailors = split_state(model)
    with atomic_dir(out) as tmp:
        files = {}
        for key, name, tensors in [("learngene", LEARNGENE_FILE, learngene)] + [
            (str(g), tailor_file(g), t) for g, t in tailors.items()
        ]:
            files[key] = write_part(tmp, name, key, tensors)
        manifest = {
            "format": FORMAT,
            "model": cfg.to_dict(),  # an assembled model's `groups`: the parts hold only those
            "diffusion": vars(diffusion),
            "classes": [
                {"id": c, "name": cfg.class_names[c], "group": cfg.tau[c]} for c in cfg.held_classes
            ],
            "learngene": files.pop("learngene"),
            "tailors": {
                g: dict(f, classes=[c for c in cfg.held_classes if cfg.tau[c] == int(g)])
                for g, f in files.items()
            },
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
        write_card(tmp, parts_card(manifest, "decomposed by `kind-dit decompose`"))
    return out


def parts_card(manifest: dict, how: str) -> str:
    """The model card of a parts directory with this manifest (made as `how` says)."""
    source = f" from `{manifest['source']}`" if manifest.get("source") else ""
    made = provenance(manifest) | {"how": how + source}
    return model_card(manifest, manifest_sizes(manifest), made, parts=True)


def provenance(manifest: dict) -> dict:
    """How the model of a parts manifest was made, as far as the runs it names still say: the
    run it was decomposed from, plus the training data of the runs grafted onto it."""
    made = run_provenance(manifest["source"]) if manifest.get("source") else {}
    for g in manifest.get("grafted") or []:
        if g.get("run"):
            made["data"] = made.get("data", []) + run_provenance(g["run"]).get("data", [])
    return made


def is_parts_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(parts: str | Path) -> dict:
    parts = Path(parts)
    if not (parts / MANIFEST).is_file():
        raise PartsError(
            f"{parts} is not a parts directory (no {MANIFEST}); make one with "
            "`kind-dit decompose RUN --out PARTS`"
        )
    manifest = read_json(parts / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise PartsError(
            f"{parts / MANIFEST} has format {manifest.get('format')!r}; this version "
            f"of kind-dit reads {FORMAT}"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise PartsError(
            f"{parts / MANIFEST}: {problem}; the file is damaged (decompose the run again, or "
            "restore the parts directory from a copy)"
        )
    return manifest


_ENTRY = {"file": str, "params": int, "bytes": int, "sha256": str}


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the structure of a parts manifest, or None. Checked when it is read, so a
    damaged or hand-edited manifest is one clear error rather than a KeyError deep in a command,
    or (duplicate class names, a class listed under another group) a silently wrong tailor."""
    missing = [
        k for k in ("model", "diffusion", "learngene", "tailors", "classes") if k not in manifest
    ]
    if missing:
        return f"it has no {', '.join(missing)}"
    problem = kind_problem(manifest, {"sample": dict, "latent": dict, "grafted": list,
                                      "source": str})  # fmt: skip
    if problem:
        return problem
    grafted = manifest.get("grafted") or []
    if not is_a(grafted, list[dict]) or not all(is_a(g.get("run"), str | None) and is_a(
            g.get("classes", []), list[str]) for g in grafted):  # fmt: skip
        return "its grafted record is not a list of {run, method, classes, groups} objects"
    try:
        config = ModelConfig.from_dict(manifest["model"])
        DiffusionConfig.from_dict(manifest["diffusion"])
    except (TypeError, ValueError) as e:
        return f"its model or diffusion config is invalid ({e})"
    tailors = manifest["tailors"]
    if not isinstance(tailors, dict):
        return "its tailors are not a mapping of group -> part file"
    entries = [("learngene", manifest["learngene"])] + [
        (f"tailor {g}", e) for g, e in tailors.items()
    ]
    return (
        _config_problem(config)
        or next(filter(None, (_entry_problem(what, e) for what, e in entries)), None)
        or _classes_problem(manifest["classes"], config, tailors)
    )


def _config_problem(config: ModelConfig) -> str | None:
    """A model config a parts directory cannot serve: class names that are not unique (a name
    picks the tailor), or a τ that does not map every class to a group number."""
    names = config.class_names  # a list of strings: ModelConfig.from_dict checked the types
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"its model names class(es) {repeated[:5]} more than once"
    tau = config.tau
    if len(tau) != len(names):
        return (
            f"its model's class_to_group does not give one group for each of {len(names)} classes"
        )
    groups = config.groups if config.groups is not None else []
    if not all(g >= 0 for g in [*tau, *groups]):
        return "its model's class_to_group or groups hold something other than group numbers"
    return None


def _entry_problem(what: str, entry: object) -> str | None:
    """What is wrong with one part file's manifest entry (`_ENTRY`'s fields, a plain file name)."""
    if not isinstance(entry, dict):
        return f"its {what} entry is not a mapping"
    bad = [k for k, kind in _ENTRY.items() if not isinstance(entry.get(k), kind)]
    if bad:
        return f"its {what} entry lacks a valid {', '.join(bad)}"
    if Path(entry["file"]).name != entry["file"] or entry["file"].startswith("."):
        return f"its {what} entry names the file {entry['file']!r}, not a file of the directory"
    return None


def _classes_problem(classes: object, config: ModelConfig, tailors: dict) -> str | None:
    """Whether the manifest's class list agrees with its model config: each class once, under its
    model name and τ group; and each tailor entry under a group number, listing class ids."""
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        return "its classes are not a list of {id, name, group}"
    ids = [c.get("id") for c in classes]
    for c in classes:
        i = c.get("id")
        if not isinstance(i, int) or not 0 <= i < config.num_classes or ids.count(i) > 1:
            return f"its classes list class id {i!r}, not one class of its model's {config.num_classes}"
        if c.get("name") != config.class_names[i] or c.get("group") != config.tau[i]:
            return (
                f"its classes list class {i} as {c.get('name')!r} in group {c.get('group')!r}, "
                f"its model as {config.class_names[i]!r} in group {config.tau[i]}"
            )
    for g, entry in tailors.items():
        if not str(g).isdigit() or not is_a(entry.get("classes"), list[int]):
            return f"its tailor entry {g!r} is not a group number with a list of class ids"
        strays = [c for c in entry["classes"]
                  if not 0 <= c < config.num_classes or config.tau[c] != int(g)]  # fmt: skip
        if strays:
            return f"its tailor entry {g} lists class(es) {strays[:5]}, not classes of group {g}"
    return None


def read_part(parts: Path, entry: dict, key: str) -> dict[str, torch.Tensor]:
    """One part file, verified against its manifest entry (size, then sha256, then its label)."""
    path = parts / entry["file"]
    if not path.is_file():
        raise PartsError(
            f"part file {path} is missing; copy the whole parts directory again or "
            "re-run `kind-dit decompose`"
        )
    seen = path.stat()  # to tell a file replaced between its check and its read (below)
    size = seen.st_size
    if size != entry["bytes"]:
        raise PartsError(
            f"part file {path} has {size} bytes, the manifest says {entry['bytes']}: "
            "it is truncated or was replaced; copy it again from the original parts"
        )
    if sha256_file(path) != entry["sha256"]:
        raise PartsError(
            f"part file {path} does not match the manifest's sha256: it was modified "
            "or swapped with another file; copy it again from the original parts"
        )
    try:
        with safe_open(str(path), "pt") as f:
            label = (f.metadata() or {}).get("part")
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise PartsError(
            f"part file {path} is not a safetensors file ({e}); re-run decompose"
        ) from e
    if label != key:
        raise PartsError(f"part file {path} holds part {label!r}, the manifest expects {key!r}")
    tensors = read_tensors(path)
    now = path.stat()  # the same file (inode) unchanged since before its hash: the read is verified
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
        seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns
    ):  # fmt: skip
        raise PartsError(
            f"part file {path} changed while it was read (something is writing into the parts "
            "directory); read it again once that is done"
        )
    return tensors


def load_parts(
    parts: str | Path, classes: list[str] | None = None
) -> tuple[DiT, DiffusionConfig, dict]:
    """Assemble the model holding the learngenes plus the tailors of `classes` (names; None: all)."""
    parts = Path(parts)
    manifest = read_manifest(parts)
    full = ModelConfig.from_dict(manifest["model"])
    ids = resolve_classes(full, classes)
    groups = sorted({full.tau[c] for c in ids})
    groups += [] if full.null_group is None else [full.null_group]  # guidance needs it always
    check_held(parts, manifest, full, ids)
    model = DiT(replace(full, groups=groups))
    state = read_part(parts, manifest["learngene"], "learngene")
    for g in groups:
        state |= read_part(parts, manifest["tailors"][str(g)], str(g))
    load_state(model, state, parts)
    return model.eval(), DiffusionConfig.from_dict(manifest["diffusion"]), manifest


def check_held(parts: Path, manifest: dict, config: ModelConfig, ids: list[int]) -> None:
    """Refuse classes (ids) whose tailor group has no part file in the manifest, naming them and
    the classes the parts do hold: e.g. parts an older kind-dit decomposed from an assembled
    model, whose manifest listed every class but held only the assembled ones' tailors."""
    tailors = manifest["tailors"]
    missing = [repr(config.class_names[c]) for c in ids if str(config.tau[c]) not in tailors]
    null = config.null_group
    if null is not None and str(null) not in tailors:
        missing.append("the null class (its tailor, for guidance)")
    if missing:
        held = [config.class_names[c] for c in config.held_classes if str(config.tau[c]) in tailors]
        raise PartsError(
            f"{parts} holds no tailor for {', '.join(missing)}; it holds the classes {held}: "
            f"give --classes {','.join(held)}, or decompose a model that holds the others"
        )


def load_learngene(model: DiT, parts: str | Path) -> dict[str, torch.Tensor]:
    """Copy the learngene of a parts directory into `model` (shapes must match); returns it."""
    parts = Path(parts)
    learngene = read_part(parts, read_manifest(parts)["learngene"], "learngene")
    own = model.state_dict()
    for name, tensor in learngene.items():
        if name not in own:
            raise PartsError(
                f"learngene tensor {name!r} has no place in this model: the parts come "
                "from a different architecture"
            )
        if own[name].shape != tensor.shape:
            raise PartsError(
                f"learngene tensor {name!r} has shape {tuple(tensor.shape)}, this "
                f"model expects {tuple(own[name].shape)}: the parts come from a model "
                "of another size or learngene rank"
            )
    missing = [n for n in own if n not in BANKS and n not in learngene]
    if missing:
        raise PartsError(
            f"the learngene in {parts} lacks {missing[:5]}: it comes from a different architecture"
        )
    model.load_state_dict(learngene, strict=False)
    return learngene


BUDGET_RULE = (
    "Globally across all decomposed layers, the learngene components are ranked by |σ_i| alone "
    "(smallest first); components are dropped in that order until the model's cost is ≤ the "
    "budget, each dropped component saving its cost: for a parameter budget (in + out + 1) "
    "parameters of its layer (its U column, σ and V column), for a FLOP budget what its layer's "
    "learngene then costs less in one forward pass of one sample (FLOP_RULE); every layer keeps "
    "at least one component (its largest |σ|)."
)

FLOP_RULE = (
    "FLOPs of one forward pass of one sample at the model's image size (T tokens), 2 FLOPs a "
    "multiply-add, counted as torch.utils.flop_counter counts them (matrix products, the patch "
    "convolution, attention; not biases, norms, activations, modulation or softmax). A dense "
    "linear costs rows·in·out multiply-adds (rows = T for the per-token layers, 1 for the "
    "timestep MLP and the adaLN modulations); attention 2·T²·hidden a block (QKᵀ and AV); the patch "
    "embedding T·hidden·C·p². A KIND linear of learngene rank r, for a sample of a class with its "
    "tailor (rank r_T), costs what its forward then computes: when one folded weight is no bigger "
    "than the activations (min(in, out) ≤ rows) it builds the learngene weight (out·r·in), adds "
    "the class's tailor to it and a zero one for the samples without (2·out·r_T·in) and runs one "
    "product (rows·in·out); otherwise the learngene by "
    "the cheaper of its two forms (`KindLinear._learngene`: the materialised weight, "
    "rows·in·out + in·out·r, when that is ≤ 1.25 × the factored rows·r·(in + out)) plus the "
    "tailor through its factors (rows·r_T·(in + out))."
)


def _rows(name: str, tokens: int) -> int:
    """How many rows a linear of the DiT sees in one forward pass of one sample: one for the
    timestep MLP and the adaLN modulations (they act on the conditioning vector), else one per
    token."""
    return 1 if name.startswith("t_embedder.") or ".adaLN_modulation." in name else tokens


def kind_linear_flops(layer: KindLinear, rows: int, rank: int | None = None) -> int:
    """FLOPs of `layer` (at learngene rank `rank`, default its own) on `rows` rows of one sample
    of a class with its tailor, following the layer's own choice of path (FLOP_RULE)."""
    fin, fout = layer.in_features, layer.out_features
    r = layer.rank_learngene if rank is None else rank
    rt = layer.rank_tailor
    if rt and layer.folds(1, rows):  # one group folded into one weight
        macs = fout * r * fin + 2 * fout * rt * fin + rows * fin * fout
    else:
        materialised = rows * fin * fout + fin * fout * r
        factored = rows * r * (fin + fout)
        macs = materialised if layer.materialises(rows, r) else factored
        macs += rows * rt * (fin + fout)
    return 2 * macs


def forward_flops(model: nn.Module) -> int:
    """FLOPs of one forward pass of one sample of a class the model holds (FLOP_RULE), dense or
    KIND, at the model's image size."""
    cfg = model.config
    tokens = (cfg.image_size // model.patch) ** 2
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, KindLinear):
            total += kind_linear_flops(m, _rows(name, tokens))
        elif isinstance(m, nn.Linear):
            total += 2 * _rows(name, tokens) * m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            (kh, kw), (sh, sw) = m.kernel_size, m.stride
            out = ((cfg.image_size - kh) // sh + 1) * ((cfg.image_size - kw) // sw + 1)
            total += 2 * out * m.out_channels * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, Attention):
            total += 4 * tokens * tokens * m.q.in_features
    return total


def _budget_cost(model: DiT, max_params: int | None, max_gflops: float | None):
    """(budget, full cost, cost of layer `name` at learngene rank r, how the budget was asked,
    how a cost reads) for a parameter or a FLOP budget: the one place the two budgets differ (the
    full and floor costs of the model are its cost(s) at full rank and at rank 1 per layer, so
    each layer's cost must be the whole model's share of that layer)."""
    if (max_params is None) == (max_gflops is None):
        raise ValueError("give one budget: max_params or max_gflops")
    budget = max_params if max_params is not None else max_gflops
    if not math.isfinite(budget):  # NaN compares false with every cost: it would keep nothing
        raise ValueError(f"a budget is a finite number, got {budget}")
    if max_params is not None:

        def params(name: str, m: KindLinear, r: int) -> int:
            return r * (m.in_features + m.out_features + 1)

        return (max_params, count_params(model), params, f"--max-params {max_params}",
                lambda n: f"{int(n)} parameters")  # fmt: skip
    tokens = (model.config.image_size // model.patch) ** 2

    def flops(name: str, m: KindLinear, r: int) -> int:
        return kind_linear_flops(m, _rows(name, tokens), r)

    return (max_gflops * 1e9, forward_flops(model), flops, f"--max-gflops {max_gflops:g}",
            lambda n: f"{n / 1e9:.6g} GFLOPs a forward pass")  # fmt: skip


def budget_floor(model: DiT, gflops: bool = False) -> tuple[float, float]:
    """(the smallest cost the budget rule reaches, the model's full cost), in parameters or (with
    `gflops`) in FLOPs of one forward pass of one sample: the model with one learngene component
    in every decomposed layer, and as it is."""
    _, full, cost, _, _ = _budget_cost(model, None if gflops else 0, 0.0 if gflops else None)
    layers = model.kind_layers()
    return full - sum(cost(n, m, m.rank_learngene) - cost(n, m, 1) for n, m in layers), full


def budget_keep(
    model: DiT, max_params: int | None = None, *, max_gflops: float | None = None
) -> dict[str, list[int]]:
    """The learngene components each decomposed layer of `model` keeps (indices, in order) so that
    the model has at most `max_params` parameters, or costs at most `max_gflops` GFLOPs in one
    forward pass of one sample (`forward_flops`); only layers that lose some are listed.

    Rule (BUDGET_RULE): globally across all decomposed layers, rank the learngene components by
    |σ_i| alone, smallest first; drop in that order until the cost is within the budget, each
    dropped component saving its layer's cost at its rank minus the cost one rank lower
    ((in + out + 1) parameters; for FLOPs, FLOP_RULE); every layer keeps at least one component
    (its largest |σ|). PartsError, before anything is written, when even one component per layer
    cannot meet the budget (the message gives the minimum reachable cost)."""
    budget, full, cost, flag, describe = _budget_cost(model, max_params, max_gflops)
    layers = model.kind_layers()
    candidates = []  # (|σ|, layer order, index, name): all but each layer's largest
    for order, (name, m) in enumerate(layers):
        s = m.S.detach().abs().double()
        top = int(s.argmax())
        candidates += [(float(s[i]), order, i, name) for i in range(len(s)) if i != top]
    floor, _ = budget_floor(model, gflops=max_gflops is not None)
    if floor > budget:
        raise PartsError(
            f"{flag} cannot be met: with one learngene component per layer the model still comes "
            f"to {describe(floor)} (the minimum reachable; {describe(full)} in full)"
        )
    modules = dict(layers)
    rank = {name: m.rank_learngene for name, m in layers}
    dropped: dict[str, set[int]] = {}
    count = full
    for _, _, i, name in sorted(candidates):
        if count <= budget:
            break
        m, r = modules[name], rank[name]
        count -= cost(name, m, r) - cost(name, m, r - 1)
        rank[name] = r - 1
        dropped.setdefault(name, set()).add(i)
    return {
        n: [i for i in range(modules[n].rank_learngene) if i not in d] for n, d in dropped.items()
    }


def shrink_to_budget(
    model: DiT, max_params: int | None = None, *, max_gflops: float | None = None
) -> DiT:
    """`model` with its lowest-|σ| learngene components dropped until it has at most `max_params`
    parameters, or costs at most `max_gflops` GFLOPs a forward pass of one sample (`budget_keep`);
    `model` itself when it fits already."""
    keep = budget_keep(model, max_params, max_gflops=max_gflops)
    if not keep:
        return model
    state = model.state_dict()
    for name, idx in keep.items():
        idx_t = torch.tensor(idx, dtype=torch.long)
        state[f"{name}.U"] = state[f"{name}.U"][:, idx_t].clone()
        state[f"{name}.S"] = state[f"{name}.S"][idx_t].clone()
        state[f"{name}.V"] = state[f"{name}.V"][:, idx_t].clone()
    ranks = dict(model.config.learngene_ranks or {}) | {n: len(i) for n, i in keep.items()}
    small = DiT(replace(model.config, learngene_ranks=ranks))
    load_state(small, state, "the budget assembly")
    return small.eval()


def assemble(
    parts: str | Path,
    classes: list[str] | None,
    out: str | Path,
    merge_class: str | None = None,
    merge_null: bool = False,
    max_params: int | None = None,
    max_gflops: float | None = None,
) -> Path:
    """Write a model directory holding the learngenes plus the tailors of `classes`; with
    `merge_class` (or `merge_null`) a dense model with that class (or nothing) folded in.

    With `max_params` (or `max_gflops`), the model keeps at most that many parameters (GFLOPs in
    one forward pass of one sample, FLOP_RULE) by dropping learngene components (`budget_keep`);
    the dropped layers' ranks go into the config's learngene_ranks."""
    out = check_new_dir(out)
    if out.resolve().is_relative_to(Path(parts).resolve()):
        raise PartsError(f"--out {out} lies inside the parts directory {parts}; assemble never "
                         "writes into its input: choose an --out outside it")  # fmt: skip
    if classes and (merge_null or merge_class is not None and list(classes) != [merge_class]):
        raise PartsError("--classes picks the classes of an assembled model, --merge the one "
                         "class folded into a dense one; give one of them")  # fmt: skip
    if max_params is not None and max_gflops is not None:
        raise PartsError("--max-params and --max-gflops are two budgets; give one")
    budget = max_params is not None or max_gflops is not None
    if budget and (merge_class is not None or merge_null):
        flag = "--max-params" if max_params is not None else "--max-gflops"
        raise PartsError(f"{flag} shrinks a KIND model; it does not combine with --merge")
    needed = [merge_class] if merge_class is not None else classes
    model, diffusion, manifest = load_parts(parts, [] if merge_null else needed)
    if budget:
        model = shrink_to_budget(model, max_params, max_gflops=max_gflops)
    extra = {"source": str(Path(parts).resolve())}
    extra |= {k: manifest[k] for k in ("sample", "latent") if k in manifest}
    made = provenance(manifest)
    made["how"] = f"assembled by `kind-dit assemble` from the parts `{extra['source']}`"
    if merge_class is not None or merge_null:
        merged = merge(model, None if merge_null else merge_class)
        extra["merged"] = "null" if merge_null else merged.config.class_names[0]
        save_model_dir(out, merged, diffusion, extra, made=made)
    else:
        save_model_dir(out, model, diffusion, extra, made=made)
    return out
