"""The experiment jobs: pre-train, deploy (decompose, assemble, check), transfer; each evaluated,
each run in a worker process of its own and returning a typed result.

Jobs are module-level functions, so the scheduler's spawned workers import them by reference.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kind.core.diffusion import Diffusion
from kind.core.images import save_grid, save_npz
from kind.core.model import count_params, load_state
from kind.core.sampling import generate
from kind.data.dataset import class_names
from kind.eval.evaluate import evaluate_images
from kind.experiments.presets import SOURCES, Preset
from kind.experiments.results import (
    CurvePoint,
    DeployResult,
    DeployVariant,
    EvalSummary,
    GuidancePoint,
    RunResult,
    SizeRow,
)
from kind.experiments.scheduler import Job
from kind.io import read_json
from kind.store.load import load_model
from kind.store.parts import assemble, decompose, is_parts_dir, read_manifest
from kind.store.runs import (
    checkpoint_dirs,
    checkpoint_step,
    ema_weights,
    is_owned,
    is_run_dir,
    usable_checkpoints,
)
from kind.store.sizes import size_table
from kind.training.config import Config, load_config
from kind.training.loop import TrainResult, train
from kind.transfer.kind import kind_budget
from kind.transfer.registry import get
from kind.transfer.run import run_transfer

EVAL_SEED = 12345


def _setup_worker(threads: int, log_file: Path) -> None:
    """One job's process: its thread count, and its log and progress bars in its own log file
    (the terminal shows only the demo's overall progress)."""
    torch.set_num_threads(threads)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr = open(log_file, "a", buffering=1)  # noqa: SIM115 (lives as long as the job)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _config(data: str, preset: Preset, steps: int, seed: int, device: str,
            batch_size: int | None = None, **model) -> Config:  # fmt: skip
    every = max(1, steps // (preset.curve_points or 4))  # checkpoints also bound a lost job
    return load_config(
        overrides={
            "data": data,
            "model": {"size": preset.size, **model},
            "train": {
                "steps": steps,
                "batch_size": batch_size or preset.batch_size,
                "lr": preset.lr,
                "seed": seed,
                "device": device,
                "checkpoint_every": every,
                "keep_checkpoints": preset.curve_points + 1,
                "sample_every": 0,
                "log_every": 25,
            },
            "sample": {"steps": preset.sample_steps, "cfg_scale": preset.cfg_scale, "per_class": 8},
        }
    )


def _evaluate(model, diffusion, ref: str, per_class: int, preset: Preset, device: str,
              save: Path | None = None, cfg_scale: float | None = None) -> EvalSummary:  # fmt: skip
    """Sample `per_class` images of every class the model holds and score them against `ref`, at
    guidance `cfg_scale` (default the preset's)."""
    classes = model.config.held_classes
    labels = [c for c in classes for _ in range(per_class)]
    cfg_scale = preset.cfg_scale if cfg_scale is None else cfg_scale
    generation = {"sampler": "ddim", "steps": preset.sample_steps, "cfg_scale": cfg_scale,
                  "seed": EVAL_SEED}  # fmt: skip
    images = generate(model, diffusion, labels, seed=EVAL_SEED, steps=preset.sample_steps,
                      cfg_scale=cfg_scale, device=device)  # fmt: skip
    result = evaluate_images(images, torch.tensor(labels), model.config.class_names, ref,
                             generation=generation)  # fmt: skip
    if save is not None:
        show = torch.cat([images[i * per_class : i * per_class + 8] for i in range(len(classes))])
        save_grid(show, min(8, per_class), save / "samples.png")
        save_npz(save / "samples.npz", images, labels, model.config.class_names, **generation)
    return EvalSummary(**{k: result[k] for k in EvalSummary.__dataclass_fields__})


def _curve(run: Path, model, diffusion, ref: str, preset: Preset, device: str) -> list[CurvePoint]:
    """FID of the EMA weights of every checkpoint the run kept."""
    points = []
    for d in checkpoint_dirs(run):
        load_state(model, ema_weights(d), d)
        ev = _evaluate(model, diffusion, ref, preset.curve_per_class, preset, device)
        points.append(CurvePoint(checkpoint_step(d), ev.fid, ev.class_accuracy))
    return points


def _sweep(model, diffusion, ref: str, preset: Preset, device: str) -> list[GuidancePoint]:
    """The model evaluated at every guidance scale of the preset, `sweep_samples` samples each."""
    per_class = max(1, preset.sweep_samples // len(model.config.held_classes))
    points = []
    for scale in preset.cfg_scales:
        ev = _evaluate(model, diffusion, ref, per_class, preset, device, cfg_scale=scale)
        points.append(GuidancePoint(scale, ev.fid, ev.precision, ev.recall, ev.class_accuracy,
                                    ev.num_samples))  # fmt: skip
    return points


def _continue(run: Path) -> dict:
    """How to (re)start `run`: resume from its checkpoint, restart a run of ours that died before
    its first one, or start fresh; a folder that is not a run of ours is refused by `train`."""
    if next(usable_checkpoints(run), None) is not None:
        return {"resume": True}
    return {"restart": is_owned(run) and is_run_dir(run)}


def _finish(run: Path, result: TrainResult, diffusion: Diffusion, ref: str, preset: Preset,
            device: str, **extra) -> RunResult:  # fmt: skip
    """Final evaluation of a finished run, then its curve."""
    model = result.model
    trainable = count_params(model, trainable=True)
    deployed, _, _ = load_model(run / "model")
    final = _evaluate(deployed, diffusion, ref, preset.eval_per_class, preset, device, run / "eval")
    t0 = time.time()
    curve = _curve(run, model, diffusion, ref, preset, device) if preset.curve_points else []
    sweep = _sweep(deployed, diffusion, ref, preset, device)
    return RunResult(
        run=str(run),
        train_seconds=result.seconds,
        steps=result.steps,
        trainable=trainable,
        deployed=count_params(deployed),
        eval=final,
        curve=curve,
        curve_seconds=time.time() - t0,
        sweep=sweep,
        grid=str(run / "eval" / "samples.png"),
        **extra,
    )


def pretrain_job(out: str, kind: bool, preset: dict, seed: int, threads: int, device: str,
                 orth_weight: float = 0.0, source: str = "digits") -> RunResult:  # fmt: skip
    """Pre-train on the classes of `source` and evaluate; `orth_weight`: the orthogonality
    penalty."""
    preset = _preset(preset)
    spec = SOURCES[source].spec
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    cfg = _config(spec, preset, preset.pretrain_steps, seed, device, kind=kind)
    cfg.train.orth_weight = orth_weight
    result = train(cfg, run, **_continue(run))
    return _finish(run, result, Diffusion(cfg.diffusion), spec, preset, device,
                   method="kind" if kind else "dense", source=source)  # fmt: skip


def transfer_job(out: str, task: str, method: str, seed: int, parts: str, dense: str,
                 preset: dict, threads: int, device: str, rank_tailor: float | None = None,
                 source: str = "digits", budget_scale: float = 1.0,
                 null_tailor: bool = False) -> RunResult:  # fmt: skip
    """One transfer run and its evaluation. `rank_tailor` varies KIND's tailor rank (ablation);
    `budget_scale` puts the run at that multiple of KIND's budget (a KIND method through its
    tailor rank, LoRA/PiSSA through their rank, OFT through its block size)."""
    preset = _preset(preset)
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    spec = next(t.spec for t in SOURCES[source].tasks if t.name == task)
    cfg = _config(spec, preset, preset.transfer_steps, seed, device, preset.transfer_batch_size)
    budget = kind_budget(parts, class_names(spec))
    kind = get(method).is_kind
    if budget_scale != 1 and kind:
        source_rank = read_manifest(parts)["model"]["rank_tailor"]
        if source_rank < 1:  # a fraction of each layer's width: no single count to scale
            raise ValueError(f"budget curves need an absolute tailor rank, not {source_rank}")
        rank_tailor = max(1, round(budget_scale * source_rank))
    result = run_transfer(parts if kind else dense, cfg, run, method=method,
                          budget=None if kind else round(budget_scale * budget),
                          rank_tailor=rank_tailor, null_tailor=null_tailor,
                          **_continue(run))  # fmt: skip
    meta = read_json(run / "run.json")["transfer"]
    return _finish(run, result, Diffusion(cfg.diffusion), spec, preset, device, task=task,
                   method=method, seed=seed, budget=budget, detail=meta.get("detail", ""),
                   rank_tailor=rank_tailor, source=source, budget_scale=budget_scale,
                   null_tailor=null_tailor)  # fmt: skip


def _preset(fields: dict) -> Preset:
    """A Preset from its dict (as jobs receive it: plain values cross the process boundary)."""
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def deploy_job(out: str, kind_run: str, threads: int, device: str) -> DeployResult:
    """Decompose the pre-trained KIND model; assemble and merge it; check exactness; sizes."""
    out = Path(out)
    _setup_worker(threads, out.parent / "deploy.log")
    full, diffusion, meta = load_model(Path(kind_run) / "model")
    parts = out / "parts"
    if not is_parts_dir(parts):
        decompose(full, diffusion, parts, {"sample": meta.get("sample", {})})
    names = full.config.class_names
    g = torch.Generator().manual_seed(0)
    variants = []
    for label, classes, merge_class in [
        ("1 class", names[:1], None),
        ("2 classes", names[:2], None),
        ("all classes", names, None),
        ("1 class, merged dense", names[:1], names[0]),
    ]:
        target = out / label.replace(" ", "_").replace(",", "")
        if not target.exists():
            assemble(parts, classes, target, merge_class=merge_class)
        model, _, _ = load_model(target)
        ids = [names.index(c) for c in classes]
        own = [model.config.class_names.index(c) for c in classes]  # ids inside the small model
        y_full = torch.tensor(ids * 4 + [full.null_id] * 2)
        y_own = torch.tensor(own * 4 + [model.null_id] * 2)
        c, s = full.config.in_channels, full.config.image_size
        x = torch.randn(len(y_full), c, s, s, generator=g)
        t = torch.randint(0, 1000, (len(y_full),), generator=g)
        with torch.no_grad():
            ref, got = full(x, t, y_full), model(x, t, y_own)
        same = torch.equal(
            generate(full, diffusion, ids[:1] * 2, seed=7, steps=5),
            generate(model, diffusion, own[:1] * 2, seed=7, steps=5),
        )
        variants.append(
            DeployVariant(
                variant=label,
                classes=classes,
                params=count_params(model),
                bytes=sum(f.stat().st_size for f in target.rglob("*.safetensors")),
                max_rel_diff=((got - ref).norm() / ref.norm()).item(),
                same_samples=same,
            )
        )
    table = [SizeRow(n, p, b) for n, p, b in size_table(parts)]
    return DeployResult(str(parts), variants, table, full.orthogonality_error())


# ---- jobs for the scheduler ------------------------------------------------------------------


def pretrain_task(out: Path, name: str, preset: Preset, **kwargs) -> Job:
    """A `pretrain_job` called `name` whose run goes to out/name; kwargs are pretrain_job's."""
    weight = preset.pretrain_steps * (1.4 if kwargs["kind"] else 1.0)
    return Job(name, pretrain_job, dict(out=str(out / name), preset=asdict(preset), **kwargs),
               weight)  # fmt: skip


def deploy_task(out: Path, name: str, kind_run: Path, deps: tuple[str, ...], **kwargs) -> Job:
    """A `deploy_job` called `name` writing to out/name; kwargs are deploy_job's."""
    return Job(name, deploy_job, dict(out=str(out / name), kind_run=str(kind_run), **kwargs),
               100, deps=deps)  # fmt: skip


def transfer_task(out: Path, name: str, preset: Preset, deps: tuple[str, ...] = (),
                  **kwargs) -> Job:  # fmt: skip
    """A `transfer_job` called `name` whose run goes to out/name; kwargs are transfer_job's."""
    return Job(name, transfer_job, dict(out=str(out / name), preset=asdict(preset), **kwargs),
               preset.transfer_steps, deps=deps)  # fmt: skip
