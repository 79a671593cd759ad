"""Run by tests/test_distributed.py, alone or under `torchrun --nproc_per_node=2` (gloo): trains
a tiny KIND model on a fixed synthetic data set so runs can be compared tensor by tensor."""

import argparse
import os

import torch

from kind.data.dataset import Dataset
from kind.training.config import load_config
from kind.training.loop import train

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--classes", default="0,1,2,3", help="classes present in the data")
ap.add_argument("--class-dropout", type=float, default=0.0)
ap.add_argument("--resume", action="store_true")
ap.add_argument("--resume-on-rank", type=int, help="resume on this rank only (ranks that disagree)")
args = ap.parse_args()

present = [int(c) for c in args.classes.split(",")]
g = torch.Generator().manual_seed(0)
labels = torch.tensor([present[i % len(present)] for i in range(32)])
images = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
cfg = load_config(
    overrides={
        "model": {"rank_tailor": 4, "class_names": []},
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "log_every": 1,
            "sample_every": 0,
            "checkpoint_every": 1,
            "keep_checkpoints": 10,
            "warmup_steps": 1,
            "weight_decay": 0.1,
            "class_dropout": args.class_dropout,
            "threads": 1,
            "device": "cpu",
        },
        "sample": {"steps": 1, "per_class": 1},
    }
)
train(
    cfg,
    args.out,
    resume=args.resume or args.resume_on_rank == int(os.environ.get("RANK", "0")),
    data=Dataset.from_tensors(images, labels, ["0", "1", "2", "3"]),
)
