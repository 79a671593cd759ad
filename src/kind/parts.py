"""Learngenes and tailors as parts on disk: decompose, assemble, merge, transfer.

A *parts directory* holds one safetensors file with the learngenes (every gated layer's learngene
factors, every class-agnostic parameter, the null label row), one small safetensors file per tailor
group (its factors in every layer plus its classes' label rows), and `manifest.json` (model and
diffusion config, class names and ids, τ, and per file its parameter count, bytes and sha256).
Loading checks every file it reads against the manifest, so a missing, truncated or swapped file is
an error, never a silently different model.

From parts: `assemble` builds the model that holds the learngenes plus the tailors of the classes a
deployment needs (for those classes exactly the full model's outputs, KIND.md invariant 3); `merge`
folds one class, or the learngene-only unconditional model, into a plain dense DiT; `transfer`
starts a model for new classes from the learngenes alone (invariant 5).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from kind import checkpoint as ckpt
from kind.diffusion import DiffusionConfig
from kind.model import DiT, ModelConfig

FORMAT = "kind-parts/1"
MANIFEST, LEARNGENE_FILE = "manifest.json", "learngene.safetensors"
_TAILOR = re.compile(r"\.tailors\.(\d+)\.")
_ROW = re.compile(r"y_embedder\.rows\.(\d+)")


class PartsError(ValueError):
    """A parts directory that cannot be used as asked; the message says what to do."""


def tailor_file(group: int) -> str:
    return f"tailor_{group:04d}.safetensors"


def group_of(name: str, config: ModelConfig) -> int | None:
    """The tailor group a parameter belongs to (tailor factors and class label rows), or None for
    the learngene (everything class-agnostic, the null row included)."""
    if m := _TAILOR.search(name):
        return int(m.group(1))
    if m := _ROW.fullmatch(name):
        return config.tau[int(m.group(1))]
    return None


def split_state(model: DiT) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(learngene tensors, {group: tailor tensors}) of a KIND model's state dict."""
    if not model.config.kind:
        raise PartsError("only a KIND model decomposes; this is a dense DiT")
    learngene: dict[str, torch.Tensor] = {}
    tailors: dict[int, dict[str, torch.Tensor]] = {g: {} for g in model.config.held_groups}
    for name, tensor in model.state_dict().items():
        g = group_of(name, model.config)
        (learngene if g is None else tailors[g])[name] = tensor
    return learngene, tailors


def count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decompose(
    model: DiT, diffusion: DiffusionConfig, out: str | Path, extra: dict | None = None
) -> Path:
    """Write `model`'s learngenes and tailors as a parts directory `out` (which must not exist)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PartsError(f"{out} already exists and is not empty; choose another output directory")
    learngene, tailors = split_state(model)
    cfg = model.config
    with ckpt.atomic_dir(out) as tmp:
        files = {}
        for key, name, tensors in [("learngene", LEARNGENE_FILE, learngene)] + [
            (str(g), tailor_file(g), t) for g, t in tailors.items()
        ]:
            ckpt.atomic_save_tensors(tmp / name, tensors, {"part": key})
            files[key] = {
                "file": name,
                "params": count(tensors),
                "bytes": (tmp / name).stat().st_size,
                "sha256": _sha256(tmp / name),
            }
        manifest = {
            "format": FORMAT,
            "model": replace(cfg, groups=None).to_dict(),
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
        ckpt.atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    return out


def read_manifest(parts: str | Path) -> dict:
    parts = Path(parts)
    if not (parts / MANIFEST).is_file():
        raise PartsError(
            f"{parts} is not a parts directory (no {MANIFEST}); make one with "
            "`kind-dit decompose RUN --out PARTS`"
        )
    manifest = ckpt.read_json(parts / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise PartsError(
            f"{parts / MANIFEST} has format {manifest.get('format')!r}; this version "
            f"of kind-dit reads {FORMAT}"
        )
    return manifest


def _read_part(parts: Path, entry: dict, key: str) -> dict[str, torch.Tensor]:
    """One part file, verified against its manifest entry (size, then sha256, then its label)."""
    path = parts / entry["file"]
    if not path.is_file():
        raise PartsError(
            f"part file {path} is missing; copy the whole parts directory again or "
            "re-run `kind-dit decompose`"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise PartsError(
            f"part file {path} has {size} bytes, the manifest says {entry['bytes']}: "
            "it is truncated or was replaced; copy it again from the original parts"
        )
    if _sha256(path) != entry["sha256"]:
        raise PartsError(
            f"part file {path} does not match the manifest's sha256: it was modified "
            "or swapped with another file; copy it again from the original parts"
        )
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        label = (f.metadata() or {}).get("part")
    if label != key:
        raise PartsError(f"part file {path} holds part {label!r}, the manifest expects {key!r}")
    return ckpt.read_tensors(path)


def resolve_classes(config: ModelConfig, names: list[str] | None) -> list[int]:
    """Class ids for class names (None: every class the model holds); clear error for unknown ones."""
    if names is None:
        return list(config.held_classes)
    held = {config.class_names[c]: c for c in config.held_classes}
    unknown = [n for n in names if n not in held]
    if unknown:
        raise PartsError(f"unknown class(es) {unknown}; this model holds {list(held)}")
    return [held[n] for n in names]


def load_parts(
    parts: str | Path, classes: list[str] | None = None
) -> tuple[DiT, DiffusionConfig, dict]:
    """Assemble the model holding the learngenes plus the tailors of `classes` (names; None: all)."""
    parts = Path(parts)
    manifest = read_manifest(parts)
    full = ModelConfig.from_dict(manifest["model"])
    ids = resolve_classes(full, classes)
    groups = sorted({full.tau[c] for c in ids})
    model = DiT(replace(full, groups=groups))
    state = _read_part(parts, manifest["learngene"], "learngene")
    for g in groups:
        state |= _read_part(parts, manifest["tailors"][str(g)], str(g))
    ckpt.load_state(model, state, parts)
    return model.eval(), DiffusionConfig(**manifest["diffusion"]), manifest


def load_learngene(model: DiT, parts: str | Path) -> dict[str, torch.Tensor]:
    """Copy the learngene of a parts directory into `model` (shapes must match); returns it."""
    parts = Path(parts)
    learngene = _read_part(parts, read_manifest(parts)["learngene"], "learngene")
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
    missing = [n for n in own if group_of(n, model.config) is None and n not in learngene]
    if missing:
        raise PartsError(
            f"the learngene in {parts} lacks {missing[:5]}: it comes from a different architecture"
        )
    model.load_state_dict(learngene, strict=False)
    return learngene


def transfer(
    parts: str | Path,
    class_names: list[str],
    *,
    class_to_group: list[int] | None = None,
    train_learngenes: bool = False,
    carry_tailors: bool = False,
    rank_tailor: float | None = None,
    seed: int = 0,
) -> tuple[DiT, DiffusionConfig]:
    """A model for new classes: the learngenes of `parts` (frozen unless `train_learngenes`),
    freshly, randomly initialised tailors and label rows; nothing of the source's tailors.

    `carry_tailors` is the ablation behind the domain-shift claim: new tailor group g starts from
    source tailor group g mod G instead of random (the class-specific knowledge of the old domain
    comes along); label rows stay fresh. `rank_tailor` gives the new tailors another rank than
    the source's (the learngenes are unchanged)."""
    parts = Path(parts)
    manifest = read_manifest(parts)
    source = ModelConfig.from_dict(manifest["model"])
    rank = source.rank_tailor if rank_tailor is None else rank_tailor
    if carry_tailors and rank != source.rank_tailor:
        raise PartsError("carried source tailors keep the source's tailor rank; drop rank_tailor")
    config = replace(source, class_names=list(class_names), class_to_group=class_to_group,
                     groups=None, rank_tailor=rank)  # fmt: skip
    torch.manual_seed(seed)
    model = DiT(config)
    load_learngene(model, parts)
    for _, layer in model.kind_layers():  # fresh tailors outside the transferred learngene
        layer.reset_tailors()
    if carry_tailors:
        source_groups = sorted(int(g) for g in manifest["tailors"])
        state = {}
        for g in config.held_groups:
            src = source_groups[g % len(source_groups)]
            tensors = _read_part(parts, manifest["tailors"][str(src)], str(src))
            state |= {
                k.replace(f".tailors.{src}.", f".tailors.{g}."): v
                for k, v in tensors.items()
                if f".tailors.{src}." in k
            }
        model.load_state_dict(state, strict=False)
    for name, p in model.named_parameters():
        p.requires_grad_(train_learngenes or group_of(name, config) is not None)
    return model, DiffusionConfig(**manifest["diffusion"])


class MergedDiT(nn.Module):
    """One class folded into a dense DiT, plus the learngene-only dense DiT for the null class, so
    classifier-free guidance works on a merged model too. Same call signature as DiT."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cond = DiT(config)
        self.uncond = DiT(replace(config, class_names=[]))
        self.null_id = self.cond.null_id

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        null = y == self.null_id
        if not null.any():
            return self.cond(x, t, y)
        if null.all():
            return self.uncond(x, t, torch.full_like(y, self.uncond.null_id))
        out = torch.empty(
            (len(y), self.cond.out_channels, *x.shape[2:]), device=x.device, dtype=x.dtype
        )
        out[~null] = self.cond(x[~null], t[~null], y[~null])
        out[null] = self.uncond(x[null], t[null], torch.full_like(y[null], self.uncond.null_id))
        return out


@torch.no_grad()
def merge(model: DiT, class_name: str | None) -> DiT | MergedDiT:
    """Fold the learngene plus one class's tailor into plain dense weights (KIND.md invariant 4).

    `class_name` None gives the unconditional (learngene-only) dense DiT; a class gives a
    `MergedDiT` whose conditional network computes the full model's output for that class."""
    if not model.config.kind:
        raise PartsError("merge needs a KIND model; this one is already dense")
    if class_name is None:
        return _fold(
            model,
            None,
            replace(model.config, kind=False, class_names=[], class_to_group=None, groups=None),
        )
    (c,) = resolve_classes(model.config, [class_name])
    dense_cfg = replace(
        model.config, kind=False, class_names=[class_name], class_to_group=None, groups=None
    )
    merged = MergedDiT(dense_cfg)
    merged.cond.load_state_dict(_fold(model, c, dense_cfg).state_dict())
    merged.uncond.load_state_dict(_fold(model, None, merged.uncond.config).state_dict())
    return merged.eval()


def _fold(model: DiT, c: int | None, dense_cfg: ModelConfig) -> DiT:
    """A dense DiT with class c's (or only the learngene's) weights folded in; label row c -> 0."""
    dense = DiT(dense_cfg).to(next(model.parameters()).device)
    state = {}
    group = None if c is None else model.config.tau[c]
    kind_layers = dict(model.kind_layers())
    for name, tensor in model.state_dict().items():
        if ".tailors." in name or (_ROW.fullmatch(name) and name != f"y_embedder.rows.{c}"):
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in kind_layers:
            if leaf in ("U", "S", "V"):
                layer = kind_layers[owner]
                linear = layer.merge(group if layer.tailors else None)
                state[f"{owner}.weight"] = linear.weight
                if linear.bias is not None:
                    state[f"{owner}.bias"] = linear.bias
            continue
        state["y_embedder.rows.0" if _ROW.fullmatch(name) else name] = tensor
    ckpt.load_state(dense, state, "the merged weights")
    return dense.eval()


def assemble(
    parts: str | Path,
    classes: list[str] | None,
    out: str | Path,
    merge_class: str | None = None,
    merge_null: bool = False,
) -> Path:
    """Write a model directory holding the learngenes plus the tailors of `classes`; with
    `merge_class` (or `merge_null`) a dense model with that class (or nothing) folded in."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PartsError(f"{out} already exists and is not empty; choose another output directory")
    needed = [merge_class] if merge_class is not None else classes
    model, diffusion, manifest = load_parts(parts, [] if merge_null else needed)
    extra = {"source": str(Path(parts).resolve())}
    extra |= {k: manifest[k] for k in ("sample", "latent") if k in manifest}
    if merge_class is not None or merge_null:
        merged = merge(model, None if merge_null else merge_class)
        extra["merged"] = "null" if merge_null else merge_class
        ckpt.save_model_dir(out, merged, diffusion, extra)
    else:
        ckpt.save_model_dir(out, model, diffusion, extra)
    return out


def size_table(source: str | Path) -> list[tuple[str, int, int | None]]:
    """(part, parameters, bytes) rows: learngenes, each tailor, the model assembled for 1, 2 and
    all classes, and the dense DiT of the same size and classes. Bytes are file sizes for a parts
    directory, fp32 sizes (4 bytes a parameter) otherwise."""
    source = Path(source)
    if (source / MANIFEST).is_file():
        manifest = read_manifest(source)
        config = ModelConfig.from_dict(manifest["model"])
        lg = manifest["learngene"]
        tailors = [
            (int(g), t["params"], t["bytes"], t["classes"]) for g, t in manifest["tailors"].items()
        ]
        learngene = (lg["params"], lg["bytes"])
    else:
        model, _, _ = ckpt.load_model(source)
        config = model.config
        if not config.kind:
            n = sum(p.numel() for p in model.parameters())
            return [("dense model", n, 4 * n)]
        lg_state, tailor_states = split_state(model)
        learngene = (count(lg_state), 4 * count(lg_state))
        tailors = [
            (g, count(t), 4 * count(t), [c for c in config.held_classes if config.tau[c] == g])
            for g, t in tailor_states.items()
        ]
    names = config.class_names
    rows = [("learngene", *learngene)]
    rows += [(f"tailor {g} ({', '.join(names[c] for c in cls)})", p, b) for g, p, b, cls in tailors]
    for k in sorted({1, 2, len(tailors)} & set(range(1, len(tailors) + 1))):
        label = "all" if k == len(tailors) else str(k)
        chosen = tailors[:k]
        rows.append(
            (
                f"assembled: {label} tailor group(s)",
                learngene[0] + sum(t[1] for t in chosen),
                learngene[1] + sum(t[2] for t in chosen),
            )
        )
    dense = DiT(replace(config, kind=False, groups=None))
    n = sum(p.numel() for p in dense.parameters())
    rows.append((f"dense DiT, same size, {config.num_classes} classes", n, 4 * n))
    return rows
