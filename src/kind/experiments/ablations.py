"""Why KIND's transfer stands where it does in the demo: ablations of its choices, run beside a
finished demo directory (its pre-training, parts and dense source are reused).

Variants (seed 0, the demo preset's settings unless said): tailor rank 2 and 32 instead of 8
(KIND's budget x1/4 and x4), 3x the transfer steps for KIND and full fine-tuning, and a KIND model
pre-trained with the orthogonality penalty. Writes OUT/ablations.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kind.experiments.demo import saved_settings
from kind.experiments.jobs import deploy_task, pretrain_task, transfer_task
from kind.experiments.presets import SOURCES, Preset, saved_preset
from kind.experiments.report import count_label, md_table
from kind.experiments.results import RunResult
from kind.experiments.scheduler import Job, execute, result_path
from kind.io import atomic_write_text, read_json, write_json

TASKS = {t.name: t.spec for t in SOURCES["digits"].tasks}  # the demo's tasks it ablates
VARIANTS = ("kind", "kind-r2", "kind-r32", "kind-orth", "kind-steps{long}", "full",
            "full-steps{long}", "lora", "pissa")  # fmt: skip


def plan(demo: Path, out: Path, preset: Preset, orth_weight: float) -> list[Job]:
    parts, dense = str(demo / "deploy" / "parts"), str(demo / "pretrain" / "dense")
    common = dict(seed=0, dense=dense, threads=1, device="cpu")
    long = replace(preset, transfer_steps=3 * preset.transfer_steps)
    todo = [
        transfer_task(
            out,
            f"{task}/kind-r{rank}",
            preset,
            task=task,
            method="kind",
            parts=parts,
            rank_tailor=rank,
            **common,
        )  # fmt: skip
        for task in TASKS
        for rank in (2, 32)
    ]
    todo += [
        transfer_task(
            out,
            f"novel/{method}-steps{long.transfer_steps}",
            long,
            task="novel",
            method=method,
            parts=parts,
            **common,
        )  # fmt: skip
        for method in ("kind", "full")
    ]
    todo += [
        pretrain_task(
            out,
            "pretrain/kind-orth",
            preset,
            kind=True,
            seed=0,
            threads=1,
            device="cpu",
            orth_weight=orth_weight,
        ),  # fmt: skip
        deploy_task(
            out,
            "deploy-orth",
            out / "pretrain" / "kind-orth",
            ("pretrain/kind-orth",),
            threads=1,
            device="cpu",
        ),  # fmt: skip
    ]
    todo += [
        transfer_task(
            out,
            f"{task}/kind-orth",
            preset,
            ("deploy-orth",),
            task=task,
            method="kind",
            parts=str(out / "deploy-orth" / "parts"),
            **common,
        )  # fmt: skip
        for task in TASKS
    ]
    return todo


MARKER = "ablations.json"  # which demo and weight an ablations folder belongs to


def _claim(out: Path, demo: Path, orth_weight: float, jobs: list[Job]) -> None:
    """Make `out` the ablations folder of `demo`: new or empty, or these ablations started
    before (its marker says so, or, from a version without it, it holds only what `jobs`
    write); a folder holding anything else is a user's, refused before anything is written."""
    mine = {"demo": str(demo.resolve()), "orth_weight": orth_weight}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            theirs = read_json(out / MARKER) if (out / MARKER).is_file() else None
        except ValueError:
            theirs = None
        ours = {"results", "ablations.md"} | {j.name.split("/")[0] for j in jobs}
        earlier = (
            theirs is None
            and (out / "results").is_dir()
            and all(
                e.name in ours or (e.suffix == ".log" and e.stem in ours) for e in out.iterdir()
            )
        )
        if theirs != mine and not earlier:
            raise ValueError(
                f"{out} holds files that are not the ablations of {demo} with orthogonality "
                f"weight {orth_weight}; choose a new or empty --out (nothing was touched)"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, mine)


def run_ablations(demo: Path, out: Path, jobs: int = 2, orth_weight: float = 1e-4) -> Path:
    """Run (or continue) the ablations beside the finished demo `demo`, with the settings it ran
    with; returns ablations.md."""
    demo, out = Path(demo), Path(out)
    settings = saved_settings(demo)
    if settings is None:
        raise ValueError(f"{demo} holds no kind-dit demo; run `kind-dit demo --out {demo}` first")
    preset = saved_preset(settings)
    todo = plan(demo, out, preset, orth_weight)
    _claim(out, demo, orth_weight, todo)
    results, failed = execute(todo, out, jobs)
    base: dict[str, RunResult] = {}
    for task in TASKS:
        for method in ("kind", "full", "lora", "pissa"):
            path = result_path(demo, f"transfer/{task}/{method}/seed0")
            if path.is_file():
                base[f"{task}/{method}"] = RunResult.from_dict(read_json(path))
    rows = []
    for task in TASKS:
        for variant in VARIANTS:
            name = f"{task}/{variant.format(long=3 * preset.transfer_steps)}"
            r = results.get(name) or base.get(name)
            if r:
                ev = r.eval
                rows.append([TASKS[task], name.split("/")[1], count_label(r.trainable),
                             f"{ev.fid:.2f}", f"{ev.precision:.3f}", f"{ev.recall:.3f}",
                             f"{ev.class_accuracy:.3f}", f"{r.train_seconds / 60:.1f}"])  # fmt: skip
    orth = results.get("deploy-orth")
    orth_text = "–" if orth is None else f"{orth.orthogonality_error:.3f}"
    header = ["task", "variant", "trainable", "FID", "precision", "recall", "class acc.",
              "train min"]  # fmt: skip
    lines = [
        "# KIND ablations (seed 0)",
        "",
        f"Beside `{demo}`; rows without a suffix are that demo's seed-0 runs. "
        f"Orthogonality penalty weight {orth_weight}; orthogonality error of the model "
        f"pre-trained with it: {orth_text}.",
        "",
        md_table(header, rows),
        "",
    ]
    lines += [f"- failed: `{k}`: {v}" for k, v in failed.items()]
    path = out / "ablations.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
