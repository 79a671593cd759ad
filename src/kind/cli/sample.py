"""`kind-dit sample`: images from a run, a parts directory or an assembled model."""

from __future__ import annotations

import argparse
import re
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from kind.cli.common import classes, count, number
from kind.core.seeds import NULL_CLASS, SEED_MAX

NAME = "sample"
HELP = "draw samples to a PNG grid and an .npz"
DESCRIPTION = (
    "Sample from a run directory, a parts directory or an "
    "assembled/merged model directory. Writes OUT/samples.npz (arr_0 uint8 NxHxWxC, "
    "labels, class_names: every sample) and OUT/samples.png, a preview grid with one row per "
    "class (the first 16 samples of the first 64 classes). Finished chunks are kept in "
    "OUT/.samples.partial as they are drawn: a stopped job continues with --resume."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """What to sample from, which classes, and how (sampler, steps, guidance, seed)."""
    p.add_argument("source", help="run, parts or model directory")
    p.add_argument(
        "--classes",
        help="comma-separated class names, or class ids where no name is a number (ImageNet: "
        "207; default: every class held)",
    )
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="sample the null class (learngene-only model) instead of classes",
    )
    p.add_argument(
        "--n",
        "--per-class",
        dest="n",
        type=count(),
        default=8,
        help="samples per class (default 8); under torchrun write --per-class (torchrun reads "
        "--n as one of its own options)",
    )
    p.add_argument(
        "--sampler",
        choices=["ddim", "ddpm"],
        help="DDIM (eta 0) or ancestral DDPM, both respaced (default: the model's sample.sampler, "
        "ddim unless it was imported from DiT)",
    )
    p.add_argument("--steps", type=count(), help="sampling steps (default: the run's sample.steps)")
    p.add_argument(
        "--cfg-scale",
        type=number(),
        help="classifier-free guidance scale; 1 = off (default: the run's sample.cfg_scale)",
    )
    p.add_argument(
        "--guided-channels",
        type=count(),
        help="guide only the first N channels, the rest conditional (DiT's sampler: 3 of 4 latent "
        "channels; default: the run's sample.guided_channels, else every channel)",
    )
    p.add_argument(
        "--seed", type=count(0, SEED_MAX), default=0, help="seed; same seed, same samples"
    )
    p.add_argument("--batch-size", type=count(), default=256, help="samples per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace samples already in --out (and remove their samples.eval.json, which scored "
        "the samples replaced), or start an unfinished sampling there again",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished sampling in --out (same settings; any number of ranks), "
        "or start one: safe on every start of a job a scheduler may requeue",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (worth it on a GPU for many samples): one compile per "
        "batch size, whatever the classes",
    )
    p.add_argument(
        "--vae",
        help="VAE directory to decode a latent model's samples (default: the "
        "one recorded when the model was trained)",
    )


def run(args: argparse.Namespace) -> None:
    """Draw --n samples a class (sharded over ranks under torchrun); rank 0 writes PNG + npz."""
    import torch

    from kind.core import distributed
    from kind.core.decomposition import resolve_classes
    from kind.core.images import save_grid, save_npz
    from kind.core.sampling import chunk_size, generate_sharded
    from kind.store.load import load_model
    from kind.store.partial_samples import (
        FORMAT,
        PARTIAL,
        PartialSamples,
        drawn,
        job_sha256,
        model_sha256,
    )
    from kind.training.config import SampleConfig

    out = Path(args.out)
    targets = [out / "samples.png", out / "samples.npz"]
    scores = out / "samples.eval.json"  # what `evaluate` writes beside them
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a directory")
    ours = {p.name for p in [*targets, scores]} | {PARTIAL}
    left = re.compile(r"\.samples\.(png|npz)\..+\.tmp")  # a write of them a kill stopped
    if out.is_dir() and any(p.name not in ours and not left.fullmatch(p.name)
                            for p in out.iterdir()):  # fmt: skip
        raise ValueError(
            f"{out} holds other files than samples; choose a new or empty --out "
            "(nothing was touched)"
        )
    for p in [*targets, scores]:  # --overwrite replaces files, never a directory
        if p.is_dir():
            raise ValueError(f"{p} is a directory where sample files go; choose another --out")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues an unfinished sampling, --overwrite starts again: "
                         "pass one")  # fmt: skip
    if not (args.overwrite or args.resume) and any(p.exists() for p in [*targets, scores]):
        raise ValueError(f"{out} already holds samples; pass --overwrite or choose another --out")
    info = distributed.setup(args.device)  # under torchrun every rank draws a share
    if args.unconditional and args.classes:
        raise ValueError(
            "--unconditional samples the unconditional model (the null class), not classes; "
            "drop --classes, or drop --unconditional"
        )
    names = [] if args.unconditional else classes(args.classes)  # parts: no tailor to assemble
    model, diffusion, meta = load_model(Path(args.source), names)
    weights = model_sha256(model) if info.is_main else None  # what a resumed job must sample
    defaults = SampleConfig.saved(meta.get("sample"))
    sampler = args.sampler or defaults.sampler
    steps = args.steps if args.steps is not None else defaults.steps
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else defaults.cfg_scale
    guided = args.guided_channels or defaults.guided_channels
    channels = model.config.in_channels
    if guided is not None and guided > channels:  # before the first step, not during it
        raise ValueError(
            f"--guided-channels {guided}: this model's samples have {channels} channel(s); "
            f"give at most {channels}, or leave it out to guide every channel"
        )
    model.to(info.device)
    if args.compile:  # sampling hands a compiled model the static route (kind.core.diffusion)
        model = torch.compile(model)
    ids = [model.null_id] if args.unconditional else resolve_classes(model.config, names)
    if not ids:
        raise ValueError(
            f"{args.source} holds no class to sample: sample its unconditional model with "
            "--unconditional, or assemble a model with classes (assemble --classes)"
        )
    labels = [c for c in ids for _ in range(args.n)]
    decode = None
    if meta.get("latent") or args.vae:
        from kind.data.vae import decoder

        decode = decoder(meta.get("latent") or {}, args.vae, info.device)
    job = {
        "format": FORMAT,
        "model_sha256": weights,
        "labels": [model.config.class_names[c] if c != model.null_id else NULL_CLASS
                   for c in ids],
        "per_class": args.n,
        "count": len(labels),
        "seed": args.seed,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "guided_channels": guided,
        "vae": str(Path(args.vae).resolve()) if args.vae else (meta.get("latent") or {}).get("vae"),
        "diffusion": asdict(diffusion),
        "compile": args.compile,  # the static route rounds otherwise
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
                  else info.device.type,  # another device rounds otherwise
        "batch_size": args.batch_size,
        "chunk": chunk_size(len(labels), info.world, args.batch_size),
    }  # fmt: skip
    with ExitStack() as stack:
        chunks, status, error = None, None, None
        if info.is_main:  # rank 0 alone keeps the chunks; the others hear what it found
            try:
                if args.resume and drawn(targets[1], job):
                    status = "drawn"  # a requeued job that had finished
                else:
                    chunks = stack.enter_context(PartialSamples.open(
                        out, job, resume=args.resume, overwrite=args.overwrite,
                        replaces=[*targets, scores]))  # fmt: skip
            except Exception as e:  # any: the other ranks must not wait for a plan
                status, error = str(e) or type(e).__name__, e
        status = distributed.broadcast_object(status, info)
        if status == "drawn":
            if info.is_main:
                PartialSamples.discard(out)
                print(f"{out} already holds this job's samples; nothing to draw")
            return
        if status:
            raise error if error is not None else ValueError(status)
        images = generate_sharded(
            model,
            diffusion,
            labels,
            info,
            seed=args.seed,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            guided_channels=guided,
            batch_size=args.batch_size,
            chunks=chunks,
            progress=info.is_main,
            decode=decode,
        )
        if not info.is_main:
            return
        class_names = model.config.class_names + ([NULL_CLASS] if args.unconditional else [])
        save_npz(
            targets[1],
            images,
            labels,
            class_names,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            guided_channels=guided or channels,
            seed=args.seed,
            checkpoint=str(Path(args.source).resolve()),
            job_sha256=job_sha256(job),
        )
        save_grid(images, args.n, targets[0])
        chunks.remove()  # they are in samples.npz now
    if scores.exists():  # --overwrite, or a resumed job that replaces them: it scored others
        scores.unlink()
        print(f"removed {scores}: it scored the samples replaced")
    print(f"{len(labels)} samples -> {targets[0]}, {targets[1]}")
