"""Files on disk: atomic writes, training checkpoints, and model directories.

Tensors go to safetensors and everything else to JSON, so loading never unpickles. Every write lands
in a temporary file or directory first and is renamed into place: a crash leaves the previous file
whole. A training checkpoint is a directory `checkpoints/step_NNNNNNN/` holding the model, the EMA
weights, the optimiser state (flattened to tensors keyed by parameter name), the RNG states and a
`state.json` with the step; a model directory is `model.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kind.diffusion import DiffusionConfig
from kind.model import DiT, ModelConfig

MODEL_JSON, MODEL_WEIGHTS = "model.json", "model.safetensors"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(tmp: str | Path, final: Path, directory: bool = False) -> None:
    """Give a temporary file or directory the usual permissions, then rename it into place."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)
    os.replace(tmp, final)


@contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """Yield a temporary file name beside `path` (same suffix); on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None):
    with atomic_file(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            tmp,
            metadata={k: str(v) for k, v in (meta or {}).items()},
        )


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():  # re-saving the same step: move the old one aside, then drop it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            _publish(tmp, final, directory=True)
            shutil.rmtree(old)
        else:
            _publish(tmp, final, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged") from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated headers etc.
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); the file is damaged or truncated"
        ) from e


# ---- optimiser state, flattened so it can live in safetensors ------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    """(tensors keyed 'param_name/state_key', hyper-parameters of each param group)."""
    sd = optimizer.state_dict()
    tensors = {f"{names[i]}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list
) -> None:
    sd = optimizer.state_dict()
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, k = key.rpartition("/")
        if name not in index:
            raise ValueError(f"checkpoint has optimiser state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[k] = value
    for g, saved in zip(sd["param_groups"], groups, strict=True):
        g.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


# ---- run checkpoints ------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


# ---- model directories ----------------------------------------------------------------------


def save_model_dir(
    path: Path,
    model: DiT,
    diffusion: DiffusionConfig,
    extra: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `model.json` (architecture + diffusion config) and `model.safetensors` atomically."""
    with atomic_dir(Path(path)) as tmp:
        meta = {"model": model.config.to_dict(), "diffusion": vars(diffusion), **(extra or {})}
        atomic_write_text(tmp / MODEL_JSON, json.dumps(meta, indent=2))
        atomic_save_tensors(tmp / MODEL_WEIGHTS, state if state is not None else model.state_dict())


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with an error that names the file and the mismatching tensors."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", bad),
            )
            if keys
        )
        raise ValueError(
            f"weights in {source} do not fit this model ({detail}); they were saved "
            "for a different configuration"
        )
    model.load_state_dict(state)


def load_model_dir(path: Path) -> tuple[DiT, DiffusionConfig, dict]:
    path = Path(path)
    meta = read_json(path / MODEL_JSON)
    config = ModelConfig.from_dict(meta["model"])
    if meta.get("merged") not in (None, "null"):  # one class folded in, plus its null model
        from kind.parts import MergedDiT

        model = MergedDiT(config)
    else:
        model = DiT(config)
    load_state(model, read_tensors(path / MODEL_WEIGHTS), path / MODEL_WEIGHTS)
    return model.eval(), DiffusionConfig(**meta["diffusion"]), meta


def load_model(path: Path, classes: list[str] | None = None) -> tuple[DiT, DiffusionConfig, dict]:
    """A model from a parts directory (assembled for `classes`, None: all), a model directory, or
    a run directory (its exported EMA model, else the EMA weights of its latest checkpoint, for a
    run that was interrupted)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from kind.parts import load_parts

        return load_parts(path, classes)
    for candidate in (path, path / "model"):
        if (candidate / MODEL_JSON).is_file():
            return load_model_dir(candidate)
    last = latest_checkpoint(path)
    if last is None or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no model: expected a run directory (config.json + checkpoints/), "
            f"a model directory ({MODEL_JSON} + {MODEL_WEIGHTS}) or a parts directory"
        )
    cfg = read_json(path / "config.json")
    model = DiT(ModelConfig.from_dict(cfg["model"]))
    state = read_tensors(last / "model.safetensors") | read_tensors(last / "ema.safetensors")
    load_state(model, state, last)
    run = read_json(path / "run.json") if (path / "run.json").is_file() else {}
    meta = {"sample": cfg["sample"], "latent": run.get("latent")}
    return model.eval(), DiffusionConfig(**cfg["diffusion"]), meta
