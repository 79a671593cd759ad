"""Transfer runs: a model for new classes, started from a pre-trained source, trained with the
ordinary loop.

KIND methods start from a parts directory: `kind` transfers the learngenes (frozen) with fresh
tailors (KIND.md, "Novel classes" and "Large domain shift"); two ablations: `kind-tailors` also
carries the source's tailors, `kind-unfrozen` trains the learngenes too. The baselines
(`kind.baselines`) adapt a dense pre-trained DiT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from kind import baselines
from kind import parts as parts_lib
from kind.checkpoint import load_model
from kind.config import Config
from kind.model import DiT, ModelConfig
from kind.train import TrainResult, load_dataset, read_group_file, train

KIND_METHODS = ("kind", "kind-tailors", "kind-unfrozen")
METHODS = KIND_METHODS + baselines.METHODS


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kind_budget(parts: str | Path, class_names: list[str]) -> int:
    """Trainable parameters of a KIND transfer to these classes: the budget baselines match."""
    model, _ = parts_lib.transfer(parts, class_names)
    return trainable(model)


def source_config(source: str | Path, method: str) -> ModelConfig:
    """The architecture a transfer starts from (parts directory for KIND, dense run otherwise)."""
    if method in KIND_METHODS:
        return ModelConfig.from_dict(parts_lib.read_manifest(source)["model"])
    return load_model(Path(source))[0].config


def prepare(
    source: str | Path,
    class_names: list[str],
    method: str = "kind",
    *,
    class_to_group: list[int] | None = None,
    train_learngenes: bool = False,
    budget: int | None = None,
    rank_tailor: float | None = None,
    seed: int = 0,
) -> tuple[nn.Module, object, dict, Callable[[nn.Module], DiT] | None]:
    """(initial model with requires_grad set, diffusion config, run metadata, export function)."""
    if method not in METHODS:
        raise ValueError(f"unknown transfer method {method!r}; choose one of {', '.join(METHODS)}")
    meta = {"method": method, "source": str(Path(source).resolve())}
    if method in KIND_METHODS:
        train_learngenes = train_learngenes or method == "kind-unfrozen"
        model, diffusion = parts_lib.transfer(
            source,
            class_names,
            class_to_group=class_to_group,
            train_learngenes=train_learngenes,
            carry_tailors=method == "kind-tailors",
            rank_tailor=rank_tailor,
            seed=seed,
        )
        meta |= {"train_learngenes": train_learngenes, "detail": "learngenes "
                 + ("trained" if train_learngenes else "frozen") + ", tailors "
                 + ("from the source" if method == "kind-tailors" else "fresh")}  # fmt: skip
        export = None
    else:
        dense, diffusion, _ = load_model(Path(source))
        if dense.config.kind:
            raise ValueError(
                f"method {method!r} adapts a dense pre-trained DiT, but {source} holds a KIND "
                "model; pass a run of `kind-dit train --model dense` (KIND models transfer with "
                "--method kind from their parts directory)"
            )
        adapted = baselines.adapt(method, dense, class_names, budget=budget, seed=seed)
        model, export = adapted.model, adapted.export
        meta |= {"detail": adapted.detail, "budget": budget}
    meta["trainable_params"] = trainable(model)
    return model, diffusion, meta, export


def run_transfer(
    source: str | Path,
    cfg: Config,
    out: str | Path,
    *,
    method: str = "kind",
    train_learngenes: bool = False,
    budget: int | None = None,
    rank_tailor: float | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a transferred model for the classes of `cfg.data` into run directory `out`.

    The data is converted to the source model's image size and channels. On `resume`, the same
    initial model is rebuilt from `source` and the run's latest checkpoint is loaded over it."""
    arch = source_config(source, method)
    data = load_dataset(cfg, arch.image_size, arch.in_channels)
    class_names = data[2]
    tau = read_group_file(cfg.group_file, class_names) if cfg.group_file else None
    model, diffusion, meta, export = prepare(
        source,
        class_names,
        method,
        class_to_group=tau,
        train_learngenes=train_learngenes,
        budget=budget,
        rank_tailor=rank_tailor,
        seed=cfg.train.seed,
    )
    cfg.model, cfg.diffusion = model.config, diffusion
    return train(
        cfg, out, model=model, resume=resume, meta={"transfer": meta}, data=data, export=export
    )
