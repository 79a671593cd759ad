"""Run experiment jobs side by side in worker processes, respecting their dependencies, and keep
each finished job's result on disk so an interrupted experiment continues where it stopped."""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from kind.experiments.results import Result, from_dict, to_dict
from kind.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Job:
    name: str  # also its result file: results/<name with / as __>.json
    fn: Callable[..., Result]  # a module-level function: spawned workers import it by reference
    kwargs: dict
    weight: float  # rough cost, for the progress bar's time estimate
    deps: tuple[str, ...] = ()
    result: Result | None = field(default=None, repr=False)


def result_path(out: Path, name: str) -> Path:
    return Path(out) / "results" / f"{name.replace('/', '__')}.json"


@contextmanager
def _sparse_worker_progress() -> Iterator[None]:
    """The workers' progress bars print a line every 10 s at most. tqdm reads TQDM_MININTERVAL
    when it is imported, before a worker's initializer could run, so the variable is set here for
    the spawned workers to inherit, only where the user has not set their own, and removed again
    however the run ends."""
    ours = "TQDM_MININTERVAL" not in os.environ
    if ours:
        os.environ["TQDM_MININTERVAL"] = "10"
    try:
        yield
    finally:
        if ours:
            os.environ.pop("TQDM_MININTERVAL", None)


def _call(fn: Callable[..., Result], kwargs: dict) -> Result:
    t0 = time.time()
    result = fn(**kwargs)
    result.job_seconds = time.time() - t0
    return result


def execute(
    jobs: list[Job], out: Path, workers: int, report_only: bool = False
) -> tuple[dict[str, Result], dict[str, str]]:
    """Run `jobs` (respecting their dependencies) in `workers` processes; a job whose result file
    exists is done already. Returns (results, failures) by job name; one failed job does not stop
    the others, only those that depend on it."""
    done: dict[str, Job] = {}
    failed: dict[str, str] = {}
    for job in jobs:
        path = result_path(out, job.name)
        if path.is_file():
            job.result = from_dict(json.loads(path.read_text()))
            done[job.name] = job
    pending = [] if report_only else [j for j in jobs if j.name not in done]
    bar = tqdm(
        total=sum(j.weight for j in jobs),
        initial=sum(j.weight for j in done.values()),
        unit="work",
        desc="demo",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
    with (
        bar,
        _sparse_worker_progress(),
        ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool,
    ):
        running = {}
        while pending or running:
            for job in list(pending):
                if any(d in failed for d in job.deps):
                    failed[job.name] = f"skipped: {[d for d in job.deps if d in failed]} failed"
                    pending.remove(job)
                elif all(d in done for d in job.deps) and len(running) < workers:
                    running[pool.submit(_call, job.fn, job.kwargs)] = job
                    pending.remove(job)
            bar.set_description("demo: " + ", ".join(sorted(j.name for j in running.values())))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    job.result = fut.result()
                except Exception as e:  # one failed job must not take the others down
                    failed[job.name] = "".join(traceback.format_exception_only(e)).strip()
                    log.error("job %s failed: %s", job.name, failed[job.name])
                    continue
                atomic_write_text(
                    result_path(out, job.name), json.dumps(to_dict(job.result), indent=2)
                )
                done[job.name] = job
                bar.update(job.weight)
    return {name: job.result for name, job in done.items()}, failed
