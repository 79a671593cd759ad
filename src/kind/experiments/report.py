"""report.md for the demo: verdicts, tables, sample grids and plots from the job results.

Numbers are copied from the results the jobs wrote, never computed here beyond means, standard
deviations, intervals, interpolations along a run's own guidance sweep and the sums of steps,
training times and FLOPs of the KIND-ify comparison's two stages, so every figure in the report
traces back to a result file; the verdicts come from `kind.experiments.verdicts`.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from kind.experiments.presets import SOURCES, Source, Task
from kind.experiments.results import DeployResult, Result, RunResult, SizeCurveResult
from kind.experiments.verdicts import (
    KINDIFY_CLAIM,
    SIZE_CLAIM,
    all_verdicts,
    best_fid,
    kindify_verdicts,
    paired_interval,
    size_summary,
    size_verdicts,
)
from kind.io import atomic_write_text
from kind.transfer.registry import METHODS


def _stat(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    if not all(math.isfinite(v) for v in values):  # a diverged run: no mean ± std to give
        return ", ".join(format(v, fmt) for v in values)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def count_label(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _copy_grid(src: str, out: Path, name: str) -> str:
    """The run's sample grid copied beside the report; where the run is gone (a demo's results
    and report kept without its runs, as in docs/), the copy an earlier report made."""
    target = out / "report" / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).is_file():
        shutil.copyfile(src, target)
    elif not target.is_file():
        raise FileNotFoundError(
            f"the sample grid {src} is gone and no earlier report copied it; run the job again "
            "(remove its results file) or restore the run"
        )
    return f"report/{name}.png"


def _label(variant: str) -> str:
    """'kind+null@x4' -> 'KIND (...) + null tailor, 4x budget'."""
    method, _, scale = variant.partition("@x")
    method, null = method.removesuffix("+null"), method.endswith("+null")
    return (METHODS[method].label + (" + null tailor" if null else "")
            + (f", {scale}× budget" if scale else ""))  # fmt: skip


def _style(variant: str, i: int) -> dict:
    """One colour per variant; KIND solid, baselines dashed."""
    kind = METHODS[variant.partition("@x")[0].removesuffix("+null")].is_kind
    return {"color": f"C{i % 10}", "linestyle": "-" if kind else "--"}


def _save(fig: Figure, out: Path, name: str) -> str:
    path = out / "report" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"report/{name}.png"


def _new_figure() -> tuple[Figure, object]:
    # a Figure of its own (no pyplot): no global backend or figure state in a library
    fig = Figure(figsize=(7.6, 4.2))
    return fig, fig.subplots()


def _finish_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _sweep_means(runs: list[RunResult]) -> list[tuple[float, float, float | None]]:
    """(guidance scale, mean FID, mean class accuracy) over the runs' seeds, by scale."""
    by_scale: dict[float, list] = defaultdict(list)
    for r in runs:
        for p in r.sweep:
            by_scale[p.cfg_scale].append(p)
    rows = []
    for scale in sorted(by_scale):
        points = by_scale[scale]
        accs = [p.class_accuracy for p in points if p.class_accuracy is not None]
        rows.append((scale, statistics.mean(p.fid for p in points),
                     statistics.mean(accs) if accs else None))  # fmt: skip
    return rows


def _fid_at_accuracy(sweep: list[tuple[float, float, float | None]], target: float) -> float | None:
    """FID where the mean sweep first reaches class accuracy `target`, linearly interpolated
    between the two guidance scales around it; None if it never does."""
    for (_, f0, a0), (_, f1, a1) in zip(sweep, sweep[1:]):
        if a0 is not None and a1 is not None and min(a0, a1) <= target <= max(a0, a1):
            w = 0.0 if a1 == a0 else (target - a0) / (a1 - a0)
            return f0 + w * (f1 - f0)
    reached = [f for _, f, a in sweep if a is not None and abs(a - target) < 1e-12]
    return reached[0] if reached else None


def _matched_cell(sweep: list, target: float | None, matched: float | None) -> str:
    """The 'FID @ acc.' cell: the interpolated FID, or why there is none."""
    if matched is not None:
        return f"{matched:.1f}"
    accs = [a for _, _, a in sweep if a is not None]
    return "above" if target is not None and accs and min(accs) > target else "–"


def _pretrain_section(src: Source, results: dict[str, Result], out: Path, n: str) -> list[str]:
    pre = [results[k] for k in (f"{src.prefix}pretrain/kind", f"{src.prefix}pretrain/dense")
           if k in results]  # fmt: skip
    if not pre:
        return []
    rows = [["KIND DiT" if r.method == "kind" else "dense DiT", count_label(r.deployed),
             _stat([r.eval.fid], ".1f"), _stat([r.eval.precision], ".3f"),
             _stat([r.eval.recall], ".3f"), _stat([r.eval.class_accuracy], ".3f"),
             _stat([r.train_seconds / 60], ".1f")] for r in pre]  # fmt: skip
    grids = [f"![{r.method}]({_copy_grid(r.grid, out, f'{src.name}_pretrain_{r.method}')})"
             for r in pre]  # fmt: skip
    return [
        f"## {n}. Pre-training on `{src.spec}` ({src.title})",
        "",
        md_table(
            ["model", "params", "FID", "precision", "recall", "class acc.", "train min"], rows
        ),  # fmt: skip
        "",
        "| " + " | ".join(r.method for r in pre) + " |",
        "|" + "---|" * len(pre),
        "| " + " | ".join(grids) + " |",
        "",
    ]


def _deploy_section(dep: DeployResult, n: str) -> list[str]:
    variants = [[v.variant, ", ".join(v.classes), f"{v.params:,}", f"{v.bytes:,}",
                 f"{v.max_rel_diff:.1e}", "yes" if v.same_samples else "no"]
                for v in dep.variants]  # fmt: skip
    sizes = [[r.part, f"{r.params:,}", f"{r.bytes:,}" if r.bytes else "–"] for r in dep.size_table]
    return [
        f"## {n}. Decompose and recombine",
        "",
        "The KIND model split into learngene and tailor files, then assembled for a subset "
        "of classes (or one class merged into dense weights). `max rel. diff` compares the "
        "outputs with the full model's on a mixed batch of the kept classes and the null "
        "class; `same samples` draws with the same seed from both. The merged variant holds two "
        "dense networks: the class folded in, and the unconditional network that "
        "classifier-free guidance needs for the null class.",
        "",
        md_table(
            ["variant", "classes", "params", "bytes", "max rel. diff", "same samples"], variants
        ),  # fmt: skip
        "",
        "Orthogonality error of the pre-trained KIND model (worst RMS deviation of "
        "[U_G U_T]ᵀ[U_G U_T] and [V_G V_T]ᵀ[V_G V_T] from the identity over layers and "
        f"tailors; 0 for an exact SVD): {dep.orthogonality_error:.3f}.",
        "",
        "Parts on disk:",
        "",
        md_table(["part", "params", "bytes"], sizes),
        "",
    ]


def _transfer_table(by_variant: dict[str, list[RunResult]], cfg_scale: float) -> list[str]:
    """At KIND's budget: the final evaluation, each variant at its best-FID guidance scale, and
    FID at the class accuracy every variant reaches (the lowest of their best accuracies). Runs
    without a guidance sweep (the default preset) get the final evaluation's columns only."""
    sweeps = {v: _sweep_means(rs) for v, rs in by_variant.items()}
    tops = [max(a for _, _, a in s if a is not None) for s in sweeps.values()
            if any(a is not None for _, _, a in s)]  # fmt: skip
    target = min(tops) if tops else None
    rows = []
    for variant, runs in by_variant.items():
        sweep = sweeps[variant]
        best = min(sweep, key=lambda p: p[1]) if sweep else None
        matched = _fid_at_accuracy(sweep, target) if target is not None else None
        rows.append([
            _label(variant), count_label(runs[0].trainable), count_label(runs[0].deployed),
            _stat([r.eval.fid for r in runs], ".1f"), _stat([r.eval.class_accuracy for r in runs], ".3f"),
            "–" if best is None else f"{best[0]:g}",
            _stat([best_fid(r) for r in runs], ".1f"),
            "–" if best is None or best[2] is None else f"{best[2]:.3f}",
            _matched_cell(sweep, target, matched),
            _stat([r.train_seconds / 60 for r in runs], ".1f"), str(len(runs)),
        ])  # fmt: skip
    header = ["method", "trainable", "deployed", f"FID @ {cfg_scale:g}", f"acc. @ {cfg_scale:g}",
              "best-FID scale", "best FID", "acc. there",
              "FID @ acc. " + ("–" if target is None else f"{target:.3f}"), "train min", "seeds"]  # fmt: skip
    if not any(sweeps.values()):  # no sweep: its four columns would only repeat or dash
        sweep_columns = slice(5, 9)
        for row in [header, *rows]:
            del row[sweep_columns]
        return [md_table(header, rows), ""]
    note = ("Best FID: each seed's FID at its best guidance scale (mean ± std over seeds); "
            "'best-FID scale' and 'acc. there' are from the mean sweep. 'FID @ acc.' interpolates "
            "each method's mean sweep at the highest class accuracy every method reaches; "
            "'above' where a method's sweep stays above that accuracy at every scale, so no "
            "swept scale brackets it.")  # fmt: skip
    return [md_table(header, rows), "", note, ""]


def _front_plot(by_variant: dict[str, list[RunResult]], title: str, out: Path, name: str) -> str:
    fig, ax = _new_figure()
    for i, (variant, runs) in enumerate(by_variant.items()):
        sweep = [p for p in _sweep_means(runs) if p[2] is not None]
        if not sweep:
            continue
        ax.plot([a for _, _, a in sweep], [f for _, f, _ in sweep], marker="o", label=variant,
                **_style(variant, i))  # fmt: skip
        ax.annotate(f"{sweep[0][0]:g}", (sweep[0][2], sweep[0][1]), fontsize=6)
        ax.annotate(f"{sweep[-1][0]:g}", (sweep[-1][2], sweep[-1][1]), fontsize=6)
    ax.set_yscale("log")
    _finish_axes(ax, f"Guidance sweep: {title}", "class accuracy (higher is better)",
                 "FID (lower is better)")  # fmt: skip
    return _save(fig, out, name)


def _budget_section(runs: list[RunResult], title: str, out: Path, name: str) -> list[str]:
    """FID against trainable parameters per method, and the method order at each budget."""
    by_budget: dict[float, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if not METHODS[r.method].is_kind or r.method == "kind":
            by_budget[r.budget_scale][r.method + ("+null" if r.null_tailor else "")].append(r)
    if len(by_budget) < 2:
        return []
    fig, ax = _new_figure()
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for _scale, variants in sorted(by_budget.items()):
        for variant, rs in variants.items():
            curves[variant].append((rs[0].trainable, statistics.mean(best_fid(r) for r in rs)))
    for i, (variant, points) in enumerate(sorted(curves.items())):
        if len(points) > 1:
            points.sort()
            ax.plot([p for p, _ in points], [f for _, f in points], marker="o", label=variant,
                    **_style(variant, i))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish_axes(ax, f"Budget curves: {title}", "trainable parameters", "best FID")
    rows = []
    for scale, variants in sorted(by_budget.items()):
        ranked = sorted(
            variants.items(), key=lambda kv: statistics.mean(best_fid(r) for r in kv[1])
        )
        order = []
        for j, (variant, rs) in enumerate(ranked):
            # the count it trained, as a multiple of KIND's: a LoRA capped at full rank falls
            # short of the multiple asked (on a wide source even of KIND's own count)
            trained = f" at {rs[0].trainable / rs[0].budget:.2f}×" if rs[0].budget else ""
            text = f"{variant}{trained} {_stat([best_fid(r) for r in rs], '.1f')} (n={len(rs)})"
            if j + 1 < len(ranked):
                nxt = ranked[j + 1][1]
                iv = paired_interval({r.seed: best_fid(r) for r in rs},
                                     {r.seed: best_fid(r) for r in nxt})  # fmt: skip
                text += " <" if iv is not None and iv.high < 0 else " ≈"
            order.append(text)
        rows.append([f"{scale:g}×", " ".join(order)])
    return [
        f"![budget curves]({_save(fig, out, name)})",
        "",
        md_table(
            [
                "budget asked (× KIND's)",
                "order by best FID (mean ± std), each at the multiple of KIND's count it "
                "trained; '<' resolved by a paired 95% interval over seeds, '≈' not",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


def _curve_plot(
    by_variant: dict[str, list[RunResult]], title: str, out: Path, name: str
) -> str | None:
    if not any(r.curve for rs in by_variant.values() for r in rs):
        return None
    fig, ax = _new_figure()
    for i, (variant, runs) in enumerate(by_variant.items()):
        steps = defaultdict(list)
        for r in runs:
            for p in r.curve:
                steps[p.step].append(p.fid)
        xs = sorted(steps)
        ax.plot(xs, [statistics.mean(steps[x]) for x in xs], marker="o", label=variant,
                **_style(variant, i))  # fmt: skip
    ax.set_yscale("log")
    _finish_axes(ax, f"FID against training steps: {title}", "training step", "FID")
    return _save(fig, out, name)


def _task_section(src: Source, task: Task, runs: list[RunResult], settings: dict, out: Path,
                  n: str) -> list[str]:  # fmt: skip
    order = list(settings["methods"])
    at_budget: dict[str, list[RunResult]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (order.index(r.method) if r.method in order else 99,
                                         r.null_tailor, r.seed)):  # fmt: skip
        if r.budget_scale == 1:
            at_budget[r.variant].append(r)
    if not at_budget:
        return []
    stem = f"{src.name}_{task.name}"
    md = [
        f"## {n}. Transfer: {task.title} (`{task.spec}`)",
        "",
        f"Budget: KIND's transfer trains {count_label(runs[0].budget)} parameters; "
        "LoRA/PiSSA/OFT take the rank (block size) closest to it, full fine-tuning trains "
        "everything; KIND + σ also trains the learngenes' singular values.",
        "",
        *_transfer_table(at_budget, settings["cfg_scale"]),
        "Details: " + "; ".join(f"{v}: {rs[0].detail}" for v, rs in at_budget.items() if rs[0].detail),
        "",
    ]  # fmt: skip
    if any(r.sweep for rs in at_budget.values() for r in rs):
        front = _front_plot(at_budget, f"{task.title}, {src.title}", out, f"front_{stem}")
        md += [f"![guidance sweep]({front})", ""]
    md += _budget_section(runs, f"{task.title}, {src.title}", out, f"budget_{stem}")
    curve = _curve_plot(at_budget, task.title, out, f"fid_{stem}")
    if curve:
        md += [f"![FID against steps]({curve})", ""]
    grids = [f"![{v}]({_copy_grid(rs[0].grid, out, f'{stem}_{v}')})" for v, rs in at_budget.items()]
    md += ["| " + " | ".join(at_budget) + " |", "|" + "---|" * len(at_budget),
           "| " + " | ".join(grids) + " |", ""]  # fmt: skip
    return md


def _best(run: RunResult) -> str:
    """'best FID (at scale)' of a run's guidance sweep."""
    if not run.sweep:
        return "–"
    p = min(run.sweep, key=lambda p: p.fid)
    return f"{p.fid:.2f} ({p.cfg_scale:g})"


def _kindify_section(src: Source, results: dict[str, Result], settings: dict, out: Path,
                     n: str) -> list[str]:  # fmt: skip
    """KIND-ify against KIND from scratch at equal total steps: the two pre-trainings (with the
    source's own pre-trainings for reference), what each cost, and the transfers from them."""
    get = lambda name: results.get(f"{src.prefix}{name}")  # noqa: E731
    kindify, scratch, dense = get("kindify/pretrain/kind"), get("scratch/pretrain/kind"), \
        get("pretrain/dense")  # fmt: skip
    if not isinstance(kindify, RunResult) and not isinstance(scratch, RunResult):
        return []
    cfg = settings["cfg_scale"]
    tflops = lambda steps, flops: None if flops is None else steps * flops / 1e12  # noqa: E731
    rows = []
    if isinstance(kindify, RunResult):
        dense_min = dense.train_seconds / 60 if isinstance(dense, RunResult) else None
        init = kindify.init_steps or 0
        parts = [tflops(init, kindify.init_step_flops), tflops(kindify.steps, kindify.step_flops)]
        rows.append([
            "KIND-ify: dense DiT, then KIND from its model", f"{init:,} dense + {kindify.steps:,} KIND",
            ("–" if dense_min is None else f"{dense_min:.1f} + {kindify.train_seconds / 60:.1f} = "
             f"{dense_min + kindify.train_seconds / 60:.1f}"),
            " / ".join("–" if f is None else f"{f / 1e9:.2f}"
                       for f in (kindify.init_step_flops, kindify.step_flops)),
            "–" if None in parts else f"{parts[0]:.1f} + {parts[1]:.1f} = {sum(parts):.1f}",
            count_label(kindify.deployed), _stat(kindify.draws, ".2f"), f"{kindify.eval.precision:.3f}",
            f"{kindify.eval.recall:.3f}", _stat([kindify.eval.class_accuracy], ".3f"), _best(kindify),
        ])  # fmt: skip
    if isinstance(scratch, RunResult):
        total = tflops(scratch.steps, scratch.step_flops)
        rows.append([
            "KIND from scratch", f"{scratch.steps:,} KIND", f"{scratch.train_seconds / 60:.1f}",
            "–" if scratch.step_flops is None else f"{scratch.step_flops / 1e9:.2f}",
            "–" if total is None else f"{total:.1f}", count_label(scratch.deployed),
            _stat(scratch.draws, ".2f"), f"{scratch.eval.precision:.3f}", f"{scratch.eval.recall:.3f}",
            _stat([scratch.eval.class_accuracy], ".3f"), _best(scratch),
        ])  # fmt: skip
    for name, label in (("pretrain/kind", "for reference: the source's KIND pre-training"),
                        ("pretrain/dense", "for reference: the dense pre-training")):  # fmt: skip
        r = get(name)
        if isinstance(r, RunResult):
            rows.append([label, f"{r.steps:,} {'KIND' if r.method == 'kind' else 'dense'}",
                         f"{r.train_seconds / 60:.1f}", "–", "–", count_label(r.deployed),
                         f"{r.eval.fid:.2f}", f"{r.eval.precision:.3f}", f"{r.eval.recall:.3f}",
                         _stat([r.eval.class_accuracy], ".3f"), _best(r)])  # fmt: skip
    header = ["pre-training", "steps", "train min", "GFLOPs a step (dense / KIND)",
              "training TFLOPs", "params", f"FID @ {cfg:g}", "precision", "recall",
              "class acc.", "best FID (scale)"]  # fmt: skip
    md = [
        f"## {n}. KIND-ify against KIND from scratch at equal compute",
        "",
        "KIND-ify: the dense DiT pre-trained above, made into a KIND model (learngenes from the "
        "SVD of its weights, fresh tailors: `kind-dit train --model kind --init-from DENSE`), "
        "then trained as KIND; against KIND from scratch (seed 0, the KIND pre-training's "
        "settings) for as many steps as the two stages together. The scratch run is the KIND "
        "pre-training above continued from its last checkpoint: with the learning rate constant "
        "after warm-up and resumes exact, that is the run from scratch, its first steps not "
        "trained twice (its train min holds both sessions). *Equal compute* is equal steps of "
        "the same batch; whether that is equal work shows in the FLOPs of a training step "
        "(forward and backward of the loss on one batch through all classes, counted by "
        "`torch.utils.flop_counter`) and in the measured training times (the pre-trainings "
        "above ran in an earlier session; times on a shared CPU move with its load). "
        f"FID @ {cfg:g}: mean ± std over {len((kindify or scratch).draws)} sample draws of the "
        "final evaluation (same seeds for both); the reference rows have one draw.",
        "",
        md_table(header, rows),
        "",
    ]
    verdicts = [v for v in kindify_verdicts(results, src.name) if v.claim == KINDIFY_CLAIM]
    md += [f"- {v.comparison}: **{v.verdict}** ({v.evidence})" for v in verdicts]
    md += [""] if verdicts else []
    trows = []
    for task in src.tasks:
        for label, name in (("the source's KIND pre-training", "transfer"),
                            ("KIND from scratch", "scratch/transfer"),
                            ("KIND-ify", "kindify/transfer")):  # fmt: skip
            found = [r for k, r in results.items() if isinstance(r, RunResult)
                     and k.startswith(f"{src.prefix}{name}/{task.name}/kind/seed")]  # fmt: skip
            r = min(found, key=lambda r: r.seed or 0) if found else None
            if r is None:
                continue
            trows.append([task.title, label, f"{r.seed}", count_label(r.trainable),
                          _stat(r.draws or [r.eval.fid], ".2f"),
                          _stat([r.eval.class_accuracy], ".3f"), _best(r),
                          f"{r.train_seconds / 60:.1f}"])  # fmt: skip
    if any(row[1] != "the source's KIND pre-training" for row in trows):
        md += [
            "KIND transfers from each pre-training's parts (the KIND-ify and scratch runs "
            "decomposed like the source's KIND model; the first row of each task is the transfer "
            "above, one draw):",
            "",
            md_table(["task", "learngenes from", "seed", "trainable", f"FID @ {cfg:g}",
                      f"acc. @ {cfg:g}", "best FID (scale)", "train min"], trows),
            "",
        ]  # fmt: skip
    runs = [(label, r) for label, r in (("KIND-ify", kindify), ("scratch", scratch))
            if isinstance(r, RunResult)]  # fmt: skip
    grids = [f"![{label}]({_copy_grid(r.grid, out, f'{src.name}_{label.lower()}')})"
             for label, r in runs]  # fmt: skip
    md += ["| " + " | ".join(label for label, _ in runs) + " |", "|" + "---|" * len(runs),
           "| " + " | ".join(grids) + " |", ""]  # fmt: skip
    return md


def _size_plot(curve: SizeCurveResult, title: str, out: Path, name: str) -> str:
    fig, ax = _new_figure()
    for i, (model, label) in enumerate((("kind", "KIND, truncated"),
                                        ("dense", "dense DiT (SVD-truncated below its size)"))):  # fmt: skip
        points = sorted((p.params, statistics.mean(p.fids)) for p in curve.points
                        if p.model == model)  # fmt: skip
        points = list(dict(points).items())  # one point per model size
        ax.plot([x for x, _ in points], [f for _, f in points], marker="o", label=label,
                color=f"C{i}", linestyle="-" if model == "kind" else "--")  # fmt: skip
    ax.axvline(curve.kind_floor, color="C0", alpha=0.3, linestyle=":", label="KIND's floor")
    ax.set_yscale("log")
    _finish_axes(ax, f"FID against size: {title}", "parameters", "FID (lower is better)")
    return _save(fig, out, name)


def _size_section(src: Source, curve: SizeCurveResult, settings: dict, out: Path,
                  n: str) -> list[str]:  # fmt: skip
    """FID against size: the KIND model for all source classes and the dense DiT, each truncated
    by the budget rule to the same parameter counts."""
    cfg = settings["cfg_scale"]
    by_target: dict[int, dict[str, object]] = defaultdict(dict)
    for p in curve.points:
        by_target[p.target][p.model] = p
    verdict = {v.comparison.split(":")[0]: v.verdict for v in size_verdicts(curve)
               if v.claim == SIZE_CLAIM}  # fmt: skip

    def cells(p) -> list[str]:
        if p is None:
            return ["–"] * 5
        kept = "" if p.form in ("full", "dense") else f", {p.kept:.0%}"
        return [f"{p.params:,}", p.form + kept, f"{p.gflops:.4f}", _stat(p.fids, ".2f"),
                _stat([e.class_accuracy for e in p.evals], ".3f")]  # fmt: skip

    rows = [[f"{t:,}" + (" (KIND's floor)" if t == curve.kind_floor else ""),
             *cells(m.get("kind")), *cells(m.get("dense")), verdict.get(f"≤ {t:,} parameters", "–")]
            for t, m in sorted(by_target.items(), reverse=True)]  # fmt: skip
    draws = max((len(p.evals) for p in curve.points), default=0)
    md = [
        f"## {n}. Quality against size: KIND truncated vs the dense DiT truncated by its SVD",
        "",
        f"The KIND model for all {src.title} ({curve.kind_params:,} parameters, the deployment "
        "above) and the dense DiT, each cut to a parameter budget by the rule of `kind-dit "
        "assemble --max-params` (the lowest-|σ| learngene components dropped across all layers; "
        "the tailors stay whole). The dense DiT is cut through its exact SVD form: KIND-ified at "
        "full learngene rank without tailors, its outputs within "
        f"{curve.svd_max_rel_diff:.1e} of the dense model's, {curve.svd_params:,} parameters (a "
        "rank-r factor pair costs r·(in + out + 1) against a dense layer's in·out); at a budget "
        f"it fits whole ({curve.dense_params:,}) it is the dense DiT itself. The rule keeps one "
        f"component a layer: KIND goes no lower than {curve.kind_floor:,}, the dense DiT "
        f"{curve.dense_floor:,}. 'kept': the learngene (SVD) components left; GFLOPs: one forward "
        f"pass of one sample (`kind.store.parts.FLOP_RULE`); FID @ {cfg:g} and class accuracy: "
        f"mean ± std over {draws} sample draws, paired across the two models.",
        "",
        md_table(["budget (params)", "KIND params", "KIND form", "KIND GFLOPs", "KIND FID",
                  "KIND acc.", "dense params", "dense form", "dense GFLOPs", "dense FID",
                  "dense acc.", "at this budget"], rows),
        "",
        f"![FID against size]({_size_plot(curve, src.title, out, f'sizes_{src.name}')})",
        "",
        f"**Verdict:** {size_summary(curve)}",
        "",
    ]  # fmt: skip
    if curve.unreachable:
        md += ["Budgets neither model reaches: " + ", ".join(f"{t:,}" for t in curve.unreachable),
               ""]  # fmt: skip
    return md


def _verdict_section(results: dict[str, Result], sources: list[str]) -> list[str]:
    verdicts = all_verdicts(results, sources)
    if not verdicts:
        return []
    md = ["## Verdicts", "",
          "Computed from the results below by `kind.experiments.verdicts`: each run scored by its "
          "FID at its best guidance scale; two methods compared on their shared seeds through a "
          "95% t-interval of the paired FID difference (negative: the first is better). "
          "*Unresolved* means the interval straddles 0 or fewer than two seeds are shared.", ""]  # fmt: skip
    if any(v.claim in (KINDIFY_CLAIM, SIZE_CLAIM) for v in verdicts):
        md += ["The KIND-ify and size comparisons rest on one training seed: their models are "
               "compared at the preset's guidance over paired sample draws (the same sampling "
               "seeds for both), so their intervals hold the evaluation's sampling noise only, "
               "not the seed-to-seed noise of training; *within noise* means that interval "
               "straddles 0.", ""]  # fmt: skip
    for claim in dict.fromkeys(v.claim for v in verdicts):
        md += [f"**{claim}**", "",
               md_table(["source", "comparison", "verdict", "evidence"],
                        [[SOURCES[v.source].title, v.comparison, f"**{v.verdict}**", v.evidence]
                         for v in verdicts if v.claim == claim]), ""]  # fmt: skip
    return md


def write_report(
    out: Path,
    settings: dict,
    results: dict[str, Result],
    failed: dict[str, str],
    invocation_seconds: list[float],
) -> Path:
    """Write report.md (and its figures) into `out`; `invocation_seconds` holds the wall time of
    each invocation that ran jobs (none: the report states no wall time)."""
    out = Path(out)
    sources = list(settings.get("sources", ["digits"]))
    job_seconds = sum(r.job_seconds for r in results.values())
    wall, n = "", len(invocation_seconds)
    if n:
        over = f" over the {n} invocations that ran jobs" if n > 1 else ""
        wall = f"Wall time: {sum(invocation_seconds) / 60:.1f} min{over}. "
    sweep = settings.get("cfg_scales") or []
    # what the sweep drew: `sweep_samples` rounded down to a whole number a class
    drawn = sorted({p.num_samples for r in results.values() if isinstance(r, RunResult)
                    for p in r.sweep})  # fmt: skip
    drawn_text = "–".join(str(n) for n in drawn[:: max(1, len(drawn) - 1)]) or "no"
    md = [
        "# KIND demo report",
        "",
        f"Preset **{settings['preset']}**: model size `{settings['size']}`, lr {settings['lr']}, "
        f"pre-training {settings['pretrain_steps']} steps of batch {settings['batch_size']}, "
        f"transfer {settings['transfer_steps']} steps of batch "
        f"{settings.get('transfer_batch_size') or settings['batch_size']}, "
        f"seeds {list(settings['seeds'])}; {settings['jobs']} job(s) side by side with "
        f"{settings['threads_per_job']} thread(s) each on {settings['device']}. {wall}"
        f"The jobs' own times add up to {job_seconds / 60:.1f} min "
        f"({job_seconds / 60 / settings['jobs']:.1f} min with {settings['jobs']} side by side; "
        "a job finished by an earlier invocation is reused).",
        "",
        f"Samples: DDIM {settings['sample_steps']} steps, EMA weights, classifier-free guidance "
        f"{settings['cfg_scale']} for the final evaluation"
        + (f" and a sweep over {', '.join(f'{s:g}' for s in sweep)} "
           f"({drawn_text} samples a scale)" if sweep else "")
        + ". Metrics against the dataset's **test** split, in the feature space of a small "
        "classifier trained on the dataset's train split (FID lower is better; precision/recall: "
        "k-NN manifolds, k=3; class accuracy: how often that classifier assigns a sample the "
        "class it was asked for). Times are training wall times.",
        "",
    ]  # fmt: skip
    md += _verdict_section(results, sources)
    for i, src in enumerate(SOURCES[s] for s in sources):
        prefix = "" if len(sources) == 1 else f"{chr(ord('A') + i)}."
        if len(sources) > 1:
            md += [f"# {chr(ord('A') + i)}. Source: {src.title} (`{src.spec}`)", ""]
        md += _pretrain_section(src, results, out, f"{prefix}1")
        dep = results.get(f"{src.prefix}deploy")
        if isinstance(dep, DeployResult):
            md += _deploy_section(dep, f"{prefix}2")
        for j, task in enumerate(src.tasks, start=3):
            runs = [r for k, r in results.items() if isinstance(r, RunResult) and r.task == task.name
                    and r.source == src.name and k.startswith(f"{src.prefix}transfer/")]  # fmt: skip
            if runs:
                md += _task_section(src, task, runs, settings, out, f"{prefix}{j}")
        j = 3 + len(src.tasks)
        extra = _kindify_section(src, results, settings, out, f"{prefix}{j}")
        md += extra
        curve = results.get(f"{src.prefix}sizes")
        if isinstance(curve, SizeCurveResult):
            md += _size_section(src, curve, settings, out, f"{prefix}{j + bool(extra)}")
    if failed:
        md += ["## Failed jobs", "", *[f"- `{k}`: {v}" for k, v in failed.items()], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
