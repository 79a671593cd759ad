"""Grafting: a KIND transfer run's new classes added to the parts directory it started from, so
one learngene serves the old classes and the new ones (`kind-dit graft PARTS RUN --out PARTS2`).

A KIND transfer with frozen learngenes (docs/KIND.md, "Novel classes"; invariant 5) leaves the
learngene of its parts bit for bit as it was and trains only fresh tailors and label rows. Those
tailors are parts like any other: `graft` writes a new parts directory holding PARTS's learngene
and tailor files (copied byte for byte, so their sha256 stay what they were) plus one file per
tailor group of the run, renumbered after PARTS's groups and classes, and a fresh manifest.
`assemble` and `sample` then serve every class, and for each one compute what its own model
computed: PARTS's classes what PARTS's model did, the run's classes what the run's model did.

Everything is checked before anything is written: the run must be a finished KIND transfer whose
learngene is PARTS's (sha256 of every learngene tensor), with PARTS's architecture, tailor rank
and diffusion, no class name PARTS already has, and no null tailor on either side (a null tailor
is the unconditional model guidance uses for every class: one deployment cannot keep two).

This lives apart from `kind.store.parts` because it reads runs through `kind.store.load`, which
itself imports `kind.store.parts`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import fields, replace
from pathlib import Path

import torch

from kind.core.decomposition import PartsError, split_state
from kind.core.model import ModelConfig
from kind.data.vae import CONFIG_SHA, check_space
from kind.io import (
    atomic_dir,
    atomic_file,
    check_new_dir,
    sha256_file,
    tensor_sha256,
    write_json,
)
from kind.store.load import load_model
from kind.store.modeldir import is_model_dir, write_card
from kind.store.parts import (
    MANIFEST,
    parts_card,
    read_manifest,
    read_part,
    tailor_file,
    write_part,
)
from kind.store.runs import is_run_dir, read_run_record

log = logging.getLogger(__name__)

# model config fields that may differ between PARTS and a run grafted onto it: the classes and
# their groups (what grafting adds), which groups a model holds, the initial σ of fresh tailors
# (used only at initialisation), and the null tailor (checked on its own, with its own message)
_MAY_DIFFER = {"class_names", "class_to_group", "groups", "tailor_sigma", "null_tailor"}
_TAILOR = re.compile(r"\.tailors\.(\d+)\.")
_ROW = re.compile(r"y_embedder\.rows\.(\d+)")
_FIX_TRANSFER = "transfer again from PARTS with `kind-dit transfer PARTS --method kind`"


def graft(parts_dir: str | Path, run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a new parts directory `out_dir`: PARTS's learngene and tailors plus the tailors (and
    label rows) of the new classes of the KIND transfer run `run_dir`. Neither input is touched;
    every refusal comes before the first write and says why and what to do instead."""
    parts_dir, run_dir = Path(parts_dir), Path(run_dir)
    out = check_new_dir(out_dir)
    for what, inside in (("PARTS", parts_dir), ("RUN", run_dir)):
        if out.resolve().is_relative_to(inside.resolve()):
            raise PartsError(
                f"--out {out} lies inside {what} ({inside}); graft never writes into its inputs: "
                "choose a directory outside both"
            )
    manifest = read_manifest(parts_dir)
    pcfg = ModelConfig.from_dict(manifest["model"])
    record = _transfer_record(run_dir)
    model, diffusion, meta = load_model(run_dir)
    rcfg = model.config
    if not rcfg.kind:
        raise PartsError(
            f"{run_dir} holds a dense DiT, which has no learngene or tailors to graft; only KIND "
            f"transfers graft: {_FIX_TRANSFER}"
        )
    _check_null_tailors(pcfg, rcfg, parts_dir, run_dir)
    _check_architecture(pcfg, rcfg, manifest, vars(diffusion), meta, parts_dir, run_dir)
    clash = [n for n in rcfg.class_names if n in pcfg.class_names]
    if clash:
        raise PartsError(
            f"class name(s) {clash} of {run_dir} already exist in {parts_dir}; a deployment "
            "serves one class per name: rename the new classes (e.g. a class map or folder "
            "names) and transfer again, or graft onto parts without them"
        )
    learngene, run_tailors = split_state(model)
    _check_learngene(
        read_part(parts_dir, manifest["learngene"], "learngene"),
        learngene,
        record,
        parts_dir,
        run_dir,
    )
    for g, entry in manifest["tailors"].items():  # every file copied is verified first
        read_part(parts_dir, entry, g)

    # the run's groups and classes go after PARTS's: group g -> offset + g, class c -> K + c
    offset, k = max(pcfg.tau, default=-1) + 1, pcfg.num_classes
    tau = pcfg.tau + [offset + g for g in rcfg.tau]
    identity = pcfg.class_to_group is None and rcfg.class_to_group is None
    new_tailors = {offset + g: _renumbered(t, offset, k) for g, t in run_tailors.items()}
    config = replace(
        pcfg,
        class_names=pcfg.class_names + rcfg.class_names,
        class_to_group=None if identity else tau,
        # parts of an assembled model hold only its groups: the grafted ones hold those and the new
        groups=None if pcfg.groups is None else pcfg.groups + sorted(new_tailors),
    )
    new_classes = [
        {"id": k + c, "name": name, "group": tau[k + c]} for c, name in enumerate(rcfg.class_names)
    ]

    with atomic_dir(out) as tmp:
        _copy_part(parts_dir, manifest["learngene"], tmp)
        tailors = {}
        for g, entry in manifest["tailors"].items():
            _copy_part(parts_dir, entry, tmp)
            tailors[g] = entry
        for g, tensors in new_tailors.items():
            entry = write_part(tmp, tailor_file(g), str(g), tensors)
            tailors[str(g)] = dict(entry, classes=[c["id"] for c in new_classes if c["group"] == g])
        grafted = {
            "run": str(run_dir.resolve()),
            "method": record.get("method"),
            "classes": list(rcfg.class_names),
            "groups": sorted(new_tailors),
        }
        new_manifest = manifest | {
            "model": config.to_dict(),
            "classes": manifest["classes"] + new_classes,
            "learngene": manifest["learngene"],
            "tailors": dict(sorted(tailors.items(), key=lambda item: int(item[0]))),
            "grafted": (manifest.get("grafted") or []) + [grafted],
        }
        write_json(tmp / MANIFEST, new_manifest)
        write_card(
            tmp,
            parts_card(new_manifest, f"grafted by `kind-dit graft` onto `{parts_dir.resolve()}`"),
        )
    log.info("grafted %s (%s) onto %s -> %s", run_dir, ", ".join(rcfg.class_names), parts_dir, out)
    theirs, ours = meta.get("sample") or {}, manifest.get("sample") or {}
    differ = {k: (ours.get(k), theirs[k]) for k in theirs if ours.get(k) != theirs[k]}
    if differ:  # one deployment has one sample section: the run's classes get PARTS's
        log.warning(
            "%s samples every class with %s's settings; %s's classes were sampled with other "
            "ones (%s): pass those to `kind-dit sample` to draw them as the run did",
            out, parts_dir, run_dir,
            ", ".join(f"{k} {a} here, {b} in the run" for k, (a, b) in differ.items()),
        )  # fmt: skip
    return out


def _transfer_record(run_dir: Path) -> dict:
    """The run's `transfer` record (run.json), refusing what is not a finished KIND transfer."""
    if not is_run_dir(run_dir):
        raise PartsError(
            f"{run_dir} is not a run directory (no config.json); graft takes the --out directory "
            "of a `kind-dit transfer PARTS ...` run"
        )
    record = read_run_record(run_dir).get("transfer")
    if not record:
        raise PartsError(
            f"{run_dir} is a pre-training run, not a transfer: its classes have a learngene of "
            f"their own. Deploy it on its own with `kind-dit decompose {run_dir} --out PARTS2`, "
            f"or {_FIX_TRANSFER} to add its classes"
        )
    method = str(record.get("method", ""))
    if not method.startswith("kind"):
        raise PartsError(
            f"{run_dir} is a {method!r} transfer of a dense DiT (a baseline), which has no "
            f"learngene or tailors to graft; only KIND transfers graft: {_FIX_TRANSFER}"
        )
    if not is_model_dir(run_dir / "model"):
        raise PartsError(
            f"{run_dir} has no exported model ({run_dir / 'model'}): the transfer has not "
            "finished; finish it with `kind-dit transfer ... --resume` and graft its final model"
        )
    return record


def _check_null_tailors(pcfg: ModelConfig, rcfg: ModelConfig, parts: Path, run: Path) -> None:
    """Refuse a null tailor on either side: guidance uses one null model for every class."""
    if rcfg.null_tailor:
        raise PartsError(
            f"{run} gives the null class a tailor of its own (--null-tailor): its classes were "
            "trained and sample with guidance from that unconditional model, PARTS's classes "
            "with PARTS's; a deployment has one null class, so grafting would change the samples "
            "of one side. Deploy the run on its own (`kind-dit decompose RUN --out PARTS2`), "
            "or transfer again from PARTS without --null-tailor"
        )
    if pcfg.null_tailor:
        raise PartsError(
            f"{parts} gives the null class a tailor of its own, which the run's classes were "
            "not sampled with (a transfer starts the null class afresh); grafting onto parts "
            "with a null tailor is not supported: deploy the run on its own "
            "(`kind-dit decompose RUN --out PARTS2`)"
        )


def _check_architecture(
    pcfg: ModelConfig,
    rcfg: ModelConfig,
    manifest: dict,
    diffusion: dict,
    meta: dict,
    parts: Path,
    run: Path,
) -> None:
    """Refuse a run whose model, tailor rank, diffusion or latent space is not PARTS's."""
    if rcfg.groups is not None:
        raise PartsError(
            f"{run}'s model holds only tailor groups {rcfg.groups} of its classes; graft takes "
            "a transfer run's whole exported model"
        )
    differ = [
        f.name
        for f in fields(ModelConfig)
        if f.name not in _MAY_DIFFER and getattr(pcfg, f.name) != getattr(rcfg, f.name)
    ]
    if differ:
        detail = ", ".join(
            f"{n} (run {getattr(rcfg, n)!r}, parts {getattr(pcfg, n)!r})" for n in differ
        )
        hint = (
            "the transfer gave its tailors another rank (--rank-tailor): transfer again "
            "without --rank-tailor"
            if differ == ["rank_tailor"]
            else f"the run was not transferred from these parts: {_FIX_TRANSFER}"
        )
        raise PartsError(f"{run}'s model differs from {parts}'s in {detail}; {hint}")
    if diffusion != manifest["diffusion"]:
        differ = sorted(
            k
            for k in diffusion.keys() | manifest["diffusion"].keys()
            if diffusion.get(k) != manifest["diffusion"].get(k)
        )
        raise PartsError(
            f"{run}'s diffusion differs from {parts}'s in {differ}: one deployment samples "
            f"every class with one diffusion; {_FIX_TRANSFER}"
        )
    ours, theirs = manifest.get("latent"), meta.get("latent")
    if bool(ours) != bool(theirs) or (ours and ours.get("image_size") != theirs.get("image_size")):
        raise PartsError(
            f"{run} was trained on {'latents ' + str(theirs) if theirs else 'pixels'}, {parts} "
            f"on {'latents ' + str(ours) if ours else 'pixels'}: their samples decode "
            f"differently; {_FIX_TRANSFER} on data of PARTS's kind"
        )
    if not ours:
        return
    check_space(  # refuses another latent space; warns where the VAE's config.json differs
        ours,
        theirs,
        f"{run}'s latents were made with another VAE ({theirs.get('vae')}) than {parts}'s "
        f"({ours.get('vae')})",
        f"{_FIX_TRANSFER} on data encoded with PARTS's VAE",
    )
    unrecorded = CONFIG_SHA not in ours or CONFIG_SHA not in theirs  # older runs: the path only
    if unrecorded and ours.get("vae") != theirs.get("vae"):
        log.warning(
            "%s's latents were made with VAE %s, %s's with %s; the grafted parts decode every "
            "class with %s (if these are two different VAEs, the run's classes will not decode "
            "right)",
            run,
            theirs.get("vae"),
            parts,
            ours.get("vae"),
            ours.get("vae"),
        )


def _check_learngene(
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    record: dict,
    parts: Path,
    run: Path,
) -> None:
    """Refuse unless the run's learngene is PARTS's bit for bit (sha256 of every tensor)."""
    if ours.keys() != theirs.keys():
        odd = sorted(ours.keys() ^ theirs.keys())
        raise PartsError(
            f"{run}'s learngene has other tensors than {parts}'s ({odd[:5]}): another "
            f"architecture; {_FIX_TRANSFER}"
        )
    changed = [n for n in ours if tensor_sha256(ours[n]) != tensor_sha256(theirs[n])]
    if not changed:
        return
    method = record.get("method")
    if record.get("train_learngenes"):
        flag = "--method kind-unfrozen" if method == "kind-unfrozen" else "--train-learngenes"
        why = f"the run trained its learngenes ({flag})"
    elif method == "kind-sigma":
        why = "the run trained the learngenes' singular values σ (--method kind-sigma)"
    else:
        source = record.get("source")
        from_other = source and Path(source) != parts.resolve()
        why = (
            f"the run was transferred from {source}"
            if from_other
            else "the run started from another learngene (PARTS was written again since)"
        )
    raise PartsError(
        f"{run}'s learngene differs from {parts}'s in {len(changed)} tensor(s) "
        f"({', '.join(changed[:3])}{' …' if len(changed) > 3 else ''}): {why}. Its classes need "
        "that learngene, so they cannot share PARTS's: deploy the run on its own "
        "(`kind-dit decompose RUN --out PARTS2`), or transfer again from PARTS with the "
        "learngenes frozen (--method kind or kind-tailors, without --train-learngenes) to graft"
    )


def _renumbered(tensors: dict[str, torch.Tensor], offset: int, k: int) -> dict[str, torch.Tensor]:
    """A run's tailor tensors named for the grafted model: group g -> offset + g, class c -> k+c."""
    out = {}
    for name, tensor in tensors.items():
        if m := _ROW.fullmatch(name):
            name = f"y_embedder.rows.{k + int(m.group(1))}"
        else:
            name = _TAILOR.sub(lambda m: f".tailors.{offset + int(m.group(1))}.", name, count=1)
        out[name] = tensor
    return out


def _copy_part(parts: Path, entry: dict, directory: Path) -> None:
    """Copy one verified part file byte for byte (atomically); the copy is checked against the
    manifest's sha256 before it is renamed into place."""
    source, target = parts / entry["file"], directory / entry["file"]
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)
        if sha256_file(tmp) != entry["sha256"]:
            raise PartsError(
                f"part file {source} changed while it was copied; graft again (nothing was written)"
            )
