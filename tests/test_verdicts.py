"""Verdicts are computed from results: a table of results in, the right verdict out."""

import pytest

from kind.experiments.results import (
    DeployResult,
    DeployVariant,
    EvalSummary,
    GuidancePoint,
    RunResult,
    SizeRow,
)
from kind.experiments.verdicts import (
    NOT_SUPPORTED,
    SUPPORTED,
    UNRESOLVED,
    all_verdicts,
    best_fid,
    compare,
    draw_compare,
    paired_interval,
)


def _run(method, seed, fids, task="shift", source="digits", null=False):
    """A transfer result whose guidance sweep has these FIDs (scales 1, 1.5, 2, ...)."""
    sweep = [GuidancePoint(1 + 0.5 * i, f, 0.5, 0.5, 0.8, 100) for i, f in enumerate(fids)]
    ev = EvalSummary(fids[0], 0.5, 0.5, 0.8, None, 100, "net")
    return RunResult(run="r", method=method, train_seconds=1.0, steps=1, trainable=1, deployed=1,
                     eval=ev, curve=[], curve_seconds=0.0, grid="", task=task, seed=seed,
                     source=source, null_tailor=null, sweep=sweep)  # fmt: skip


def _results(kind, lora, tailors=None, task="shift"):
    """{job name: result} with one KIND and one LoRA run per seed (best FIDs as given)."""
    out = {
        f"transfer/{task}/kind/seed{s}": _run("kind", s, [f + 5, f], task)
        for s, f in enumerate(kind)
    }
    out |= {f"transfer/{task}/lora/seed{s}": _run("lora", s, [f], task) for s, f in enumerate(lora)}
    for s, f in enumerate(tailors or []):
        out[f"transfer/{task}/kind-tailors/seed{s}"] = _run("kind-tailors", s, [f], task)
    return out


def _verdict(verdicts, comparison_start):
    (v,) = [v for v in verdicts if v.comparison.startswith(comparison_start)]
    return v


def test_best_fid_is_the_best_point_of_the_guidance_sweep():
    assert best_fid(_run("kind", 0, [30.0, 12.0, 20.0])) == 12.0
    # a scale that diverged is never the best, wherever it sits in the sweep
    assert best_fid(_run("kind", 0, [float("nan"), 5.0, 6.0])) == 5.0
    assert best_fid(_run("kind", 0, [5.0, 6.0, float("nan")])) == 5.0
    assert best_fid(_run("kind", 0, [float("inf"), float("nan")])) == float("inf")


def test_paired_interval_needs_two_seeds_and_pairs_by_seed():
    assert paired_interval({0: 1.0}, {0: 2.0}) is None
    iv = paired_interval({0: 10.0, 1: 11.0, 2: 12.0}, {0: 12.0, 1: 12.5, 2: 14.5})
    assert iv.n == 3 and iv.mean == pytest.approx(-2.0) and iv.high < 0


def test_kind_resolved_better_than_lora_is_supported():
    verdicts = all_verdicts(_results(kind=[10, 11, 12], lora=[20, 21.5, 22]), ["digits"])
    assert _verdict(verdicts, "kind (").verdict == SUPPORTED


def test_kind_resolved_worse_than_lora_is_not_supported():
    verdicts = all_verdicts(_results(kind=[20, 21.5, 22], lora=[10, 11, 12]), ["digits"])
    assert _verdict(verdicts, "kind (").verdict == NOT_SUPPORTED


def test_overlapping_intervals_are_unresolved():
    verdicts = all_verdicts(_results(kind=[10, 14, 12], lora=[12, 11, 13]), ["digits"])
    v = _verdict(verdicts, "kind (")
    assert v.verdict == UNRESOLVED and "ΔFID" in v.evidence


def test_a_peft_method_with_one_seed_does_not_block_the_verdict():
    results = _results(kind=[10, 11, 12], lora=[20, 21.5, 22])
    results["transfer/shift/pissa/seed0"] = _run("pissa", 0, [30.0])
    v = _verdict(all_verdicts(results, ["digits"]), "kind (")
    assert v.verdict == SUPPORTED and "pissa (1 seed(s)) not compared" in v.evidence


def test_a_single_peft_seed_ahead_of_kind_leaves_the_claim_unresolved():
    results = _results(kind=[10, 11, 12], lora=[20, 21.5, 22])
    results["transfer/shift/pissa/seed0"] = _run("pissa", 0, [2.0])
    v = _verdict(all_verdicts(results, ["digits"]), "kind (")
    assert (
        v.verdict == UNRESOLVED and "pissa (1 seed(s)) not compared, ahead on seed 0" in v.evidence
    )


def _trained(results, counts):
    for r in results.values():
        r.trainable = counts[r.method]
    return results


@pytest.mark.parametrize(
    "kind, lora, counts, expected",
    [  # KIND better with 1.5x LoRA's count (LoRA capped at full rank): no verdict of a match
        ([10, 11, 12], [20, 21.5, 22], {"kind": 1500, "lora": 1000}, UNRESOLVED),
        # worse while training more: not supported, budget or not
        ([20, 21.5, 22], [10, 11, 12], {"kind": 1500, "lora": 1000}, NOT_SUPPORTED),
        # better while training less: supported; worse while training less: no verdict
        ([10, 11, 12], [20, 21.5, 22], {"kind": 1000, "lora": 1500}, SUPPORTED),
        ([20, 21.5, 22], [10, 11, 12], {"kind": 1000, "lora": 1500}, UNRESOLVED),
        ([10, 11, 12], [20, 21.5, 22], {"kind": 1003, "lora": 1000}, SUPPORTED),  # within 5 %
    ],
)
def test_a_comparison_at_budgets_that_do_not_match_counts_only_against_kind(
    kind, lora, counts, expected
):
    v = _verdict(all_verdicts(_trained(_results(kind=kind, lora=lora), counts), ["digits"]),
                 "kind (")  # fmt: skip
    assert v.verdict == expected, v.evidence
    assert ("budget not matched" in v.evidence) == (expected == UNRESOLVED)


def test_a_missing_seed_is_named_in_the_evidence():
    results = _results(kind=[10, 11, 12], lora=[20, 21.5, 22])
    del results["transfer/shift/kind/seed1"]  # its job failed
    v = _verdict(all_verdicts(results, ["digits"]), "kind (")
    assert "(n=2); seed(s) 1 without a pair" in v.evidence


def test_one_seed_is_unresolved_however_large_the_gap():
    verdicts = all_verdicts(_results(kind=[5], lora=[50]), ["digits"])
    assert _verdict(verdicts, "kind vs PEFT").verdict == UNRESOLVED


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "a, b, shown",
    [
        ({0: NAN, 1: 2.0, 2: 3.0}, {0: 5.0, 1: 6.0, 2: 7.0}, "seed 0: nan vs 5.00"),
        ({0: 1.0, 1: 2.0, 2: INF}, {0: 5.0, 1: 6.0, 2: 7.0}, "seed 2: inf vs 7.00"),
        ({0: 1.0, 1: 2.0, 2: 3.0}, {0: 5.0, 1: INF, 2: 7.0}, "seed 1: 2.00 vs inf"),
        ({0: INF, 1: 2.0, 2: 3.0}, {0: INF, 1: 6.0, 2: 7.0}, "seed 0: inf vs inf"),
    ],
)
def test_a_non_finite_fid_is_unresolved_and_says_so(a, b, shown):
    """A diverged run's FID (NaN, inf) has no interval: unresolved, naming the seed, no crash."""
    assert paired_interval(a, b) is None
    assert compare(a, b) == (UNRESOLVED, f"non-finite FID ({shown}), a diverged run: no interval "
                                         "to compute")  # fmt: skip
    outcome, evidence = draw_compare(list(a.values()), list(b.values()))
    assert outcome == UNRESOLVED and f"non-finite FID ({shown.replace('seed', 'draw')})" in evidence


def test_no_draws_compare_to_unresolved():
    assert draw_compare([], [1.0, 2.0]) == (UNRESOLVED, "no sample draws recorded")


def test_a_diverged_kind_run_leaves_the_claim_unresolved():
    v = _verdict(all_verdicts(_results(kind=[INF, 11, 12], lora=[20, 21.5, 22]), ["digits"]),
                 "kind (")  # fmt: skip
    assert (
        v.verdict == UNRESOLVED
        and "vs lora: unresolved, non-finite FID (seed 0: inf vs" in v.evidence
    )


def test_negative_transfer_of_source_tailors():
    worse = _results(kind=[10, 11, 12], lora=[10, 11, 12], tailors=[15, 17, 16])
    assert _verdict(all_verdicts(worse, ["digits"]), "kind-tailors").verdict == SUPPORTED
    same = _results(kind=[10, 11, 12], lora=[10, 11, 12], tailors=[11, 10, 12.5])
    assert _verdict(all_verdicts(same, ["digits"]), "kind-tailors").verdict == UNRESOLVED


@pytest.mark.parametrize(
    "null_fids, expected",
    [
        ([8, 9, 10], SUPPORTED),
        ([14, 15, 17], NOT_SUPPORTED),
        ([9, 12, 11.5], UNRESOLVED),
    ],  # fmt: skip
)
def test_null_tailor_verdict_on_each_task(null_fids, expected):
    results = _results(kind=[10, 11, 12], lora=[10, 11, 12])
    results |= {f"transfer/shift/kind+null/seed{s}": _run("kind", s, [f], null=True)
                for s, f in enumerate(null_fids)}  # fmt: skip
    v = _verdict(all_verdicts(results, ["digits"]), "kind+null vs kind")
    assert v.verdict == expected and v.comparison == "kind+null vs kind on shift"


def test_decomposition_verdict_checks_exactness_and_size():
    def deploy(diff):
        variants = [DeployVariant("1 class", ["0"], 100, 400, diff, True)]
        return DeployResult(
            "p", variants, [SizeRow("dense DiT, same size, 6 classes", 150, 600)], 0.1
        )

    assert all_verdicts({"deploy": deploy(1e-7)}, ["digits"])[0].verdict == SUPPORTED
    assert all_verdicts({"deploy": deploy(5e-6)}, ["digits"])[0].verdict == NOT_SUPPORTED
    assert all_verdicts({"deploy": deploy(1e-2)}, ["digits"])[0].verdict == NOT_SUPPORTED


def test_sources_are_kept_apart():
    wide = {f"wide/{k}": r for k, r in _results(kind=[10, 11, 12], lora=[20, 21, 22]).items()}
    for r in wide.values():
        r.source = "wide"
    verdicts = all_verdicts(wide, ["digits", "wide"])
    assert {v.source for v in verdicts} == {"wide"}


def test_a_table_cell_over_a_diverged_run_lists_its_values():
    """The report's mean ± std of a cell with a NaN FID lists the values (it crashed)."""
    from kind.experiments.report import _stat

    assert _stat([1.0, float("nan"), 2.0], ".2f") == "1.00, nan, 2.00"
    assert _stat([1.0, 2.0], ".2f") == "1.50 ± 0.71"


def test_fid_at_accuracy_says_above_for_a_sweep_that_never_comes_down_to_it():
    """The report's 'FID @ acc.' cell: interpolated where the mean sweep brackets the target,
    'above' where every scale's accuracy is higher (it showed "–", hiding the best methods)."""
    from kind.experiments.report import _fid_at_accuracy, _matched_cell

    crosses = [(1.0, 10.0, 0.2), (2.0, 14.0, 0.4)]
    assert _matched_cell(crosses, 0.3, _fid_at_accuracy(crosses, 0.3)) == "12.0"
    above = [(1.0, 9.0, 0.35), (2.0, 11.0, 0.5)]
    assert _matched_cell(above, 0.3, _fid_at_accuracy(above, 0.3)) == "above"
    assert _matched_cell([(1.0, 9.0, None)], 0.3, None) == "–"
