"""Model directories: `model.json` (architecture, diffusion and sampling settings) beside
`model.safetensors` (the weights), `README.md` (its model card, `kind.store.card`) and
`checksums.json` (their sha256, checked on every load), written atomically as one directory.

This is what a run exports, what `assemble` writes and what `sample` reads; a merged directory
(`"merged"` in model.json) holds one class folded into dense weights plus its null network.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kind.core.decomposition import MergedDiT
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig, load_state
from kind.io import (
    atomic_dir,
    atomic_save_tensors,
    atomic_write_text,
    kind_problem,
    read_json,
    read_tensors,
    verify_checksums,
    write_checksums,
    write_json,
)
from kind.store.card import CARD, model_card, model_sizes
from kind.store.runs import run_provenance

log = logging.getLogger(__name__)

MODEL_JSON, MODEL_WEIGHTS = "model.json", "model.safetensors"


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def save_model_dir(
    path: Path,
    model: DiT | MergedDiT,
    diffusion: DiffusionConfig,
    extra: dict | None = None,
    made: dict | None = None,
    replace: bool = False,
) -> None:
    """Write `model.json` (architecture + diffusion config + `extra`), `model.safetensors` and
    the model card as one directory, atomically. `made`:
    how the model was made, for its card (`kind.store.card.model_card`); default, for a run's
    `model/`, what the run's config.json and run.json record. `replace`: a model already at
    `path` is replaced (a run's `model/`, when a continued run ends again)."""
    path = Path(path)
    made = run_provenance(path) if made is None else made
    with atomic_dir(path, replace=replace) as tmp:
        meta = {"model": model.config.to_dict(), "diffusion": vars(diffusion), **(extra or {})}
        write_json(tmp / MODEL_JSON, meta)
        atomic_save_tensors(tmp / MODEL_WEIGHTS, model.state_dict())
        write_card(tmp, model_card(meta, model_sizes(model), made))
        write_checksums(tmp)


def write_card(directory: Path, card: str) -> None:
    """Write `card` as the directory's README.md; a README.md already there is never replaced."""
    if (Path(directory) / CARD).exists():
        log.warning("%s already exists: kept, no model card written", Path(directory) / CARD)
        return
    atomic_write_text(Path(directory) / CARD, card)


def load_model_dir(path: Path) -> tuple[DiT | MergedDiT, DiffusionConfig, dict]:
    """(model in eval mode, diffusion config, model.json's content) of a model directory."""
    path = Path(path)
    if not verify_checksums(path):
        log.warning("%s has no checksums.json (written by kind-dit 0.1): not verified", path)
    meta = read_json(path / MODEL_JSON, "model", "diffusion")
    problem = kind_problem(meta, {"model": dict, "diffusion": dict, "sample": dict,
                                  "latent": dict, "imported": dict, "source": str, "merged": str})  # fmt: skip
    if problem:
        raise ValueError(
            f"{path / MODEL_JSON}: {problem}; the file is damaged or was edited by hand"
        )
    config = ModelConfig.from_dict(meta["model"])
    merged = meta.get("merged") not in (None, "null")  # one class folded in, plus its null model
    model = MergedDiT(config) if merged else DiT(config)
    load_state(model, read_tensors(path / MODEL_WEIGHTS), path / MODEL_WEIGHTS)
    return model.eval(), DiffusionConfig.from_dict(meta["diffusion"]), meta
