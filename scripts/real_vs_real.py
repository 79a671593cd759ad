"""The evaluator's floor on the bundled data: each set's real training images scored as if they
were samples against its real test split (the default reference), in the feature space `kind-dit
evaluate` uses for that set. A model's FID on these sets is read against this floor.

    python scripts/real_vs_real.py                      # mnist:0-5, animals, glyphs
    python scripts/real_vs_real.py --per-class 100      # as many images as the demo's samples
    python scripts/real_vs_real.py --data mnist:0-5     # one set

FID grows as the scored set shrinks (its covariance estimate is noisier), so compare a model's
FID with the floor at the same count: `--per-class` scores the first N training images of each
class (the bundled sets' order is fixed), as the demo scores 100 samples a class.
"""

from __future__ import annotations

import argparse

import torch

from kind.data.images import load_images
from kind.eval.evaluate import evaluate_images

SETS = ("mnist:0-5", "animals", "glyphs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help=f"a data spec (default: {', '.join(SETS)})")
    parser.add_argument("--per-class", type=int, help="training images a class (default: all)")
    args = parser.parse_args()
    if args.per_class is not None and args.per_class < 2:
        parser.error("--per-class takes a count of at least 2")
    for spec in args.data or SETS:
        train = load_images(spec, "train")  # uint8, as samples are
        keep = torch.cat([(train.labels == c).nonzero()[: args.per_class, 0]
                          for c in range(len(train.class_names))])  # fmt: skip
        images, labels = train.images[keep], train.labels[keep]
        result = evaluate_images(images, labels, train.class_names, ref=spec)
        print(f"{spec}: {len(keep)} training images against the test split: "
              f"FID {result['fid']:.3f}, class accuracy {result['class_accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
