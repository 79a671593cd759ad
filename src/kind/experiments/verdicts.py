"""Verdicts on the paper's claims, computed from the results, never typed by hand.

Each transfer run is scored by its FID at its best-FID guidance scale (the guidance sweep; the
final evaluation where a run has no sweep), so a method is judged where it works best rather than
at one scale that suits some methods more than others. Two methods are compared on the seeds they
share: the per-seed differences are paired (same seed, same batches and noise), and a 95%
t-interval of their mean says whether the difference is resolved. An interval that straddles 0,
or a comparison with fewer than two shared seeds, is "unresolved at this scale".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from kind.experiments.presets import SOURCES
from kind.experiments.results import DeployResult, RunResult, SizeCurveResult
from kind.transfer.registry import METHODS

SUPPORTED, NOT_SUPPORTED, UNRESOLVED = "supported", "not supported", "unresolved"
WITHIN_NOISE = "within noise"
# the parameter-efficient baselines the claims name: the budgeted ones, sized to KIND's count
PEFT = tuple(name for name, method in METHODS.items() if method.budgeted)
# two trainable counts within 5 % are one budget (a LoRA rank step lands within 1 % at the
# demo's sizes; a LoRA capped at full rank, or KIND with its null tailor, is 25-60 % off)
MATCHED = 0.05
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy in the core install)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences a - b with its 95% t-interval, over n seeds."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


@dataclass(frozen=True)
class Verdict:
    claim: str
    source: str
    comparison: str  # what was compared, e.g. "kind+null vs lora on shift"
    verdict: str  # SUPPORTED, NOT_SUPPORTED or UNRESOLVED
    evidence: str  # the numbers behind it


def paired_interval(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """The 95% t-interval of mean(a[s] - b[s]) over the seeds s both have; None under 2 pairs, or
    when a difference is not finite (a diverged run's inf or NaN FID), which has no interval."""
    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    if len(seeds) < 2 or not all(math.isfinite(d) for d in diffs):
        return None
    mean, n = statistics.mean(diffs), len(diffs)
    half = _T975[min(n - 1, len(_T975)) - 1] * statistics.stdev(diffs) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def non_finite(a: dict[int, float], b: dict[int, float], label: str = "seed") -> str:
    """The shared keys whose difference a - b is not finite, as "seed 0: nan vs 5.00"; "" when
    there are none. A diverged run's FID (inf, NaN) says neither by how much nor, with NaN, which
    way, so a comparison over it is unresolved, and says why, rather than computed."""
    bad = [k for k in sorted(a.keys() & b.keys()) if not math.isfinite(a[k] - b[k])]
    return ", ".join(f"{label} {k}: {a[k]:.2f} vs {b[k]:.2f}" for k in bad)


def best_fid(run: RunResult) -> float:
    """FID at the run's best-FID guidance scale (its final evaluation when it has no sweep). A
    scale whose FID is not finite (samples that diverged there) is never the best; a run with
    no finite scale keeps its first FID, so the comparison says it diverged (`non_finite`).
    (`min` over them alone answers by their order: nan first gives nan, nan last a number.)"""
    fids = [p.fid for p in run.sweep] or [run.eval.fid]
    return min((f for f in fids if math.isfinite(f)), default=fids[0])


def score_by_seed(runs: list[RunResult], source: str, task: str, variant: str) -> dict[int, float]:
    """Best-guidance FID of each seed of one method variant on one task."""
    return {
        r.seed: best_fid(r)
        for r in runs
        if r.source == source and r.task == task and r.variant == variant
    }


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[str, str]:
    """("better" | "worse" | "unresolved", evidence) for a against b, lower FID being better. The
    evidence names the seeds only one side has (a failed job's): they are left out of the pairs."""
    unpaired = sorted(a.keys() ^ b.keys())
    missing = f"; seed(s) {', '.join(map(str, unpaired))} without a pair" if unpaired else ""
    if bad := non_finite(a, b):
        return (
            UNRESOLVED,
            f"non-finite FID ({bad}), a diverged run: no interval to compute{missing}",
        )
    interval = paired_interval(a, b)
    if interval is None:
        shared = sorted(a.keys() & b.keys())
        detail = ", ".join(f"seed {s}: {a[s]:.2f} vs {b[s]:.2f}" for s in shared) or "no seed"
        return UNRESOLVED, f"{detail}; fewer than 2 shared seeds{missing}"
    return _side(interval, UNRESOLVED), f"ΔFID {interval}{missing}"


def _side(interval, tie: str) -> str:
    """ "better" when the interval of a − b lies below 0, "worse" above, else `tie`."""
    if interval.high < 0:
        return "better"
    if interval.low > 0:
        return "worse"
    return tie


def beats_peft(
    runs: list[RunResult], source: str, task: str, kind_variant: str, claim: str
) -> Verdict:
    """The claim that KIND (`kind_variant`) beats parameter-efficient fine-tuning at KIND's budget:
    supported when it is resolved better than every PEFT method with 2+ seeds, not supported when
    it is resolved worse than any, unresolved otherwise. A comparison counts only where the
    budgets match (`MATCHED`) or the mismatch favours the PEFT method: KIND better while
    training more than a LoRA capped at full rank, or worse while training less, says nothing
    of a matched budget. A PEFT method that ran on one seed only cannot be compared, and leaves
    "supported" unresolved where that seed is ahead of KIND's."""
    mine = score_by_seed(runs, source, task, kind_variant)
    trained = {r.variant: r.trainable for r in runs if r.source == source and r.task == task}
    outcomes, skipped, blocked = [], [], False
    for peft in PEFT:
        theirs = score_by_seed(runs, source, task, peft)
        shared = sorted(mine.keys() & theirs.keys())
        if len(shared) >= 2:
            outcome, evidence = compare(mine, theirs)
            ratio = trained[kind_variant] / trained[peft]
            if (outcome == "better" and ratio > 1 + MATCHED) or (
                outcome == "worse" and ratio < 1 - MATCHED
            ):
                note = f"budget not matched ({kind_variant} trains {ratio:.2f}× {peft}'s count)"
                outcome, evidence = UNRESOLVED, f"{evidence}; {note}"
            outcomes.append((peft, outcome, evidence))
        elif theirs:  # one seed compares nothing: said, and it blocks "supported" where ahead
            ahead = [s for s in shared if theirs[s] < mine[s]]
            blocked = blocked or bool(ahead)
            skipped.append(f"{peft} ({len(theirs)} seed(s)) not compared"
                           + "".join(f", ahead on seed {s} ({theirs[s]:.2f} vs {mine[s]:.2f})"
                                     for s in ahead))  # fmt: skip
    if not mine or not outcomes:
        return Verdict(claim, source, f"{kind_variant} vs PEFT on {task}", UNRESOLVED,
                       "; ".join(skipped) or "missing runs")  # fmt: skip
    if any(o == "worse" for _, o, _ in outcomes):
        verdict = NOT_SUPPORTED
    elif all(o == "better" for _, o, _ in outcomes) and not blocked:
        verdict = SUPPORTED
    else:
        verdict = UNRESOLVED
    evidence = "; ".join([f"vs {p}: {o}, {e}" for p, o, e in outcomes] + skipped)
    names = ", ".join(f"{p} ({trained[p]:,})" for p, _, _ in outcomes)
    return Verdict(claim, source, f"{kind_variant} ({trained[kind_variant]:,} trainable) vs "
                   f"{names} on {task}", verdict, evidence)  # fmt: skip


def pair_verdict(
    runs: list[RunResult], source: str, task: str, a: str, b: str, claim: str, supports: str
) -> Verdict:
    """A claim about variant `a` against variant `b` on one task: supported when `a` is resolved
    `supports` ("better" or "worse") than `b`, not supported when resolved the other way."""
    mine, theirs = score_by_seed(runs, source, task, a), score_by_seed(runs, source, task, b)
    outcome, evidence = compare(mine, theirs) if mine and theirs else (UNRESOLVED, "missing runs")
    against = {"better": "worse", "worse": "better"}[supports]
    verdict = {supports: SUPPORTED, against: NOT_SUPPORTED}.get(outcome, UNRESOLVED)
    return Verdict(claim, source, f"{a} vs {b} on {task}", verdict, evidence)


def negative_transfer(runs: list[RunResult], source: str, task: str = "shift") -> Verdict:
    """The paper's claim that carrying the source's tailors across a domain shift hurts:
    kind-tailors resolved worse than kind."""
    claim = "source tailors transfer negatively across a domain shift"
    return pair_verdict(runs, source, task, "kind-tailors", "kind", claim, supports="worse")


def null_tailor_helps(runs: list[RunResult], source: str, task: str) -> Verdict:
    """This project's option (docs/KIND.md, question (a)): the null class's own tailor, so that
    guidance's unconditional model is the target domain's, makes a KIND transfer better:
    kind+null resolved better than kind. It decides whether `--null-tailor` is on by default."""
    claim = "the null class's own tailor improves a KIND transfer"
    return pair_verdict(runs, source, task, "kind+null", "kind", claim, supports="better")


def decomposition(deploy: DeployResult, source: str) -> Verdict:
    """The claim that an assembled model computes what the full model computes (within fp32
    rounding: 1e-6 relative, 1e-5 for one class merged into dense weights; docs/KIND.md
    invariants 3 and 4) and is smaller than the dense DiT of the same size."""
    claim = "decomposition is exact and smaller"
    worst = max(v.max_rel_diff for v in deploy.variants)
    exact = all(
        v.max_rel_diff <= (1e-5 if "merged" in v.variant else 1e-6) for v in deploy.variants
    )
    same = all(v.same_samples for v in deploy.variants)
    one = next(v for v in deploy.variants if v.variant == "1 class")
    dense = next(r.params for r in deploy.size_table if r.part.startswith("dense DiT"))
    ok = exact and same and one.params < dense
    evidence = (f"worst relative output difference {worst:.1e} (tolerance 1e-6, merged 1e-5), "
                f"same samples: {'yes' if same else 'no'}; one class {one.params:,} parameters "
                f"vs dense {dense:,}")  # fmt: skip
    return Verdict(claim, source, "assembled vs full model", SUPPORTED if ok else NOT_SUPPORTED,
                   evidence)  # fmt: skip


# ---- one training seed: comparisons over paired sample draws ---------------------------------

KINDIFY_CLAIM = "KIND-ify against KIND from scratch at equal total steps"
SIZE_CLAIM = "quality against size: KIND truncated vs the dense DiT truncated by its SVD"


def draw_compare(a: list[float], b: list[float]) -> tuple[str, str]:
    """("better" | "worse" | WITHIN_NOISE | UNRESOLVED, evidence) for FIDs `a` against `b` over
    paired sample draws (draw i of both sampled with the same seed): the 95% t-interval of the
    mean difference, which holds the evaluation's sampling noise only (one training seed)."""
    if not a or not b:  # a result written before draws were recorded
        return UNRESOLVED, "no sample draws recorded"
    head = f"FID {statistics.mean(a):.2f} vs {statistics.mean(b):.2f}"
    if bad := non_finite(dict(enumerate(a)), dict(enumerate(b)), "draw"):
        return UNRESOLVED, f"{head}; non-finite FID ({bad}): no interval to compute"
    interval = paired_interval(dict(enumerate(a)), dict(enumerate(b)))
    if interval is None:
        return UNRESOLVED, f"{head}; fewer than 2 sample draws"
    evidence = f"{head}, ΔFID {str(interval).replace('(n=', '(draws n=')}"
    return _side(interval, WITHIN_NOISE), evidence


def _arm(results: dict, source: str, arm: str, name: str) -> RunResult | None:
    r = results.get(f"{SOURCES[source].prefix}{arm}/{name}")
    return r if isinstance(r, RunResult) else None


def kindify_verdicts(results: dict, source: str) -> list[Verdict]:
    """KIND-ify (the dense pre-training, then KIND from its model) against KIND from scratch for
    as many steps in all: their pre-trainings at the preset's guidance, and the KIND transfers
    from their parts, each over paired sample draws. The verdict names the better (lower FID)
    side, or says the difference is within the sampling noise."""
    head = f"{SOURCES[source].prefix}kindify/"
    names = sorted((k.removeprefix(head) for k in results if k.startswith(head)),
                   key=lambda n: (n != "pretrain/kind", n))  # fmt: skip
    verdicts = []
    for name in names:
        mine, theirs = (
            _arm(results, source, "kindify", name),
            _arm(results, source, "scratch", name),
        )
        if mine is None or theirs is None:
            continue
        outcome, evidence = draw_compare(mine.draws or [mine.eval.fid],
                                         theirs.draws or [theirs.eval.fid])  # fmt: skip
        evidence += (
            f"; best FID over the guidance sweep {best_fid(mine):.2f} vs {best_fid(theirs):.2f}"
        )
        if mine.task is None:
            what = (f"pre-training: KIND-ify ({mine.init_steps or 0:,} dense + {mine.steps:,} KIND "
                    f"steps) vs scratch ({theirs.steps:,} KIND steps)")  # fmt: skip
        else:
            what = f"{mine.variant} transfer to {mine.task}, seed {mine.seed}: KIND-ify's parts vs scratch's"
        verdict = {"better": "KIND-ify better", "worse": "KIND-ify worse"}.get(outcome, outcome)
        verdicts.append(Verdict(KINDIFY_CLAIM, source, what, verdict, evidence))
    return verdicts


def size_pairs(curve: SizeCurveResult) -> list[tuple[int, object, object]]:
    """(budget, KIND point, dense point) for every budget both models were evaluated at."""
    kind = {p.target: p for p in curve.points if p.model == "kind"}
    dense = {p.target: p for p in curve.points if p.model == "dense"}
    return [(t, kind[t], dense[t]) for t in sorted(kind.keys() & dense.keys(), reverse=True)]


def size_verdicts(curve: SizeCurveResult) -> list[Verdict]:
    """At every budget both models reach: which has the lower FID within it (each model at its
    largest form that fits, so above the dense DiT's own size the two counts differ: both are
    shown), over paired sample draws, with how far each has moved from its full size's FID."""
    full = {p.model: statistics.mean(p.fids) for p in curve.points if p.form in ("full", "dense")}
    verdicts = []
    for target, k, d in size_pairs(curve):
        outcome, evidence = draw_compare(k.fids, d.fids)
        verdict = {"better": "KIND lower FID", "worse": "dense lower FID"}.get(outcome, outcome)
        moved = [f"{label} ×{statistics.mean(p.fids) / full[p.model]:.2f} its full size's FID"
                 for label, p in (("KIND", k), ("dense", d)) if full.get(p.model)]  # fmt: skip
        what = (f"≤ {target:,} parameters: KIND {k.params:,} ({k.form}, {k.kept:.0%} of its "
                f"learngene) vs dense {d.params:,} ({d.form}"
                + ("" if d.form == "dense" else f", {d.kept:.0%} of its SVD") + ")")  # fmt: skip
        verdicts.append(Verdict(SIZE_CLAIM, curve.source, what, verdict,
                                "; ".join([evidence, *moved])))  # fmt: skip
    return verdicts


def size_summary(curve: SizeCurveResult) -> str:
    """One line from the size verdicts: at how many shared budgets each model has the lower FID,
    and what lies beyond the KIND model's floor."""
    verdicts = size_verdicts(curve)
    counts = {v: sum(x.verdict == v for x in verdicts) for v in
              ("KIND lower FID", "dense lower FID", WITHIN_NOISE, UNRESOLVED)}  # fmt: skip
    parts = [f"{n} of {len(verdicts)} shared budgets: {v}" for v, n in counts.items() if n]
    below = [p for p in curve.points if p.model == "dense" and p.target < curve.kind_floor]
    line = "; ".join(parts) or "no budget both models reach"
    if below:
        line += (f". Below the KIND model's floor ({curve.kind_floor:,}) only the dense DiT goes: "
                 + ", ".join(f"FID {statistics.mean(p.fids):.2f} at {p.params:,}" for p in below))  # fmt: skip
    return line + "."


def all_verdicts(results: dict[str, RunResult | DeployResult], sources: list[str],
                 kind_variants: tuple[str, ...] = ("kind", "kind+null")) -> list[Verdict]:  # fmt: skip
    """Every claim for every source that has results: decomposition, novel classes vs PEFT and
    domain shift vs PEFT (for each KIND variant), negative transfer of source tailors, and the
    null class's own tailor on each task; then KIND-ify against KIND from scratch and the size
    curves, where they ran."""
    runs = [r for r in results.values()
            if isinstance(r, RunResult) and r.task and not r.pretraining]  # fmt: skip
    verdicts = []
    for source in sources:
        deploy = results.get(f"{SOURCES[source].prefix}deploy")
        if isinstance(deploy, DeployResult):
            verdicts.append(decomposition(deploy, source))
        for task, claim in (("novel", "novel classes: KIND beats PEFT at a matched budget"),
                            ("shift", "domain shift: KIND beats PEFT at a matched budget")):  # fmt: skip
            for variant in kind_variants:
                if score_by_seed(runs, source, task, variant):
                    verdicts.append(beats_peft(runs, source, task, variant, claim))
        if score_by_seed(runs, source, "shift", "kind-tailors"):
            verdicts.append(negative_transfer(runs, source))
        for task in ("novel", "shift"):
            if score_by_seed(runs, source, task, "kind+null"):
                verdicts.append(null_tailor_helps(runs, source, task))
        verdicts += kindify_verdicts(results, source)
        curve = results.get(f"{SOURCES[source].prefix}sizes")
        if isinstance(curve, SizeCurveResult):
            verdicts += size_verdicts(curve)
    return verdicts
