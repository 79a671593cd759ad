"""`kind-dit evaluate`: FID, precision, recall, class accuracy of a samples .npz."""

from __future__ import annotations

import argparse
from pathlib import Path

from kind.cli.common import count

NAME = "evaluate"
HELP = "FID, precision, recall, class accuracy of samples"
DESCRIPTION = (
    "Score a samples .npz (arr_0 uint8 NxHxWxC, labels, "
    "class_names) against the test split of a data spec. Bundled data use a "
    "classifier trained on that dataset; other data use Inception-V3 from a "
    "local weights file (FID, sFID, IS, precision, recall)."
)

_SHOWN = ("fid", "precision", "recall", "class_accuracy", "sfid", "inception_score")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The samples, the reference split, and the feature network that scores them."""
    p.add_argument("samples", help="samples .npz from `kind-dit sample`")
    p.add_argument("--ref", required=True, help="reference data spec (its test split)")
    p.add_argument(
        "--feature-net",
        default="auto",
        help="auto, mnist, animals, glyphs, bundled (every bundled set; for combined specs) or inception",
    )
    p.add_argument(
        "--inception-weights",
        help="local path of the FID Inception weights "
        "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth); or set KIND_INCEPTION_WEIGHTS",
    )
    p.add_argument("--k", type=count(), default=3, help="k of the k-NN precision/recall")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    p.add_argument("--out", help="result JSON (default: SAMPLES.eval.json)")


def run(args: argparse.Namespace) -> None:
    """Score, write the full result as JSON, and print the headline metrics on one line."""
    from kind.eval.evaluate import evaluate, write_result

    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    if out.exists() and not args.overwrite:  # checked before the (long) evaluation
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose --out")
    result = evaluate(
        args.samples,
        args.ref,
        feature_net=args.feature_net,
        k=args.k,
        inception_weights=args.inception_weights,
        device=args.device,
    )
    write_result(result, out)
    print("  ".join(f"{k} {result[k]:.4g}" for k in _SHOWN if result.get(k) is not None))
    print(f"-> {out}")
