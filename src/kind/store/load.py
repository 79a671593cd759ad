"""Open whatever directory a user points at as a model: a parts directory (assembled for some
classes), a model directory, or a run directory (its exported model, else its latest checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT
from kind.store.modeldir import MODEL_JSON, MODEL_WEIGHTS, is_model_dir, load_model_dir
from kind.store.parts import is_parts_dir, load_parts
from kind.store.runs import is_run_dir, latest_checkpoint, load_run_model


def load_model(path: Path, classes: list[str] | None = None) -> tuple[DiT, DiffusionConfig, dict]:
    """(model in eval mode, diffusion config, metadata) from a parts directory (assembled for
    `classes`, None: all), a model directory, or a run directory (its exported EMA model, else the
    EMA weights of its latest checkpoint, for a run that was interrupted)."""
    path = Path(path)
    if is_parts_dir(path):
        return load_parts(path, classes)
    for candidate in (path, path / "model"):
        if is_model_dir(candidate):
            return load_model_dir(candidate)
    if latest_checkpoint(path) is None or not is_run_dir(path):
        raise FileNotFoundError(
            f"{path} holds no model: expected a run directory (config.json + checkpoints/), "
            f"a model directory ({MODEL_JSON} + {MODEL_WEIGHTS}) or a parts directory"
        )
    return load_run_model(path)
