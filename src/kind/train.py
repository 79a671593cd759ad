"""One training loop for KIND and dense DiTs, pre-training and transfer alike.

Runs on one CPU, one GPU, or N ranks under torchrun (DistributedDataParallel). Each step draws one
global batch (indices, timesteps, noise, label dropout) from seeded generators that every rank holds
identically, and each rank takes its shard: N ranks with batch B reach what one process reaches with
batch N·B, and a resumed run continues exactly where it stopped (model, EMA, optimiser, RNG, step
all live in the checkpoint).

Gate isolation of updates (KIND.md invariant 2): gradients are cleared to None every step and an
absent class's tailors never enter the graph, so AdamW (decay and momentum included) and the EMA skip
them; under DDP a parameter unused on every rank keeps grad None too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kind import checkpoint as ckpt
from kind import distributed
from kind.config import Config, save_config
from kind.data import load_images, to_model_range
from kind.diffusion import Diffusion
from kind.ema import EMA
from kind.latents import LatentStore, decoder, is_store
from kind.model import DiT
from kind.sampling import generate, save_grid

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


def read_group_file(path: str, class_names: list[str]) -> list[int]:
    """τ from a YAML/JSON mapping {class name: group name or id}; groups are numbered in order of
    first appearance along class_names. Every class must be mapped."""
    import yaml

    mapping = yaml.safe_load(Path(path).read_text())
    if not isinstance(mapping, dict):
        raise ValueError(f"group file {path} must map class names to groups")
    mapping = {str(k): str(v) for k, v in mapping.items()}
    missing = [c for c in class_names if c not in mapping]
    if missing:
        raise ValueError(
            f"group file {path} does not map classes {missing[:10]}; every class of "
            "the data needs a group"
        )
    order: dict[str, int] = {}
    return [order.setdefault(mapping[c], len(order)) for c in class_names]


def build_model(cfg: Config, class_names: list[str], image_size: int, channels: int) -> DiT:
    """A fresh model for data with these classes; fills the data-derived model config fields."""
    mc = cfg.model
    mc.class_names, mc.image_size, mc.in_channels = list(class_names), image_size, channels
    if cfg.group_file:
        mc.class_to_group = read_group_file(cfg.group_file, class_names)
    return DiT(mc)


class InMemoryImages:
    """Training images held as one tensor in the model's range; a flip is the mirror image.

    The loop reads data only through `len`, `shape` and `get`, so a memory-mapped latent store
    (whose flips are cached encodings of mirrored images) plugs in the same way."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # float [N, C, H, W]
        self.shape = tuple(images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.images[idx]  # [b, C, H, W]
        return x if flip is None else torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def load_dataset(cfg: Config, image_size: int | None = None, channels: int | None = None):
    """(images, labels [N], class names) of the training split: a latent store when `cfg.data`
    names one (see `kind.latents`), else images of the data spec in [-1, 1]."""
    if is_store(cfg.data):
        store = LatentStore(cfg.data)
        if image_size not in (None, store.shape[-1]) or channels not in (None, store.shape[1]):
            raise ValueError(
                f"latent store {cfg.data} holds {store.shape[1:]} latents; the model "
                f"expects {channels}x{image_size}x{image_size}"
            )
        return store, store.labels, store.class_names
    data = load_images(cfg.data, "train", image_size=image_size, channels=channels)
    return InMemoryImages(to_model_range(data.images)), data.labels, data.class_names


class CsvLog:
    """metrics.csv, append-only; on resume rows after the resumed step are dropped."""

    FIELDS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "elapsed_s")

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool):
        self.path = path
        rows = []
        if resume_step is not None and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])


def _rng_tensors(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {f"gen.{k}": g.get_state() for k, g in gens.items()}
    state["torch.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state |= {f"torch.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _restore_rng(gens: dict[str, torch.Generator], state: dict[str, torch.Tensor]) -> None:
    for k, g in gens.items():
        g.set_state(state[f"gen.{k}"])
    torch.set_rng_state(state["torch.cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def train(
    cfg: Config,
    out: str | Path,
    *,
    model: DiT | None = None,
    resume: bool = False,
    meta: dict | None = None,
    data: tuple | None = None,
    export: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainResult:
    """Train `model` (default: a fresh one for `cfg`) on `cfg.data`, writing the run to `out`.

    Only parameters with requires_grad train (transfer freezes the learngenes this way). `meta` is
    stored in the run's `run.json` (e.g. where a transfer came from). `data` overrides the dataset
    as (images in [-1, 1], labels, class names). `export` turns the trained model (EMA weights in
    place) into the plain DiT written to `out/model` (baselines merge their adapters this way).
    With `resume`, the caller builds the same initial model and the latest checkpoint in `out` is
    loaded over it.
    """
    tc, out = cfg.train, Path(out)
    info = distributed.setup(tc.device)
    device = info.device
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if resume and ckpt.latest_checkpoint(out) is None:
        raise TrainingError(f"--resume: no checkpoint in {out}/checkpoints to resume from")
    if not resume and (out / "config.json").exists():
        raise TrainingError(
            f"{out} already holds a run; pass --resume to continue it, or choose "
            "another --out (nothing was overwritten)"
        )
    torch.manual_seed(tc.seed)

    if data is None:
        shape = (model.config.image_size, model.config.in_channels) if model else (None, None)
        data = load_dataset(cfg, *shape)
    images, labels, class_names = data
    if isinstance(images, torch.Tensor):
        images = InMemoryImages(images)
    if model is None:
        model = build_model(cfg, class_names, images.shape[-1], images.shape[1])
    if list(model.config.class_names) != list(class_names):
        raise TrainingError(
            f"model classes {model.config.class_names} differ from the data's {class_names}"
        )
    model.to(device)
    model.grad_checkpointing = tc.grad_checkpointing
    latent = None  # how samples become images: recorded beside the model, used by the grids
    if isinstance(images, LatentStore):
        latent = {
            "vae": cfg.vae or images.meta["vae"],
            "image_size": images.meta["image_size"],
            "store": str(images.path),
        }
    diffusion = Diffusion(cfg.diffusion)

    B, world = tc.batch_size, info.world
    local = B // world
    micro = tc.micro_batch_size or local
    if B % world or local % micro:
        raise TrainingError(
            f"train.batch_size {B} must split evenly over {world} rank(s) and "
            f"micro-batches of {micro}"
        )

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    opt = torch.optim.AdamW(
        [p for _, p in named], lr=tc.lr, weight_decay=tc.weight_decay, fused=True
    )
    ema = EMA(named, tc.ema_decay)
    gens = {
        "data": torch.Generator().manual_seed(tc.seed),
        "noise": torch.Generator(device).manual_seed(tc.seed + 1),
    }
    amp_dtype = PRECISIONS[tc.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")

    step, before = 0, 0.0  # before: training seconds of earlier calls (resume)
    if resume:
        step, before = _load_checkpoint(
            ckpt.latest_checkpoint(out), model, ema, opt, names, gens, scaler
        )
        log.info("resumed %s at step %d", out, step)
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
        ckpt.atomic_write_text(
            out / "run.json", json.dumps((meta or {}) | {"latent": latent}, indent=2)
        )
    distributed.barrier(info)

    net: nn.Module = model
    if world > 1:
        # find_unused_parameters: the tailors and label rows of absent classes are unused in a step
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if tc.compile:
        net = torch.compile(net)

    logger = (
        CsvLog(out / "metrics.csv", step if resume else None, tc.tensorboard)
        if info.is_main
        else None
    )
    C, H, W = images.shape[1:]
    t0, window_t, window_steps = time.time(), time.time(), 0
    bar = tqdm(
        total=tc.steps,
        initial=step,
        desc=f"train {out.name}",
        unit="step",
        disable=not info.is_main,
        dynamic_ncols=True,
    )
    shard = slice(info.rank * local, (info.rank + 1) * local)
    while step < tc.steps:
        # one global batch from the shared generators, then this rank's shard
        idx = torch.randint(len(images), (B,), generator=gens["data"])[shard]
        t = torch.randint(
            diffusion.config.num_timesteps, (B,), generator=gens["noise"], device=device
        )[shard]
        noise = torch.randn((B, C, H, W), generator=gens["noise"], device=device)[shard]
        drop = (torch.rand(B, generator=gens["noise"], device=device) < tc.class_dropout)[shard]
        flip = (torch.rand(B, generator=gens["noise"], device=device) < 0.5)[shard]
        x0 = images.get(idx, flip.cpu() if tc.hflip else None).to(device, non_blocking=True)
        y = torch.where(drop, model.null_id, labels[idx].to(device))

        for g in opt.param_groups:
            g["lr"] = tc.lr * min(1.0, (step + 1) / max(tc.warmup_steps, 1))
        loss_sum = torch.zeros((), device=device)
        for m0 in range(0, local, micro):
            sl = slice(m0, m0 + micro)
            last = m0 + micro >= local
            sync = nullcontext() if last or world == 1 else net.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = diffusion.loss(net, x0[sl], y[sl], t[sl], noise[sl]).mean()
                if tc.orth_weight and model.config.kind:
                    loss = loss + tc.orth_weight * model.orthogonality_penalty(y[sl])
                scaled = loss * (micro / local)
                scaler.scale(scaled).backward()
            loss_sum += scaled.detach()
        if not torch.isfinite(loss_sum):
            raise TrainingError(
                f"loss became {loss_sum.item()} at step {step + 1} (lr {opt.param_groups[0]['lr']:.3g}"
                f"); lower train.lr, keep train.grad_clip on, or use precision fp32. The last "
                f"checkpoint in {out}/checkpoints is intact; resume from it with --resume"
            )
        scaler.unscale_(opt)
        params = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale_before is None or scaler.get_scale() >= scale_before:  # fp16 step not skipped
            ema.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            loss_val = distributed.all_mean(loss_sum, info).item()
            now = time.time()
            rate = window_steps / max(now - window_t, 1e-9)
            window_t, window_steps = now, 0
            bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate * B:.0f}")
            if logger:
                logger.write(
                    {
                        "step": step,
                        "loss": f"{loss_val:.6f}",
                        "lr": f"{opt.param_groups[0]['lr']:.6g}",
                        "grad_norm": f"{grad_norm.item():.4f}",
                        "steps_per_s": f"{rate:.3f}",
                        "images_per_s": f"{rate * B:.1f}",
                        "elapsed_s": f"{before + now - t0:.1f}",
                    }
                )
        if info.is_main and (step % tc.checkpoint_every == 0 or step == tc.steps):
            elapsed = before + time.time() - t0
            _save_checkpoint(out, step, model, ema, opt, names, gens, scaler, tc.keep_checkpoints,
                             elapsed)  # fmt: skip
        if info.is_main and tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
            write_grid(
                cfg, model, ema, diffusion, out / "samples" / f"step_{step:07d}.png", device, latent
            )
        distributed.barrier(info)
    bar.close()
    seconds = before + time.time() - t0
    if info.is_main:
        write_grid(
            cfg, model, ema, diffusion, out / "samples" / f"step_{step:07d}.png", device, latent
        )
        with ema.applied():
            final = export(model) if export else model
            extra = {"sample": vars(cfg.sample), "latent": latent}
            ckpt.save_model_dir(out / "model", final, cfg.diffusion, extra)
    distributed.barrier(info)
    with torch.no_grad():
        for n, p in ema.params.items():
            p.copy_(ema.shadow[n])
    return TrainResult(out, model.eval(), step, seconds)


def write_grid(
    cfg: Config,
    model: DiT,
    ema: EMA,
    diffusion: Diffusion,
    path: Path,
    device: torch.device,
    latent: dict | None = None,
) -> None:
    """A grid with `sample.per_class` EMA samples of every class the model holds, one row each."""
    classes = model.config.held_classes
    labels = [c for c in classes for _ in range(cfg.sample.per_class)]
    sc = cfg.sample
    with ema.applied():
        imgs = generate(
            model,
            diffusion,
            labels,
            seed=0,
            sampler=sc.sampler,
            steps=sc.steps,
            cfg_scale=sc.cfg_scale,
            device=device,
            decode=decoder(latent, device=device) if latent else None,
        )
    save_grid(imgs, sc.per_class, path)


def _save_checkpoint(
    out: Path,
    step: int,
    model: DiT,
    ema: EMA,
    opt,
    names,
    gens,
    scaler,
    keep: int,
    elapsed: float,
) -> None:
    with ckpt.atomic_dir(out / "checkpoints" / f"step_{step:07d}") as d:
        ckpt.atomic_save_tensors(d / "model.safetensors", model.state_dict())
        shadow, counts = ema.state()
        ckpt.atomic_save_tensors(d / "ema.safetensors", shadow)
        tensors, groups = ckpt.optimizer_tensors(opt, names)
        ckpt.atomic_save_tensors(d / "optimizer.safetensors", tensors)
        ckpt.atomic_save_tensors(d / "rng.safetensors", _rng_tensors(gens))
        state = {
            "step": step,
            "ema_counts": counts,
            "param_groups": groups,
            "grad_scaler": {k: v for k, v in scaler.state_dict().items()},
            "elapsed_s": elapsed,
        }
        ckpt.atomic_write_text(d / "state.json", json.dumps(state))
    ckpt.prune_checkpoints(out, keep)


def _load_checkpoint(
    path: Path, model: DiT, ema: EMA, opt, names, gens, scaler
) -> tuple[int, float]:
    """Restore a checkpoint into the run's objects; returns (step, training seconds so far)."""
    ckpt.load_state(model, ckpt.read_tensors(path / "model.safetensors"), path)
    state = ckpt.read_json(path / "state.json")
    ema.load(ckpt.read_tensors(path / "ema.safetensors"), state["ema_counts"])
    ckpt.load_optimizer(
        opt, names, ckpt.read_tensors(path / "optimizer.safetensors"), state["param_groups"]
    )
    _restore_rng(gens, ckpt.read_tensors(path / "rng.safetensors"))
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))
