"""Run directories and their checkpoints, as files.

A run directory holds `config.json`, `run.json` (where it came from, how samples decode),
`metrics.csv`, `samples/`, the exported `model/` and `checkpoints/step_NNNNNNN/`. A checkpoint is a
directory of safetensors files plus `state.json`, written atomically; what goes into it is the
training state's business (`kind.training.state`). Optimiser state is flattened to tensors keyed
by parameter name so it can live in safetensors.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig, load_state
from kind.io import (
    atomic_dir,
    atomic_write_text,
    check_link,
    hold_lock,
    is_a,
    kind_problem,
    read_json,
    read_tensors,
    verify_checksums,
    write_json,
)

log = logging.getLogger(__name__)

CONFIG_JSON, RUN_JSON = "config.json", "run.json"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_JSON).is_file()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("_")[1])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first: ordered by step, not by name (past step 9,999,999 the
    names outgrow their seven digits, and `step_10000000` sorts before `step_9999999`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(dirs, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def prune_checkpoints(run_dir: Path, keep: int, step: int) -> None:
    """Keep the `keep` newest checkpoints up to `step` (the one just written). Any later one was
    left by a resume that fell back past it (unreadable): it is neither counted nor removed, so
    the good checkpoints written since are not pruned in its favour."""
    upto = [p for p in checkpoint_dirs(run_dir) if checkpoint_step(p) <= step]
    for old in upto[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    """(tensors keyed 'param_name/state_key', hyper-parameters of each param group)."""
    sd = optimizer.state_dict()
    tensors = {f"{names[i]}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    names: list[str],
    tensors: dict,
    groups: list,
    keep: tuple[str, ...] = (),
) -> None:
    """The inverse of `optimizer_tensors`, into an optimiser over the same named parameters.
    The hyper-parameters named in `keep` stay as the optimiser was built (from the resumed run's
    config, which may change them); the others come from the checkpoint."""
    sd = optimizer.state_dict()
    index = {n: i for i, n in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in `names`' order
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, k = key.rpartition("/")
        if name not in index:
            raise ValueError(f"checkpoint has optimiser state for unknown parameter {name!r}")
        if k != "step" and value.shape != params[index[name]].shape:
            raise ValueError(
                f"the checkpoint's optimiser {k} of {name} is {tuple(value.shape)}, the parameter "
                f"{tuple(params[index[name]].shape)}: the checkpoint is of another model"
            )
        state.setdefault(index[name], {})[k] = value
    if len(groups) != len(sd["param_groups"]) or not all(
        isinstance(saved, dict) and all(_same_kind(g[k], v) for k, v in saved.items() if k in g)
        for g, saved in zip(sd["param_groups"], groups)
    ):  # fmt: skip
        raise ValueError(
            f"the checkpoint's optimiser settings (param_groups: {groups!r:.120}) are not those of "
            f"this run's {len(sd['param_groups'])} parameter group(s): its state.json is damaged"
        )
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: v for k, v in saved.items() if k not in keep})
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _same_kind(current, saved) -> bool:
    """Whether a saved optimiser setting is of the kind the optimiser holds (a float for lr, two
    floats for betas, a bool for amsgrad, ...)."""
    if isinstance(current, list | tuple):
        return isinstance(saved, list | tuple) and len(saved) == len(current) and all(
            _same_kind(c, s) for c, s in zip(current, saved))  # fmt: skip
    if current is None:  # a setting torch leaves unset (fused, foreach): whatever was saved
        return True
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, int | float):
        return is_a(saved, float)
    return is_a(saved, type(current))


def ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint with the EMA of its trainable parameters in place."""
    verify_checksums(checkpoint)
    return read_tensors(checkpoint / "model.safetensors") | read_tensors(
        checkpoint / "ema.safetensors"
    )


def load_run_model(run_dir: Path) -> tuple[DiT, DiffusionConfig, dict]:
    """The EMA model of a run's latest readable checkpoint (for a run interrupted before its
    export)."""
    run_dir = Path(run_dir)
    last = next(usable_checkpoints(run_dir), None)
    if last is None or not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run directory with a checkpoint")
    cfg = read_json(run_dir / CONFIG_JSON, "model", "diffusion", "sample")
    problem = kind_problem(cfg, {"model": dict, "diffusion": dict, "sample": dict})
    if problem:
        raise ValueError(f"{run_dir / CONFIG_JSON}: {problem}; the file is damaged or was edited "
                         "by hand")  # fmt: skip
    model = DiT(ModelConfig.from_dict(cfg["model"]))
    try:
        load_state(model, ema_weights(last), last)
    except ValueError as e:  # an adapter baseline's checkpoint: peft's form, not a plain DiT
        method = (read_run_record(run_dir).get("transfer") or {}).get("method")
        if method is None or str(method).startswith("kind"):
            raise
        raise ValueError(
            f"{run_dir} is an unfinished `{method}` transfer: its checkpoints hold the method's "
            "adapters, which only the transfer itself reads; finish it with `kind-dit transfer "
            f"SOURCE --method {method} ... --resume --out {run_dir}` (it writes {run_dir}/model "
            "when it ends)"
        ) from e
    meta = {"sample": cfg["sample"], "latent": read_run_record(run_dir).get("latent")}
    return model.eval(), DiffusionConfig.from_dict(cfg["diffusion"]), meta


# run.json's records, by the JSON kind each must have (`kind.training.loop` writes them)
RUN_RECORDS = {"transfer": dict, "latent": dict, "data": dict, "init_from": dict,
               "continued_from": dict, "resumed": list}  # fmt: skip


def read_run_record(run_dir: Path) -> dict:
    """A run's run.json (where it came from, how its samples decode), {} for a run without one;
    a record of the wrong JSON kind (`"transfer": "x"`) is an error that names it, not an
    AttributeError wherever the record is first used."""
    path = Path(run_dir) / RUN_JSON
    if not path.exists():
        return {}
    run = read_json(path)  # a directory in its place is named there
    start = run.get("init_from")
    problem = kind_problem(run, RUN_RECORDS) or (
        isinstance(start, dict) and kind_problem(start, {"path": str, "imported": dict})
    )
    if problem:
        raise ValueError(f"{path}: {problem}; the file is damaged or was edited by hand")
    return run


def run_provenance(path: Path) -> dict:
    """What a model card says of how a run's model was made: {"data": [spec], "steps": n,
    "transfer": run.json's record, "base_model" and "base_license" of a run started from a
    dense model}, from a run directory or its `model/`; {} for anything else."""
    path = Path(path)
    run_dir = path.parent if path.name == "model" and is_run_dir(path.parent) else path
    if not is_run_dir(run_dir):
        return {}
    try:
        cfg = read_json(run_dir / CONFIG_JSON)
        run = read_run_record(run_dir)
    except ValueError:  # a damaged record: the card says less, the model is still written
        return {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    made = {
        "data": [cfg["data"]] if isinstance(cfg.get("data"), str) else [],
        "steps": train.get("steps") if is_a(train.get("steps"), int) else None,
    }
    if run.get("transfer"):
        made["transfer"] = run["transfer"]
    start = run.get("init_from") or {}
    if isinstance(start.get("path"), str):  # trained from a dense model: its terms carry over
        made["base_model"] = start["path"]
        licence = (start.get("imported") or {}).get("license")
        if isinstance(licence, str):
            made["base_license"] = licence
    return made


# ---- owning a run directory -----------------------------------------------------------------

MARKER, LOCK = ".kind-run", ".kind-run.lock"
# what a run writes: all that --restart may remove, in the order it removes them. Checkpoints
# first, config.json last: a restart killed half-way leaves a run without checkpoints (which
# --restart starts again) or no run and no checkpoint, never a directory that looks new while
# old checkpoints in it, of later steps, would outrank the new run's (and a resume take them).
RUN_FILES = ("checkpoints", "model", "samples", "tensorboard", "metrics.csv", RUN_JSON, CONFIG_JSON)


class RunDirError(ValueError):
    """An output directory that a run may not use as asked; nothing in it was touched."""


def is_owned(path: Path) -> bool:
    """Whether kind-dit made this directory: its marker, or a run written before markers were
    (kind-dit 0.1): a run config (model, diffusion and train settings) beside what a run writes.
    A user's own config.json alone is not a run, so --restart never removes their files."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    if not is_run_dir(path) or not any((path / n).exists() for n in RUN_FILES if n != CONFIG_JSON):
        return False
    try:
        read_json(path / CONFIG_JSON, "model", "diffusion", "train")
    except ValueError:
        return False
    return True


def check_run_dir(out: Path, resume: bool, restart: bool) -> None:
    """Validate `--out` before anything is written: absent, empty, or a run directory of ours
    (holding a run only with --resume or --restart). Touches nothing."""
    out = Path(out)
    check_link(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose a directory path")
    has_files = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
    if has_files and not is_owned(out):
        raise RunDirError(
            f"{out} holds files kind-dit did not make; choose a new or empty directory for "
            "--out (nothing was touched)"
        )
    if resume and restart:
        raise RunDirError("--resume and --restart exclude each other; pass one")
    if resume and not has_checkpoint(out):
        raise RunDirError(
            f"--resume: no checkpoint in {out}/checkpoints to resume from"
            + ("; start the run again with --restart" if is_owned(out) else "")
        )
    if not resume and not restart and is_run_dir(out):
        raise RunDirError(
            f"{out} already holds a run; pass --resume to continue it, --restart to start it "
            "again, or choose another --out (nothing was overwritten)"
        )
    if restart and not is_owned(out):
        raise RunDirError(f"--restart: {out} holds no kind-dit run to start again")
    linked = [out / name for name in RUN_FILES if (out / name).is_symlink()]
    if restart and linked:  # removing through a link could reach what else its target holds
        raise RunDirError(
            f"--restart removes a run's files, but {linked[0]} is a symbolic link (to "
            f"{linked[0].resolve()}); empty what it points to yourself (or remove the link), "
            "then --restart (nothing was touched)"
        )


def has_checkpoint(out: Path) -> bool:
    """Whether a run holds a checkpoint to resume from, counting one that an interrupted replace
    moved aside (`claim_run_dir` puts it back before the resume reads it)."""
    return latest_checkpoint(out) is not None or any(
        (Path(out) / "checkpoints").glob(".step_*.old")
    )


def stopped_early(out: Path) -> bool:
    """A run directory kind-dit marked that holds nothing training made to keep: no checkpoint
    and no exported model (a run killed before its first checkpoint, or a start left unfinished).
    Only such a run is started again without --restart."""
    out = Path(out)
    return (out / MARKER).is_file() and not has_checkpoint(out) and not (out / "model").exists()


def auto_resume(out: Path) -> tuple[bool, bool]:
    """(resume, restart) for --auto-resume, from what `out` holds: a run with a checkpoint
    continues; a run that `stopped_early` starts again; a directory without a run starts as a
    new run would (`check_run_dir` refuses one that is not ours). Any other run (an exported
    model without checkpoints, a kind-dit 0.1 run without one) is refused, never restarted.
    Under torchrun every rank reads `out` here before the process group starts, so before rank 0
    writes anything; `kind.training.loop._setup` checks that they agree."""
    out = Path(out)
    if not is_run_dir(out) or not is_owned(out):
        return False, False
    if has_checkpoint(out):
        log.info("continuing the run in %s from its latest checkpoint", out)
        return True, False
    if stopped_early(out):
        log.info("the run in %s stopped before its first checkpoint; starting it again", out)
        return False, True
    raise RunDirError(
        f"{out} holds a run with no checkpoint to continue from"
        + (" but with an exported model" if (out / "model").exists() else "")
        + "; pass --restart to train it again from nothing, or choose another --out"
    )


def claim_run_dir(out: Path, restart: bool) -> None:
    """Mark a (locked) run directory ours, empty it of its run files with `restart`, and remove
    temporary files an interrupted write left behind."""
    out = Path(out)
    if not is_owned(out):
        atomic_write_text(out / MARKER, "a kind-dit run directory\n")
    if restart:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for folder in (out, out / "checkpoints"):  # a crash between the two renames of a replace
        for old in folder.glob(".*.old"):
            final = folder / old.name[1:-4]
            if not final.exists():
                log.warning("restoring %s from %s (a replace was interrupted)", final, old)
                old.rename(final)
    leftovers = [p for folder in (out, out / "checkpoints", out / "samples")
                 for pattern in (".*.tmp", ".*.old") for p in folder.glob(pattern)]  # fmt: skip
    for stale in leftovers:  # atomic writes interrupted by a crash
        log.info("removing %s, left by an interrupted write", stale)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def run_lock(out: Path) -> AbstractContextManager[None]:
    """Hold an exclusive lock on a run directory while writing to it (`kind.io.hold_lock`: a
    crashed run never leaves a stale lock)."""
    return hold_lock(Path(out) / LOCK, lambda holder: RunDirError(
        f"{out} is being written by {holder}; wait for it to finish or choose another --out"))  # fmt: skip


def usable_checkpoints(run_dir: Path) -> Iterator[Path]:
    """The run's checkpoints, newest first, each checked against its checksums; a damaged one is
    skipped with a warning that says so (the caller falls back to the one before)."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checksums(path)
        except (ValueError, FileNotFoundError, KeyError) as e:
            log.warning("checkpoint %s is unreadable (%s); falling back to the one before", path, e)
            continue
        yield path


def start_from_checkpoint(run: Path, source: Path, checkpoint: Path) -> None:
    """Start run directory `run` as run `source` stopped at `checkpoint` (one of its own, checked):
    its marker and config, its metrics up to that step, its record (saying where it continued
    from) and the checkpoint, copied and checked against its checksums, for a resume to take it
    further. `run` must be absent or a run of ours that `stopped_early` (replaced)."""
    run, source = Path(run), Path(source)
    if run.exists():
        if not stopped_early(run):
            raise RunDirError(f"{run} holds a run of its own; it cannot start as {source}")
        shutil.rmtree(run)
    step = checkpoint_step(checkpoint)
    run.mkdir(parents=True)
    claim_run_dir(run, restart=False)  # our marker
    atomic_write_text(run / CONFIG_JSON, (source / CONFIG_JSON).read_text())
    lines = (source / "metrics.csv").read_text().splitlines(keepends=True)
    kept = [r for r in lines[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= step]
    atomic_write_text(run / "metrics.csv", "".join(lines[:1] + kept))
    continued = {"continued_from": {"run": str(source.resolve()), "step": step}}
    write_json(run / RUN_JSON, read_run_record(source) | continued)
    with atomic_dir(checkpoint_dir(run, step)) as tmp:
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        verify_checksums(tmp)  # the copy is what the source's checksums say
