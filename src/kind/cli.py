"""`kind-dit`: the command line on top of the library.

kind-dit train      pre-train a KIND (or dense) DiT
kind-dit sample     images from a run, a parts directory or an assembled model
kind-dit info       parameter counts and bytes per part
kind-dit decompose  a run -> learngene + tailor files
kind-dit assemble   parts -> a model for some classes (or one class merged dense)
kind-dit transfer   parts -> a model for new classes, trained from the learngenes
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SET_HELP = (
    "override a config value, e.g. --set train.lr=3e-4 (repeatable; sections: model, "
    "diffusion, train, sample, and the top-level keys data and group_file)"
)


def _classes(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def _add_train_options(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    p.add_argument(
        "--config",
        help="YAML/JSON config file (sections model, diffusion, train, "
        "sample); command-line options override it",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument(
        "--data",
        required=data_required,
        help="data spec: mnist:0-5, mnist:6,7,8,9, animals, path/to/folder[:cat,dog]",
    )
    p.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    p.add_argument("--seed", type=int, help="seed for init, batches and noise (train.seed)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (train.precision)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory to create (refused if it holds a run, unless --resume)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )


def _overrides(args: argparse.Namespace) -> dict:
    from kind.config import parse_overrides

    ov = parse_overrides(args.set)
    flags = {
        "steps": "steps",
        "batch_size": "batch_size",
        "lr": "lr",
        "seed": "seed",
        "device": "device",
        "precision": "precision",
    }
    for attr, key in flags.items():
        if getattr(args, attr, None) is not None:
            ov.setdefault("train", {})[key] = getattr(args, attr)
    if getattr(args, "data", None):
        ov["data"] = args.data
    if getattr(args, "model", None):
        ov.setdefault("model", {})["kind"] = args.model == "kind"
    if getattr(args, "size", None):
        ov.setdefault("model", {})["size"] = args.size
    return ov


def _run_config(args: argparse.Namespace):
    """The run's config: on --resume the saved one with overrides, else defaults + file + flags."""
    from kind.checkpoint import read_json
    from kind.config import load_config

    saved = Path(args.out) / "config.json"
    if args.resume and saved.is_file():
        base = read_json(saved)
        cfg = load_config(args.config, _overrides(args), base=base)
        for section in ("model", "diffusion", "data"):
            if getattr(cfg, section) != load_config(base=base).__getattribute__(section):
                raise SystemExit(
                    f"error: --resume cannot change {section}; it is fixed by the run in {args.out}"
                )
        return cfg
    return load_config(args.config, _overrides(args))


def cmd_train(args: argparse.Namespace) -> None:
    from kind.train import train

    cfg = _run_config(args)
    result = train(cfg, args.out, resume=args.resume)
    logging.info("trained %d steps in %.0f s -> %s", result.steps, result.seconds, result.run_dir)
    print(
        f"run: {result.run_dir}  (model: {result.run_dir / 'model'}, samples: "
        f"{result.run_dir / 'samples'})"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from kind import distributed
    from kind.checkpoint import load_model
    from kind.parts import resolve_classes
    from kind.sampling import generate_sharded, save_grid, save_npz

    out = Path(args.out)
    targets = [out / "samples.png", out / "samples.npz"]
    if not args.overwrite and any(p.exists() for p in targets):
        raise SystemExit(
            f"error: {out} already holds samples; pass --overwrite or choose another --out"
        )
    info = distributed.setup(args.device)  # under torchrun every rank draws a share
    names = _classes(args.classes)
    model, diffusion, meta = load_model(Path(args.source), names)
    defaults = meta.get("sample", {})
    steps = args.steps or defaults.get("steps", 50)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else defaults.get("cfg_scale", 1.5)
    model.to(info.device)
    if args.unconditional:
        ids = [model.null_id]
    else:
        ids = resolve_classes(model.config, names)
    labels = [c for c in ids for _ in range(args.n)]
    decode = None
    if meta.get("latent") or args.vae:
        from kind.latents import decoder

        decode = decoder(meta.get("latent") or {}, args.vae, info.device)
    images = generate_sharded(
        model,
        diffusion,
        labels,
        info,
        seed=args.seed,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        batch_size=args.batch_size,
        progress=info.is_main,
        decode=decode,
    )
    if not info.is_main:
        return
    save_grid(images, args.n, targets[0])
    class_names = model.config.class_names + (["<null>"] if args.unconditional else [])
    save_npz(
        targets[1],
        images,
        labels,
        class_names,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=args.seed,
        checkpoint=str(Path(args.source).resolve()),
    )
    print(f"{len(labels)} samples -> {targets[0]}, {targets[1]}")


def cmd_info(args: argparse.Namespace) -> None:
    from kind.parts import size_table

    rows = size_table(Path(args.source))
    width = max(len(r[0]) for r in rows)
    print(f"{'part':<{width}}  {'parameters':>12}  {'bytes':>12}")
    for name, params, size in rows:
        size_text = f"{size:>12,}" if size is not None else f"{'-':>12}"
        print(f"{name:<{width}}  {params:>12,}  {size_text}")


def cmd_decompose(args: argparse.Namespace) -> None:
    from kind.checkpoint import load_model
    from kind.parts import decompose

    model, diffusion, meta = load_model(Path(args.source))
    extra = {k: meta.get(k) for k in ("sample", "latent")}
    out = decompose(
        model, diffusion, args.out, extra | {"source": str(Path(args.source).resolve())}
    )
    print(f"parts -> {out}")
    args.source = out
    cmd_info(args)


def cmd_assemble(args: argparse.Namespace) -> None:
    from kind.parts import assemble

    merge_null = args.merge == "null"
    merge_class = None if merge_null else args.merge
    out = assemble(
        args.parts, _classes(args.classes), args.out, merge_class=merge_class, merge_null=merge_null
    )
    print(f"model -> {out}")


def cmd_transfer(args: argparse.Namespace) -> None:
    from kind.data import load_images
    from kind.transfer import kind_budget, run_transfer

    cfg = _run_config(args)
    budget = args.budget
    if args.match_kind:
        budget = kind_budget(args.match_kind, load_images(cfg.data, "test").class_names)
    result = run_transfer(
        args.source,
        cfg,
        args.out,
        method=args.method,
        train_learngenes=args.train_learngenes,
        budget=budget,
        rank_tailor=args.rank_tailor,
        resume=args.resume,
    )
    print(f"run: {result.run_dir}  ({result.steps} steps in {result.seconds:.0f} s)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kind.evaluate import evaluate, write_result

    result = evaluate(
        args.samples,
        args.ref,
        feature_net=args.feature_net,
        k=args.k,
        inception_weights=args.inception_weights,
        device=args.device,
    )
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    write_result(result, out)
    keys = ("fid", "precision", "recall", "class_accuracy", "sfid", "inception_score")
    print("  ".join(f"{k} {result[k]:.4g}" for k in keys if result.get(k) is not None))
    print(f"-> {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from kind.demo import run_demo

    report = run_demo(
        args.out,
        args.preset,
        jobs=args.jobs,
        device=args.device,
        methods=_classes(args.methods),
        report_only=args.report_only,
    )
    print(f"report: {report}")


def cmd_encode(args: argparse.Namespace) -> None:
    from kind.latents import encode_to_store

    out = encode_to_store(
        args.data,
        args.out,
        args.vae,
        args.image_size,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        limit_per_class=args.limit_per_class,
    )
    print(f"latent store -> {out}  (train on it with --data {out})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kind-dit",
        description="KIND: decomposable Diffusion Transformers (learngenes and "
        "tailors): pre-train, decompose, recombine, transfer.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="pre-train a KIND or dense DiT",
        description="Pre-train a class-conditional DiT (KIND by default) on a data "
        "spec; writes checkpoints, sample grids, metrics.csv and the EMA model.",
    )
    _add_train_options(p)
    p.add_argument(
        "--model",
        choices=["kind", "dense"],
        help="KIND gated SVD layers or plain dense linears (model.kind)",
    )
    p.add_argument(
        "--size",
        help="model size: tiny, mini (patch 7 for 28x28), tiny/4, mini/2, "
        "DiT-S/2 ... DiT-XL/8 (model.size)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw samples to a PNG grid and an .npz",
        description="Sample from a run directory, a parts directory or an "
        "assembled/merged model directory. Writes OUT/samples.png (one row per "
        "class) and OUT/samples.npz (arr_0 uint8 NxHxWxC, labels, class_names).",
    )
    p.add_argument("source", help="run, parts or model directory")
    p.add_argument("--classes", help="comma-separated class names (default: every class held)")
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="sample the null class (learngene-only model) instead of classes",
    )
    p.add_argument(
        "--n",
        "--per-class",
        dest="n",
        type=int,
        default=8,
        help="samples per class (default 8); under torchrun write --per-class (torchrun reads "
        "--n as one of its own options)",
    )
    p.add_argument(
        "--sampler",
        choices=["ddim", "ddpm"],
        default="ddim",
        help="DDIM (eta 0) or ancestral DDPM, both respaced (default ddim)",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale; 1 = off (default: the run's sample.cfg_scale)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed; same seed, same samples")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    p.add_argument(
        "--vae",
        help="VAE directory to decode a latent model's samples (default: the "
        "one recorded when the model was trained)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "info",
        help="parameter counts and bytes per part",
        description="Size table: learngenes, each tailor, assembled variants, and "
        "the dense model of the same size, for a run, model or parts directory.",
    )
    p.add_argument("source", help="run, parts or model directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "decompose",
        help="split a KIND run into learngene and tailor files",
        description="Write a parts directory: learngene.safetensors, one "
        "tailor_NNNN.safetensors per tailor group, and manifest.json (config, "
        "classes, tau, per-file parameters, bytes and sha256).",
    )
    p.add_argument("source", help="KIND run or model directory")
    p.add_argument("--out", required=True, help="parts directory to create")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser(
        "assemble",
        help="build a model for some classes from parts",
        description="Learngenes + the tailors of --classes -> a model directory "
        "that computes exactly the full model's outputs for those classes. With "
        "--merge CLASS, one class folded into a dense DiT (plus the learngene-only "
        "network for guidance); --merge null gives the unconditional dense model.",
    )
    p.add_argument("parts", help="parts directory")
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument(
        "--merge", metavar="CLASS|null", help="fold one class (or null) into dense weights"
    )
    p.add_argument("--out", required=True, help="model directory to create")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser(
        "transfer",
        help="train a model for new classes from the learngenes",
        description="Start from the learngenes of PARTS with fresh, randomly "
        "initialised tailors and label rows for the classes of --data, learngenes "
        "frozen unless --train-learngenes, and train with the usual loop.",
    )
    p.add_argument(
        "source",
        help="parts directory of a KIND model (methods kind, kind-tailors) "
        "or run/model directory of a dense DiT (the baselines)",
    )
    _add_train_options(p, data_required=True)
    p.add_argument(
        "--method",
        default="kind",
        help="kind: learngenes + fresh "
        "tailors; kind-tailors: also the source tailors, kind-unfrozen: learngenes trained "
        "too (ablations); full, lora, pissa, "
        "oft, svdiff, difffit, heurlg, scratch: baselines on a dense source",
    )
    p.add_argument(
        "--budget",
        type=int,
        help="trainable-parameter budget the LoRA/PiSSA/OFT rank is matched to",
    )
    p.add_argument(
        "--match-kind",
        metavar="PARTS",
        help="set --budget to what a KIND transfer from PARTS to the same classes trains",
    )
    p.add_argument(
        "--train-learngenes",
        action="store_true",
        help="train the learngenes too instead of freezing them",
    )
    p.add_argument(
        "--rank-tailor",
        type=float,
        help="tailor rank of the new model (KIND methods; default: the source's)",
    )
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser(
        "evaluate",
        help="FID, precision, recall, class accuracy of samples",
        description="Score a samples .npz (arr_0 uint8 NxHxWxC, labels, "
        "class_names) against the test split of a data spec. Bundled data use a "
        "classifier trained on that dataset; other data use Inception-V3 from a "
        "local weights file (FID, sFID, IS, precision, recall).",
    )
    p.add_argument("samples", help="samples .npz from `kind-dit sample`")
    p.add_argument("--ref", required=True, help="reference data spec (its test split)")
    p.add_argument("--feature-net", default="auto", help="auto, mnist, animals or inception")
    p.add_argument(
        "--inception-weights",
        help="local path of the FID Inception weights "
        "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth); or set KIND_INCEPTION_WEIGHTS",
    )
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", help="result JSON (default: SAMPLES.eval.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="the end-to-end demo: pre-train, decompose, transfer, evaluate, report",
        description="Every stage of KIND on the bundled data "
        "against the baselines; writes OUT/report.md. Re-running with the same "
        "--out continues where it stopped.",
    )
    p.add_argument(
        "--preset",
        choices=["quick", "default", "paper"],
        default="default",
        help="quick: toy sizes (minutes); default: KIND, its ablation, LoRA and full "
        "fine-tuning (about half an hour on 2 cores); paper: every baseline, 3 seeds",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument(
        "--jobs", type=int, help="jobs side by side (default: one a core, at most 4; 1 on a GPU)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--methods", help="comma-separated transfer methods instead of the preset's")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write report.md from the jobs finished so far, run nothing",
    )
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "encode",
        help="encode images into a latent store with a local VAE",
        description="Encode the images of a data spec (and their mirror images) "
        "with a local Stable Diffusion VAE into a memory-mapped latent store; "
        "train on it with --data STORE.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="data spec, e.g. /data/imagenet/train or /data/imagenet/train:n01440764,n01443537",
    )
    p.add_argument("--vae", required=True, help="local VAE directory (sd-vae-ft-ema layout)")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument("--image-size", type=int, default=256, help="pixels (default 256)")
    p.add_argument(
        "--split",
        choices=["train", "test"],
        default="train",
        help="which split of the spec (every 5th image of a class is test)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="VAE compute precision"
    )
    p.add_argument("--workers", type=int, default=4, help="image-reading threads")
    p.add_argument("--limit-per-class", type=int, help="encode at most N images a class")
    p.set_defaults(func=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
