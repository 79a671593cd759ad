"""Nothing a user saved is lost or silently wrong: one row per fault, each a command (or API call),
the exit code and a phrase of the message it must give, and the files that were there before it
ran, byte for byte the same after (unless the row says the command may change them)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kind.cli.main import main
from kind.store.runs import (
    checkpoint_dir,
    checkpoint_dirs,
    latest_checkpoint,
    prune_checkpoints,
    run_lock,
    start_from_checkpoint,
)
from kind.training.config import load_config
from kind.training.loop import train

TRANSFER = ["--data", "mnist:0-1", "--batch-size", "8", "--set", "train.sample_every=0", "--set",
            "sample.steps=1", "--set", "sample.per_class=1", "--set", "train.threads=1", "--set",
            "train.checkpoint_every=1"]  # fmt: skip
QUICK = ["--size", "tiny", *TRANSFER]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished 2-step run (two checkpoints), its parts, and its samples."""
    root = tmp_path_factory.mktemp("made")
    main(["train", *QUICK, "--steps", "2", "--out", str(root / "run")])
    main(["decompose", str(root / "run"), "--out", str(root / "parts")])
    main(["sample", str(root / "run"), "--n", "2", "--steps", "1", "--out", str(root / "s")])
    return root


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], list[str] | Callable[[], None]]  # (tmp, made) -> argv or call
    code: int  # expected exit code (0: success)
    phrase: str  # in the error message (stderr), or in the log for code 0
    untouched: bool = True  # files present before are byte-identical after


def _copy(made: Path, tmp: Path, what: str = "run") -> Path:
    shutil.copytree(made / what, tmp / what)
    return tmp / what


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40  # one exponent bit of a float near the end of the file
    path.write_bytes(bytes(data))


def _user_dir(tmp: Path, made: Path) -> list[str]:
    (tmp / "u" / "model").mkdir(parents=True)
    (tmp / "u" / "model" / "important.txt").write_text("x")
    return ["train", *QUICK, "--steps", "2", "--out", str(tmp / "u")]


def _locked(tmp: Path, made: Path) -> Callable[[], None]:
    run = _copy(made, tmp)

    def call() -> None:
        with run_lock(run):  # another process writing the run
            main(["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)])

    return call


def _demo_user_folder(tmp: Path, made: Path) -> Callable[[], None]:
    """The demo resumes or restarts a pre-training folder only when it is a run of its own."""
    from kind.experiments.jobs import _continue

    folder = tmp / "demo" / "pretrain" / "kind"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    cfg = load_config(overrides={"data": "mnist:0-1", "train": {"steps": 1, "batch_size": 8}})
    return lambda: train(cfg, folder, **_continue(folder))


def _continue_into(what: str) -> Callable[[Path, Path], Callable[[], None]]:
    """A run started as another's checkpoint (the demo's continued pre-training) into a folder
    holding a user's file or a run of its own."""

    def setup(tmp: Path, made: Path) -> Callable[[], None]:
        if what == "run":
            target = _copy(made, tmp)
        else:
            target = tmp / "mine"
            target.mkdir()
            (target / "notes.txt").write_text("mine")
        source = made / "run"
        return lambda: start_from_checkpoint(target, source, latest_checkpoint(source))

    return setup


def _flipped_model(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    _flip(run / "model" / "model.safetensors")
    return ["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp / "s")]


def _flipped_checkpoint(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    _flip(run / "checkpoints" / "step_0000002" / "model.safetensors")
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _truncated_checkpoint(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    path = run / "checkpoints" / "step_0000002" / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _no_checkpoint(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    shutil.rmtree(run / "checkpoints")
    return ["train", *QUICK, "--steps", "2", "--resume", "--out", str(run)]


def _restart(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    shutil.rmtree(run / "checkpoints")
    (run / ".metrics.csv.abc.tmp").write_text("partial")  # left by a crash mid-write
    return ["train", *QUICK, "--steps", "2", "--restart", "--out", str(run)]


def _restart_through_a_link(tmp: Path, made: Path) -> list[str]:
    """checkpoints/ linked to a scratch disk that holds more than the run's checkpoints."""
    run = _copy(made, tmp)
    scratch = tmp / "scratch"
    (run / "checkpoints").rename(scratch)
    (scratch / "other-project.txt").write_text("not this run's")
    (run / "checkpoints").symlink_to(scratch)
    return ["train", *QUICK, "--steps", "2", "--restart", "--out", str(run)]


def _auto(prune: tuple[str, ...] = (), *extra: str) -> Callable[[Path, Path], list[str]]:
    """--auto-resume into a copy of the finished run with `prune` removed from it."""

    def setup(tmp: Path, made: Path) -> list[str]:
        run = _copy(made, tmp)
        for name in prune:
            shutil.rmtree(run / name)
        return ["train", *QUICK, "--steps", "3", "--auto-resume", *extra, "--out", str(run)]

    return setup


def _auto_set_aside(tmp: Path, made: Path) -> list[str]:
    """Every checkpoint moved aside by a replace killed between its renames: put back, resumed."""
    argv = _auto(("model",))(tmp, made)
    for step in (tmp / "run" / "checkpoints").iterdir():
        step.rename(step.with_name(f".{step.name}.old"))
    return argv


def _auto_unmarked(tmp: Path, made: Path) -> list[str]:
    """A kind-dit 0.1 run (no marker) without a checkpoint is not started again unasked."""
    argv = _auto(("checkpoints", "model"))(tmp, made)
    (tmp / "run" / ".kind-run").unlink()
    return argv


def _auto_resume_a_users_folder(tmp: Path, made: Path) -> list[str]:
    argv = _restart_a_users_folder(tmp, made)
    return [a for a in argv if a != "--restart"] + ["--auto-resume"]


def _resume_changes(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _interrupted_replace(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    (run / "model").rename(run / ".model.old")  # killed between the two renames of a replace
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _before_markers(tmp: Path, made: Path) -> list[str]:
    run = _copy(made, tmp)
    (run / ".kind-run").unlink()  # a run written by kind-dit 0.1
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _other_method(tmp: Path, made: Path) -> list[str]:
    main(["transfer", str(made / "parts"), *TRANSFER, "--steps", "1", "--data", "mnist:2-3",
          "--out", str(tmp / "t")])  # fmt: skip
    return ["transfer", str(made / "parts"), *TRANSFER, "--steps", "2", "--data", "mnist:2-3",
            "--method", "kind-sigma", "--resume", "--out", str(tmp / "t")]  # fmt: skip


def _not_safetensors_part(tmp: Path, made: Path) -> list[str]:
    from kind.io import sha256_file

    parts = _copy(made, tmp, "parts")
    manifest = json.loads((parts / "manifest.json").read_text())
    entry = manifest["tailors"]["0"]
    (parts / entry["file"]).write_bytes(b"not a safetensors file at all")
    entry |= {"bytes": 29, "sha256": sha256_file(parts / entry["file"])}
    (parts / "manifest.json").write_text(json.dumps(manifest))
    return ["sample", str(parts), "--classes", "0", "--n", "1", "--steps", "1", "--out",
            str(tmp / "s")]  # fmt: skip


def _not_npz(tmp: Path, made: Path) -> list[str]:
    (tmp / "x.npz").write_text("hello")
    return ["evaluate", str(tmp / "x.npz"), "--ref", "mnist:0-1"]


def _eval_twice(tmp: Path, made: Path) -> list[str]:
    samples = _copy(made, tmp, "s") / "samples.npz"
    (samples.parent / "samples.eval.json").write_text("{}")
    return ["evaluate", str(samples), "--ref", "mnist:0-1"]


def _bad_yaml(tmp: Path, made: Path) -> list[str]:
    (tmp / "c.yaml").write_text("train: {steps: 3\n")
    return ["train", *QUICK, "--config", str(tmp / "c.yaml"), "--out", str(tmp / "r")]


def _out_is_file(tmp: Path, made: Path) -> list[str]:
    (tmp / "f").write_text("mine")
    return ["train", *QUICK, "--steps", "1", "--out", str(tmp / "f")]


def _dangling(command: str) -> Callable[[Path, Path], list[str]]:
    """--out a symbolic link to a folder that is not there (or to itself: a loop)."""

    def setup(tmp: Path, made: Path) -> list[str]:
        (tmp / "link").symlink_to(tmp / "link" if command == "decompose" else tmp / "gone")
        if command == "decompose":
            return ["decompose", str(made / "run"), "--out", str(tmp / "link")]
        return ["train", *QUICK, "--steps", "1", "--out", str(tmp / "link")]

    return setup


def _folder_tiny(tmp: Path, made: Path) -> list[str]:
    from PIL import Image

    for c in ("a", "b"):
        (tmp / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(
                tmp / "imgs" / c / f"{i}.png"
            )
    return ["train", "--data", str(tmp / "imgs"), "--size", "tiny", "--steps", "1", "--out",
            str(tmp / "r")]  # fmt: skip


def _folder_resized(tmp: Path, made: Path) -> list[str]:
    _folder_tiny(tmp, made)
    return ["train", "--data", str(tmp / "imgs"), "--size", "tiny", "--steps", "1", "--set",
            "model.image_size=28", "--set", "train.sample_every=0", "--set", "sample.steps=1",
            "--set", "sample.per_class=1", "--out", str(tmp / "r")]  # fmt: skip


def _train(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, made: ["train", *QUICK, "--steps", "2", *extra, "--out", str(tmp / "r")]


def _sample(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, made: ["sample", str(made / "run"), *extra, "--out", str(tmp / "s")]


def _config_file(text: bytes) -> Callable[[Path, Path], list[str]]:
    """`train --config` of a file holding `text`."""

    def setup(tmp: Path, made: Path) -> list[str]:
        (tmp / "c.yaml").write_bytes(text)
        return _train("--config", str(tmp / "c.yaml"))(tmp, made)

    return setup


def _demo_into_user_dir(tmp: Path, made: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("x")
    return ["demo", "--preset", "quick", "--out", str(tmp / "mine")]


def _demo_into_user_settings(tmp: Path, made: Path) -> list[str]:
    """A user's folder that happens to hold a settings.json naming a preset."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("x")
    (tmp / "mine" / "settings.json").write_text('{"preset": "default", "theme": "dark"}')
    return ["demo", "--preset", "quick", "--out", str(tmp / "mine"), "--report-only"]


def _ablations_into_user_dir(tmp: Path, made: Path) -> Callable[[], None]:
    """Ablations beside a (report-only) demo, into a user's folder holding an ablations.md."""
    from kind.experiments.ablations import run_ablations
    from kind.experiments.demo import run_demo

    run_demo(tmp / "demo", "quick", device="cpu", report_only=True)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "ablations.md").write_text("my own notes")
    return lambda: run_ablations(tmp / "demo", tmp / "mine")


def _sample_into_user_dir(tmp: Path, made: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "photo.png").write_bytes(b"x")
    return ["sample", str(made / "run"), "--n", "1", "--steps", "1", "--out", str(tmp / "mine")]


def _damaged_json(what: str, text: str) -> Callable[[Path, Path], list[str]]:
    """A hand-edited or damaged JSON file of the run or its parts, the command that reads it."""

    def setup(tmp: Path, made: Path) -> list[str]:
        folder = _copy(made, tmp, what.split("/")[0])
        (folder.parent / what).write_text(text)
        if what.startswith("parts"):
            return ["info", str(folder)]
        if what.endswith("model.json"):  # export reads it to tell a KIND model from a dense one
            return ["export", str(folder / "model"), "--out", str(tmp / "x")]
        return ["sample", str(folder), "--n", "1", "--steps", "1", "--out", str(tmp / "x")]

    return setup


def _edited_state(edit: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    """The newest checkpoint's state.json edited by hand and its checksums.json removed with it
    (so the checkpoint reads as one written before checksums), then a resume."""

    def setup(tmp: Path, made: Path) -> list[str]:
        newest = _copy(made, tmp) / "checkpoints" / "step_0000002"
        state = json.loads((newest / "state.json").read_text())
        edit(state)
        (newest / "state.json").write_text(json.dumps(state))
        (newest / "checksums.json").unlink()
        return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(tmp / "run")]

    return setup


def _edited_record(tmp: Path, made: Path) -> list[str]:
    """run.json hand-edited: a record of the wrong JSON kind, then a resume that reads it."""
    run = _copy(made, tmp)
    (run / "run.json").write_text('{"transfer": "x"}')
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


def _record_made_a_directory(tmp: Path, made: Path) -> list[str]:
    """run.json replaced by a directory (a sync tool's conflict, a hand mistake), then a resume."""
    run = _copy(made, tmp)
    (run / "run.json").unlink()
    (run / "run.json").mkdir()
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(run)]


SAMPLE_ONE = ("sample", "{}", "--n", "1", "--steps", "1", "--out", "{tmp}/s")  # `_edited_json`'s


def _edited_json(what: str, edit: Callable[[dict], None], *argv: str, drop: str = ""):
    """`what` (a JSON file of the shared run or its parts) edited by hand, checksums.json beside
    it removed with it (so it reads as written before checksums), then `argv` on the copy
    (`{}` stands for the copied folder, `{tmp}` for the test's directory); `drop`: a folder of
    the copy removed first."""

    def setup(tmp: Path, made: Path) -> list[str]:
        folder = _copy(made, tmp, what.split("/")[0])
        if drop:
            shutil.rmtree(folder / drop)
        path = folder.parent / what
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        (path.parent / "checksums.json").unlink(missing_ok=True)
        return [a.format(folder, tmp=tmp) for a in argv]

    return setup


def _other_optimizer_shape(tmp: Path, made: Path) -> list[str]:
    """The newest checkpoint's optimiser state of another model's shape (a file swapped in from
    another run), its checksums removed with it, then a resume."""
    import torch
    from safetensors.torch import load_file, save_file

    newest = _copy(made, tmp) / "checkpoints" / "step_0000002"
    state = load_file(newest / "optimizer.safetensors")
    key = next(k for k in state if k.endswith("/exp_avg"))
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, newest / "optimizer.safetensors")
    (newest / "checksums.json").unlink()
    return ["train", *QUICK, "--steps", "3", "--resume", "--out", str(tmp / "run")]


def _match_a_numbered_data(tmp: Path, made: Path) -> list[str]:
    """--match-kind of a KIND transfer run whose config.json data is a number, not a spec."""
    run = _copy(made, tmp)
    (run / "run.json").write_text('{"transfer": {"method": "kind", "trainable_params": 10}}')
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data": 5}))
    return ["transfer", str(made / "parts"), "--method", "lora", "--match-kind", str(run),
            *TRANSFER, "--data", "mnist:8", "--steps", "1", "--out", str(tmp / "t")]  # fmt: skip


def _sample_over_a_directory(tmp: Path, made: Path) -> list[str]:
    """--overwrite samples whose samples.png is a directory (a user's, made by hand)."""
    (tmp / "s" / "samples.png").mkdir(parents=True)
    (tmp / "s" / "samples.png" / "mine.txt").write_text("x")
    return _sample("--n", "1", "--steps", "1", "--overwrite")(tmp, made)


def _assemble(*argv: str) -> Callable[[Path, Path], list[str]]:
    """`assemble` of a copy of the shared parts ({parts}: the copy; {tmp}: the test's folder)."""

    def setup(tmp: Path, made: Path) -> list[str]:
        parts = _copy(made, tmp, "parts")
        return ["assemble", str(parts), *(a.format(parts=parts, tmp=tmp) for a in argv)]

    return setup


def _damaged_samples(how: str) -> Callable[[Path, Path], list[str]]:
    """A sample .npz cut short, with a flipped byte in its image data, with float labels or
    with a single class name or one name for two classes, scored with evaluate."""

    def setup(tmp: Path, made: Path) -> list[str]:
        samples = _copy(made, tmp, "s") / "samples.npz"
        data = samples.read_bytes()
        if how == "truncated":
            samples.write_bytes(data[: len(data) // 2])
        elif how == "flipped":
            _flip(samples, 200)  # inside arr_0's data: the member's CRC no longer matches
        else:
            arrays = dict(np.load(samples))
            if how == "float labels":
                arrays["labels"] = arrays["labels"] + 0.5
            elif how == "one name twice":
                arrays["class_names"] = np.array([arrays["class_names"][0]] * 2)
            else:
                arrays["class_names"] = np.array("one name")
            np.savez(samples, **arrays)
        return ["evaluate", str(samples), "--ref", "mnist:0-1"]

    return setup


def _restart_a_users_folder(tmp: Path, made: Path) -> list[str]:
    """A folder of the user's with a config.json of their own is no run to --restart."""
    (tmp / "proj" / "samples").mkdir(parents=True)
    (tmp / "proj" / "config.json").write_text('{"my": 1}')
    (tmp / "proj" / "samples" / "photo.png").write_bytes(b"x")
    return ["train", *QUICK, "--steps", "1", "--restart", "--out", str(tmp / "proj")]


def _out_under_a_file(tmp: Path, made: Path) -> list[str]:
    (tmp / "f").write_text("mine")
    return ["decompose", str(made / "run"), "--out", str(tmp / "f" / "parts")]


def _empty_samples(tmp: Path, made: Path) -> list[str]:
    (tmp / "samples.npz").write_bytes(b"")  # an interrupted copy, a full disk
    return ["evaluate", str(tmp / "samples.npz"), "--ref", "mnist:0-1"]


def _eval_onto_samples(tmp: Path, made: Path) -> list[str]:
    samples = _copy(made, tmp, "s") / "samples.npz"
    return ["evaluate", str(samples), "--ref", "mnist:0-1", "--out", str(samples), "--overwrite"]


DIVERGE = ("--set", "train.lr=1e6", "--set", "train.warmup_steps=0", "--steps", "7")
CASES = [
    Case("divergence stops, saves nothing non-finite", _train(*DIVERGE), 2, "training diverged"),
    Case("--out with user files", _user_dir, 2, "did not make"),
    Case("two runs in one --out", _locked, 2, "is being written by"),
    Case("demo never deletes a user's folder", _demo_user_folder, 2, "did not make"),
    Case("demo --out with user files", _demo_into_user_dir, 2, "not a kind-dit demo"),
    Case(
        "demo --out with a user's settings.json", _demo_into_user_settings, 2, "not a kind-dit demo"
    ),
    Case("ablations --out with user files", _ablations_into_user_dir, 2, "not the ablations of"),
    Case("continue a run into a user's folder", _continue_into("user"), 2, "of its own"),
    Case("continue a run into another run", _continue_into("run"), 2, "of its own"),
    Case("sample --out with user files", _sample_into_user_dir, 2, "other files than samples"),
    Case("bit flip in a model directory", _flipped_model, 2, "does not match its sha256"),
    Case("bit flip in the latest checkpoint", _flipped_checkpoint, 0, "falling back", False),
    Case("truncated latest checkpoint", _truncated_checkpoint, 0, "falling back", False),
    Case("resume without a checkpoint", _no_checkpoint, 2, "--restart"),
    Case("--restart a run, stale temporary files", _restart, 0, "removing", False),
    Case(
        "--restart through a linked checkpoints/",
        _restart_through_a_link,
        2,
        "empty what it points to",
    ),
    Case("--auto-resume a run with checkpoints", _auto(), 0, "resumed", False),
    Case(
        "--auto-resume before the first checkpoint",
        _auto(("checkpoints", "model")),
        0,
        "before its first checkpoint",
        False,
    ),  # fmt: skip
    Case("--auto-resume a model without checkpoints", _auto(("checkpoints",)), 2, "--restart"),
    Case("--auto-resume with --restart", _auto((), "--restart"), 2, "pass it alone"),
    Case("--auto-resume with --resume", _auto((), "--resume"), 2, "pass it alone"),
    Case("--auto-resume, checkpoints set aside", _auto_set_aside, 0, "restoring", False),
    Case("--auto-resume a 0.1 run without checkpoints", _auto_unmarked, 2, "no checkpoint to"),
    Case("--auto-resume a user's folder", _auto_resume_a_users_folder, 2, "did not make"),
    Case("resume with changed settings", _resume_changes, 0, "train.steps 2 -> 3", False),
    Case("a replace interrupted between its renames", _interrupted_replace, 0, "restoring", False),
    Case("a run written before markers resumes", _before_markers, 0, "resumed", False),
    Case("resume with another method", _other_method, 2, "method 'kind' (now 'kind-sigma')"),
    Case(
        "state.json with a negative step",
        _edited_state(lambda s: s.update(step=-2)),
        2,
        "step is -2, not the 2 its folder says",
    ),  # fmt: skip
    Case(
        "state.json without EMA counts",
        _edited_state(lambda s: s.pop("ema_counts")),
        2,
        "state.json has no 'ema_counts'",
    ),  # fmt: skip
    Case(
        "state.json with text for counts",
        _edited_state(lambda s: s.update(ema_counts="x")),
        2,
        "ema_counts is 'x', not a dict[str, int | list[int]]",
    ),  # fmt: skip
    Case(
        "--set class_to_group (group_file's)",
        _train("--set", "model.class_to_group=[0,0]"),
        2,
        "model.class_to_group comes from the data (--data) and group_file",
    ),  # fmt: skip
    Case(
        "a KIND model without tailors",
        _train("--set", "model.rank_tailor=0"),
        0,
        "this KIND model has no tailors",
        untouched=False,
    ),  # fmt: skip
    Case(
        "state.json without one parameter's EMA count",
        _edited_state(lambda s: s["ema_counts"].pop(next(iter(s["ema_counts"])))),
        2,
        "EMA update counts are missing or malformed",
    ),  # fmt: skip
    Case(
        "state.json with text for AdamW's eps",
        _edited_state(lambda s: s["param_groups"][0].update(eps="x")),
        2,
        "optimiser settings (param_groups",
    ),  # fmt: skip
    Case(
        "state.json without AdamW's groups",
        _edited_state(lambda s: s.update(param_groups=[])),
        2,
        "optimiser settings (param_groups: [])",
    ),  # fmt: skip
    Case("optimiser state of another shape", _other_optimizer_shape, 2, "is of another model"),
    Case(
        "--set a value, then a key under it",
        _train("--set", "train.lr=1", "--set", "train.lr.x=2"),
        2,
        "train.lr was set to a value by an earlier --set",
    ),  # fmt: skip
    Case(
        "run.json whose dense start's import record is text",
        _edited_json(
            "run/run.json",
            lambda r: r.update(init_from={"path": "x", "imported": "j"}),
            "train",
            *QUICK,
            "--steps",
            "3",
            "--resume",
            "--out",
            "{}",
        ),
        2,
        "imported is 'j', not a JSON object",
    ),  # fmt: skip
    Case(
        "model.json whose VAE is a number",
        _edited_json(
            "run/model/model.json",
            lambda m: m.update(latent={"vae": 5}),
            *SAMPLE_ONE,
        ),
        2,
        "latent.vae is 5, not str | None",
    ),  # fmt: skip
    Case(
        "a parts manifest's grafted record of numbers",
        _edited_json(
            "parts/manifest.json",
            lambda m: m.update(grafted=[1]),
            "assemble",
            "{}",
            "--out",
            "{tmp}/a",
        ),
        2,
        "its grafted record is not a list",
    ),  # fmt: skip
    Case(
        "config.json with text for sample, no model/",
        _edited_json(
            "run/config.json",
            lambda c: c.update(sample="x"),
            *SAMPLE_ONE,
            drop="model",
        ),
        2,
        "sample is 'x', not a JSON object",
    ),  # fmt: skip
    Case("run.json with a text record", _edited_record, 2, "transfer is 'x', not a JSON object"),
    Case("run.json made a directory", _record_made_a_directory, 2, "is a directory where a file"),
    Case(
        "--match-kind a run whose data is 5",
        _match_a_numbered_data,
        2,
        "config.json: data is 5, not a data spec",
    ),
    Case(
        "--set learngene_ranks to a list",
        _train("--set", "model.learngene_ranks=[1]"),
        2,
        "'model.learngene_ranks' expects a dict[str, int] | None, got [1]",
    ),  # fmt: skip
    Case("part file that is not safetensors", _not_safetensors_part, 2, "not a safetensors"),
    Case("evaluate a non-npz", _not_npz, 2, "not a sample .npz"),
    Case("evaluate over an existing result", _eval_twice, 2, "--overwrite"),
    Case("malformed YAML", _bad_yaml, 2, "c.yaml is not valid YAML"),
    Case("--out names a file", _out_is_file, 2, "is a file"),
    Case("--out a dangling link", _dangling("train"), 2, "which does not exist or loops"),
    Case("--out a looping link", _dangling("decompose"), 2, "which does not exist or loops"),
    Case("folder data with patch 7", _folder_tiny, 2, "--size tiny/2"),
    Case("--set model.image_size resizes folder data", _folder_resized, 0, "(3, 28, 28)"),
    Case("--steps -5", _train("--steps", "-5"), 2, "must be an integer >= 1"),
    Case("batch size 0", _train("--batch-size", "0"), 2, "must be an integer >= 1"),
    Case("class_dropout 2", _train("--set", "train.class_dropout=2"), 2, "train.class_dropout"),
    Case("ema_decay 5", _train("--set", "train.ema_decay=5"), 2, "train.ema_decay"),
    Case("precision fp64", _train("--set", "train.precision=fp64"), 2, "fp32, bf16 or fp16"),
    Case("checkpoint_every 0", _train("--set", "train.checkpoint_every=0"), 2, "checkpoint_every"),
    Case("num_timesteps 0", _train("--set", "diffusion.num_timesteps=0"), 2, "num_timesteps"),
    Case("empty data spec", _train("--data", ""), 2, "data = ''"),
    Case("sample --cfg-scale nan", _sample("--cfg-scale", "nan"), 2, "finite number"),
    Case("sample --steps 0", _sample("--steps", "0"), 2, "must be an integer >= 1"),
    Case("sample --n 0", _sample("--n", "0"), 2, "must be an integer >= 1"),
    Case("manifest not an object", _damaged_json("parts/manifest.json", "[1]"), 2, "not an object"),
    Case(
        "manifest without tailors",
        _damaged_json("parts/manifest.json", '{"format": "kind-parts/1", "model": {}}'),
        2,
        "has no diffusion, learngene, tailors",
    ),  # fmt: skip
    Case(
        "model.json without model",
        _damaged_json("run/model/model.json", '{"diffusion": {}}'),
        2,
        "has no 'model'",
    ),  # fmt: skip
    Case(
        "checksums.json without sha256",
        _damaged_json("run/model/checksums.json", '{"x": 1}'),
        2,
        "has no 'sha256'",
    ),  # fmt: skip
    Case(
        "checksums.json naming a file elsewhere",
        _damaged_json("run/model/checksums.json", '{"sha256": {"../config.json": "0"}}'),
        2,
        "sha256 is not an object of file name -> digest",
    ),  # fmt: skip
    Case("evaluate a truncated .npz", _damaged_samples("truncated"), 2, "not a sample .npz"),
    Case("evaluate a corrupted .npz", _damaged_samples("flipped"), 2, "damaged sample .npz"),
    Case("evaluate an empty .npz", _empty_samples, 2, "not a sample .npz"),
    Case("evaluate float labels", _damaged_samples("float labels"), 2, "integer class ids"),
    Case("evaluate 0-d class_names", _damaged_samples("names"), 2, "1-d array of names"),
    Case("evaluate a name twice", _damaged_samples("one name twice"), 2, "more than once"),
    Case("assemble into its parts", _assemble("--out", "{parts}/sub"), 2, "never writes into"),
    Case(
        "assemble --classes with --merge",
        _assemble("--classes", "0", "--merge", "1", "--out", "{tmp}/a"),
        2,
        "give one of",
    ),
    Case("group_file a directory", _train("--set", "group_file=."), 2, "group_file . is a dir"),
    Case("--set model.groups", _train("--set", "model.groups=[0]"), 2, "model.groups comes from"),
    Case("sample over a directory", _sample_over_a_directory, 2, "is a directory where sample"),
    Case("--out inside a file", _out_under_a_file, 2, "is a file, so"),
    Case(
        "sample --seed past 2^32 - 1",
        _sample("--seed", str(2**44 + 1)),
        2,
        "from 0 to 17592186044416",
    ),
    Case(
        "evaluate --write-ref --image-size 100000",
        lambda tmp, made: [
            "evaluate",
            "--ref",
            "mnist:0-1",
            "--write-ref",
            str(tmp / "r.npz"),
            "--image-size",
            "100000",
        ],
        2,
        "from 1 to 2048",
    ),  # fmt: skip
    Case(
        "evaluate --out a directory",
        lambda tmp, made: [
            "evaluate",
            str(made / "s" / "samples.npz"),
            "--ref",
            "mnist:0-1",
            "--out",
            str(made),
        ],
        2,
        "is a directory",
    ),  # fmt: skip
    Case(
        "train.seed past 2^44",
        _train("--set", "train.seed=100000000000000000000"),
        2,
        "train.seed = 100000000000000000000 is out of range; allowed: 0 to 17592186044416",
    ),  # fmt: skip
    Case("--set a whole section", _train("--set", "train=3"), 2, "replaces a whole section"),
    Case(
        "--config a directory",
        lambda tmp, made: ["train", *QUICK, "--config", str(made), "--out", str(tmp / "r")],
        2,
        "is a directory",
    ),  # fmt: skip
    Case(
        "guided_channels beyond the data's",
        _train("--set", "sample.guided_channels=5"),
        2,
        "out of range for this model's 1 channel",
    ),  # fmt: skip
    Case(
        "--restart a user's folder with a config.json", _restart_a_users_folder, 2, "did not make"
    ),  # fmt: skip
    Case("evaluate --out onto its samples", _eval_onto_samples, 2, "is one of the inputs"),
    Case(
        "evaluate --device bogus",
        lambda tmp, made: [
            "evaluate",
            str(made / "s" / "samples.npz"),
            "--ref",
            "mnist:0-1",
            "--device",
            "bogus",
            "--out",
            str(tmp / "r.json"),
        ],
        2,
        "unknown device 'bogus'",
    ),  # fmt: skip
    Case(
        "model.image_size past any image",
        _train("--set", "model.image_size=100000"),
        2,
        "model.image_size = 100000 is out of range; allowed: an integer from 1 to 2048",
    ),  # fmt: skip
    Case("sample --device xpu", _sample("--device", "xpu"), 2, "unknown device 'xpu'"),
    Case(
        "train.threads past any machine",
        _train("--set", "train.threads=100000"),
        2,
        "an integer from 1 to 1024",
    ),  # fmt: skip
    Case(
        "a config key that is a number",
        _config_file(b"train:\n  1: 2\n"),
        2,
        "config key 1 in train is not a name",
    ),  # fmt: skip
    Case(
        "a binary config file",
        _config_file(b"\xff\xfe\x00"),
        2,
        "is not a YAML/JSON text file (UnicodeDecodeError)",
    ),  # fmt: skip
]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, made: Path, tmp_path: Path, capsys, caplog):
    caplog.set_level(logging.INFO)
    todo = case.setup(tmp_path, made)
    before = _files(tmp_path) | _files(made)  # the shared run too: a refusal may not touch it
    capsys.readouterr()
    code, message = 0, ""
    try:
        main(todo) if isinstance(todo, list) else todo()
    except SystemExit as e:
        code = e.code
    except ValueError as e:  # an API call: the library's clear error (the CLI prints it)
        code, message = 2, str(e)
    err = capsys.readouterr().err + caplog.text + message
    assert code == case.code, err[-2000:]
    assert case.phrase in err, err[-2000:]
    if case.untouched:
        after = _files(tmp_path) | _files(made)
        changed = [str(p) for p, data in before.items() if after.get(p) != data]
        assert not changed, f"files changed or removed: {changed}"


def test_checkpoints_past_step_9999999_keep_their_step_order(tmp_path):
    """Past step 9,999,999 a checkpoint's name outgrows its seven digits: the newest is still the
    one a resume takes and the one pruning keeps (by name it sorted first and was deleted)."""
    for step in (9_999_998, 9_999_999, 10_000_000):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_notes").mkdir()  # not a checkpoint: never pruned
    assert latest_checkpoint(tmp_path).name == "step_10000000"
    prune_checkpoints(tmp_path, keep=2, step=10_000_000)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_9999999", "step_10000000"]
    assert (tmp_path / "checkpoints" / "step_notes").is_dir()


def test_pruning_after_a_fallback_past_a_damaged_checkpoint_keeps_the_new_ones(tmp_path):
    """A resume fell back from an unreadable step 4 to step 2 and wrote step 3: with
    keep_checkpoints=1 step 3 must stay (pruning by step kept only the damaged step 4, and the
    next resume found nothing readable); step 4 is neither counted nor removed."""
    for step in (2, 3, 4):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    prune_checkpoints(tmp_path, keep=1, step=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000003", "step_0000004"]


def test_outputs_go_into_a_users_empty_folder_or_its_link_and_keep_them(made, tmp_path):
    """An empty --out the user made (its mode, setgid for a shared group folder) or a symlink to
    one stays what it is: the parts appear inside, the link still points there."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o2770)
    before = (tmp_path / "shared").stat()
    main(["decompose", str(made / "run"), "--out", str(tmp_path / "shared")])
    after = (tmp_path / "shared").stat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert (tmp_path / "shared" / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    (tmp_path / "disk" / "empty").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "empty")
    main(["decompose", str(made / "run"), "--out", str(tmp_path / "link")])
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "disk" / "empty" / "manifest.json").is_file()


def test_tensorboard_missing_is_refused_before_the_run_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(["train", *QUICK, "--steps", "1", "--set", "train.tensorboard=true",
              "--out", str(tmp_path / "r")])  # fmt: skip
    assert e.value.code == 2 and "kind-dit[tensorboard]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_atomic_dir_fills_the_current_folder_and_refuses_one_filled_meanwhile(
    tmp_path, monkeypatch
):
    """`--out .` in an empty folder works (the temporary directory goes inside it); a folder that
    someone fills, or creates, while the output is written is left as it is and refused."""
    from kind.io import OutputDirError, atomic_dir

    monkeypatch.chdir(tmp_path)
    with atomic_dir(Path(".")) as d:
        (d / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputDirError, match="was filled while"):
        with atomic_dir(tmp_path / "empty") as d:
            (d / "manifest.json").write_text("{}")
            (tmp_path / "empty" / "theirs.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["theirs.txt"]
    with pytest.raises(OutputDirError, match="appeared while"):
        with atomic_dir(tmp_path / "new") as d:
            (d / "manifest.json").write_text("{}")
            (tmp_path / "new").mkdir()
    assert not any((tmp_path / "new").iterdir())


def test_an_out_filled_while_the_output_is_computed_is_refused_and_kept(
    made, tmp_path, monkeypatch
):
    """`--out` passes the start's check, then fills (the user, or a second command given the same
    `--out`) while the model is loaded and assembled: refused at the end, their file kept, where
    the output used to replace the folder and delete it. A checkpoint saved again is replaced."""
    import kind.store.parts as parts_module
    from kind.io import OutputDirError, atomic_dir

    out, load = tmp_path / "asm", parts_module.load_parts

    def load_while_they_write(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("precious")
        return load(*args, **kwargs)

    monkeypatch.setattr(parts_module, "load_parts", load_while_they_write)
    with pytest.raises(OutputDirError, match="made or filled while the output was computed"):
        parts_module.assemble(made / "parts", ["0"], out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert (out / "theirs.txt").read_text() == "precious"
    with atomic_dir(out, replace=True) as d:  # what a checkpoint saved again asks for
        (d / "model.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["model.json"]


def test_an_out_holding_only_an_interrupted_commands_leftover_says_so(tmp_path):
    """A command killed while it wrote into the user's empty `--out` leaves its hidden temporary
    directory there; the retry names it and how to remove it, where `ls` showed an empty folder
    said to be "not empty"."""
    from kind.io import OutputDirError, check_new_dir

    out = tmp_path / "eo"
    (out / ".eo.ypdzr9id.tmp").mkdir(parents=True)
    (out / ".eo.ypdzr9id.tmp" / "config.json").write_text("{}")
    with pytest.raises(OutputDirError, match=r"interrupted kind-dit command \(\.eo\.ypdzr9id\.tmp"):
        check_new_dir(out)
    (tmp_path / "link").symlink_to(out)  # the temporary directory is named after the target
    with pytest.raises(OutputDirError, match="interrupted kind-dit command"):
        check_new_dir(tmp_path / "link")
    (out / "theirs.txt").write_text("x")
    with pytest.raises(OutputDirError, match="already exists and is not empty"):
        check_new_dir(out)


def test_ablations_continue_a_folder_an_earlier_version_started(tmp_path):
    """A folder without the ablations' marker is theirs when it holds only what the ablations
    write (results/, their job folders and logs); a user's ablations.md alone is not."""
    from kind.experiments.ablations import MARKER, _claim
    from kind.experiments.scheduler import Job

    jobs = [Job("deploy-orth", print, {}, 1.0), Job("novel/kind-orth", print, {}, 1.0)]
    out = tmp_path / "abl"
    for folder in ("results", "deploy-orth", "novel"):
        (out / folder).mkdir(parents=True)
    (out / "deploy-orth.log").write_text("")
    _claim(out, tmp_path / "demo", 1e-4, jobs)
    assert (out / MARKER).is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ablations.md").write_text("my own notes")
    with pytest.raises(ValueError, match="not the ablations of"):
        _claim(tmp_path / "mine", tmp_path / "demo", 1e-4, jobs)


def test_a_model_json_section_of_the_wrong_kind_is_named(made, tmp_path):
    """A hand-edited model.json (its checksums removed, so it is read): a section that is not an
    object is named where the file is read, not an AttributeError where it is first used."""
    from kind.store.modeldir import load_model_dir

    folder = _copy(made, tmp_path, "run") / "model"
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(meta | {"latent": [1]}))
    (folder / "checksums.json").unlink()
    with pytest.raises(ValueError, match=r"model\.json: latent is \[1\], not a JSON object"):
        load_model_dir(folder)


def test_a_tensor_file_that_does_not_read_back_as_written_keeps_the_previous_one(
    tmp_path, monkeypatch
):
    import torch

    import kind.io
    from kind.io import atomic_save_tensors, read_tensors

    path = tmp_path / "w.safetensors"
    atomic_save_tensors(path, {"w": torch.arange(6.0), "nan": torch.tensor([float("nan")])})
    assert torch.equal(read_tensors(path)["w"], torch.arange(6.0))  # NaN reads back as written
    save = kind.io.save_file

    def damaging(tensors, filename, metadata=None):  # a write the disk damaged: one byte flipped
        save(tensors, filename, metadata=metadata)
        data = bytearray(Path(filename).read_bytes())
        data[-1] ^= 0xFF
        Path(filename).write_bytes(bytes(data))

    monkeypatch.setattr(kind.io, "save_file", damaging)
    with pytest.raises(OSError, match="did not read back as written"):
        atomic_save_tensors(path, {"w": torch.zeros(6), "nan": torch.zeros(1)})
    assert torch.equal(read_tensors(path)["w"], torch.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def _finite_files(run: Path) -> list[str]:
    """Every safetensors file under `run`, each checked to hold only finite floats."""
    from kind.io import read_tensors

    files = sorted(run.rglob("*.safetensors"))
    for path in files:
        bad = [k for k, t in read_tensors(path).items()
               if t.is_floating_point() and not t.isfinite().all()]  # fmt: skip
        assert not bad, (path, bad[:3])
    return [str(p.relative_to(run)) for p in files]


def test_a_diverged_run_keeps_only_finite_checkpoints(tmp_path, capsys, monkeypatch):
    """Non-finite losses, and weights made non-finite by an update whose loss was finite: both
    stop with the reason, and every checkpoint left behind holds finite weights."""
    from kind.training.optim import MaskedAdamW

    with pytest.raises(SystemExit):
        main(["train", *QUICK, *DIVERGE, "--out", str(tmp_path / "r")])
    assert "training diverged" in capsys.readouterr().err
    assert _finite_files(tmp_path / "r")  # the good steps' checkpoints, all finite
    step = MaskedAdamW.step

    def poisoning(self, closure=None):  # step 2's update leaves an infinite weight
        loss = step(self, closure)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return loss

    monkeypatch.setattr(MaskedAdamW, "step", poisoning)
    with pytest.raises(SystemExit):
        main(["train", *QUICK, "--steps", "3", "--out", str(tmp_path / "p")])
    assert "the weights became non-finite by step 2" in capsys.readouterr().err
    saved = _finite_files(tmp_path / "p")
    assert saved and all(name.startswith("checkpoints/step_0000001/") for name in saved), saved
