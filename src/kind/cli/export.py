"""`kind-dit export`: a dense (or merged) model -> a diffusers DiT folder; a KIND model -> its
learngenes as a diffusers DiT plus its tailors as peft LoRA adapters."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a model as a diffusers DiT folder (a KIND model: plus peft LoRA adapters)"
DESCRIPTION = (
    "Write MODEL (a dense run or model directory, or a class merged by `assemble --merge`) as "
    "a diffusers DiTTransformer2DModel folder: config.json + "
    "diffusion_pytorch_model.safetensors, loadable with DiTTransformer2DModel.from_pretrained"
    "(OUT); a merged model's unconditional network goes to OUT/unconditional. kind_dit.json "
    "records the class names, the diffusion and scheduler settings and the licence. A KIND "
    "model (class-gated tailors) has no dense diffusers counterpart: merge a class first, or "
    "use --format peft: MODEL (a KIND parts, model or run directory) goes to OUT/base (its "
    "learngenes as a DiTTransformer2DModel, the unconditional network) and one peft LoRA "
    "adapter folder per tailor group, OUT/<class>, for PeftModel.from_pretrained(base, "
    'OUT/<class>) and mixed batches with adapter_names=[...] ("__base__" for the null class).'
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the format and where it goes."""
    p.add_argument(
        "source",
        help="dense run or model directory, or a merged model directory; with --format peft a "
        "KIND parts, model or run directory",
    )
    p.add_argument("--out", required=True, help="folder to create (new or empty)")
    p.add_argument(
        "--format",
        choices=["diffusers", "peft"],
        default="diffusers",
        help="output format: diffusers (a dense or merged model) or peft (a KIND model: "
        "diffusers base + one LoRA adapter per tailor group)",
    )


def run(args: argparse.Namespace) -> None:
    """Write the folder; print what the user should know about it."""
    if args.format == "peft":
        from kind.store.peft_export import export_peft as export
    else:
        from kind.store.interop import export_diffusers as export

    out, notes = export(args.source, args.out)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.format} folder -> {out}")
