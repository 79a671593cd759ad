"""The scheduler with cheap fake jobs: a worker process killed under its job (as the OS's OOM
killer does) fails that job alone; the jobs beside it and after it still run and keep results."""

import json
import os
import signal
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from kind.experiments import scheduler
from kind.experiments.results import DeployResult
from kind.experiments.scheduler import Job, execute, result_path


def _dies(beside_ran: str) -> DeployResult:
    """Kill this worker as the OOM killer would, once the job beside it is surely running."""
    while not Path(beside_ran).exists():
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def _fine(runs: str = "") -> DeployResult:
    """A job that finishes, counting its runs in the file `runs`; its first run lasts until the
    pool ends it (the worker beside it dies meanwhile)."""
    if runs:
        first = not Path(runs).exists()
        with open(runs, "a") as f:
            f.write("run\n")
        if first:
            time.sleep(30)
    return DeployResult(parts="p", variants=[], size_table=[], orthogonality_error=0.0)


def _assert_only_dies_failed(failed: dict[str, str]) -> None:
    assert failed.pop("after-dies") == "skipped: ['dies'] failed"
    assert list(failed) == ["dies"]
    assert "worker process died" in failed["dies"] and "memory" in failed["dies"]


def test_a_dead_worker_fails_only_its_job_and_the_others_run_and_keep_their_results(tmp_path):
    runs = str(tmp_path / "beside.runs")
    jobs = [
        # "first" ends before "beside" starts: the pool then watches both workers (CPython's
        # pool does not notice a worker spawned after its last event die until its next one)
        Job("first", _fine, {}, weight=1.0),
        Job("dies", _dies, {"beside_ran": runs}, weight=1.0),
        Job("beside", _fine, {"runs": runs}, weight=1.0),
        Job("after-dies", _fine, {}, weight=1.0, deps=("dies",)),
        Job("after-beside", _fine, {}, weight=1.0, deps=("beside",)),
    ]
    results, failed = execute(jobs, tmp_path, workers=2)
    _assert_only_dies_failed(failed)
    assert sorted(results) == ["after-beside", "beside", "first"]
    # the job running beside the dead worker was ended with the pool and ran again, alone
    assert Path(runs).read_text() == "run\nrun\n"
    for name in results:
        assert json.loads(result_path(tmp_path, name).read_text())["parts"] == "p"


class _Pool:
    """An in-process pool; the first one's worker under "dies" dies unnoticed until the pool is
    given the next job, which it refuses, as a real pool does when it learns of the death late."""

    made = 0

    def __init__(self, workers: int):
        _Pool.made += 1
        self.broken = _Pool.made == 1
        self.dying: Future | None = None

    def submit(self, fn, job_fn, kwargs) -> Future:
        fut = Future()
        if self.dying is not None:
            self.dying.set_exception(BrokenProcessPool("a worker terminated abruptly"))
            raise BrokenProcessPool("the process pool is not usable anymore")
        if self.broken and job_fn is _dies:
            self.dying = fut
        else:
            fut.set_result(fn(job_fn, kwargs))
        return fut

    def shutdown(self) -> None:
        pass


def test_a_pool_that_refuses_a_job_is_rebuilt_and_the_job_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "_new_pool", _Pool)
    monkeypatch.setattr(_Pool, "made", 0)
    jobs = [
        Job("dies", _dies, {"beside_ran": ""}, weight=1.0),
        Job("beside", _fine, {}, weight=1.0),
        Job("after-dies", _fine, {}, weight=1.0, deps=("dies",)),
        Job("after-beside", _fine, {}, weight=1.0, deps=("beside",)),
    ]
    results, failed = execute(jobs, tmp_path, workers=2)
    _assert_only_dies_failed(failed)
    assert sorted(results) == ["after-beside", "beside"]
    assert _Pool.made == 2
