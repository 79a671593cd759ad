"""The demo end to end on a toy preset: every stage runs, the report holds every table, and a
second invocation continues instead of redoing finished jobs."""

import json

import pytest

from kind.experiments.demo import run_demo
from kind.experiments.presets import Preset

pytestmark = pytest.mark.slow

TOY = Preset(
    pretrain_steps=3,
    transfer_steps=2,
    batch_size=8,
    methods=("kind", "lora"),
    eval_per_class=4,
    curve_points=1,
    curve_per_class=4,
    sample_steps=2,
)


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    report = run_demo(tmp_path, TOY, jobs=2, device="cpu")
    text = report.read_text()
    for heading in ("Pre-training", "Decompose and recombine", "novel classes", "domain shift"):
        assert heading in text
    assert "Failed jobs" not in text
    deploy = json.loads((tmp_path / "results" / "deploy.json").read_text())
    assert all(v["max_rel_diff"] <= 1e-5 and v["same_samples"] for v in deploy["variants"])
    lora = json.loads((tmp_path / "results" / "transfer__novel__lora__seed0.json").read_text())
    kind = json.loads((tmp_path / "results" / "transfer__novel__kind__seed0.json").read_text())
    assert lora["budget"] == kind["trainable"]
    assert 0.9 < lora["trainable"] / kind["trainable"] < 1.1
    for name in ("fid_novel.png", "fid_shift.png", "novel_kind.png", "shift_lora.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0

    before = {p: p.stat().st_mtime for p in (tmp_path / "results").iterdir()}
    run_demo(tmp_path, TOY, jobs=2, device="cpu")  # continues: nothing left to run
    assert {p: p.stat().st_mtime for p in (tmp_path / "results").iterdir()} == before
