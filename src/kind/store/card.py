"""Model cards: the `README.md` (Hugging Face model-card style: YAML front matter, then Markdown)
that every model directory, run export and parts directory carries.

`model_card` is pure: it renders what a writer already holds (model.json's or manifest.json's
content, parameter counts, and what is known of how the model was made) and writes nothing; the
writers (`kind.store.modeldir.save_model_dir`, `kind.store.parts.decompose`, `kind.store.graft`)
put it into the directory they are writing, before its checksums are taken.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import yaml

from kind.core.decomposition import split_state
from kind.core.model import DiT, ModelConfig, count_params
from kind.io import CARD

TAGS = ["kind-dit", "diffusion", "dit", "class-conditional"]
_SHOWN = 100  # class names listed in full up to this many

# the licence of weights trained by kind-dit is not decided: the data's (and base model's) terms
_TRAINED_NOTE = (
    "kind-dit's code is MIT-licensed; the licence of weights it trains is not decided. These "
    "weights were trained on {data}: the terms of that data apply (for the bundled sets see "
    "src/kind/assets/DATA_LICENSES.md: mnist CC BY-SA 3.0, animals MIT, glyphs the DejaVu "
    "fonts licence){base}."
)


def dense_params(config: ModelConfig) -> int:
    """Parameters of the dense DiT of the same size and classes (built on the meta device)."""
    with torch.device("meta"):
        return count_params(DiT(replace(config, kind=False, groups=None, null_tailor=False)))


def model_sizes(model: torch.nn.Module) -> dict:
    """Parameter counts of a model for its card: total, and for KIND learngene, per tailor group
    and the dense equivalent."""
    config = getattr(model, "config", None)
    if config is None or not config.kind or not isinstance(model, DiT):
        return {"total": count_params(model)}
    learngene, tailors = split_state(model)
    return {
        "total": count_params(model),
        "learngene": sum(t.numel() for t in learngene.values()),
        "tailors": {g: sum(t.numel() for t in ts.values()) for g, ts in tailors.items()},
        "dense": dense_params(config),
    }


def manifest_sizes(manifest: dict) -> dict:
    """`model_sizes` of a parts directory, from its manifest."""
    tailors = {int(g): t["params"] for g, t in manifest["tailors"].items()}
    learngene = manifest["learngene"]["params"]
    return {
        "total": learngene + sum(tailors.values()),
        "learngene": learngene,
        "tailors": tailors,
        "dense": dense_params(ModelConfig.from_dict(manifest["model"])),
    }


def _licence(meta: dict, made: dict) -> tuple[str, str | None]:
    """(front matter `license`, a note or None)."""
    imported = meta.get("imported")
    if imported:
        licence = imported.get("license")
        if licence and " " not in str(licence):
            return str(licence).lower(), None
        return "other", (
            f"licence named by the source: {licence}"
            if licence
            else "the source named no licence; check the terms under which you obtained it"
        )
    data = made.get("data")
    if data:
        base, licence = made.get("base_model"), made.get("base_license")
        licence = f" (licence: {licence})" if licence else ""
        base = f", and those of the base model {base}{licence}" if base else ""
        return "other", _TRAINED_NOTE.format(data=", ".join(data), base=base)
    source = meta.get("source")
    return "other", (
        "not recorded here: the terms of the model this was made from apply"
        + (f" ({source}; see its README.md)" if source else "")
    )


def _names(config: ModelConfig, ids: list[int]) -> str:
    names = [config.class_names[c] for c in ids]
    shown = ", ".join(f"`{n}`" for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def model_card(meta: dict, sizes: dict, made: dict | None = None, parts: bool = False) -> str:
    """The README.md of a model directory (`meta`: model.json's content) or, with `parts`, of a
    parts directory (`meta`: manifest.json's content). `sizes`: `model_sizes`/`manifest_sizes`.
    `made`, all optional: `data` (training data specs), `steps`, `transfer` (run.json's record),
    `base_model`, `base_license`, `how` (sentences on how it was made)."""
    made = dict(made or {})
    config = ModelConfig.from_dict(meta["model"])
    transfer = made.get("transfer") or {}
    imported = meta.get("imported") or {}
    base = made.get("base_model") or transfer.get("source") or imported.get("from")
    made["base_model"] = base
    licence, note = _licence(meta, made)
    merged = meta.get("merged")
    kind = config.kind and not merged
    front: dict = {"library_name": "kind-dit", "license": licence}
    if note:
        front["license_note"] = note
    if base:
        front["base_model"] = base
    front["tags"] = TAGS + (["kind", "learngene", "tailors"] if config.kind else [])
    if merged:
        front["tags"].append("merged")
    if made.get("data"):
        front["datasets"] = list(made["data"])

    held = config.held_classes
    what = "KIND" if config.kind else "dense DiT"
    shape = f"{config.image_size}×{config.image_size}, {config.in_channels} channel(s)"
    latent = meta.get("latent")
    title = (
        f"KIND parts ({config.size}, {len(held)} classes)"
        if parts
        else f"{'Merged ' if merged else ''}{what} model ({config.size}, {len(held)} classes)"
    )
    lines = [f"# {title}", "", "## What it is", ""]
    if parts:
        lines.append(
            "A KIND parts directory: the learngenes (shared by every class) and one tailor file "
            "per class group, for assembling models for any subset of its classes."
        )
    elif merged:
        lines.append(
            f"A dense DiT with {'no class (the unconditional model)' if merged == 'null' else f'class `{merged}`'}"
            " folded into its weights, plus the unconditional network guidance uses."
        )
    elif kind:
        lines.append(
            "A KIND diffusion transformer: class-gated SVD layers whose learngene is shared by "
            "every class, plus one tailor per class group."
        )
    else:
        lines.append("A dense class-conditional diffusion transformer (DiT).")
    lines += [
        "",
        f"- size: `{config.size}`, {'latent' if latent else 'pixel'} space {shape}"
        + (f" (VAE: {latent.get('vae') or 'give one with --vae'})" if latent else ""),
        f"- classes ({len(held)}): {_names(config, held)}",
    ]
    if "learngene" in sizes:
        tailors = sizes["tailors"]
        per = sorted(set(tailors.values()))
        lines += [
            f"- parameters: learngene {sizes['learngene']:,}; per tailor "
            f"{' / '.join(f'{n:,}' for n in per)} ({len(tailors)} tailor group(s)); "
            f"total {sizes['total']:,}",
            f"- the dense DiT of the same size and classes: {sizes['dense']:,} parameters",
        ]
    else:
        lines.append(f"- parameters: {sizes['total']:,}")
    diffusion = meta.get("diffusion") or {}
    lines += [
        f"- diffusion: {diffusion.get('prediction')}-prediction, {diffusion.get('schedule')} "
        f"schedule, {diffusion.get('num_timesteps')} steps",
        "",
        "## How it was made",
        "",
    ]
    if made.get("data"):
        lines.append(f"- training data: `{', '.join(made['data'])}`")
    if made.get("steps"):
        lines.append(f"- training steps: {made['steps']:,}")
    if transfer:
        lines.append(
            f"- transfer: method `{transfer.get('method')}` from `{transfer.get('source')}`"
            + (f" ({transfer['detail']})" if transfer.get("detail") else "")
        )
    if imported:
        lines.append(
            f"- imported by `kind-dit import` ({imported.get('format')}) from "
            f"`{imported.get('from')}`"
            + (f", sha256 `{imported['sha256']}`" if imported.get("sha256") else "")
        )
    for g in meta.get("grafted") or []:
        lines.append(
            f"- grafted: classes {', '.join(f'`{c}`' for c in g.get('classes', []))} of the "
            f"`{g.get('method')}` transfer run `{g.get('run')}`"
        )
    if made.get("how"):
        lines.append(f"- {made['how']}")
    elif meta.get("source") and not imported:
        lines.append(f"- made from `{meta['source']}`")
    if lines[-1] == "":
        lines.append("- not recorded")
    lines += ["", "## Licence", "", f"`{licence}`" + (f": {note}" if note else "")]
    if imported:
        lines[-1] += " See NOTICE."
    classes = ",".join(config.class_names[c] for c in held[:2])
    lines += ["", "## How to load it", "", "```bash"]
    if parts:
        lines += [
            f"kind-dit assemble DIR --classes {classes} --out MODEL   # a model for some classes",
        ]
    lines += [
        f"kind-dit sample DIR --classes {classes} --out SAMPLES",
        "```",
        "",
        "```python",
        "from kind.store.load import load_model",
        "",
        "model, diffusion, meta = load_model(DIR"
        + (f", classes={[config.class_names[c] for c in held[:2]]})" if parts else ")"),
        "```",
        "",
        "(`DIR`: this directory.)",
        "",
        "## Files",
        "",
    ]
    if parts:
        lines += [
            "- `manifest.json`: model and diffusion config, classes, and per part file its "
            "parameters, bytes and sha256 (checked on every load)",
            "- `learngene.safetensors`: the learngenes, class-agnostic parameters, null label row",
            "- `tailor_NNNN.safetensors`: one per tailor group, with its classes' label rows",
        ]
    else:
        lines += [
            "- `model.json`: architecture, diffusion and sampling settings",
            "- `model.safetensors`: the weights",
            "- `checksums.json`: sha256 of every file here (checked on every load)",
        ]
        if imported:
            lines.append("- `NOTICE` (and `source-*`): the source's licence and notices")
    lines.append(f"- `{CARD}`: this card")
    head = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{head}---\n" + "\n".join(lines) + "\n"
