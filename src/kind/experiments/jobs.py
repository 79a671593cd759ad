"""The experiment jobs: pre-train, deploy (decompose, assemble, check), transfer; each evaluated,
each run in a worker process of its own and returning a typed result.

Jobs are module-level functions, so the scheduler's spawned workers import them by reference.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kind.core.diffusion import Diffusion
from kind.core.flops import count_flops
from kind.core.host_memory import keep_freed_memory
from kind.core.images import save_grid, save_npz
from kind.core.kindify import kindify
from kind.core.model import DiT, count_params, load_state
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
    SizeCurveResult,
    SizePoint,
    SizeRow,
)
from kind.experiments.scheduler import Job
from kind.io import read_json
from kind.store.load import load_model
from kind.store.parts import (
    assemble,
    budget_floor,
    decompose,
    forward_flops,
    is_parts_dir,
    load_parts,
    read_manifest,
    shrink_to_budget,
)
from kind.store.runs import (
    CONFIG_JSON,
    auto_resume,
    checkpoint_dirs,
    checkpoint_step,
    ema_weights,
    has_checkpoint,
    start_from_checkpoint,
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
    """One job's process: its thread count, its heap kept between steps (kind.core.host_memory),
    and its log and progress bars in its own log file (the terminal shows only the demo's overall
    progress)."""
    torch.set_num_threads(threads)
    keep_freed_memory()
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
              save: Path | None = None, cfg_scale: float | None = None,
              seed: int = EVAL_SEED) -> EvalSummary:  # fmt: skip
    """Sample `per_class` images of every class the model holds and score them against `ref`, at
    guidance `cfg_scale` (default the preset's), drawing with `seed`."""
    classes = model.config.held_classes
    labels = [c for c in classes for _ in range(per_class)]
    cfg_scale = preset.cfg_scale if cfg_scale is None else cfg_scale
    generation = {"sampler": "ddim", "steps": preset.sample_steps, "cfg_scale": cfg_scale,
                  "seed": seed}  # fmt: skip
    images = generate(model, diffusion, labels, seed=seed, steps=preset.sample_steps,
                      cfg_scale=cfg_scale, device=device)  # fmt: skip
    result = evaluate_images(images, torch.tensor(labels), model.config.class_names, ref,
                             generation=generation)  # fmt: skip
    if save is not None:
        show = images.unflatten(0, (len(classes), per_class))[:, :8]  # [classes, ≤ 8, C, H, W]
        save_grid(show.flatten(0, 1), show.shape[1], save / "samples.png")
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


def _draws(model, diffusion, ref: str, preset: Preset, device: str,
           first: EvalSummary | None = None) -> list[EvalSummary]:  # fmt: skip
    """`preset.noise_draws` evaluations at the preset's guidance, draw i sampled with seed
    EVAL_SEED + i (the same labels and noise for every model, so draws pair across models);
    `first`: draw 0, evaluated already."""
    evals = [first] if first is not None else []
    for i in range(len(evals), preset.noise_draws):
        evals.append(_evaluate(model, diffusion, ref, preset.eval_per_class, preset, device,
                               seed=EVAL_SEED + i))  # fmt: skip
    return evals


def _step_flops(model: DiT, diffusion: Diffusion, batch_size: int, device: str) -> float:
    """FLOPs of one training step of `model` (the loss's forward and backward) on a batch of
    `batch_size` cycling through its classes, counted by torch.utils.flop_counter, attention
    through the math kernel (which it counts; the fused kernels it does not)."""
    classes = model.config.held_classes
    g = torch.Generator().manual_seed(0)
    c, s = model.config.in_channels, model.config.image_size
    x = torch.randn(batch_size, c, s, s, generator=g).to(device)
    y = torch.tensor([classes[i % len(classes)] for i in range(batch_size)])
    t = torch.randint(0, diffusion.config.num_timesteps, (batch_size,), generator=g).to(device)
    route = model.route(y) if model.config.kind else None
    with sdpa_kernel(SDPBackend.MATH), count_flops() as counter:
        diffusion.loss(model, x, y.to(device), t, torch.randn_like(x), route).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _continue(run: Path) -> dict:
    """How to (re)start a job's `run`, by --auto-resume's rule (`auto_resume`): resume from its
    checkpoint, start again a run of ours that died before its first one, or start fresh; a
    folder that is not a run of ours is refused by `train`."""
    resume, restart = auto_resume(run)
    return {"resume": resume, "restart": restart}


# training settings a continued run may change: how long it runs and how it keeps records
_LENGTH = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "device",
           "threads", "init_from"}  # fmt: skip


def _adopt(source: Path, run: Path, cfg: Config) -> None:
    """Start `run` as finished run `source` at its latest checkpoint (its config, record, metrics
    to that step, and the checkpoint), for `train(..., resume=True)` to take it to
    cfg.train.steps. The learning rate is constant after warm-up and a resumed run computes what
    an uninterrupted one does (tests/test_train.py), so `run` ends as the run of `cfg` from scratch
    would, without redoing the steps `source` took. Refused unless `source` trained the same data
    and model with the same settings (its length aside); the files are `start_from_checkpoint`'s
    business."""
    saved = read_json(source / CONFIG_JSON)
    mine = asdict(cfg)
    differ = [f"{k}: {saved.get(k)} vs {mine[k]}" for k in ("data", "group_file", "vae", "diffusion")
              if saved.get(k) != mine[k]]  # fmt: skip
    differ += [f"model.{k}: {saved['model'].get(k)} vs {v}" for k, v in mine["model"].items()
               if v is not None and k not in ("class_names",) and saved["model"].get(k) != v]  # fmt: skip
    differ += [f"train.{k}: {saved['train'].get(k)} vs {v}" for k, v in mine["train"].items()
               if k not in _LENGTH and saved["train"].get(k) != v]  # fmt: skip
    if differ:
        raise ValueError(f"cannot continue {source}: it trained otherwise ({'; '.join(differ)})")
    checkpoint = next((c for c in usable_checkpoints(source)
                       if checkpoint_step(c) <= cfg.train.steps), None)  # fmt: skip
    if checkpoint is None:
        raise ValueError(f"cannot continue {source}: no checkpoint at or before step "
                         f"{cfg.train.steps}")  # fmt: skip
    start_from_checkpoint(run, source, checkpoint)


def _finish(run: Path, result: TrainResult, diffusion: Diffusion, ref: str, preset: Preset,
            device: str, draws: bool = False, **extra) -> RunResult:  # fmt: skip
    """Final evaluation of a finished run (with `draws`: repeated over `preset.noise_draws` sample
    draws), then its curve."""
    model = result.model
    trainable = count_params(model, trainable=True)
    deployed, _, _ = load_model(run / "model")
    final = _evaluate(deployed, diffusion, ref, preset.eval_per_class, preset, device, run / "eval")
    if draws:
        extra["draws"] = [e.fid for e in _draws(deployed, diffusion, ref, preset, device, final)]
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
                 orth_weight: float = 0.0, source: str = "digits", steps: int | None = None,
                 init_from: str | None = None, continue_from: str | None = None,
                 pretraining: str = "") -> RunResult:  # fmt: skip
    """Pre-train on the classes of `source` for `steps` (default the preset's) and evaluate;
    `orth_weight`: the orthogonality penalty; `init_from`: a dense run whose model starts this
    KIND run (KIND-ify, `train.init_from`); `continue_from`: a finished run of the same settings
    this one continues from its latest checkpoint (`_adopt`: the same run as from scratch, its
    steps not redone). A run of the KIND-ify comparison (`pretraining` set) is also evaluated
    over sample draws and has its training step's FLOPs counted (and those of the dense run it
    starts from)."""
    preset = _preset(preset)
    spec = SOURCES[source].spec
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    cfg = _config(spec, preset, steps or preset.pretrain_steps, seed, device, kind=kind)
    cfg.train.orth_weight = orth_weight
    cfg.train.init_from = init_from
    if continue_from and not has_checkpoint(run):
        _adopt(Path(continue_from), run, cfg)
    result = train(cfg, run, **_continue(run))
    diffusion = Diffusion(cfg.diffusion)
    extra = {}
    if pretraining:
        batch = cfg.train.batch_size
        extra["step_flops"] = _step_flops(result.model, diffusion, batch, device)
        if init_from:
            dense = load_model(Path(init_from) / "model")[0].to(device)
            extra["init_step_flops"] = _step_flops(dense, diffusion, batch, device)
            extra["init_steps"] = load_config(Path(init_from) / "config.json").train.steps
    return _finish(run, result, diffusion, spec, preset, device, draws=bool(pretraining),
                   method="kind" if kind else "dense", source=source, pretraining=pretraining,
                   **extra)  # fmt: skip


def transfer_job(out: str, task: str, method: str, seed: int, parts: str, dense: str,
                 preset: dict, threads: int, device: str, rank_tailor: float | None = None,
                 source: str = "digits", budget_scale: float = 1.0,
                 null_tailor: bool = False, pretraining: str = "") -> RunResult:  # fmt: skip
    """One transfer run and its evaluation. `rank_tailor` varies KIND's tailor rank (ablation);
    `budget_scale` puts the run at that multiple of KIND's budget (a KIND method through its
    tailor rank, LoRA/PiSSA through their rank, OFT through its block size); `pretraining`: the
    KIND-ify comparison's pre-training the parts come from (evaluated over sample draws too)."""
    preset = _preset(preset)
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    spec = next(t.spec for t in SOURCES[source].tasks if t.name == task)
    cfg = _config(spec, preset, preset.transfer_steps, seed, device, preset.transfer_batch_size)
    budget = kind_budget(parts, class_names(spec))
    kind, budgeted = get(method).is_kind, get(method).budgeted
    if budget_scale != 1 and kind:
        source_rank = read_manifest(parts)["model"]["rank_tailor"]
        if source_rank < 1:  # a fraction of each layer's width: no single count to scale
            raise ValueError(f"budget curves need an absolute tailor rank, not {source_rank}")
        rank_tailor = max(1, round(budget_scale * source_rank))
    result = run_transfer(parts if kind else dense, cfg, run, method=method,
                          budget=round(budget_scale * budget) if budgeted else None,
                          rank_tailor=rank_tailor, null_tailor=null_tailor,
                          **_continue(run))  # fmt: skip
    meta = read_json(run / "run.json", "transfer")["transfer"]
    return _finish(run, result, Diffusion(cfg.diffusion), spec, preset, device,
                   draws=bool(pretraining), task=task, method=method, seed=seed, budget=budget,
                   detail=meta.get("detail", ""), rank_tailor=rank_tailor, source=source,
                   budget_scale=budget_scale, null_tailor=null_tailor,
                   pretraining=pretraining)  # fmt: skip


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
                max_rel_diff=_max_rel_diff(full, model, ids, own),
                same_samples=same,
            )
        )
    table = [SizeRow(n, p, b) for n, p, b in size_table(parts)]
    return DeployResult(str(parts), variants, table, full.orthogonality_error())


@torch.no_grad()
def svd_form(dense: DiT) -> DiT:
    """Dense DiT `dense` as a KIND model without tailors whose learngenes are the full SVDs of its
    weights (`kindify` at full learngene rank, tailor rank 0): the same outputs to fp32 rounding,
    in a form the budget rule truncates as it truncates KIND (more parameters than the dense
    model at full rank: r·(in + out + 1) against in·out a layer)."""
    probe = DiT(replace(dense.config, kind=True, rank_tailor=0, rank_learngene=1))
    ranks = {n: min(m.in_features, m.out_features) for n, m in probe.kind_layers()}
    cfg = replace(dense.config, kind=True, rank_tailor=0, rank_learngene=1, learngene_ranks=ranks)
    return kindify(dense, cfg).eval()


def _max_rel_diff(a: DiT, b: DiT, classes: list[int], own: list[int] | None = None) -> float:
    """Relative difference of model b's outputs from model a's on one seeded batch of `classes`
    (ids of a; `own`: the same classes' ids in b, default the same ids) and the null class."""
    g = torch.Generator().manual_seed(0)
    own = classes if own is None else own
    y_a, y_b = (torch.tensor(ids * 4 + [m.null_id] * 2) for ids, m in ((classes, a), (own, b)))
    c, s = a.config.in_channels, a.config.image_size
    x = torch.randn(len(y_a), c, s, s, generator=g)
    t = torch.randint(0, 1000, (len(y_a),), generator=g)
    with torch.no_grad():
        ref, got = a.cpu()(x, t, y_a), b.cpu()(x, t, y_b)
    return ((got - ref).norm() / ref.norm()).item()


def _components(model: DiT) -> int:
    """Learngene components over all of the model's decomposed layers."""
    return sum(m.rank_learngene for _, m in model.kind_layers())


def size_job(out: str, source: str, parts: str, dense: str, preset: dict, threads: int,
             device: str) -> SizeCurveResult:  # fmt: skip
    """FID against size for `source`: its KIND model for all source classes (from `parts`) and
    its dense DiT (the run `dense`), each truncated by the budget rule (`shrink_to_budget`) to
    `preset.size_fractions` of the KIND model's parameter count and to the KIND model's floor,
    the dense DiT through its exact SVD form (`svd_form`; itself where it fits whole); every
    model evaluated at the preset's guidance over `preset.noise_draws` sample draws."""
    preset = _preset(preset)
    spec = SOURCES[source].spec
    _setup_worker(threads, Path(out).with_suffix(".log"))
    kind_model, diffusion, _ = load_parts(parts)
    dense_model = load_model(Path(dense) / "model")[0].eval()
    svd = svd_form(dense_model)
    kind_full, dense_full = count_params(kind_model), count_params(dense_model)
    kind_floor = budget_floor(kind_model)[0]
    svd_floor, svd_full = budget_floor(svd)
    targets = sorted({round(f * kind_full) for f in preset.size_fractions} | {kind_floor},
                     reverse=True)  # fmt: skip
    kind_ranks, svd_ranks = _components(kind_model), _components(svd)
    evaluated: dict[tuple, list[EvalSummary]] = {}  # a model at several budgets: evaluated once

    def point(name: str, target: int, model: DiT, form: str, kept: float) -> SizePoint:
        params = count_params(model)
        key = (name, form, params)  # the budget rule gives one model a count
        if key not in evaluated:
            evaluated[key] = _draws(model.to(device), diffusion, spec, preset, device)
        return SizePoint(name, target, params, form, kept, forward_flops(model) / 1e9,
                         evaluated[key])  # fmt: skip

    points, unreachable = [], []
    for target in targets:
        if target >= kind_floor:
            small = shrink_to_budget(kind_model, target)
            points.append(point("kind", target, small, "full" if small is kind_model
                                else "truncated", _components(small) / kind_ranks))  # fmt: skip
        if target >= dense_full:
            points.append(point("dense", target, dense_model, "dense", 1.0))
        elif target >= svd_floor:
            small = shrink_to_budget(svd, target)
            points.append(point("dense", target, small, "SVD, truncated",
                                _components(small) / svd_ranks))  # fmt: skip
        if target < kind_floor and target < svd_floor:
            unreachable.append(target)
    return SizeCurveResult(source, kind_full, kind_floor, dense_full, svd_full, svd_floor,
                           _max_rel_diff(dense_model, svd, dense_model.config.held_classes), unreachable, points)  # fmt: skip


# ---- jobs for the scheduler ------------------------------------------------------------------


def pretrain_task(out: Path, name: str, preset: Preset, deps: tuple[str, ...] = (),
                  **kwargs) -> Job:  # fmt: skip
    """A `pretrain_job` called `name` whose run goes to out/name; kwargs are pretrain_job's."""
    steps = kwargs.get("steps") or preset.pretrain_steps
    if kwargs.get("continue_from"):
        steps -= preset.pretrain_steps  # the steps of the run it continues are not redone
    weight = steps * (1.4 if kwargs["kind"] else 1.0)
    return Job(name, pretrain_job, dict(out=str(out / name), preset=asdict(preset), **kwargs),
               weight, deps=deps)  # fmt: skip


def size_task(out: Path, name: str, preset: Preset, deps: tuple[str, ...], **kwargs) -> Job:
    """A `size_job` called `name` (its log: out/name.log); kwargs are size_job's."""
    evals = 2 * (len(preset.size_fractions) + 1) * preset.noise_draws
    return Job(name, size_job, dict(out=str(out / name), preset=asdict(preset), **kwargs),
               evals * preset.eval_per_class * preset.sample_steps / 100, deps=deps)  # fmt: skip


def deploy_task(out: Path, name: str, kind_run: Path, deps: tuple[str, ...], **kwargs) -> Job:
    """A `deploy_job` called `name` writing to out/name; kwargs are deploy_job's."""
    return Job(name, deploy_job, dict(out=str(out / name), kind_run=str(kind_run), **kwargs),
               100, deps=deps)  # fmt: skip


def transfer_task(out: Path, name: str, preset: Preset, deps: tuple[str, ...] = (),
                  **kwargs) -> Job:  # fmt: skip
    """A `transfer_job` called `name` whose run goes to out/name; kwargs are transfer_job's."""
    return Job(name, transfer_job, dict(out=str(out / name), preset=asdict(preset), **kwargs),
               preset.transfer_steps, deps=deps)  # fmt: skip
