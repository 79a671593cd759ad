"""The training loop: gate isolation of updates (docs/KIND.md invariant 2), exact resume, refusals."""

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kind.data.dataset import Dataset
from kind.io import read_json, read_tensors
from kind.store.modeldir import load_model_dir
from kind.store.runs import RUN_FILES, RunDirError, claim_run_dir, has_checkpoint, is_run_dir
from kind.training.config import load_config
from kind.training.loop import TrainingError, train

CLASSES = ["0", "1", "2", "3"]


def _cfg(steps, **train_kw):
    return load_config(
        overrides={
            "data": "mnist:0-3",
            "model": {"rank_tailor": 4},
            "train": {
                "steps": steps,
                "batch_size": 8,
                "log_every": 1,
                "sample_every": 0,
                "checkpoint_every": 2,
                "keep_checkpoints": 10,
                "warmup_steps": 1,
                "threads": 1,
                **train_kw,
            },
            "sample": {"steps": 2, "per_class": 1},
        }
    )


def _data(classes, n=16):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return Dataset.from_tensors(torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, labels, CLASSES)


def _checkpoint(run, step):
    d = run / "checkpoints" / f"step_{step:07d}"
    return (
        read_tensors(d / "model.safetensors"),
        read_tensors(d / "ema.safetensors"),
        read_tensors(d / "optimizer.safetensors"),
        read_json(d / "state.json"),
    )


def _assert_same_checkpoint(run_a, run_b, step):
    """Weights, EMA, optimiser state (to fp32 rounding) and EMA counts of two runs at `step`."""
    a, b = _checkpoint(run_a, step), _checkpoint(run_b, step)
    for part_a, part_b in zip(a[:3], b[:3]):
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            torch.testing.assert_close(part_a[k], part_b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert a[3]["ema_counts"] == b[3]["ema_counts"]


def test_steps_without_a_class_leave_its_tailors_and_their_optimiser_state_unchanged(tmp_path):
    run = tmp_path / "run"
    # weight decay and momentum on: the two ways a stock optimiser moves rows with no gradient;
    # 2 steps with every class, then a resume and 10 steps without class 2
    cfg = _cfg(2, weight_decay=0.1, class_dropout=0.0)
    train(cfg, run, data=_data([0, 1, 2, 2, 3]))  # every class gets optimiser state
    train(_cfg(12, weight_decay=0.1, class_dropout=0.0), run, resume=True, data=_data([0, 1, 3]))
    model2, ema2, opt2, state2 = _checkpoint(run, 2)
    model12, ema12, opt12, state12 = _checkpoint(run, 12)
    for bank in ("tailors.rows", "y_embedder.table"):  # row 2 = class 2's tailor group / label
        assert torch.equal(model2[bank][2], model12[bank][2]), bank
        assert torch.equal(ema2[bank][2], ema12[bank][2]), bank
        assert state2["ema_counts"][bank][2] == state12["ema_counts"][bank][2] >= 1
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2[f"{bank}/{k}"][2], opt12[f"{bank}/{k}"][2]), (bank, k)
        steps2, steps12 = opt2[f"{bank}/step"], opt12[f"{bank}/step"]  # each row counts its own
        assert steps12[2] == steps2[2] >= 1 and steps12.sum() - steps2.sum() >= 10
        # ... while the rows of the classes in those batches moved
        for row in (0, 1, 3):
            assert not torch.equal(model2[bank][row], model12[bank][row]), (bank, row)
    assert not torch.equal(model2["blocks.0.attn.q.U"], model12["blocks.0.attn.q.U"])


def test_masked_adamw_is_adamw_on_present_rows_and_still_elsewhere():
    from kind.training.optim import MaskedAdamW

    torch.manual_seed(0)
    bank, plain = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    ref = [torch.nn.Parameter(bank[r].detach().clone()) for r in (1, 3)]
    opt = MaskedAdamW([plain, bank], {"tailors": bank}, lr=0.1, weight_decay=0.2)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.2)
    for _ in range(3):
        before = bank.detach().clone()
        grad = torch.randn(5, 3)
        bank.grad, plain.grad = grad.clone(), torch.randn(4)
        for r, p in zip((1, 3), ref):
            p.grad = grad[r].clone()
        opt.set_rows({"tailors": torch.tensor([1, 3])})
        opt.step()
        ref_opt.step()
        for r in (0, 2, 4):
            assert torch.equal(bank[r], before[r])
        for r, p in zip((1, 3), ref):
            torch.testing.assert_close(bank[r], p, rtol=1e-6, atol=1e-7)  # AdamW, up to rounding
    assert opt.state[bank]["step"].tolist() == [0, 3, 0, 3, 0]
    assert torch.all(opt.state[bank]["exp_avg"][[0, 2, 4]] == 0)


def test_masked_adamw_counts_each_plain_parameter_and_resumes_from_its_state_dict():
    from kind.training.optim import MaskedAdamW

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MaskedAdamW(params, {}, lr=0.1, weight_decay=0.2)
    ref = torch.optim.AdamW(copies, lr=0.1, weight_decay=0.2)
    for step in range(4):  # parameter 1 gets no gradient in steps 1 and 2, parameter 2 not in 0
        for i, (p, c) in enumerate(zip(params, copies)):
            skip = (i == 1 and step in (1, 2)) or (i == 2 and step == 0)
            p.grad = c.grad = None if skip else torch.randn(4)
        opt.step(), ref.step()
        if step == 1:  # resume from a copy of the state, into a new optimiser
            saved = opt.state_dict()
            opt = MaskedAdamW(params, {}, lr=0.1, weight_decay=0.2)
            opt.load_state_dict(saved)
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 2.0, 3.0]
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)
    steps = [st["step"] for st in opt.state_dict()["state"].values()]  # each its own tensor
    assert len({t.untyped_storage().data_ptr() for t in steps}) == len(steps)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = _data([0, 1, 2, 3])
    # a warm-up past the resume point: its learning rate counts the run's steps, not the resume's
    settings = dict(weight_decay=0.05, warmup_steps=3)
    train(_cfg(4, **settings), tmp_path / "straight", data=data)
    train(_cfg(2, **settings), tmp_path / "resumed", data=data)
    train(_cfg(4, **settings), tmp_path / "resumed", resume=True, data=data)
    _assert_same_checkpoint(tmp_path / "straight", tmp_path / "resumed", 4)
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_run_writes_config_model_and_samples(tmp_path):
    train(_cfg(2), tmp_path / "r", data=_data([0, 1, 2, 3]))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["class_names"] == CLASSES and cfg["train"]["steps"] == 2
    model, _, _ = load_model_dir(tmp_path / "r" / "model")
    assert model.config.class_names == CLASSES
    assert (tmp_path / "r" / "samples" / "step_0000002.png").is_file()


def test_existing_run_is_not_overwritten(tmp_path):
    train(_cfg(2), tmp_path / "r", data=_data([0, 1]))
    before = (tmp_path / "r" / "config.json").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(_cfg(2), tmp_path / "r", data=_data([0, 1]))
    assert (tmp_path / "r" / "config.json").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint"):
        train(_cfg(2), tmp_path / "nothing", resume=True, data=_data([0, 1]))


def test_nan_loss_stops_with_a_message_naming_the_steps_and_saves_nothing(tmp_path):
    data = _data([0, 1])
    data.images.images[:] = float("nan")
    with pytest.raises(TrainingError, match="diverged: the last 2 steps .up to step 2.*--restart"):
        train(_cfg(2), tmp_path / "nan", data=data)
    assert (
        not (tmp_path / "nan" / "checkpoints").exists()
        and not (tmp_path / "nan" / "model").exists()
    )


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """With the orthogonality penalty on: it weighs each present tailor once a step, however
    the batch is split (a micro-batch holds some of the batch's groups)."""
    data = _data([0, 1, 2, 3])
    train(_cfg(2, class_dropout=0.0, orth_weight=1.0), tmp_path / "big", data=data)
    train(_cfg(2, class_dropout=0.0, orth_weight=1.0, micro_batch_size=2), tmp_path / "micro",
          data=data)  # fmt: skip
    a = _checkpoint(tmp_path / "big", 2)[0]
    b = _checkpoint(tmp_path / "micro", 2)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    data = _data([0, 1, 2, 3])
    train(_cfg(2), tmp_path / "plain", data=data)
    train(_cfg(2, grad_checkpointing=True), tmp_path / "ckpt", data=data)
    a, b = _checkpoint(tmp_path / "plain", 2)[0], _checkpoint(tmp_path / "ckpt", 2)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _same_direction(run_a, run_b, step=2) -> float:
    """Cosine of the two runs' updates at `step` (weights after it minus before it), over every
    weight: Adam's steps are ~lr whatever the gradient, so the weights alone stay within ~lr of
    each other even for a wrong gradient; the update's direction is what a gradient decides."""

    def update(run):
        after, before = _checkpoint(run, step)[0], _checkpoint(run, step - 1)[0]
        return torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)])

    return torch.nn.functional.cosine_similarity(update(run_a), update(run_b), dim=0).item()


def test_bf16_autocast_trains_and_stays_close_to_fp32(tmp_path):
    data = _data([0, 1, 2, 3])
    train(_cfg(2, checkpoint_every=1), tmp_path / "fp32", data=data)
    train(_cfg(2, precision="bf16", checkpoint_every=1), tmp_path / "bf16", data=data)
    a, b = _checkpoint(tmp_path / "fp32", 2)[0], _checkpoint(tmp_path / "bf16", 2)[0]
    assert all(torch.isfinite(t).all() for t in b.values())
    assert all(t.dtype == torch.float32 for t in b.values())  # master weights stay fp32
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved  # bf16 really ran
    for k in a:  # Adam moves a weight by at most ~lr a step, whatever the gradient's precision
        torch.testing.assert_close(a[k], b[k], rtol=0.05, atol=2 * 2 * 1e-3, msg=k)
    assert _same_direction(tmp_path / "fp32", tmp_path / "bf16") > 0.9


def test_group_file_maps_classes_to_shared_tailors(tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("'0': round\n'1': straight\n'2': round\n'3': straight\n")
    cfg = _cfg(1)
    cfg.group_file = str(groups)
    result = train(cfg, tmp_path / "r", data=_data([0, 1, 2, 3]))
    assert result.model.config.class_to_group == [0, 1, 0, 1]
    assert result.model.tailors.groups == [0, 1]
    groups.write_text("'0': round\n")
    cfg = _cfg(1)
    cfg.group_file = str(groups)
    with pytest.raises(ValueError, match=r"does not map classes \['1', '2', '3'\]"):
        train(cfg, tmp_path / "r2", data=_data([0, 1, 2, 3]))


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    data = _data([0, 1, 2, 3])
    train(_cfg(2, checkpoint_every=1), tmp_path / "eager", data=data)
    # scalar C++ kernels: inductor lowers the same graphs, and their code compiles in two thirds
    # of the time on a 2-core machine (vectorised code generation is torch's own to test)
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        train(_cfg(2, compile=True, checkpoint_every=1), tmp_path / "compiled", data=data)
    a, b = _checkpoint(tmp_path / "eager", 2)[0], _checkpoint(tmp_path / "compiled", 2)[0]
    for k in a:  # inductor fuses differently: Adam steps of ~lr can flip on rounding
        torch.testing.assert_close(a[k], b[k], rtol=0.05, atol=2 * 2 * 1e-3, msg=k)
    assert _same_direction(tmp_path / "eager", tmp_path / "compiled") > 0.9


def test_resumed_run_reports_its_whole_training_time(tmp_path):
    data = _data([0, 1])
    train(_cfg(2), tmp_path / "r", data=data)
    # what the resume starts from: the time up to the checkpoint (not its own writing, which
    # the first run's total includes and which a loaded machine can make the longer part)
    state = json.loads((tmp_path / "r" / "checkpoints" / "step_0000002" / "state.json").read_text())
    second = train(_cfg(4), tmp_path / "r", resume=True, data=data)
    assert second.steps == 4 and second.seconds > state["elapsed_s"] > 0
    elapsed = [
        float(r.split(",")[-1]) for r in (tmp_path / "r" / "metrics.csv").read_text().split()[1:]
    ]
    assert elapsed == sorted(elapsed)  # cumulative across the resume


def _as_kind_dit_0_1(checkpoint, model_config):
    """Rewrite a checkpoint in kind-dit 0.1's form: a tensor per tailor group and factor and per
    label row (weights, EMA and AdamW state alike), one AdamW parameter group."""
    from kind.core.model import DiT, ModelConfig, is_per_part
    from kind.io import atomic_save_tensors, atomic_write_text, write_checksums

    model = DiT(ModelConfig.from_dict(model_config))
    banks = ("tailors.rows", "y_embedder.table")
    row_of = {}  # per-part name -> (bank, row)
    for i, g in enumerate(model.tailors.groups):
        row_of |= {n: ("tailors.rows", i) for n in model.part_state() if f".tailors.{g}." in n}
    for i, c in enumerate(model.config.held_classes):
        row_of[f"y_embedder.rows.{c}"] = ("y_embedder.table", i)

    def cut(tensors):  # banked -> per part, through the model's own cutting
        model.load_state_dict(model.state_dict() | {k: tensors[k] for k in banks})
        parts = model.part_state()
        return {k: v for k, v in tensors.items() if k not in banks} | {
            k: v for k, v in parts.items() if is_per_part(k)
        }

    state = read_json(checkpoint / "state.json")
    weights = read_tensors(checkpoint / "model.safetensors")
    atomic_save_tensors(checkpoint / "model.safetensors", cut(weights))
    atomic_save_tensors(
        checkpoint / "ema.safetensors", cut(read_tensors(checkpoint / "ema.safetensors"))
    )
    optim = read_tensors(checkpoint / "optimizer.safetensors")
    old = {}
    for key in ("exp_avg", "exp_avg_sq"):
        per = cut({n.rpartition("/")[0]: t for n, t in optim.items() if n.endswith(f"/{key}")})
        old |= {f"{n}/{key}": t for n, t in per.items()}
    old |= {n: t for n, t in optim.items() if n.endswith("/step") and n[:-5] not in banks}
    old |= {f"{n}/step": optim[f"{b}/step"][r].clone() for n, (b, r) in row_of.items()}
    atomic_save_tensors(checkpoint / "optimizer.safetensors", old)
    counts = state["ema_counts"]
    state["ema_counts"] = {k: v for k, v in counts.items() if k not in banks} | {
        n: counts[b][r] for n, (b, r) in row_of.items()
    }
    state["param_groups"] = [{k: v for k, v in state["param_groups"][0].items() if k != "bank"}]
    atomic_write_text(checkpoint / "state.json", json.dumps(state))
    write_checksums(checkpoint)


def test_a_run_started_by_kind_dit_0_1_resumes_where_it_stopped(tmp_path):
    data = _data([0, 1, 2, 3])
    train(_cfg(4, weight_decay=0.05), tmp_path / "straight", data=data)
    train(_cfg(2, weight_decay=0.05), tmp_path / "old", data=data)
    config = read_json(tmp_path / "old" / "config.json")["model"]
    _as_kind_dit_0_1(tmp_path / "old" / "checkpoints" / "step_0000002", config)
    assert "tailors.rows" not in read_tensors(
        tmp_path / "old" / "checkpoints" / "step_0000002" / "ema.safetensors"
    )
    train(_cfg(4, weight_decay=0.05), tmp_path / "old", resume=True, data=data)
    _assert_same_checkpoint(tmp_path / "straight", tmp_path / "old", 4)


def test_a_resume_applies_a_changed_weight_decay(tmp_path):
    data = _data([0, 1, 2, 3])
    train(_cfg(2), tmp_path / "same", data=data)
    shutil.copytree(tmp_path / "same", tmp_path / "decayed")
    train(_cfg(4), tmp_path / "same", resume=True, data=data)
    train(_cfg(4, weight_decay=0.5), tmp_path / "decayed", resume=True, data=data)
    groups = _checkpoint(tmp_path / "decayed", 4)[3]["param_groups"]
    assert groups and all(g["weight_decay"] == 0.5 for g in groups)
    same, decayed = _checkpoint(tmp_path / "same", 4)[0], _checkpoint(tmp_path / "decayed", 4)[0]
    assert any(not torch.equal(same[k], decayed[k]) for k in same)  # the decay really applied


def _unchanged(run):
    """What a refused resume must leave as it was: the run's records and its checkpoints."""
    files = ("config.json", "run.json", "metrics.csv")
    return [(run / f).read_bytes() for f in files], sorted(
        p.name for p in (run / "checkpoints").iterdir()
    )


def test_a_resume_that_changes_the_seed_is_refused(tmp_path):
    data = _data([0, 1])
    train(_cfg(2), tmp_path / "r", data=data)
    before = _unchanged(tmp_path / "r")
    with pytest.raises(TrainingError, match=r"cannot change train.seed \(0 -> 5\).*without --seed"):
        train(_cfg(4, seed=5), tmp_path / "r", resume=True, data=data)
    assert _unchanged(tmp_path / "r") == before


def test_a_resume_whose_spec_opens_other_data_is_refused(tmp_path, monkeypatch):
    """A relative folder read from another directory, or a folder whose images changed: same
    spec and class names, other images; refused before anything is written."""
    from PIL import Image

    def folder(root, shade):
        for c in ("cat", "dog"):
            (root / "ds" / c).mkdir(parents=True)
            for i in range(5):
                Image.new("L", (8, 8), shade + 10 * i).save(root / "ds" / c / f"{i}.png")

    for root, shade in ((tmp_path / "a", 0), (tmp_path / "b", 100)):
        folder(root, shade)
    cfg = _cfg(2)
    cfg.data, cfg.model.image_size, cfg.model.in_channels = "ds", 8, 1
    cfg.model.size = "tiny/4"
    monkeypatch.chdir(tmp_path / "a")
    train(cfg, tmp_path / "r")
    record = read_json(tmp_path / "r" / "run.json")["data"]
    assert record["spec"] == "ds" and record["source"] == str(tmp_path / "a" / "ds")
    assert record["images"] == 8  # four a class: the fifth is the test split's
    before = _unchanged(tmp_path / "r")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(TrainingError, match=r"now opens .*b/ds \(8 images\), not the data"):
        train(cfg, tmp_path / "r", resume=True)
    assert _unchanged(tmp_path / "r") == before
    monkeypatch.chdir(tmp_path / "a")
    cfg.train.steps = 4
    train(cfg, tmp_path / "r", resume=True)  # where it started, the same data: it goes on
    assert read_json(tmp_path / "r" / "checkpoints" / "step_0000004" / "state.json")["step"] == 4


def test_a_resume_with_an_edited_group_file_is_refused(tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("'0': round\n'1': straight\n'2': round\n'3': straight\n")
    cfg = _cfg(2)
    cfg.group_file = str(groups)
    data = _data([0, 1, 2, 3])
    train(cfg, tmp_path / "r", data=data)
    before = _unchanged(tmp_path / "r")
    groups.write_text("'0': round\n'1': round\n'2': straight\n'3': straight\n")
    cfg = _cfg(4)
    cfg.group_file = str(groups)
    trained = r"\{'0': 0, '1': 1, '2': 0, '3': 1\}"
    now = r"\{'0': 0, '1': 0, '2': 1, '3': 1\}"
    with pytest.raises(TrainingError, match=f"trained with {trained}.*now gives {now}"):
        train(cfg, tmp_path / "r", resume=True, data=data)
    assert _unchanged(tmp_path / "r") == before


class _Killed(Exception):
    """Stands for a SIGKILL in the middle of a --restart's removals."""


def _restart_killed_after(run, removals, monkeypatch):
    """A --restart's clearing of `run`, killed after its first `removals` removals; returns what
    it removed."""
    done = []

    def remove(path, *args, original, **kwargs):
        if len(done) == removals:
            raise _Killed
        done.append(path)
        return original(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", functools.partial(remove, original=shutil.rmtree))
        m.setattr(Path, "unlink", functools.partialmethod(remove, original=Path.unlink))
        with pytest.raises(_Killed):
            claim_run_dir(run, restart=True)
    return done


def test_a_restart_killed_half_way_never_leaves_old_checkpoints_in_a_new_looking_directory(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(_cfg(4), run, data=_data([0, 1]))  # checkpoints at steps 2 and 4
    present = [n for n in RUN_FILES if (run / n).exists()]
    assert "checkpoints" in present and "config.json" in present
    for removals in range(1, len(present)):  # killed after each removal but the last
        left = tmp_path / f"killed_{removals}"
        shutil.copytree(run, left)
        done = _restart_killed_after(left, removals, monkeypatch)
        # a directory without config.json is started as a new run: it must hold no checkpoint
        assert is_run_dir(left) or not has_checkpoint(left), done


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_step_whose_loss_is_not_finite_is_never_applied(tmp_path, monkeypatch, precision):
    """A loss of inf with finite gradients (here a constant added to it): with fp16 the gradient
    scaler, which skips overflowing gradients only, applied it (weights and AdamW's counts
    moved, the EMA not, and the run then said none of its bad steps was applied)."""
    from kind.core.diffusion import Diffusion
    from kind.core.model import DiT

    loss = Diffusion.loss
    monkeypatch.setattr(Diffusion, "loss", lambda *a, **k: loss(*a, **k) + float("inf"))
    cfg = _cfg(3, precision=precision, max_bad_steps=2)
    model = DiT(replace(cfg.model, class_names=CLASSES, image_size=28, in_channels=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="none of them was applied"):
        train(cfg, tmp_path / "r", model=model, data=_data([0, 1]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_tensorboard_writer_is_closed_when_the_steps_end(tmp_path, monkeypatch):
    """Its events reach the disk on close (it flushes by itself only every 2 minutes, and a
    torchrun rank ends without the interpreter's teardown). A stand-in writer: the tensorboard
    extra is not installed here."""
    import importlib.util
    import sys
    import types

    closed, written = [], []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = type("Writer", (), {
        "__init__": lambda self, path: None,
        "add_scalar": lambda self, *a: written.append(a),
        "close": lambda self: closed.append(True),
    })  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else find_spec(name, *a))  # fmt: skip
    train(_cfg(2, tensorboard=True), tmp_path / "r", data=_data([0, 1]))
    assert written and closed == [True]


def test_a_sparse_row_gradient_is_summed_per_row_without_coalescing():
    """A per-sample gather's gradient repeats rows (one entry per sample) and holds rows outside
    the batch's (a null sample's gated row): summed per kept row, the others dropped."""
    from kind.training.optim import rows_of_grad

    index = torch.tensor([3, 0, 3, 5, 0, 3])
    values = torch.arange(12.0).view(6, 2)
    grad = torch.sparse_coo_tensor(index[None], values, (6, 2))  # uncoalesced
    rows = torch.tensor([0, 3])
    dense = torch.zeros(6, 2).index_add_(0, index, values)
    assert torch.equal(rows_of_grad(grad, rows), dense[rows])
    assert torch.equal(rows_of_grad(grad.coalesce(), rows), dense[rows])
    assert torch.equal(rows_of_grad(dense, rows), dense[rows])


def test_a_transfer_step_whose_batch_is_all_null_samples_trains_nothing_and_goes_on(tmp_path):
    """A KIND transfer (learngenes frozen, no null tailor) has no gradient at all on a batch
    whose labels all dropped to the null class: the step goes on (it failed with "Tensor list
    must have at least one tensor", and a resume replayed the same batch)."""
    from kind.core.diffusion import DiffusionConfig
    from kind.core.model import DiT, ModelConfig
    from kind.store.parts import decompose
    from kind.transfer.run import prepare

    torch.manual_seed(0)
    source = DiT(ModelConfig(class_names=["a", "b"], rank_tailor=4))
    decompose(source.eval(), DiffusionConfig(), tmp_path / "parts")
    start = prepare(tmp_path / "parts", CLASSES)
    cfg = _cfg(3, batch_size=1, class_dropout=0.99)  # every batch of one: null, at this seed
    assert train(cfg, tmp_path / "run", model=start.model).steps == 3


def test_a_resume_with_fewer_steps_than_the_run_has_taken_is_refused(tmp_path):
    train(_cfg(2), tmp_path / "run")
    with pytest.raises(TrainingError, match="is at step 2, past --steps 1; give --steps 2 or more"):
        train(_cfg(1), tmp_path / "run", resume=True)


def test_a_model_handed_over_in_eval_mode_trains_with_gradient_checkpointing(tmp_path, monkeypatch):
    """`load_model` returns models in eval mode, where the blocks skip checkpointing."""
    from kind.core.model import DiT, ModelConfig

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or checkpoint(*a, **k))  # fmt: skip
    model = DiT(ModelConfig(class_names=CLASSES, rank_tailor=4)).eval()
    train(_cfg(1, grad_checkpointing=True), tmp_path / "run", model=model)
    assert calls


def test_a_resume_on_another_device_type_than_the_checkpoints_is_named(tmp_path):
    """A GPU run's noise generator state (16 bytes of Philox) resumed on a CPU: one clear error,
    not torch's "Expected a CPUGeneratorImplState of size 5056"."""
    from safetensors.torch import save_file

    from kind.io import write_checksums

    train(_cfg(2), tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    rng = read_tensors(step / "rng.safetensors")
    rng["gen.noise"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator saves
    save_file(rng, step / "rng.safetensors")
    (step / "checksums.json").unlink()
    write_checksums(step)
    with pytest.raises(ValueError, match="noise random stream was saved on another device type"):
        train(_cfg(3), tmp_path / "run", resume=True)


def test_the_average_follows_the_warmed_up_decay_worked_by_hand():
    """EMA weight 1 - min(decay, (1 + n) / (10 + n)) after n updates of that parameter (or row):
    a plain parameter every step, a bank's rows only in the steps that updated them."""
    from kind.training.ema import EMA

    p, bank = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 2))
    ema = EMA([("p", p), ("bank", bank)], decay=0.2, banks={"bank": "bank"})
    want_p, want_rows, counts = torch.zeros(3), torch.zeros(4, 2), [0] * 4
    weight = lambda n: 1 - min(0.2, (1 + n) / (10 + n))  # noqa: E731 (the clamp bites from n = 2)
    for step, rows in enumerate(([0, 1], [1], [1, 3]), start=1):
        with torch.no_grad():
            p.fill_(step), bank.fill_(step)
        p.grad, bank.grad = torch.zeros(3), torch.zeros(4, 2)
        ema.update({"bank": torch.tensor(rows)})
        want_p += weight(step - 1) * (step - want_p)
        for r in rows:
            want_rows[r] += weight(counts[r]) * (step - want_rows[r])
            counts[r] += 1
    torch.testing.assert_close(ema.shadow["p"], want_p)
    torch.testing.assert_close(ema.shadow["bank"], want_rows)
    assert ema.shadow["bank"][2].abs().sum() == 0  # never updated: still the start


def test_clipping_scales_dense_and_sparse_gradients_by_their_joint_norm():
    from kind.training.loop import _clip_grad_norm

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 2))
    a.grad = torch.tensor([3.0, 0.0, 4.0])
    rows = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    b.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), rows.clone(), (4, 2))  # rows 1, 3
    opt = torch.optim.SGD([a, b], lr=1.0)
    norm = _clip_grad_norm(opt, 1.0)
    total = 34**0.5  # sqrt(9 + 16 + 1 + 4 + 4)
    assert abs(float(norm) - total) < 1e-5
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0, 4.0]) / total)
    torch.testing.assert_close(b.grad.to_dense()[[1, 3]], rows / total)


def test_a_damaged_row_in_the_log_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, caplog):
    """metrics.csv is a record, not the run's state: a garbage line (a full disk mid-write) no
    longer stops a resume with "invalid literal for int()", a message naming no file."""
    train(_cfg(2), tmp_path / "r")
    log_file = tmp_path / "r" / "metrics.csv"
    log_file.write_text(log_file.read_text() + "\x00garbage,1,2\n")
    train(_cfg(3), tmp_path / "r", resume=True)
    assert "metrics.csv: dropped 1 unreadable row(s)" in caplog.text
    steps = [r.split(",")[0] for r in log_file.read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3"]
