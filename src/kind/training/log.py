"""The run's training log: metrics.csv (append-only, trimmed to the resumed step on resume) and,
optionally, TensorBoard scalars."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from kind.io import atomic_file

log = logging.getLogger(__name__)


def _step(row: dict) -> int | None:
    """A row's step, None for a row that is not one (a damaged file)."""
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


class CsvLog:
    """metrics.csv, append-only; on resume rows after the resumed step are dropped."""

    FIELDS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "elapsed_s",
              "skipped")  # fmt: skip

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool):
        self.path = path
        rows = []
        if resume_step is not None and path.exists():
            try:
                with path.open(newline="") as f:
                    read = [(_step(r), r) for r in csv.DictReader(f)]
            except (csv.Error, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{path} cannot be read ({e}); repair it or move it aside (the run's weights "
                    "are in its checkpoints), then --resume again"
                ) from e
            rows = [r for step, r in read if step is not None and step <= resume_step]
            if any(step is None for step, _ in read):  # a log, not the run's state: go on
                log.warning("%s: dropped %d unreadable row(s) (the file was damaged)", path,
                            sum(step is None for step, _ in read))  # fmt: skip
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
