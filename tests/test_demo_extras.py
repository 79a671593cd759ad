"""The demo's added comparisons on toy settings, their jobs called in this process (no workers):
KIND-ify against KIND from scratch at equal steps, and FID against size for KIND truncation
against the dense DiT truncated through its SVD; the plan that schedules them, and the report
sections they write."""

import json
import re
from dataclasses import asdict

import pytest

from kind.core.model import count_params
from kind.experiments import jobs
from kind.experiments.demo import plan
from kind.experiments.presets import PRESETS, Preset
from kind.experiments.report import write_report
from kind.store.load import load_model
from kind.store.parts import decompose

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRAS = Preset(
    pretrain_steps=3,
    transfer_steps=2,
    batch_size=8,
    methods=("kind",),
    eval_per_class=2,
    curve_points=0,
    sample_steps=2,
    cfg_scales=(1.0,),
    sweep_samples=6,
    kindify_steps=2,
    size_fractions=(1.0, 0.8, 0.3),
    noise_draws=2,
)


def test_only_the_paper_preset_adds_the_comparisons():
    assert PRESETS["paper"].kindify_steps > 0 and PRESETS["paper"].size_fractions
    for name in ("quick", "default"):
        assert not PRESETS[name].kindify_steps and not PRESETS[name].size_fractions


def test_plan_schedules_the_comparisons_after_what_they_need(tmp_path):
    by_name = {j.name: j for j in plan(tmp_path, EXTRAS, 1, "cpu")}
    assert by_name["kindify/pretrain/kind"].deps == ("pretrain/dense",)
    assert by_name["kindify/pretrain/kind"].kwargs["steps"] == 2
    scratch = by_name["scratch/pretrain/kind"]
    assert scratch.kwargs["steps"] == 5  # 3 dense + 2 KIND-ify steps
    assert scratch.deps == ("pretrain/kind",)  # continued from the source's KIND pre-training
    assert scratch.kwargs["continue_from"] == str(tmp_path / "pretrain" / "kind")
    for arm in ("kindify", "scratch"):
        assert by_name[f"{arm}/deploy"].deps == (f"{arm}/pretrain/kind",)
        for task in ("novel", "shift"):
            job = by_name[f"{arm}/transfer/{task}/kind/seed0"]
            assert job.deps == (f"{arm}/deploy",) and job.kwargs["pretraining"] == arm
    assert set(by_name["sizes"].deps) == {"deploy", "pretrain/dense"}
    assert not {n for n in plan(tmp_path, PRESETS["quick"], 1, "cpu") if "kindify" in n.name}


def test_kindify_and_size_jobs_write_their_report_sections(tmp_path, monkeypatch):
    """Kept short: both arms transfer from the source's KIND parts (the plan deploys each arm
    apart), whose deploy is only its decomposition here."""
    monkeypatch.setattr(jobs, "_setup_worker", lambda threads, log_file: None)
    preset, common = asdict(EXTRAS), dict(threads=1, device="cpu")
    dense, kind = str(tmp_path / "pretrain/dense"), str(tmp_path / "pretrain/kind")
    results = {
        "pretrain/dense": jobs.pretrain_job(dense, False, preset, 0, **common),
        "pretrain/kind": jobs.pretrain_job(kind, True, preset, 0, **common),
    }
    model, diffusion, meta = load_model(tmp_path / "pretrain/kind/model")
    decompose(model, diffusion, tmp_path / "deploy/parts", {"sample": meta["sample"]})
    for arm, steps, start in (
        ("scratch", 5, {"continue_from": kind}),
        ("kindify", 2, {"init_from": dense}),
    ):
        results[f"{arm}/pretrain/kind"] = jobs.pretrain_job(
            str(tmp_path / arm / "pretrain/kind"), True, preset, 0, steps=steps, pretraining=arm,
            **start, **common,
        )  # fmt: skip
        results[f"{arm}/transfer/novel/kind/seed0"] = jobs.transfer_job(
            str(tmp_path / arm / "transfer/novel/kind/seed0"), "novel", "kind", 0,
            str(tmp_path / "deploy/parts"), dense, preset, pretraining=arm, **common,
        )  # fmt: skip
    results["sizes"] = jobs.size_job(str(tmp_path / "sizes"), "digits",
                                     str(tmp_path / "deploy/parts"), dense, preset, **common)  # fmt: skip

    kindify, scratch = results["kindify/pretrain/kind"], results["scratch/pretrain/kind"]
    assert kindify.steps == 2 and scratch.steps == 5 and kindify.init_steps == 3
    record = json.loads((tmp_path / "scratch/pretrain/kind/run.json").read_text())
    assert record["continued_from"]["step"] == 3  # steps 4 and 5 trained, 1-3 taken over
    assert scratch.train_seconds > results["pretrain/kind"].train_seconds
    assert len(kindify.draws) == len(scratch.draws) == 2 and kindify.draws[0] == kindify.eval.fid
    assert kindify.step_flops == scratch.step_flops > 0  # the same KIND architecture
    assert 0 < kindify.init_step_flops != kindify.step_flops  # the dense DiT's step
    assert len(results["kindify/transfer/novel/kind/seed0"].draws) == 2

    curve = results["sizes"]
    dense = load_model(tmp_path / "pretrain/dense/model")[0]
    assert curve.dense_params == count_params(dense) < curve.svd_params
    assert curve.svd_max_rel_diff < 1e-5  # the SVD form computes the dense model
    assert curve.kind_floor < 0.8 * curve.kind_params  # the 0.8 budget is reachable
    assert curve.unreachable == [round(0.3 * curve.kind_params)]  # below both floors
    kind_points = [p for p in curve.points if p.model == "kind"]
    assert [p.form for p in kind_points] == ["full", "truncated", "truncated"]  # 1, 0.8, floor
    assert kind_points[-1].target == curve.kind_floor == kind_points[-1].params
    for p in curve.points:
        assert p.params <= p.target and len(p.evals) == 2 and p.gflops > 0
    dense_points = [p for p in curve.points if p.model == "dense"]
    assert dense_points[0].form == "dense" and dense_points[0].params == curve.dense_params
    assert all(p.form == "SVD, truncated" for p in dense_points[1:])

    settings = {"preset": "custom", **asdict(EXTRAS), "jobs": 1, "threads_per_job": 1,
                "device": "cpu"}  # fmt: skip
    text = write_report(tmp_path, settings, results, {}, invocation_seconds=[]).read_text()
    section = text[text.index("KIND-ify against KIND from scratch at equal compute") :]
    assert re.search(r"\| KIND from scratch \| 5 KIND \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", section)
    assert re.search(
        r"\| KIND-ify: dense DiT, then KIND from its model \| 3 dense \+ 2 KIND", section
    )
    assert re.search(r"pre-training: KIND-ify \(3 dense \+ 2 KIND steps\) vs scratch \(5 KIND "
                     r"steps\): \*\*(KIND-ify better|KIND-ify worse|within noise)\*\*", section)  # fmt: skip
    assert "transfer to novel, seed 0: KIND-ify's parts vs scratch's" in section
    sizes = text[text.index("Quality against size") :]
    assert re.search(r"\*\*Verdict:\*\* \d of 3 shared budgets: ", sizes)
    assert f"{curve.kind_floor:,} (KIND's floor)" in sizes
    assert "Budgets neither model reaches" in sizes
    assert (tmp_path / "report" / "sizes_digits.png").stat().st_size > 0
    assert "quality against size: KIND truncated vs the dense DiT" in text  # in the verdicts too


def test_failed_jobs_end_the_demo_with_an_error_after_the_report(tmp_path, monkeypatch):
    """A demo whose jobs failed still writes the report of what finished, then ends in an error
    (the command exits 2), not in a success that hides the failures."""
    from kind.experiments import demo

    failed = {"pretrain/kind": "RuntimeError: out of memory"}
    monkeypatch.setattr(demo, "execute", lambda *args: ({}, dict(failed)))
    with pytest.raises(demo.DemoError, match=r"1 job\(s\) failed \(first: pretrain/kind: Runtime"):
        demo.run_demo(tmp_path, EXTRAS, jobs=1, device="cpu")
    report = (tmp_path / "report.md").read_text()
    assert "Failed jobs" in report and "out of memory" in report
    assert len(json.loads((tmp_path / "wall_times.json").read_text())["seconds"]) == 1


def _demo_help() -> str:
    """`demo --help` on one line (the test sets COLUMNS so argparse wraps no word)."""
    import argparse

    from kind.cli import demo as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return " ".join(parser.format_help().split())


def test_demo_help_says_what_each_preset_and_methods_run(monkeypatch):
    """The help is read from the presets: the paper preset's methods, who gets its three seeds,
    and that --methods leaves the budget curves and KIND-ify's KIND transfers alone."""
    from kind.cli.demo import DURATION, describe

    monkeypatch.setenv("COLUMNS", "10000")
    text = _demo_help()
    assert set(DURATION) == set(PRESETS)
    assert ("paper: sources digits, wide; kind, lora with seeds 0, 1, 2; kind-sigma, kind-tailors, "
            "pissa with seed 0; kind also with a null tailor;") in text  # fmt: skip
    assert "budget curves of kind, lora at 0.25x, 4x KIND's budget" in text
    assert "quick and default: source digits; kind, kind-tailors, lora, full with seed 0." in text
    assert ("It does not change the budget curves (paper: kind, lora) nor the KIND-ify "
            "comparison's KIND transfers") in text  # fmt: skip
    assert "(paper: kind, lora) get them, the others its first seed" in text
    custom = Preset(methods=("kind", "oft"), seeds=(3, 4), seeded_methods=("oft",))
    assert describe(custom).startswith("source digits; oft with seeds 3, 4; kind with seed 3")


def test_each_preset_has_a_folder_of_its_own_by_default(monkeypatch, capsys):
    """`make demo DEMO_ARGS="--preset quick"` then `make demo`: two folders, not a refusal to
    continue the quick demo with the default settings."""
    import kind.experiments.demo as demo
    from kind.cli.main import main

    outs = []
    monkeypatch.setattr(demo, "run_demo", lambda out, preset, **kw: outs.append(str(out)) or out)
    for argv in (["--preset", "quick"], [], ["--preset", "paper", "--out", "mine"]):
        main(["demo", *argv])
    assert outs == ["runs/demo-quick", "runs/demo", "mine"]
