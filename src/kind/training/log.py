"""The run's training log: metrics.csv (append-only, trimmed to the resumed step on resume) and,
optionally, TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path

from kind.io import atomic_file


class CsvLog:
    """metrics.csv, append-only; on resume rows after the resumed step are dropped."""

    FIELDS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "elapsed_s",
              "skipped")  # fmt: skip

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool):
        self.path = path
        rows = []
        if resume_step is not None and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:  # a kill keeps the old log
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def close(self) -> None:
        """Flush TensorBoard's events (its writer flushes on its own only every 2 minutes, and a
        torchrun rank ends without the interpreter's teardown: `kind.cli.main._end_rank`)."""
        if self.tb:
            self.tb.close()

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
