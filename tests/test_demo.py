"""The demo end to end on a toy preset: every stage runs, the report holds every table, and a
second invocation continues instead of redoing finished jobs."""

import json
import os
import shutil
from dataclasses import asdict, replace

import pytest

from kind.experiments.demo import _changed, run_demo
from kind.experiments.presets import Preset
from kind.experiments.scheduler import Job, execute

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
    assert "| FID @ 1.5 | acc. @ 1.5 | train min | seeds |" in text  # no sweep: no sweep columns
    assert "best-FID scale" not in text and "FID @ acc." not in text
    deploy = json.loads((tmp_path / "results" / "deploy.json").read_text())
    assert all(v["max_rel_diff"] <= 1e-5 and v["same_samples"] for v in deploy["variants"])
    lora = json.loads((tmp_path / "results" / "transfer__novel__lora__seed0.json").read_text())
    kind = json.loads((tmp_path / "results" / "transfer__novel__kind__seed0.json").read_text())
    assert lora["budget"] == kind["trainable"]
    assert 0.9 < lora["trainable"] / kind["trainable"] < 1.1
    for name in ("fid_digits_novel.png", "digits_novel_kind.png", "digits_shift_lora.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0

    walls = json.loads((tmp_path / "wall_times.json").read_text())["seconds"]
    assert len(walls) == 1 and f"Wall time: {walls[0] / 60:.1f} min. " in text

    before = {p: p.stat().st_mtime for p in (tmp_path / "results").iterdir()}
    again = run_demo(tmp_path, TOY, jobs=2, device="cpu")  # continues: nothing left to run
    assert {p: p.stat().st_mtime for p in (tmp_path / "results").iterdir()} == before
    assert json.loads((tmp_path / "wall_times.json").read_text())["seconds"] == walls  # ran nothing
    assert f"Wall time: {walls[0] / 60:.1f} min. " in again.read_text()

    # continued with other settings: refused, its settings kept; `report_only` reports what ran
    settings = (tmp_path / "settings.json").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(transfer_steps 2 \(asked: 3\)\)"):
        run_demo(tmp_path, replace(TOY, transfer_steps=3), jobs=2, device="cpu")
    asked = replace(TOY, transfer_steps=3, methods=("kind",))  # reported as it ran: both methods
    text = run_demo(tmp_path, asked, jobs=1, report_only=True).read_text()
    assert "\n| LoRA | " in text  # its row in the transfer tables
    assert (tmp_path / "settings.json").read_bytes() == settings
    assert "transfer 2 steps of batch 8" in text and "2 job(s) side by side" in text
    assert _changed(json.loads(settings), "custom", json.loads(json.dumps(asdict(
        replace(TOY, seeds=(0, 1), methods=("kind", "lora", "pissa"), kindify_steps=5))))) == []  # fmt: skip
    sized = json.loads(settings) | {"size_fractions": [1.0, 0.5]}  # its one job ran these two
    grown = json.loads(json.dumps(asdict(replace(TOY, size_fractions=(1.0, 0.5, 0.3)))))
    assert _changed(sized, "custom", grown) == [
        "size_fractions [1.0, 0.5] (asked: [1.0, 0.5, 0.3])"]  # fmt: skip
    paper_like = json.loads(settings) | {"preset": "paper", "seeded_methods": ["kind", "lora"]}
    assert _changed(paper_like, "quick", json.loads(json.dumps(asdict(TOY)))) == [
        "preset paper (asked: quick)", "seeded_methods ['kind', 'lora'] (asked: None)"]  # fmt: skip

    # copied (or reported from another folder): the report shows the copy's own sample grids
    copy = shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "_copy"))
    (tmp_path / "pretrain" / "kind" / "eval" / "samples.png").write_bytes(b"the original's")
    run_demo(copy, TOY, jobs=2, device="cpu", report_only=True)
    assert (copy / "report" / "digits_pretrain_kind.png").read_bytes() == (
        copy / "pretrain" / "kind" / "eval" / "samples.png"
    ).read_bytes()


def _report_progress_interval() -> None:
    """A job that fails with the progress interval its worker process sees."""
    raise RuntimeError(f"interval={os.environ.get('TQDM_MININTERVAL')}")


@pytest.mark.parametrize("users", [None, "3"])
def test_workers_print_sparse_progress_unless_the_user_chose_and_the_caller_keeps_its_env(
    tmp_path, monkeypatch, users
):
    if users is None:
        monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    else:
        monkeypatch.setenv("TQDM_MININTERVAL", users)
    job = Job("probe", _report_progress_interval, {}, weight=1.0)
    _, failed = execute([job], tmp_path, workers=1)
    assert failed["probe"] == f"RuntimeError: interval={users or 10}"
    assert os.environ.get("TQDM_MININTERVAL") == users


CLAIMS = Preset(
    pretrain_steps=3,
    transfer_steps=2,
    batch_size=8,
    sources=("wide",),
    methods=("kind", "lora", "kind-tailors"),
    seeds=(0, 1),
    seeded_methods=("kind", "lora"),
    null_methods=("kind",),
    budget_scales=(4.0,),
    budget_methods=("kind", "lora"),
    eval_per_class=2,
    curve_points=0,
    sample_steps=2,
    cfg_scales=(1.0, 2.0),
    sweep_samples=24,
)


def test_claims_preset_sweeps_guidance_draws_budget_curves_and_writes_verdicts(tmp_path):
    report = run_demo(tmp_path, CLAIMS, jobs=2, device="cpu")
    text = report.read_text()
    assert "Failed jobs" not in text
    results = tmp_path / "results"
    null = json.loads((results / "wide__transfer__shift__kind+null__seed1.json").read_text())
    assert null["null_tailor"] and [p["cfg_scale"] for p in null["sweep"]] == [1.0, 2.0]
    kind4 = json.loads((results / "wide__transfer__novel__kind@x4__seed0.json").read_text())
    kind1 = json.loads((results / "wide__transfer__novel__kind__seed0.json").read_text())
    assert kind4["trainable"] > 3 * (kind1["trainable"] - 4 * 128)  # rank 32 tailors, same rows
    lora4 = json.loads((results / "wide__transfer__novel__lora@x4__seed0.json").read_text())
    assert 3 < lora4["trainable"] / kind1["trainable"] < 5
    assert "| best-FID scale | best FID | acc. there | FID @ acc. " in text
    for heading in (
        "## Verdicts",
        "domain shift: KIND beats PEFT",
        "budget asked (× KIND",
        "kind at 1.00×",
    ):
        assert heading in text, heading
    assert "unresolved" in text  # two toy seeds of two steps resolve nothing
    for name in ("front_wide_shift.png", "budget_wide_novel.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_budget_curves_of_a_method_no_budget_sizes_are_refused_before_any_job(tmp_path):
    """`full` trains its architecture's count at every scale: its '4×' run would be its 1× run."""
    curves = replace(TOY, budget_scales=(4.0,), budget_methods=("kind", "full"))
    with pytest.raises(ValueError, match="--method full trains what its architecture fixes"):
        run_demo(tmp_path / "d", curves, jobs=1, device="cpu")
    assert not (tmp_path / "d").exists()


def test_a_null_tailor_variant_of_a_baseline_is_refused_before_any_job(tmp_path):
    """A baseline has no tailors: its '+null' transfer would fail after pre-training had run."""
    nulls = replace(TOY, methods=("kind", "lora"), null_methods=("lora",))
    with pytest.raises(ValueError, match="null_methods names 'lora', a baseline"):
        run_demo(tmp_path / "d", nulls, jobs=1, device="cpu")
    assert not (tmp_path / "d").exists()
