"""A sampling job's finished chunks on disk, so that a stopped `kind-dit sample` (a killed or
preempted FID-50K job) continues where it stopped (`--resume`) instead of drawing every sample
again.

    OUT/.samples.partial/
        job.json                  what the samples are: the model's weights (sha256), classes,
                                  samples a class, seed, sampler, steps, guidance, decoder,
                                  device type, batch and chunk size
        chunk_000000.safetensors  uint8 [size, C, H, W]: samples k·size .. (k+1)·size - 1, each
        ...                       read back before it takes its name (`kind.io`)
        lock                      held while a job writes here

Rank 0 alone reads and writes it (`kind.core.sampling.generate_sharded` deals the chunks left
out to the ranks), so a job needs no file system shared between nodes. The directory goes once
samples.npz is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kind.io import (
    atomic_save_tensors,
    hold_lock,
    read_json,
    read_tensors,
    tensor_sha256,
    write_json,
)

PARTIAL = ".samples.partial"
FORMAT = "kind-samples-partial/1"
_CHUNK = re.compile(r"chunk_(\d{6})\.safetensors")


def job_sha256(job: dict) -> str:
    """The job's identity (chunk size aside): samples.npz records it, so that a requeued
    `--resume` of a finished job knows its samples are drawn."""
    same = {k: v for k, v in job.items() if k != "chunk"}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def drawn(samples: Path, job: dict) -> bool:
    """Whether the sample file `samples` holds this job's samples."""
    try:
        with np.load(samples, allow_pickle=False) as npz:
            return "job_sha256" in npz.files and str(npz["job_sha256"]) == job_sha256(job)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # absent or damaged: not drawn
        return False


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the model's state, by name: the weights a job samples from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor_sha256(tensor)}".encode())
    return h.hexdigest()


class PartialSamples:
    """The chunks of one job (`job`: what `job.json` records) in `root`."""

    def __init__(self, root: Path, job: dict):
        self.root, self.job = root, job
        self.size, self.count = job["chunk"], job["count"]

    @classmethod
    @contextmanager
    def open(
        cls, out: Path, job: dict, *, resume: bool, overwrite: bool, replaces: list[Path]
    ) -> Iterator[PartialSamples]:
        """The job's chunks under `out` while the block runs, locked: an unfinished job's with
        `resume` (refused when it differs from `job` in anything but the chunk size, which it
        keeps), else a new one (an unfinished job there is refused unless `overwrite`). The
        files in `replaces` (the outputs) are replaced at the end only with `overwrite`, or
        when resuming the unfinished job (started with `--overwrite`, or stopped while writing
        them)."""
        root = Path(out) / PARTIAL
        if root.is_dir() and not resume and not overwrite:
            raise ValueError(
                f"{out} holds an unfinished sampling ({cls._progress(root)}): pass --resume "
                "to continue it, or --overwrite to start again (nothing was touched)"
            )
        if not overwrite and not root.is_dir() and any(p.exists() for p in replaces):
            raise ValueError(
                f"{out} already holds samples of another job; pass --overwrite or choose "
                "another --out"
            )
        root.mkdir(parents=True, exist_ok=True)
        with hold_lock(root / "lock", lambda holder: ValueError(
                f"{out} is being sampled into by {holder}; wait for it or choose another --out")):  # fmt: skip
            saved = root / "job.json"
            if resume and saved.is_file():
                job = cls._same(read_json(saved), job, root)
            else:  # a new job (--overwrite: the unfinished one's chunks go)
                for old in root.glob("chunk_*.safetensors"):
                    old.unlink()
                write_json(saved, job)
            yield cls(root, job)

    @staticmethod
    def _same(saved: dict, job: dict, root: Path) -> dict:
        """The saved job when `job` asks for the same samples (its chunk size: the saved one)."""
        as_saved = json.loads(json.dumps(job))  # as JSON holds it (a tuple reads back a list)
        differ = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in as_saved.items()
                  if k != "chunk" and saved.get(k) != v]  # fmt: skip
        if differ:
            raise ValueError(
                f"--resume: the unfinished sampling in {root.parent} drew other samples: "
                f"{'; '.join(differ)}; resume with the settings it started with, or pass "
                "--overwrite instead of --resume to start again"
            )
        if not isinstance(saved.get("chunk"), int) or saved["chunk"] < 1:
            raise ValueError(f"{root / 'job.json'} is damaged (its chunk size); pass --overwrite")
        return saved

    @staticmethod
    def _progress(root: Path) -> str:
        try:
            job = read_json(root / "job.json")
            total = -(-job["count"] // job["chunk"])
        except (ValueError, KeyError, TypeError, ZeroDivisionError, FileNotFoundError):
            return "its job record unreadable"
        kept = sum(1 for p in root.iterdir() if _CHUNK.fullmatch(p.name))
        return f"{kept} of {total} chunks of {job['chunk']} samples drawn"

    def _path(self, k: int) -> Path:
        return self.root / f"chunk_{k:06d}.safetensors"

    def _rows(self, k: int) -> int:
        return min(self.count, (k + 1) * self.size) - k * self.size

    def done(self) -> set[int]:
        """Chunks written by an earlier start of this job."""
        chunks = -(-self.count // self.size)
        found = (_CHUNK.fullmatch(p.name) for p in self.root.iterdir())
        return {int(m[1]) for m in found if m and int(m[1]) < chunks}

    def read(self, k: int) -> torch.Tensor:
        images = read_tensors(self._path(k)).get("images")
        if images is None or images.dtype != torch.uint8 or len(images) != self._rows(k):
            raise ValueError(
                f"{self._path(k)} is not this job's chunk {k}; remove it and --resume to draw it "
                "again"
            )
        return images

    def write(self, k: int, images: torch.Tensor) -> None:
        atomic_save_tensors(self._path(k), {"images": images})

    def remove(self) -> None:
        """Once the samples are written: the chunks are in samples.npz (and what a write of
        them stopped by a kill left, hidden temporary files, goes too)."""
        shutil.rmtree(self.root)
        for stale in self.root.parent.glob(".samples.*.tmp"):
            stale.unlink()

    @staticmethod
    def discard(out: Path) -> None:
        """What a job killed after writing its samples left (the chunks are in them)."""
        if (Path(out) / PARTIAL).is_dir():
            shutil.rmtree(Path(out) / PARTIAL)
