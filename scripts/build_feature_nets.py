"""Train the bundled feature networks used to evaluate samples of the 28×28 datasets.

    python scripts/build_feature_nets.py                      # every net (see NETS)
    python scripts/build_feature_nets.py --datasets animals   # some of them

Why: FID, precision, recall and class accuracy need a network that knows the data. Inception-V3
on 28×28 grayscale digits mostly measures the upsampling (and needs torchvision, which does not
import beside the CPU torch wheel here), so each bundled dataset gets its own small classifier,
trained on that dataset's *train* split (all its classes) and scored on its *test* split. Samples
are later compared with the test split, so the network has never seen the reference images.
One more net, ``bundled``, is trained on the train splits of all bundled sets at once (their
class names are unique: digits, animal names, letters), for combined specs such as
``mnist:0-4 + glyphs``, which no single dataset's net classifies.

Deterministic: fixed seed, deterministic algorithms, a fixed thread count, a seeded generator for
shuffling and augmentation. Writes ``src/kind/assets/featnet_<dataset>.safetensors`` and a JSON
sidecar (architecture, classes, test accuracy, sha256 of the weights, this command).
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from kind.core.images import to_model_range  # noqa: E402
from kind.data.images import BUNDLED, ImageSet, dataset_classes, load_images  # noqa: E402
from kind.eval.features import ASSETS, SmallCNN, save_feature_net  # noqa: E402

log = logging.getLogger("build_feature_nets")

# The data spec each net trains on: a bundled set's own, or all of them for "bundled".
NETS = {**{name: name for name in BUNDLED}, "bundled": " + ".join(BUNDLED)}
# Epochs chosen so each net trains in a few minutes on CPU (~0.5-1 ms per image-step; "bundled",
# 17,760 images, took 11 min with --threads 1 on a shared 2-core machine).
DEFAULT_EPOCHS = {"mnist": 24, "animals": 16, "glyphs": 24, "bundled": 12}
# Silhouettes of animals face either way, digits and letters do not.
HFLIP = {"mnist": False, "animals": True, "glyphs": False, "bundled": False}


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int, hflip: bool) -> torch.Tensor:
    """Random integer translations (and optional flips) of ``x`` float ``[B, C, H, W]``: the
    cheap augmentation that lifts a small CNN's test accuracy on few thousand images."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # background is black = -1
    shifts = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)])
    if hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat(
        [model(to_model_range(images[i : i + 1000]))[1] for i in range(0, len(images), 1000)]
    )
    return round(float((logits.argmax(1) == labels).double().mean()), 4)


def by_dataset(model: SmallCNN, test: ImageSet) -> dict[str, float]:
    """Test accuracy on each bundled set's images (argmax over all the net's classes)."""
    out = {}
    for name in BUNDLED:
        ids = torch.tensor([test.class_names.index(c) for c in dataset_classes(name)])
        mask = torch.isin(test.labels, ids)
        out[name] = accuracy(model, test.images[mask], test.labels[mask])
    return out


def train_one(
    dataset: str, epochs: int, seed: int, batch_size: int, lr: float
) -> tuple[SmallCNN, dict]:
    """Train net ``dataset`` on the train split of its spec (``NETS``); return the model and the
    facts for the sidecar."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = load_images(NETS[dataset], "train"), load_images(NETS[dataset], "test")
    model = SmallCNN(num_classes=len(train.class_names))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    x_all = to_model_range(train.images)  # [N, 1, 28, 28]
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = augment(x_all[idx], gen, max_shift=2, hflip=HFLIP.get(dataset, False))
            _, logits = model(x)
            loss = F.cross_entropy(logits, train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.info("%s epoch %d/%d loss %.4f (%.0fs)", dataset, epoch + 1, epochs,
                 total / len(train), time.perf_counter() - t0)  # fmt: skip
    seconds = time.perf_counter() - t0
    facts = {
        **({"data_spec": NETS[dataset]} if NETS[dataset] != dataset else {}),
        "train_images": len(train),
        "test_images": len(test),
        "train_accuracy": accuracy(model, train.images, train.labels),
        "test_accuracy": accuracy(model, test.images, test.labels),
        **({"test_accuracy_by_dataset": by_dataset(model, test)} if dataset == "bundled" else {}),
        "train_seconds": round(seconds, 1),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "augmentation": f"shift ±2 px{', horizontal flip' if HFLIP.get(dataset) else ''}",
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    return model, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    # Two threads on an idle 2-core machine; when other processes compete for the cores, two
    # OpenMP threads ran ~5-25x slower than one, so pass --threads 1 there. The weights depend
    # on the thread count (it is recorded in the sidecar), not on the run.
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    command = "python scripts/build_feature_nets.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    for dataset in args.datasets:
        epochs = args.epochs or DEFAULT_EPOCHS[dataset]
        model, facts = train_one(dataset, epochs, args.seed, args.batch_size, args.lr)
        facts["threads"] = args.threads
        facts["command"] = command.strip()
        info = save_feature_net(
            model, dataset, load_images(NETS[dataset], "test").class_names, facts, args.out
        )
        log.info("%s: test accuracy %.4f, train accuracy %.4f, %.0fs, sha256 %s",
                 dataset, info["test_accuracy"], info["train_accuracy"], info["train_seconds"],
                 info["sha256"][:16])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
