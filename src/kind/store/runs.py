"""Run directories and their checkpoints, as files.

A run directory holds `config.json`, `run.json` (where it came from, how samples decode),
`metrics.csv`, `samples/`, the exported `model/` and `checkpoints/step_NNNNNNN/`. A checkpoint is a
directory of safetensors files plus `state.json`, written atomically; what goes into it is the
training state's business (`kind.training.state`). Optimiser state is flattened to tensors keyed
by parameter name so it can live in safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig, load_state
from kind.io import read_json, read_tensors

CONFIG_JSON, RUN_JSON = "config.json", "run.json"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_JSON).is_file()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("_")[1])


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


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    """(tensors keyed 'param_name/state_key', hyper-parameters of each param group)."""
    sd = optimizer.state_dict()
    tensors = {f"{names[i]}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list
) -> None:
    """The inverse of `optimizer_tensors`, into an optimiser over the same named parameters."""
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


def ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint with the EMA of its trainable parameters in place."""
    return read_tensors(checkpoint / "model.safetensors") | read_tensors(
        checkpoint / "ema.safetensors"
    )


def load_run_model(run_dir: Path) -> tuple[DiT, DiffusionConfig, dict]:
    """The EMA model of a run's latest checkpoint (for a run interrupted before its export)."""
    run_dir = Path(run_dir)
    last = latest_checkpoint(run_dir)
    if last is None or not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run directory with a checkpoint")
    cfg = read_json(run_dir / CONFIG_JSON)
    model = DiT(ModelConfig.from_dict(cfg["model"]))
    load_state(model, ema_weights(last), last)
    run = read_json(run_dir / RUN_JSON) if (run_dir / RUN_JSON).is_file() else {}
    meta = {"sample": cfg["sample"], "latent": run.get("latent")}
    return model.eval(), DiffusionConfig(**cfg["diffusion"]), meta
