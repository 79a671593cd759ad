"""`kind-dit demo`: every stage of KIND on the bundled data, against the methods people would use
instead, in one command.

1. pre-train a KIND DiT and a dense DiT of the same size on mnist:0-5;
2. decompose KIND; assemble it for one, two and all classes; check that the assembled and merged
   models compute the full model's outputs; measure their sizes;
3. transfer to novel classes (mnist:6-9) and across a domain shift (animal silhouettes) with KIND
   and the baselines at KIND's budget of trainable parameters;
4. evaluate every model on the test split (FID, precision, recall and class accuracy in the feature
   space of a classifier trained on that dataset), also along training for FID-against-steps curves;
5. write report.md with the tables, sample grids and plots.

Independent jobs run side by side in worker processes (one CPU thread each by default, which is
what a 2-core laptop runs best); each job writes `result.json` when it finishes, and re-running
the demo with the same --out skips finished jobs, so an interrupted demo continues.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SOURCE = "mnist:0-5"
TASKS = {"novel": "mnist:6-9", "shift": "animals"}
TASK_TITLES = {"novel": "novel classes (MNIST 6-9)", "shift": "domain shift (animal silhouettes)"}


@dataclass(frozen=True)
class Preset:
    size: str = "tiny"
    pretrain_steps: int = 2500
    transfer_steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    methods: tuple[str, ...] = ("kind", "kind-tailors", "lora", "full")
    seeds: tuple[int, ...] = (0,)
    eval_per_class: int = 100  # samples per class for the final evaluation
    curve_points: int = 4  # evaluations along training, for FID against steps
    curve_per_class: int = 30
    sample_steps: int = 50  # DDIM steps when evaluating
    cfg_scale: float = 1.5


PRESETS = {
    "quick": Preset(
        pretrain_steps=200,
        transfer_steps=100,
        batch_size=64,
        eval_per_class=20,
        curve_points=2,
        curve_per_class=10,
        sample_steps=20,
    ),
    "default": Preset(),
    # the default's pre-training, every transfer method, three seeds
    "paper": Preset(
        methods=(
            "kind",
            "kind-tailors",
            "kind-unfrozen",
            "full",
            "lora",
            "pissa",
            "oft",
            "svdiff",
            "difffit",
            "heurlg",
            "scratch",
        ),
        seeds=(0, 1, 2),
    ),
}


@dataclass
class Job:
    name: str
    fn: str  # name of a job function in this module (workers import it by name)
    kwargs: dict
    weight: float  # rough cost, for the progress bar's time estimate
    deps: tuple[str, ...] = ()
    result: dict | None = field(default=None, repr=False)


# ---- work done inside the worker processes --------------------------------------------------


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


def _config(data: str, preset: Preset, steps: int, seed: int, device: str, **model):
    from kind.config import load_config

    every = max(1, steps // preset.curve_points)
    return load_config(
        overrides={
            "data": data,
            "model": {"size": preset.size, **model},
            "train": {
                "steps": steps,
                "batch_size": preset.batch_size,
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


def _evaluate(
    model,
    diffusion,
    ref: str,
    per_class: int,
    preset: Preset,
    device: str,
    save: Path | None = None,
) -> dict:
    """Sample `per_class` images of every class the model holds and score them against `ref`."""
    from kind.evaluate import evaluate_images
    from kind.sampling import generate, save_grid, save_npz

    classes = model.config.held_classes
    labels = [c for c in classes for _ in range(per_class)]
    images = generate(
        model,
        diffusion,
        labels,
        seed=12345,
        steps=preset.sample_steps,
        cfg_scale=preset.cfg_scale,
        device=device,
    )
    result = evaluate_images(
        images,
        torch.tensor(labels),
        model.config.class_names,
        ref,
        generation={
            "sampler": "ddim",
            "steps": preset.sample_steps,
            "cfg_scale": preset.cfg_scale,
            "seed": 12345,
        },
    )
    if save is not None:
        show = torch.cat([images[i * per_class : i * per_class + 8] for i in range(len(classes))])
        save_grid(show, min(8, per_class), save / "samples.png")
        save_npz(
            save / "samples.npz",
            images,
            labels,
            model.config.class_names,
            sampler="ddim",
            steps=preset.sample_steps,
            cfg_scale=preset.cfg_scale,
            seed=12345,
        )
    return {
        k: result[k]
        for k in (
            "fid",
            "precision",
            "recall",
            "class_accuracy",
            "per_class_accuracy",
            "num_samples",
            "feature_net",
        )
    }


def _curve(run, model, diffusion, ref: str, preset: Preset, device: str) -> list[dict]:
    """FID of the EMA weights of every checkpoint the run kept."""
    from kind import checkpoint as ckpt

    points = []
    for d in ckpt.checkpoint_dirs(run):
        state = ckpt.read_tensors(d / "model.safetensors") | ckpt.read_tensors(
            d / "ema.safetensors"
        )
        ckpt.load_state(model, state, d)
        ev = _evaluate(model, diffusion, ref, preset.curve_per_class, preset, device)
        points.append(
            {
                "step": int(d.name.split("_")[1]),
                "fid": ev["fid"],
                "class_accuracy": ev["class_accuracy"],
            }
        )
    return points


def _continue(run: Path) -> bool:
    """Whether to resume `run`: it has a checkpoint. A run that died before its first checkpoint
    is the demo's own scratch output and starts over."""
    import shutil

    from kind import checkpoint as ckpt

    if ckpt.latest_checkpoint(run) is not None:
        return True
    shutil.rmtree(run, ignore_errors=True)
    return False


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _finish(
    run: Path, result, diffusion, ref: str, preset: Preset, device: str, extra: dict
) -> dict:
    """Final evaluation of a finished run, then its curve; returns the job's result."""
    from kind import checkpoint as ckpt

    model = result.model
    trainable = _trainable(model)
    deployed, _, _ = ckpt.load_model(run / "model")
    final = _evaluate(deployed, diffusion, ref, preset.eval_per_class, preset, device, run / "eval")
    t0 = time.time()
    curve = _curve(run, model, diffusion, ref, preset, device)
    return {
        "run": str(run),
        "train_seconds": result.seconds,
        "steps": result.steps,
        "trainable": trainable,
        "deployed": sum(p.numel() for p in deployed.parameters()),
        "eval": final,
        "curve": curve,
        "curve_seconds": time.time() - t0,
        "grid": str(run / "eval" / "samples.png"),
        **extra,
    }


def pretrain_job(out: str, kind: bool, preset: dict, seed: int, threads: int, device: str,
                 orth_weight: float = 0.0) -> dict:  # fmt: skip
    """Pre-train on the source classes and evaluate; `orth_weight`: the orthogonality penalty."""
    from kind.diffusion import Diffusion
    from kind.train import train

    preset = Preset(**preset)
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    cfg = _config(SOURCE, preset, preset.pretrain_steps, seed, device, kind=kind)
    cfg.train.orth_weight = orth_weight
    result = train(cfg, run, resume=_continue(run))
    return _finish(
        run,
        result,
        Diffusion(cfg.diffusion),
        SOURCE,
        preset,
        device,
        {"method": "kind" if kind else "dense"},
    )


def transfer_job(
    out: str,
    task: str,
    method: str,
    seed: int,
    parts: str,
    dense: str,
    preset: dict,
    threads: int,
    device: str,
    rank_tailor: float | None = None,
) -> dict:
    """One transfer run and its evaluation; `rank_tailor` varies KIND's tailor rank (ablation)."""
    from kind.data import load_images
    from kind.diffusion import Diffusion
    from kind.transfer import KIND_METHODS, kind_budget, run_transfer

    preset = Preset(**preset)
    run = Path(out)
    _setup_worker(threads, run.parent / f"{run.name}.log")
    spec = TASKS[task]
    cfg = _config(spec, preset, preset.transfer_steps, seed, device)
    classes = load_images(spec, "test").class_names
    budget = kind_budget(parts, classes)
    source = parts if method in KIND_METHODS else dense
    result = run_transfer(source, cfg, run, method=method, budget=budget,
                          rank_tailor=rank_tailor, resume=_continue(run))  # fmt: skip
    meta = json.loads((run / "run.json").read_text())["transfer"]
    return _finish(
        run,
        result,
        Diffusion(cfg.diffusion),
        spec,
        preset,
        device,
        {
            "task": task,
            "method": method,
            "seed": seed,
            "budget": budget,
            "detail": meta.get("detail", ""),
            "rank_tailor": rank_tailor,
        },
    )


def deploy_job(out: str, kind_run: str, threads: int, device: str) -> dict:
    """Decompose the pre-trained KIND model; assemble and merge it; check exactness; sizes."""
    from kind import checkpoint as ckpt
    from kind.parts import assemble, decompose, size_table
    from kind.sampling import generate

    out = Path(out)
    _setup_worker(threads, out.parent / "deploy.log")
    full, diffusion, meta = ckpt.load_model(Path(kind_run) / "model")
    parts = out / "parts"
    if not (parts / "manifest.json").is_file():
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
        model, _, _ = ckpt.load_model(target)
        ids = [names.index(c) for c in classes]
        own = [model.config.class_names.index(c) for c in classes]  # ids inside the small model
        y_full = torch.tensor(ids * 4 + [full.null_id] * 2)
        y_own = torch.tensor(own * 4 + [model.null_id] * 2)
        x = torch.randn(
            len(y_full),
            full.config.in_channels,
            full.config.image_size,
            full.config.image_size,
            generator=g,
        )
        t = torch.randint(0, 1000, (len(y_full),), generator=g)
        with torch.no_grad():
            ref, got = full(x, t, y_full), model(x, t, y_own)
        same = torch.equal(
            generate(full, diffusion, ids[:1] * 2, seed=7, steps=5),
            generate(model, diffusion, own[:1] * 2, seed=7, steps=5),
        )
        variants.append(
            {
                "variant": label,
                "classes": classes,
                "params": sum(p.numel() for p in model.parameters()),
                "bytes": sum(f.stat().st_size for f in target.rglob("*.safetensors")),
                "max_rel_diff": ((got - ref).norm() / ref.norm()).item(),
                "same_samples": same,
            }
        )
    table = [{"part": n, "params": p, "bytes": b} for n, p, b in size_table(parts)]
    return {"parts": str(parts), "variants": variants, "size_table": table,
            "orthogonality_error": full.orthogonality_error()}  # fmt: skip


# ---- the scheduler --------------------------------------------------------------------------


def _call(fn: str, kwargs: dict) -> dict:
    t0 = time.time()
    result = globals()[fn](**kwargs)
    result["job_seconds"] = time.time() - t0
    return result


def transfer_task(out: Path, name: str, weight: float, deps: tuple[str, ...] = (), **kwargs) -> Job:
    """A `transfer_job` called `name` whose run goes to out/name; kwargs are transfer_job's."""
    return Job(name, "transfer_job", dict(out=str(out / name), **kwargs), weight, deps=deps)


def plan(out: Path, preset: Preset, threads: int, device: str) -> list[Job]:
    p = asdict(preset)
    pre = out / "pretrain"
    jobs = [
        Job(
            "pretrain/kind",
            "pretrain_job",
            dict(
                out=str(pre / "kind"), kind=True, preset=p, seed=0, threads=threads, device=device
            ),
            preset.pretrain_steps * 1.4,
        ),
        Job(
            "pretrain/dense",
            "pretrain_job",
            dict(
                out=str(pre / "dense"), kind=False, preset=p, seed=0, threads=threads, device=device
            ),
            preset.pretrain_steps,
        ),
        Job(
            "deploy",
            "deploy_job",
            dict(
                out=str(out / "deploy"), kind_run=str(pre / "kind"), threads=threads, device=device
            ),
            100,
            deps=("pretrain/kind",),
        ),
    ]
    # seed-major, so an interrupted run has every method and task at least once
    for seed in preset.seeds:
        for task in TASKS:
            for method in preset.methods:
                name = f"transfer/{task}/{method}/seed{seed}"
                deps = ("deploy",) if method.startswith("kind") else ("deploy", "pretrain/dense")
                jobs.append(
                    transfer_task(
                        out,
                        name,
                        preset.transfer_steps,
                        deps,
                        task=task,
                        method=method,
                        seed=seed,
                        parts=str(out / "deploy" / "parts"),
                        dense=str(pre / "dense"),
                        preset=p,
                        threads=threads,
                        device=device,
                    )
                )
    return jobs


def execute(
    jobs: list[Job], out: Path, workers: int, report_only: bool = False
) -> tuple[dict[str, dict], dict[str, str]]:
    """Run `jobs` (respecting their dependencies) in `workers` processes; a job whose
    `out/results/NAME.json` exists is done already. Returns (results, failures) by job name."""
    done: dict[str, Job] = {}
    failed: dict[str, str] = {}
    for job in jobs:
        result_file = out / "results" / f"{job.name.replace('/', '__')}.json"
        if result_file.is_file():
            job.result = json.loads(result_file.read_text())
            done[job.name] = job
    pending = [] if report_only else [j for j in jobs if j.name not in done]
    bar = tqdm(
        total=sum(j.weight for j in jobs),
        initial=sum(j.weight for j in done.values()),
        unit="work",
        desc="demo",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
    ctx = get_context("spawn")
    os.environ["TQDM_MININTERVAL"] = "10"  # read by tqdm in the workers: sparse log lines
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        running = {}
        while pending or running:
            for job in list(pending):
                if any(d in failed for d in job.deps):
                    failed[job.name] = f"skipped: {[d for d in job.deps if d in failed]} failed"
                    pending.remove(job)
                elif all(d in done for d in job.deps) and len(running) < workers:
                    running[pool.submit(_call, job.fn, job.kwargs)] = job
                    pending.remove(job)
            bar.set_description("demo: " + ", ".join(sorted(j.name for j in running.values())))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    job.result = fut.result()
                except Exception as e:  # one failed job must not take the others down
                    failed[job.name] = "".join(traceback.format_exception_only(e)).strip()
                    log.error("job %s failed: %s", job.name, failed[job.name])
                    continue
                path = out / "results" / f"{job.name.replace('/', '__')}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(job.result, indent=2))
                done[job.name] = job
                bar.update(job.weight)
    os.environ.pop("TQDM_MININTERVAL", None)
    bar.close()
    return {name: job.result for name, job in done.items()}, failed


def run_demo(
    out: str | Path,
    preset: str | Preset = "default",
    jobs: int | None = None,
    device: str = "auto",
    methods: tuple[str, ...] | None = None,
    report_only: bool = False,
) -> Path:
    """Run (or continue) the demo into `out` with a named preset (or a custom `Preset`); returns
    the path of report.md. `report_only` writes the report from the jobs finished so far."""
    from kind.report import write_report

    out = Path(out)
    preset_name = preset if isinstance(preset, str) else "custom"
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if methods:
        preset = replace(preset, methods=tuple(methods))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = jobs or (1 if device == "cuda" else max(1, min(4, os.cpu_count() or 1)))
    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else 1
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "preset": preset_name,
        **asdict(preset),
        "jobs": workers,
        "threads_per_job": threads,
        "device": device,
    }
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text())["preset"] != preset_name:
        raise ValueError(f"{out} holds a demo with another preset; choose another --out")
    saved.write_text(json.dumps(settings, indent=2))

    t0 = time.time()
    results, failed = execute(plan(out, preset, threads, device), out, workers, report_only)
    wall = None if report_only else time.time() - t0
    report = write_report(out, settings, results, failed, wall_seconds=wall)
    if failed:
        log.error("%d job(s) failed; see %s and the job logs beside the runs", len(failed), report)
    return report
