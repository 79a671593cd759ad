"""Fault injection: a training run killed with SIGKILL at random points, and started again each time
with the same command line (--auto-resume, as torchrun --max-restarts or a requeued job would, and
the demo's jobs do: continue from a checkpoint, start again a run that had none), ends with exactly
the weights of an uninterrupted run and leaves no temporary file behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KILLS = 6
TRAIN = ["train", "--data", "mnist:0-1", "--size", "tiny", "--batch-size", "8", "--steps", "60",
         "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2", "--set",
         "train.sample_every=0", "--set", "sample.steps=1", "--set", "sample.per_class=1",
         "--set", "train.threads=1"]  # fmt: skip


def _command(run: Path) -> list[str]:
    return [sys.executable, "-m", "kind.cli", *TRAIN, "--auto-resume", "--out", str(run)]


def _newest(run: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none)."""
    return max((int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")), default=0)


def _start(run: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONHASHSEED": "0"}
    return subprocess.Popen(_command(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)  # fmt: skip


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = tmp_path / "reference"
    done = _start(reference)
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()[-2000:]

    run, rng, kills, attempts = tmp_path / "killed", random.Random(0), 0, 0
    while kills < KILLS and attempts < 3 * KILLS:
        attempts += 1
        proc = _start(run)
        # kill at a random point: 0.5-8 s into start-up, or 0-0.2 s after the 1st-3rd new
        # checkpoint (in the middle of a step or of a checkpoint's write). A start-up kill that
        # a fast machine outlives comes 0-0.2 s after the first new checkpoint instead, so each
        # attempt moves the run a few steps at most and the kills stay short of its end
        start = _newest(run)
        target = start + rng.randint(0, 3)
        deadline = time.time() + (rng.uniform(0.5, 8.0) if target == start else 120.0)
        while (
            proc.poll() is None and _newest(run) < max(target, start + 1) and time.time() < deadline
        ):
            time.sleep(0.02)
        if time.time() < deadline:  # a checkpoint came first: kill in its next step or write
            time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        elif proc.returncode != 0:
            pytest.fail(proc.stderr.read().decode()[-2000:])
    assert kills >= KILLS and _newest(run) < 60, f"{kills} kills in {attempts} attempts"
    last = _start(run)
    assert last.wait(timeout=300) == 0, last.stderr.read().decode()[-2000:]

    for name in ("model/model.safetensors", "checkpoints/step_0000060/ema.safetensors"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    left = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not left, f"temporary files left behind: {left}"
