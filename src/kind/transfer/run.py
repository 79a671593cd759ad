"""Transfer runs: a model for new classes, started from a pre-trained source by one of the
registered methods (`kind.transfer.registry`), trained with the ordinary loop.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kind.core.model import ModelConfig, count_params
from kind.data.dataset import open_dataset
from kind.data.vae import check_space
from kind.store.load import load_model
from kind.store.parts import read_manifest
from kind.store.runs import read_run_record
from kind.training.config import Config, read_group_file
from kind.training.loop import TrainResult, train
from kind.transfer.registry import Start, check_budget, get


def read_source(source: str | Path, method: str) -> tuple[ModelConfig, dict | None]:
    """The architecture a transfer starts from (parts directory for KIND, dense run otherwise),
    and the latent space it was trained in (its `latent` record; None: pixels)."""
    if get(method).is_kind:
        manifest = read_manifest(source)
        return ModelConfig.from_dict(manifest["model"]), manifest.get("latent")
    model, _, meta = load_model(Path(source))
    return model.config, meta.get("latent")


def prepare(
    source: str | Path,
    class_names: list[str],
    method: str = "kind",
    *,
    class_to_group: list[int] | None = None,
    train_learngenes: bool = False,
    budget: int | None = None,
    rank_tailor: float | None = None,
    null_tailor: bool = False,
    seed: int = 0,
) -> Start:
    """The start of a transfer by `method`; its meta records the method, the source and the
    trainable parameter count."""
    if budget is not None:  # a budget a method would ignore (the CLI refuses it earlier)
        check_budget(method, "budget")
    start = get(method).start(
        source,
        class_names,
        class_to_group=class_to_group,
        train_learngenes=train_learngenes,
        budget=budget,
        rank_tailor=rank_tailor,
        null_tailor=null_tailor,
        seed=seed,
    )
    meta = {"method": method, "source": str(Path(source).resolve())} | start.meta
    meta["trainable_params"] = count_params(start.model, trainable=True)
    return replace(start, meta=meta)


def run_transfer(
    source: str | Path,
    cfg: Config,
    out: str | Path,
    *,
    method: str = "kind",
    train_learngenes: bool = False,
    budget: int | None = None,
    rank_tailor: float | None = None,
    null_tailor: bool = False,
    resume: bool = False,
    restart: bool = False,
) -> TrainResult:
    """Train a transferred model for the classes of `cfg.data` into run directory `out`.

    The data is converted to the source model's image size and channels. On `resume`, the same
    initial model is rebuilt from `source` and the run's latest checkpoint is loaded over it."""
    arch, latent = read_source(source, method)
    data = open_dataset(cfg.data, "train", arch.image_size, arch.in_channels, vae=cfg.vae)
    if latent and data.latent:  # the transferred model decodes the new classes with one VAE
        check_space(
            latent,
            data.latent,
            f"latent store {cfg.data} was encoded with another VAE ({data.latent['vae']}) than "
            f"source {source} was trained with ({latent.get('vae') or 'not recorded'})",
            "encode the new classes with the source's VAE (kind-dit encode --vae DIR)",
        )
    tau = read_group_file(cfg.group_file, data.class_names) if cfg.group_file else None
    start = prepare(
        source,
        data.class_names,
        method,
        class_to_group=tau,
        train_learngenes=train_learngenes,
        budget=budget,
        rank_tailor=rank_tailor,
        null_tailor=null_tailor,
        seed=cfg.train.seed,
    )
    if resume:
        _check_same_transfer(Path(out), start.meta)
    cfg = replace(cfg, model=start.model.config, diffusion=start.diffusion)
    return train(cfg, out, model=start.model, resume=resume, restart=restart,
                 meta={"transfer": start.meta},
                 data=data, export=start.export)  # fmt: skip


# what a transfer's start fixes: its method and what sizes what it trains
SAME_ON_RESUME = ("method", "budget", "null_tailor", "train_learngenes", "trainable_params")


def _check_same_transfer(out: Path, meta: dict) -> None:
    """A resume rebuilds the start from the options given now; other options (a --match-kind or
    --null-tailor left out, another --rank-tailor) would fail on the checkpoint's shapes with a
    message that names none of them, so the run's record is compared first."""
    then = read_run_record(out).get("transfer")
    if then is None:
        return
    # keys an older run did not record are not compared; a budget it did not have is
    keys = [k for k in SAME_ON_RESUME if k in then or k == "budget"]
    differ = [f"{k} {then.get(k)!r} (now {meta.get(k)!r})" for k in keys
              if then.get(k) != meta.get(k)]  # fmt: skip
    if differ:
        raise ValueError(
            f"--resume: the transfer in {out} started with other options: {'; '.join(differ)}; "
            "resume with the options it started with (--method, --budget or --match-kind, "
            "--null-tailor, --rank-tailor, --train-learngenes), or start a new run (--restart "
            "or another --out)"
        )
