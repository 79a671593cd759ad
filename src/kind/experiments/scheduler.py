"""Run experiment jobs side by side in worker processes, respecting their dependencies, and keep
each finished job's result on disk so an interrupted experiment continues where it stopped."""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from kind.experiments.results import Result, from_dict, to_dict
from kind.io import atomic_write_text, read_json

log = logging.getLogger(__name__)

WORKER_DIED = (
    "its worker process died abruptly: killed by the OS (most often for want of memory) or "
    "crashed; run again with the same --out to retry it, with fewer --jobs if memory ran short"
)


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
    the others, only those that depend on it. A worker process that dies (the OS killing it for
    memory, a crash) fails only the job it ran: the pool is rebuilt and the others go on."""
    done: dict[str, Job] = {}
    failed: dict[str, str] = {}
    for job in jobs:
        path = result_path(out, job.name)
        if path.is_file():
            job.result = from_dict(read_json(path))
            done[job.name] = job
    pending = [] if report_only else [j for j in jobs if j.name not in done]
    bar = tqdm(
        total=sum(j.weight for j in jobs),
        initial=sum(j.weight for j in done.values()),
        unit="work",
        desc="demo",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
    with bar, _sparse_worker_progress():
        pool = _new_pool(workers)
        try:
            running: dict[Future, Job] = {}
            suspects: set[str] = set()  # running when a worker died: each runs alone next
            while pending or running:
                usable = _submit_ready(pool, pending, running, done, failed, suspects, workers)
                bar.set_description("demo: " + ", ".join(sorted(j.name for j in running.values())))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                if not usable or any(_died(f) for f in finished):
                    finished, _ = wait(running)  # a dead worker breaks the pool: all jobs end
                    pool.shutdown()
                    pool = _new_pool(workers)
                    died = {f for f in finished if _died(f)}
                    pending[:0] = _run_again([running.pop(f) for f in died], failed, suspects)
                    finished -= died
                for fut in finished:
                    job = running.pop(fut)
                    try:
                        job.result = fut.result()
                    except Exception as e:  # one failed job must not take the others down
                        failed[job.name] = "".join(traceback.format_exception_only(e)).strip()
                        log.error("job %s failed: %s", job.name, failed[job.name])
                        continue
                    # JSON's own text, not write_json: a result may hold a NaN (a diverged
                    # transfer's FID), which the report reads back as such
                    atomic_write_text(
                        result_path(out, job.name), json.dumps(to_dict(job.result), indent=2)
                    )
                    done[job.name] = job
                    bar.update(job.weight)
        finally:
            pool.shutdown()
    return {name: job.result for name, job in done.items()}, failed


def _new_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned workers: forking a process that holds torch's threads can deadlock."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))


def _submit_ready(
    pool: ProcessPoolExecutor,
    pending: list[Job],
    running: dict[Future, Job],
    done: dict[str, Job],
    failed: dict[str, str],
    suspects: set[str],
    workers: int,
) -> bool:
    """Start the pending jobs whose dependencies are done, in order, while a worker is free, and
    skip those whose dependencies failed. A suspect runs alone: should its worker die again, the
    death is known to be its own and fails it, not the jobs beside it. False when the pool refused
    a job: a worker died, which the pool may learn (at a job's end) before its futures say so."""
    for job in list(pending):
        if any(d in failed for d in job.deps):
            failed[job.name] = f"skipped: {[d for d in job.deps if d in failed]} failed"
            pending.remove(job)
            continue
        alone = any(j.name in suspects for j in running.values())
        if alone or not all(d in done for d in job.deps):
            continue
        if job.name in suspects:
            if running:
                return True  # the others wait until the suspect has had the pool to itself
        elif len(running) >= workers:
            continue
        try:
            running[pool.submit(_call, job.fn, job.kwargs)] = job
        except BrokenProcessPool:
            return False
        pending.remove(job)
    return True


def _died(fut: Future) -> bool:
    """Whether the job's worker process died under it (or beside it: that breaks the pool)."""
    return isinstance(fut.exception(), BrokenProcessPool)


def _run_again(died: list[Job], failed: dict[str, str], suspects: set[str]) -> list[Job]:
    """The jobs to run again after a worker died under one of `died`. Which of several killed its
    worker is unknown, so each becomes a suspect and runs again alone; the job that was the only
    one to end with its worker fails, with a message that says so."""
    if len(died) == 1:
        failed[died[0].name] = WORKER_DIED
        log.error("job %s failed: %s", died[0].name, WORKER_DIED)
        return []
    if died:
        suspects.update(j.name for j in died)
        log.warning("a worker process died while %s ran; running each again alone",
                    ", ".join(j.name for j in died))  # fmt: skip
    return died
