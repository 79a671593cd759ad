"""`kind-dit evaluate`: FID, precision, recall, class accuracy of a samples .npz; or, with
--write-ref, the reference statistics file to score many sample sets against."""

from __future__ import annotations

import argparse
from pathlib import Path

from kind.cli.common import count
from kind.data.images import MAX_IMAGE_SIZE

NAME = "evaluate"
HELP = "FID, precision, recall, class accuracy of samples"
DESCRIPTION = (
    "Score a samples .npz (arr_0 uint8 NxHxWxC, labels, class_names) against a reference: a "
    "data spec (its test split, or --ref-split train/all) or a reference statistics .npz (ADM's "
    "reference batches such as VIRTUAL_imagenet256_labeled.npz, clean-fid statistics of its "
    "legacy_tensorflow mode, or one "
    "written with --write-ref; FID and sFID then come from its mu/sigma and mu_s/sigma_s, and "
    "precision/recall need its images). Bundled data use a classifier trained on that dataset; "
    "other data use Inception-V3 from a local weights file (FID, sFID, IS, precision, recall). "
    "Papers report FID-50K: 50,000 samples (e.g. --per-class 50 for 1,000 ImageNet classes) "
    "against ADM's reference batch; with fewer samples or reference images than the feature "
    "dimension (2048 for Inception) FID is unreliable and the result records a warning."
)

_SHOWN = ("fid", "precision", "recall", "class_accuracy", "sfid", "inception_score")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The samples, the reference, and the feature network that scores them."""
    p.add_argument(
        "samples", nargs="?", help="samples .npz from `kind-dit sample` (omit with --write-ref)"
    )
    p.add_argument(
        "--ref",
        required=True,
        help="reference: a data spec, or a statistics .npz (ADM reference batch, clean-fid "
        "statistics of its legacy_tensorflow mode, or one written with --write-ref)",
    )
    p.add_argument(
        "--ref-split",
        choices=("test", "train", "all"),
        help="split of a data-spec reference: test (default), train, or all (train + test)",
    )
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
    p.add_argument(
        "--is-split-size",
        type=count(),
        help="Inception Score: the mean over chunks of this many samples (default: 5000, as "
        "ADM's evaluator)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing result (or --write-ref) file"
    )
    p.add_argument("--out", help="result JSON (default: SAMPLES.eval.json)")
    p.add_argument(
        "--write-ref",
        metavar="OUT.npz",
        help="score nothing: write the --ref spec's --ref-split images (ADM layout) and their "
        "feature statistics (mu, sigma; with inception also mu_s, sigma_s) to OUT.npz, to pass "
        "as --ref OUT.npz for every later evaluation",
    )
    p.add_argument(
        "--image-size",
        type=count(1, MAX_IMAGE_SIZE),
        help="with --write-ref: image size of the reference (default: the data's own, 32 for "
        "folders; e.g. 256 for ImageNet 256x256)",
    )


def _write_reference(args: argparse.Namespace, device: str) -> None:
    from kind.eval.reference import write_adm_reference

    if args.samples is not None or args.out is not None:
        raise ValueError(
            "--write-ref writes reference statistics and scores nothing; drop the samples "
            "and --out, then evaluate with --ref OUT.npz"
        )
    out = Path(args.write_ref)
    if out.suffix.lower() != ".npz":
        raise ValueError(
            f"--write-ref {out}: name it *.npz, which is how --ref knows a statistics file"
        )
    if out.exists() and not args.overwrite:
        raise FileExistsError(
            f"{out} exists; pass --overwrite to replace it, or choose another name"
        )
    path = write_adm_reference(
        args.ref,
        out,
        split=args.ref_split or "test",
        image_size=args.image_size,
        feature_net=args.feature_net,
        inception_weights=args.inception_weights,
        device=device,
        overwrite=args.overwrite,
    )
    print(f"-> {path}")


def run(args: argparse.Namespace) -> None:
    """Score, write the full result as JSON, and print the headline metrics on one line."""
    from kind.core.device import pick_device
    from kind.eval.evaluate import IS_SPLIT_SIZE, evaluate, write_result

    device = str(pick_device(args.device))  # checked before the (long) work, like the paths
    if args.write_ref is not None:
        _write_reference(args, device)
        return
    if args.samples is None:
        raise ValueError(
            "give the samples .npz to score (or --write-ref OUT.npz to write a reference)"
        )
    if args.image_size is not None:
        raise ValueError("--image-size goes with --write-ref; samples are scored at their own size")
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give the result file's name")
    inputs = [Path(p) for p in (args.samples, args.ref, args.inception_weights) if p]
    if any(p.exists() and out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"--out {out} is one of the inputs; choose another --out")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose --out")
    result = evaluate(
        args.samples,
        args.ref,
        feature_net=args.feature_net,
        k=args.k,
        inception_weights=args.inception_weights,
        device=device,
        ref_split=args.ref_split,
        is_split_size=args.is_split_size or IS_SPLIT_SIZE,
    )
    write_result(result, out)
    print("  ".join(f"{k} {result[k]:.4g}" for k in _SHOWN if result.get(k) is not None))
    print(f"-> {out}")
