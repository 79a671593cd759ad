"""One training loop for KIND and dense DiTs, pre-training and transfer alike.

Runs on one CPU, one GPU, or N ranks under torchrun (DistributedDataParallel). Each step draws one
global batch (indices, timesteps, noise, label dropout) from seeded generators that every rank holds
identically, and each rank takes its shard: N ranks with batch B reach what one process reaches with
batch N·B, and a resumed run continues exactly where it stopped (`TrainState` holds model, EMA,
optimiser, RNG and step, and saves and restores itself).

Gate isolation of updates (docs/KIND.md invariant 2): the tailors and label rows live in row banks
(`DiT.row_banks`), and each step updates only the rows of the groups and classes in its global batch
(`DiT.present_rows`, read from the host labels every rank draws alike): the masked AdamW and the EMA
leave every other row, its moments and its step count as they were. Under DDP the banks stay out of
DDP's buckets; the present rows of their gradients are averaged in one all-reduce each.

The route (which tailor each sample uses) is built once per batch from the host labels and handed to
the model, so the forward never syncs with the device; a compiled run uses the static route, whose
shapes depend on the batch size only.

`train` = `_setup` (validate, build, restore) + `train_step` in a loop + the hooks that log,
checkpoint and draw sample grids.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kind.core import distributed
from kind.core.diffusion import Diffusion
from kind.core.host_memory import keep_freed_memory
from kind.core.images import GRID_CLASSES, GRID_PER_CLASS, save_grid
from kind.core.kindify import KindifyError, kindify
from kind.core.model import DiT, ModelConfig
from kind.core.sampling import generate_sharded
from kind.data.dataset import Dataset, open_dataset
from kind.data.vae import check_space, decoder
from kind.io import CHECKSUMS, read_json, sha256_file, write_json
from kind.store.load import load_model
from kind.store.modeldir import MODEL_WEIGHTS, is_model_dir, save_model_dir
from kind.store.runs import (
    CONFIG_JSON,
    RUN_JSON,
    check_run_dir,
    claim_run_dir,
    read_run_record,
    run_lock,
    usable_checkpoints,
)
from kind.training.config import Config, read_group_file, save_config
from kind.training.log import CsvLog
from kind.training.optim import keep_rows
from kind.training.state import TrainState

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad batch configuration, existing run)."""


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module  # with the EMA weights in place
    steps: int  # the run's step count (earlier calls of a resumed run included)
    seconds: float  # the run's training wall time, across resumes
    is_main: bool  # whether this process wrote the run (rank 0; under torchrun, one of several)


def build_model(cfg: Config, data: Dataset, dense: DiT | None = None) -> DiT:
    """A fresh model for `data`: the config's architecture with the data's classes, size and
    channels (and τ from the group file); started from dense DiT `dense` when given
    (`kind.core.kindify`), else from DiT's random init."""
    images = data.images
    if cfg.model.kind and cfg.model.rank_tailor == 0:
        log.warning("model.rank_tailor = 0: this KIND model has no tailors, every class shares "
                    "the learngenes alone (an ablation; nothing to decompose per class)")  # fmt: skip
    tau = read_group_file(cfg.group_file, data.class_names) if cfg.group_file else None
    mc = replace(cfg.model, class_names=list(data.class_names), image_size=images.shape[-1],
                 in_channels=images.shape[1], class_to_group=tau)  # fmt: skip
    if dense is None:
        return DiT(mc)
    try:
        return kindify(dense, mc)
    except KindifyError as e:
        raise TrainingError(f"train.init_from {cfg.train.init_from}: {e}") from None


def load_dense(cfg: Config) -> tuple[DiT, dict]:
    """The dense model `train.init_from` names (a run or model directory) and what run.json
    records of it: its resolved path, the weights file read and that file's sha256 (and, for a
    model `kind-dit import` made, the record of its source)."""
    path = Path(cfg.train.init_from)
    try:
        dense, diffusion, meta = load_model(path)
    except FileNotFoundError as e:
        raise TrainingError(f"train.init_from: {e}") from None
    if getattr(dense, "config", None) is not None and dense.config.kind:
        raise TrainingError(
            f"train.init_from {path} is a KIND model (learngenes and tailors), not a dense DiT: to "
            "reuse a KIND model's learngenes for new classes run `kind-dit transfer` on its parts "
            "directory (`kind-dit decompose` writes one); --init-from takes a dense DiT"
        )
    if diffusion != cfg.diffusion:
        log.warning("train.init_from %s was trained with another diffusion config (%s); this run "
                    "uses %s (set the diffusion section to match to keep its schedule)",
                    path, vars(diffusion), vars(cfg.diffusion))  # fmt: skip
    record: dict = {"path": str(path.resolve())}
    directory = next((d for d in (path, path / "model") if is_model_dir(d)), None)
    if directory is not None:
        weights = directory / MODEL_WEIGHTS
        checksums = directory / CHECKSUMS
        sums = read_json(checksums, "sha256")["sha256"] if checksums.is_file() else {}
        record |= {"weights": str(weights.resolve()),
                   "sha256": sums.get(MODEL_WEIGHTS) or sha256_file(weights)}  # fmt: skip
        if isinstance(meta.get("imported"), dict):  # `kind-dit import`: its source and licence
            record["imported"] = {k: v for k, v in meta["imported"].items() if k != "notes"}
    else:  # a run interrupted before its export: the EMA weights of its latest checkpoint
        checkpoint = next(usable_checkpoints(path))
        weights = checkpoint / "ema.safetensors"
        record |= {"weights": str(weights.resolve()), "sha256": sha256_file(weights)}
    return dense, record


@dataclass
class _Run:
    """What `_setup` builds for the loop."""

    cfg: Config
    out: Path
    info: distributed.DistInfo
    data: Dataset
    diffusion: Diffusion
    state: TrainState
    net: nn.Module  # the model as called in the step (DDP-wrapped, compiled)
    ddp: bool  # whether net is DDP-wrapped
    local: int  # samples per rank and step
    micro: int  # samples per forward
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # latents -> uint8 images, for grids


def _setup(cfg: Config, out: Path, model: DiT | None, resume: bool, restart: bool,
           meta: dict | None, data: Dataset | None, stack: ExitStack) -> _Run:  # fmt: skip
    """Validate, build the model and its state, then (and only then) claim and lock `out` and
    write the run's config, or restore its latest readable checkpoint."""
    tc = cfg.train
    info = distributed.setup(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if info.device.type == "cpu":  # the step's freed memory stays for the next step
        keep_freed_memory()
    if info.world > 1:  # --auto-resume decides on each rank (a network filesystem may lag)
        flag = torch.tensor(float(resume), device=info.device)
        if distributed.all_min(flag, info) != -distributed.all_min(-flag, info):
            raise TrainingError(
                f"the ranks disagree on whether {out} holds a checkpoint to resume from: every "
                "node must see the same --out (a directory on a filesystem they share)"
            )
    if info.is_main:  # rank 0 owns the directory; the others follow it after the barrier
        check_run_dir(out, resume, restart)
    B, world = tc.batch_size, info.world
    local = B // world
    micro = tc.micro_batch_size or local
    if B % world or local % micro:
        raise TrainingError(
            f"train.batch_size {B} must split evenly over {world} rank(s) and "
            f"micro-batches of {micro}"
        )
    dense, init_record = None, None
    if tc.init_from and model is not None:
        raise TrainingError(
            "train.init_from starts `kind-dit train` from a dense DiT; this command builds its "
            "own start model: unset train.init_from"
        )
    if tc.init_from and not resume:  # on --resume the checkpoint wins: no init to redo
        dense, init_record = load_dense(cfg)
    torch.manual_seed(tc.seed)
    if data is None:
        arch = model.config if model is not None else cfg.model  # a size set in the config wins
        if dense is not None:  # unset: the dense model's (the data are resized to it)
            arch = replace(arch, image_size=arch.image_size or dense.config.image_size,
                           in_channels=arch.in_channels or dense.config.in_channels)  # fmt: skip
        shape = (arch.image_size, arch.in_channels)
        data = open_dataset(cfg.data, "train", *shape, vae=cfg.vae)
    model = model if model is not None else build_model(cfg, data, dense)
    del dense
    if list(model.config.class_names) != list(data.class_names):
        raise TrainingError(
            f"model classes {model.config.class_names} differ from the data's {data.class_names}"
        )
    if model.config.null_group is not None and tc.class_dropout == 0:  # a warning: invariant
        log.warning(  # tests step without null samples on purpose
            "the null class's tailor trains on the samples label dropout makes unconditional, "
            "and train.class_dropout is 0: it stays as initialised, and guidance uses it; set "
            "train.class_dropout above 0 (default 0.1), or drop --null-tailor"
        )
    if resume:
        _check_resume(cfg, out, model, data)
    cfg = replace(cfg, model=model.config)
    guided, channels = cfg.sample.guided_channels, model.config.in_channels
    if guided is not None and guided > channels:  # else found only when the run exports
        raise TrainingError(
            f"sample.guided_channels = {guided} is out of range for this model's {channels} "
            f"channel(s); set at most {channels}, or unset it (null: guide every channel)"
        )
    if tc.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError(
            "train.tensorboard needs TensorBoard: pip install 'kind-dit[tensorboard]', or unset "
            "train.tensorboard (metrics.csv holds the same scalars)"
        )
    # grids from a latent store decode with its VAE, on every rank (each draws a share): loaded
    # here, so a VAE a rank cannot read stops the run before it writes anything
    decode = decoder(data.latent, device=info.device) if data.latent else None
    model.to(info.device).train()  # a model loaded for sampling comes in eval mode
    model.grad_checkpointing = tc.grad_checkpointing
    state = TrainState.create(model, tc, info.device)
    if info.is_main:  # the first write: everything above was checked
        out.mkdir(parents=True, exist_ok=True)
        stack.enter_context(run_lock(out))
        claim_run_dir(out, restart)
    distributed.barrier(info)  # the claim may put back a checkpoint the others resume from
    if resume:
        path = next(usable_checkpoints(out), None)
        if path is None:
            raise TrainingError(f"--resume: no readable checkpoint in {out}/checkpoints")
        state.restore(path)
        if tc.steps < state.step:  # it would stop at once, its records saying tc.steps
            raise TrainingError(
                f"--resume: the run in {out} is at step {state.step}, past --steps {tc.steps}; "
                f"give --steps {state.step} or more"
            )
        log.info("resumed %s at step %d from %s", out, state.step, path.name)
        if info.is_main:
            _record_changes(cfg, out, state.step)
    elif info.is_main:
        save_config(cfg, out / CONFIG_JSON)
        run_meta = (meta or {}) | {"latent": data.latent, "data": _data_record(cfg, data)}
        if init_record is not None:
            run_meta["init_from"] = init_record
        write_json(out / RUN_JSON, run_meta)
    distributed.barrier(info)

    net: nn.Module = model
    # the row banks are reduced row by row in the step (only the rows the batch used); DDP
    # averages the gradients of the other trained parameters, and is left out where there are
    # none (a KIND transfer trains only tailors and label rows), which it refuses
    banks = {id(p) for p in model.row_banks().values()}
    ddp = world > 1 and any(p.requires_grad and id(p) not in banks for p in model.parameters())
    if ddp:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, p in model.named_parameters() if id(p) in banks]
        )
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if tc.compile:
        net = torch.compile(net)
    return _Run(cfg, out, info, data, Diffusion(cfg.diffusion), state, net, ddp, local, micro,
                decode)  # fmt: skip


def _data_record(cfg: Config, data: Dataset) -> dict:
    """run.json's record of the data a run trains on: the spec, what it opened, and a digest."""
    return {"spec": cfg.data, "source": data.source, "images": len(data.labels),
            "sha256": data.sha256}  # fmt: skip


def _check_resume(cfg: Config, out: Path, model: DiT, data: Dataset) -> None:
    """Refuse, before anything is written, a resume that changes what its checkpoint fixes: the
    data (a relative path read from another directory, a folder whose images changed: the run
    would go on with other images under the same names), the seed (the run continues the random
    streams the checkpoint saved, so a new seed would be recorded and change nothing), the
    tailor group of each class (a changed or edited group_file would hand the tailors trained
    for some classes to others) and the VAE latent space of its data (the model would go on
    learning latents that mean something else)."""
    if not (out / CONFIG_JSON).is_file():
        return
    run = read_run_record(out)
    before = run.get("latent")
    if before and data.latent:
        check_space(
            before,
            data.latent,
            f"--resume: latent store {cfg.data} was encoded with another VAE "
            f"({data.latent['vae']}) than the run in {out} trained on ({before.get('vae')})",
            "resume on the store the run started with, or start a new run (--restart or another "
            "--out)",
        )
    trained, opened = run.get("data"), _data_record(cfg, data)
    if trained and trained.get("sha256") and opened["sha256"] not in ("", trained["sha256"]):
        raise TrainingError(
            f"--resume: data {cfg.data} now opens {opened['source']} ({opened['images']} images), not "
            f"the data the run in {out} trained on ({trained.get('source')}, {trained.get('images')} "
            "images; other images, labels or class names); resume where it opens those data (a "
            "relative path is read from the current directory: run from the one the run started "
            "in), or start a new run (--restart or another --out)"
        )
    saved = read_json(out / CONFIG_JSON, "model", "train")
    seed = saved["train"].get("seed")
    if seed is not None and seed != cfg.train.seed:
        raise TrainingError(
            f"--resume cannot change train.seed ({seed} -> {cfg.train.seed}): the run continues "
            f"the random streams its checkpoint saved in {out}, so a new seed would change "
            "nothing; resume without --seed, or start a new run with it (--restart or another "
            "--out)"
        )
    before = ModelConfig.from_dict(saved["model"])
    then = dict(zip(before.class_names, before.tau, strict=True))
    now = dict(zip(model.config.class_names, model.config.tau, strict=True))
    if then != now:
        source = f"group_file {cfg.group_file}" if cfg.group_file else "no group_file"
        raise TrainingError(
            f"--resume cannot change which tailor group each class uses: the run in {out} was "
            f"trained with {then} (class: group), but {source} now gives {now}; resume with the "
            "group file the run started with, or start a new run (--restart or another --out)"
        )


def _record_changes(cfg: Config, out: Path, step: int) -> None:
    """A resume that changes how the run trains (steps, batch size, lr, ...) says so, and the
    run's config.json and run.json record it."""
    saved = read_json(out / CONFIG_JSON, "train")["train"]
    now = asdict(cfg.train)
    changed = {k: [saved.get(k), v] for k, v in now.items() if saved.get(k) != v}
    if not changed:
        return
    log.warning("resuming %s at step %d with changed settings: %s", out, step,
                ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in changed.items()))  # fmt: skip
    save_config(cfg, out / CONFIG_JSON)
    run = read_run_record(out)
    run.setdefault("resumed", []).append({"step": step, "changed": changed})
    write_json(out / RUN_JSON, run)


def train_step(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one global batch; returns (mean loss, gradient norm) as tensors, so
    the step itself never waits for the device."""
    cfg, state, info = run.cfg, run.state, run.info
    tc, model, opt, gens, device = cfg.train, state.model, state.optimizer, state.gens, info.device
    B, local, micro = tc.batch_size, run.local, run.micro
    C, H, W = run.data.images.shape[1:]
    # one global batch from the shared generators, then this rank's shard; indices, labels, label
    # dropout and flips on the host (from the data generator), timesteps and noise on the device
    shard = slice(info.rank * local, (info.rank + 1) * local)
    idx = torch.randint(len(run.data.images), (B,), generator=gens["data"])
    drop = torch.rand(B, generator=gens["data"]) < tc.class_dropout
    flip = torch.rand(B, generator=gens["data"]) < 0.5
    t = torch.randint(
        run.diffusion.config.num_timesteps, (B,), generator=gens["noise"], device=device
    )[shard]
    noise = torch.randn((B, C, H, W), generator=gens["noise"], device=device)[shard]
    labels = torch.where(drop, model.null_id, run.data.labels[idx])  # [B] global, host
    rows = model.present_rows(labels)  # the bank rows this step may change, on every rank alike
    idx, labels = idx[shard], labels[shard]
    x0 = run.data.images.get(idx, flip[shard] if tc.hflip else None).to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True)

    for g in opt.param_groups:
        g["lr"] = tc.lr * min(1.0, (state.step + 1) / max(tc.warmup_steps, 1))
    amp_dtype = PRECISIONS[tc.precision]
    loss_sum = torch.zeros((), device=device)
    for m0 in range(0, local, micro):
        sl = slice(m0, m0 + micro)
        last = m0 + micro >= local
        sync = run.net.no_sync() if run.ddp and not last else nullcontext()
        route = model.route(labels[sl], blocked=not tc.compile)
        with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = run.diffusion.loss(run.net, x0[sl], y[sl], t[sl], noise[sl], route).mean()
            scaled = loss * (micro / local)
            if last and tc.orth_weight and model.config.kind:
                # once a step, over the tailors of the global batch, alike on every rank: its
                # weight does not depend on how the batch is split into micro-batches or ranks
                present = rows.get("tailors")
                present = present.to(device, non_blocking=True) if present is not None else None
                scaled = scaled + tc.orth_weight * model.orthogonality_penalty(present)
            state.scaler.scale(scaled).backward()
        loss_sum += scaled.detach()
    keep_rows(model.row_banks(), rows, lambda grad: distributed.all_mean(grad, info))
    opt.set_rows(rows)
    scaler = state.scaler
    scaler.unscale_(opt)
    grad_norm = _clip_grad_norm(opt, tc.grad_clip or math.inf)
    # One fused check, the step's one host sync: a non-finite loss or gradient is never applied.
    # (With fp16 the gradient scaler skips overflowing gradients and lowers its scale itself:
    # those steps, part of finding the scale, are not counted as bad. It reads its overflow flag
    # and its scale on the host, three syncs more: fp16 is for GPUs without bf16.)
    finite = torch.isfinite(loss_sum if scaler.is_enabled() else loss_sum + grad_norm)
    finite = bool(distributed.all_min(finite, info))  # every rank skips the same steps
    if finite:
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale_before is None or scaler.get_scale() >= scale_before:
            state.ema.update(rows)  # not after a step the fp16 scaler skipped
    elif scaler.is_enabled():  # unscale_ ran: end the scaler's cycle without a step, backed off
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    opt.zero_grad(set_to_none=True)
    state.step += 1
    state.bad_in_row = 0 if finite else state.bad_in_row + 1
    state.skipped += not finite
    if state.bad_in_row >= tc.max_bad_steps:
        detail = f" (loss {loss_sum.item():.3g}, gradient norm {grad_norm.item():.3g})"
        raise TrainingError(_diverged(run, detail))
    return loss_sum, grad_norm


def _clip_grad_norm(opt: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over every gradient, the sparse ones of the row banks included (torch's
    clip_grad_norm_ takes dense gradients only); returns the norm before clipping, on the
    device."""
    # the list the foreach kernels take, as torch's own clip_grad_norm_ builds it every call
    grads = [p.grad._values() if p.grad.is_sparse else p.grad
             for g in opt.param_groups for p in g["params"] if p.grad is not None]  # fmt: skip
    if not grads:  # nothing trained this step: a KIND transfer's batch all null samples
        return torch.zeros((), device=next(iter(opt.param_groups[0]["params"])).device)
    norm = torch.nn.utils.get_total_norm(grads)
    if math.isfinite(max_norm):
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def _diverged(run: _Run, detail: str = "") -> str:
    """What happened and what to do, when steps kept coming out non-finite."""
    state = run.state
    last = next(usable_checkpoints(run.out), None)
    where = (f"the last checkpoint, {last}, holds finite weights: continue from it with --resume "
             "after changing the settings (e.g. --resume --lr ...)" if last is not None else
             "no checkpoint was written yet: start again with --restart and other settings")  # fmt: skip
    return (
        f"training diverged: the last {state.bad_in_row} steps (up to step {state.step}) had a "
        f"non-finite loss or gradient{detail} at lr "
        f"{state.optimizer.param_groups[0]['lr']:.3g}, and none of them was applied. Lower "
        f"train.lr, keep train.grad_clip on, or use precision fp32. Nothing non-finite was saved; "
        f"{where}"
    )


def _check_saveable(run: _Run, final: bool) -> None:
    """Never save what a divergence left: a run that ends in non-finite steps, or weights with a
    NaN or an infinity, stops here with a message naming the last good checkpoint."""
    state = run.state
    if final and state.bad_in_row:
        raise TrainingError(_diverged(run))
    bad = state.nonfinite()
    if bad:
        last = next(usable_checkpoints(run.out), None)
        raise TrainingError(
            f"the weights became non-finite by step {state.step} ({len(bad)} tensors, e.g. "
            f"{bad[0]}); nothing was saved. Lower train.lr or keep train.grad_clip on; "
            + (f"the last checkpoint, {last}, holds finite weights (--resume continues from it)"
               if last else "no checkpoint was written yet (--restart starts again)")
        )  # fmt: skip


def train(
    cfg: Config,
    out: str | Path,
    *,
    model: DiT | None = None,
    resume: bool = False,
    restart: bool = False,
    meta: dict | None = None,
    data: Dataset | None = None,
    export: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainResult:
    """Train `model` (default: a fresh one for `cfg`) on `cfg.data`, writing the run to `out`.

    Only parameters with requires_grad train (transfer freezes the learngenes this way). `meta` is
    stored in the run's `run.json` (e.g. where a transfer came from). `data` replaces the dataset
    `cfg.data` names. `export` turns the trained model (EMA weights in place) into the plain DiT
    written to `out/model` (baselines merge their adapters this way). With `resume`, the caller
    builds the same initial model and the latest readable checkpoint in `out` is loaded over it;
    with `restart`, a run in `out` starts again from nothing. `out` must be absent, empty or a
    kind-dit run directory, and is locked while the run writes to it. The returned model (the one
    passed in, trained) holds the EMA weights.
    """
    with ExitStack() as stack:  # the run directory's lock, held until the run ends
        run = _setup(cfg, Path(out), model, resume, restart, meta, data, stack)
        return _loop(run, resume, export)


def _loop(run: _Run, resume: bool, export: Callable[[nn.Module], nn.Module] | None) -> TrainResult:
    """The steps, with the hooks that log, checkpoint and draw grids; then the export."""
    cfg, tc, info, state, out = run.cfg, run.cfg.train, run.info, run.state, run.out
    logger = CsvLog(out / "metrics.csv", state.step if resume else None, tc.tensorboard) \
        if info.is_main else None  # fmt: skip
    t0, window_t, window_steps = time.time(), time.time(), 0
    bar = tqdm(total=tc.steps, initial=state.step, desc=f"train {out.name}", unit="step",
               disable=not info.is_main, dynamic_ncols=True)  # fmt: skip
    try:
        while state.step < tc.steps:
            loss_sum, grad_norm = train_step(run)
            step = state.step
            window_steps += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_val = distributed.all_mean(loss_sum, info).item()
                now = time.time()
                rate = window_steps / max(now - window_t, 1e-9)
                window_t, window_steps = now, 0
                bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate * tc.batch_size:.0f}")
                if logger:
                    logger.write(
                        {
                            "step": step,
                            "loss": f"{loss_val:.6f}",
                            "lr": f"{state.optimizer.param_groups[0]['lr']:.6g}",
                            "grad_norm": f"{grad_norm.item():.4f}",
                            "steps_per_s": f"{rate:.3f}",
                            "images_per_s": f"{rate * tc.batch_size:.1f}",
                            "elapsed_s": f"{state.seconds + now - t0:.1f}",
                            "skipped": state.skipped,
                        }
                    )
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                _check_saveable(run, final=step == tc.steps)  # every rank: they stop together
                if info.is_main and not state.bad_in_row:
                    state.save(out, tc.keep_checkpoints, state.seconds + time.time() - t0)
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                write_grid(run, out / "samples" / f"step_{step:07d}.png")
    finally:
        bar.close()
        if logger:
            logger.close()
    if state.skipped:
        log.warning("%s: %d of %d steps were skipped (non-finite loss or gradient); see the "
                    "skipped column of metrics.csv", out, state.skipped, state.step)  # fmt: skip
    seconds = state.seconds + time.time() - t0
    write_grid(run, out / "samples" / f"step_{state.step:07d}.png")
    if info.is_main:
        with state.ema.applied():
            final = export(state.model) if export else state.model
            extra = {"sample": vars(cfg.sample), "latent": run.data.latent}
            save_model_dir(out / "model", final, cfg.diffusion, extra, replace=True)
    distributed.barrier(info)
    state.ema.copy_to_model()
    return TrainResult(out, state.model.eval(), state.step, seconds, info.is_main)


def write_grid(run: _Run, path: Path) -> None:
    """A grid with `sample.per_class` EMA samples of each class the model holds, one row each (at
    most what a grid shows: GRID_CLASSES rows of GRID_PER_CLASS). Every rank draws a share (at
    hundreds of classes one rank alone would keep the others waiting, past NCCL's timeout); rank
    0 writes the grid."""
    model, sc, info = run.state.model, run.cfg.sample, run.info
    per_class = min(sc.per_class, GRID_PER_CLASS)
    labels = [c for c in model.config.held_classes[:GRID_CLASSES] for _ in range(per_class)]
    with run.state.ema.applied():
        imgs = generate_sharded(
            model,
            run.diffusion,
            labels,
            info,
            seed=0,
            sampler=sc.sampler,
            steps=sc.steps,
            cfg_scale=sc.cfg_scale,
            guided_channels=sc.guided_channels,
            decode=run.decode,
        )
    if info.is_main:
        save_grid(imgs, per_class, path)
