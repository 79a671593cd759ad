"""Transfer runs: a model for new classes, started from a source model's parts, trained with the
ordinary loop. `kind` transfers the learngenes with fresh tailors (KIND.md, "Novel classes" and
"Large domain shift")."""

from __future__ import annotations

from pathlib import Path

from kind import parts as parts_lib
from kind.config import Config
from kind.train import TrainResult, load_dataset, read_group_file, train

METHODS = ("kind",)


def run_transfer(
    parts: str | Path,
    cfg: Config,
    out: str | Path,
    *,
    method: str = "kind",
    train_learngenes: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Train a transferred model for the classes of `cfg.data` into run directory `out`.

    The data is converted to the source model's image size and channels. On `resume`, the same
    initial model is rebuilt from `parts` and the run's latest checkpoint is loaded over it."""
    if method not in METHODS:
        raise ValueError(f"unknown transfer method {method!r}; choose one of {METHODS}")
    source = parts_lib.ModelConfig.from_dict(parts_lib.read_manifest(parts)["model"])
    data = load_dataset(cfg, source.image_size, source.in_channels)
    class_names = data[2]
    tau = read_group_file(cfg.group_file, class_names) if cfg.group_file else None
    model, diffusion = parts_lib.transfer(
        parts,
        class_names,
        class_to_group=tau,
        train_learngenes=train_learngenes,
        seed=cfg.train.seed,
    )
    cfg.model, cfg.diffusion = model.config, diffusion
    meta = {
        "transfer": {
            "method": method,
            "source": str(Path(parts).resolve()),
            "train_learngenes": train_learngenes,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    }
    return train(cfg, out, model=model, resume=resume, meta=meta, data=data)
