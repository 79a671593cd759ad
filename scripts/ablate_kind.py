"""Why KIND's transfer stands where it does in the demo: ablations of its choices, run beside a
finished demo directory (its pre-training, parts and dense source are reused).

    python scripts/ablate_kind.py runs/demo_paper --out runs/ablations [--jobs 2]

Variants (seed 0, the demo preset's settings unless said): tailor rank 2 and 32 instead of 8
(KIND's budget x1/4 and x4), 3,000 transfer steps instead of 1,000 for KIND and full fine-tuning,
and a KIND model pre-trained with the orthogonality penalty. Writes OUT/ablations.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from kind.demo import PRESETS, TASKS, Job, Preset, execute, transfer_task
from kind.report import _count, _table


def jobs(demo: Path, out: Path, preset: Preset, orth_weight: float) -> list[Job]:
    parts, dense = str(demo / "deploy" / "parts"), str(demo / "pretrain" / "dense")
    common = dict(seed=0, dense=dense, threads=1, device="cpu")
    p, long = asdict(preset), asdict(replace(preset, transfer_steps=3 * preset.transfer_steps))
    todo = [
        transfer_task(
            out,
            f"{task}/kind-r{rank}",
            1000,
            task=task,
            method="kind",
            preset=p,
            parts=parts,
            rank_tailor=rank,
            **common,
        )
        for task in TASKS
        for rank in (2, 32)
    ]
    todo += [
        transfer_task(
            out,
            f"novel/{method}-steps{3 * preset.transfer_steps}",
            3000,
            task="novel",
            method=method,
            preset=long,
            parts=parts,
            **common,
        )
        for method in ("kind", "full")
    ]
    orth_run = out / "pretrain" / "kind-orth"
    todo += [
        Job(
            "pretrain/kind-orth",
            "pretrain_job",
            dict(
                out=str(orth_run),
                kind=True,
                preset=p,
                seed=0,
                threads=1,
                device="cpu",
                orth_weight=orth_weight,
            ),
            preset.pretrain_steps * 1.4,
        ),
        Job(
            "deploy-orth",
            "deploy_job",
            dict(out=str(out / "deploy-orth"), kind_run=str(orth_run), threads=1, device="cpu"),
            100,
            deps=("pretrain/kind-orth",),
        ),
    ]
    todo += [
        transfer_task(
            out,
            f"{task}/kind-orth",
            1000,
            ("deploy-orth",),
            task=task,
            method="kind",
            preset=p,
            parts=str(out / "deploy-orth" / "parts"),
            **common,
        )
        for task in TASKS
    ]
    return todo


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("demo", type=Path, help="a finished demo directory (default or paper preset)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--orth-weight", type=float, default=1e-4)
    args = ap.parse_args()
    preset = PRESETS[json.loads((args.demo / "settings.json").read_text())["preset"]]
    results, failed = execute(
        jobs(args.demo, args.out, preset, args.orth_weight), args.out, args.jobs
    )
    base = {
        f"{r['task']}/{r['method']}": r
        for r in (
            json.loads(f.read_text()) for f in (args.demo / "results").glob("transfer__*seed0.json")
        )
    }
    rows = []
    for task in TASKS:
        for name in (
            "kind",
            "kind-r2",
            "kind-r32",
            "kind-orth",
            "kind-steps3000",
            "full",
            "full-steps3000",
            "lora",
            "pissa",
        ):
            r = results.get(f"{task}/{name}") or base.get(f"{task}/{name}")
            if r:
                ev = r["eval"]
                rows.append(
                    [
                        TASKS[task],
                        name,
                        _count(r["trainable"]),
                        f"{ev['fid']:.2f}",
                        f"{ev['precision']:.3f}",
                        f"{ev['recall']:.3f}",
                        f"{ev['class_accuracy']:.3f}",
                        f"{r['train_seconds'] / 60:.1f}",
                    ]
                )
    orth = results.get("deploy-orth", {}).get("orthogonality_error")
    lines = [
        "# KIND ablations (seed 0)",
        "",
        f"Beside `{args.demo}`; rows without a suffix are that demo's seed-0 runs. "
        f"Orthogonality penalty weight {args.orth_weight}; orthogonality error of the model "
        f"pre-trained with it: {orth if orth is None else f'{orth:.3f}'}.",
        "",
        _table(
            [
                "task",
                "variant",
                "trainable",
                "FID",
                "precision",
                "recall",
                "class acc.",
                "train min",
            ],
            rows,
        ),
        "",
    ]
    lines += [f"- failed: `{k}`: {v}" for k, v in failed.items()]
    (args.out / "ablations.md").write_text("\n".join(lines) + "\n")
    print(args.out / "ablations.md")


if __name__ == "__main__":
    main()
