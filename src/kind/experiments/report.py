"""report.md for the demo: tables, sample grids and FID-against-steps plots from the job results.

Numbers are copied from the results the jobs wrote, never computed here beyond means and standard
deviations over seeds, so every figure in the report traces back to one run's result.json.
"""

from __future__ import annotations

import shutil
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from kind.experiments.presets import SOURCE, TASK_TITLES, TASKS
from kind.experiments.results import DeployResult, Result, RunResult
from kind.io import atomic_write_text
from kind.transfer.registry import METHODS


def _stat(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def count_label(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _metrics_row(runs: list[RunResult]) -> list[str]:
    ev = [r.eval for r in runs]
    return [
        _stat([e.fid for e in ev], ".1f"),
        _stat([e.precision for e in ev], ".3f"),
        _stat([e.recall for e in ev], ".3f"),
        _stat([e.class_accuracy for e in ev], ".3f"),
        _stat([r.train_seconds / 60 for r in runs], ".1f"),
    ]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _copy_grid(src: str, out: Path, name: str) -> str:
    target = out / "report" / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return f"report/{name}.png"


def _plot(task: str, by_method: dict[str, list[RunResult]], out: Path) -> str:
    # a Figure of its own (no pyplot): no global backend or figure state in a library
    fig = Figure(figsize=(7.2, 4))
    ax = fig.subplots()
    for i, (method, runs) in enumerate(by_method.items()):
        steps = defaultdict(list)
        for r in runs:
            for p in r.curve:
                steps[p.step].append(p.fid)
        xs = sorted(steps)
        ax.plot(
            xs,
            [statistics.mean(steps[x]) for x in xs],
            marker="o",
            color=f"C{i}" if i < 10 else "black",  # 11 methods: one colour each
            linestyle="-" if METHODS[method].is_kind else "--",  # KIND solid, baselines dashed
            label=method,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (classifier features, lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"FID against training steps: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = out / "report" / f"fid_{task}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"report/fid_{task}.png"


def write_report(
    out: Path,
    settings: dict,
    results: dict[str, Result],
    failed: dict[str, str],
    wall_seconds: float | None,
) -> Path:
    out = Path(out)
    job_seconds = sum(r.job_seconds for r in results.values())
    wall = (
        ""
        if wall_seconds is None
        else f"Wall time of this invocation: {wall_seconds / 60:.1f} min. "
    )
    md = ["# KIND demo report", ""]
    md += [
        f"Preset **{settings['preset']}**: model size `{settings['size']}`, batch "
        f"{settings['batch_size']}, lr {settings['lr']}, pre-training "
        f"{settings['pretrain_steps']} steps, transfer {settings['transfer_steps']} steps, "
        f"seeds {list(settings['seeds'])}; {settings['jobs']} job(s) side by side with "
        f"{settings['threads_per_job']} thread(s) each on {settings['device']}. {wall}"
        f"The jobs' own times add up to {job_seconds / 60:.1f} min "
        f"({job_seconds / 60 / settings['jobs']:.1f} min with {settings['jobs']} side by side; "
        "a job finished by an earlier invocation is reused).",
        "",
        "Samples: DDIM "
        f"{settings['sample_steps']} steps, classifier-free guidance {settings['cfg_scale']}, "
        "EMA weights. Metrics against the dataset's **test** split, in the feature space of a "
        "small classifier trained on the dataset's train split (FID lower is better; "
        "precision/recall: k-NN manifolds, k=3; class accuracy: how often that classifier "
        "assigns a sample the class it was asked for). Times are training wall times.",
        "",
    ]

    pre = [results[k] for k in ("pretrain/kind", "pretrain/dense") if k in results]
    if pre:
        md += [f"## 1. Pre-training on `{SOURCE}`", ""]
        rows = [
            [
                "KIND DiT" if r.method == "kind" else "dense DiT",
                count_label(r.deployed),
                *_metrics_row([r]),
            ]
            for r in pre
        ]
        md += [
            md_table(
                ["model", "params", "FID", "precision", "recall", "class acc.", "train min"], rows
            ),
            "",
        ]
        md += [
            "| " + " | ".join(r.method for r in pre) + " |",
            "|" + "---|" * len(pre),
            "| "
            + " | ".join(
                f"![{r.method}]({_copy_grid(r.grid, out, 'pretrain_' + r.method)})" for r in pre
            )
            + " |",
            "",
        ]

    if "deploy" in results:
        dep: DeployResult = results["deploy"]
        md += [
            "## 2. Decompose and recombine",
            "",
            "The KIND model split into learngene and tailor files, then assembled for a subset "
            "of classes (or one class merged into dense weights). `max rel. diff` compares the "
            "outputs with the full model's on a mixed batch of the kept classes and the null "
            "class; `same samples` draws with the same seed from both."
            " The merged variant holds two dense networks: the class folded in, and the"
            " learngene-only network that classifier-free guidance needs for the null class.",
            "",
        ]
        md += [
            md_table(
                ["variant", "classes", "params", "bytes", "max rel. diff", "same samples"],
                [
                    [
                        v.variant,
                        ", ".join(v.classes),
                        f"{v.params:,}",
                        f"{v.bytes:,}",
                        f"{v.max_rel_diff:.1e}",
                        "yes" if v.same_samples else "no",
                    ]
                    for v in dep.variants
                ],
            ),
            "",
        ]
        if dep.orthogonality_error is not None:
            md += [
                "Orthogonality error of the pre-trained KIND model (worst RMS deviation of "
                "[U_G U_T]ᵀ[U_G U_T] and [V_G V_T]ᵀ[V_G V_T] from the identity over layers and "
                f"tailors; 0 for an exact SVD): {dep.orthogonality_error:.3f}.",
                "",
            ]
        md += [
            "Parts on disk:",
            "",
            md_table(
                ["part", "params", "bytes"],
                [
                    [r.part, f"{r.params:,}", f"{r.bytes:,}" if r.bytes else "–"]
                    for r in dep.size_table
                ],
            ),
            "",
        ]

    for i, task in enumerate(TASKS, start=3):
        runs = [r for k, r in results.items() if k.startswith(f"transfer/{task}/")]
        if not runs:
            continue
        by_method: dict[str, list[RunResult]] = defaultdict(list)
        order = list(settings["methods"])
        for r in sorted(runs, key=lambda r: (order.index(r.method), r.seed)):
            by_method[r.method].append(r)
        md += [
            f"## {i}. Transfer: {TASK_TITLES[task]} (`{TASKS[task]}`)",
            "",
            f"Budget: KIND's transfer trains {count_label(runs[0].budget)} parameters; "
            "LoRA/PiSSA/OFT take the rank (block size) closest to it, SVDiff and DiffFit have "
            "fixed sizes, full fine-tuning, Heur-LG and scratch train everything.",
            "",
        ]
        rows = [
            [
                METHODS[m].label,
                count_label(rs[0].trainable),
                count_label(rs[0].deployed),
                *_metrics_row(rs),
                str(len(rs)),
            ]
            for m, rs in by_method.items()
        ]
        md += [
            md_table(
                [
                    "method",
                    "trainable",
                    "deployed",
                    "FID",
                    "precision",
                    "recall",
                    "class acc.",
                    "train min",
                    "seeds",
                ],
                rows,
            ),
            "",
        ]
        md += [
            "Details: "
            + "; ".join(f"{m}: {rs[0].detail}" for m, rs in by_method.items() if rs[0].detail),
            "",
        ]
        md += [f"![FID against steps]({_plot(task, by_method, out)})", ""]
        md += [
            "| " + " | ".join(by_method) + " |",
            "|" + "---|" * len(by_method),
            "| "
            + " | ".join(
                f"![{m}]({_copy_grid(rs[0].grid, out, f'{task}_{m}')})"
                for m, rs in by_method.items()
            )
            + " |",
            "",
        ]

    if failed:
        md += ["## Failed jobs", "", *[f"- `{k}`: {v}" for k, v in failed.items()], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
