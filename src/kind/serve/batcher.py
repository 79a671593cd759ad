"""The dynamic batcher: requests for different classes queue up and run together as one mixed
batch through the KIND model (the per-sample class gate), one batch at a time.

An asyncio queue and one worker task: the worker takes the oldest request, waits up to
`max_wait` after its arrival for more, takes every queued request with the same sampling
settings that fits (at most `max_batch` samples a forward, counting the null samples `draw` pads
a batch of many classes with, at most as many tailor groups as the cache has slots; a single
request larger runs alone), and runs the batch in a thread so the event loop keeps answering.
Requests left out wait for the next batch, oldest first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kind.core.diffusion import Diffusion
from kind.core.seeds import sample_seed
from kind.serve.cache import TailorCache
from kind.serve.draw import Settings, draw, padding

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A request's images and the batch that drew them."""

    images: torch.Tensor  # uint8 [n, C, H, W]
    batch: int  # batch number since start
    batch_samples: int  # samples of all requests in that batch
    batch_classes: int  # distinct classes in that batch
    seconds: float  # the batch's time, tailor loads included


@dataclass(eq=False)  # identity: two requests alike are still two requests
class Job:
    class_id: int
    group: int
    n: int
    seed: int
    settings: Settings
    future: asyncio.Future[Result]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Queue + one worker; `submit` returns a request's `Result` or raises what failed it (a
    `PartsError` when its tailor file cannot be loaded). Cancelling `submit` (its client went
    away) drops the request unless its batch is already running."""

    def __init__(
        self,
        cache: TailorCache,
        diffusion: Diffusion,
        max_batch: int = 64,
        max_wait_ms: float = 50.0,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.cache, self.diffusion, self.decode = cache, diffusion, decode
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._pending: list[Job] = []  # taken from the queue, not yet run, oldest first
        self._waiting: set[Job] = set()  # submitted, not yet in a batch, client still there
        self._running: list[Job] = []  # the batch on the worker thread
        self._task: asyncio.Task | None = None
        self.failure: str | None = None  # what stopped the worker, if anything did
        self.batches = self.samples = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work())
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drain()
        for job in self._running + self._pending:  # only at shutdown, after the server stopped
            job.future.cancel()  # taking requests; a batch still on the thread is not awaited

    def _ended(self, task: asyncio.Task) -> None:
        """The worker ends only when stopped; should a bug end it, every request waiting would
        hang: fail them, and later ones at once, with the cause (and /health says so)."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("the batcher stopped", exc_info=error)
        self.failure = (f"the server's batcher stopped ({type(error).__name__}: {error}); "
                        "restart the server (its log has the traceback)")  # fmt: skip
        self._drain()
        for job in self._running + self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError(self.failure))

    @property
    def queued(self) -> int:
        """Requests waiting for a batch; one whose client went away no longer counts, though
        the worker drops it only when it next looks."""
        return len(self._waiting)

    async def submit(self, class_id: int, n: int, seed: int, settings: Settings) -> Result:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        future = asyncio.get_running_loop().create_future()
        job = Job(class_id, self.cache.group_of(class_id), n, seed, settings, future)
        self._waiting.add(job)
        future.add_done_callback(lambda _: self._waiting.discard(job))
        self._queue.put_nowait(job)
        return await future

    async def _work(self) -> None:
        while True:
            self._drain()
            if not self._pending:
                self._pending.append(await self._queue.get())
                continue  # drain again: that request's client may already have gone
            deadline = self._pending[0].arrived + self.max_wait
            while self._pending and self._size(self._select()) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    self._pending.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
                self._drain()
            self._drain()
            batch = self._select()
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            self._waiting.difference_update(batch)
            self._running = batch
            await self._run(batch)
            self._running = []

    def _drain(self) -> None:
        """Move the queue into `_pending`, dropping requests whose client went away (`submit`
        cancelled): nobody would get their images, and they would hold others' batch room."""
        while not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        self._pending = [j for j in self._pending if not j.future.done()]

    def _select(self) -> list[Job]:
        """The next batch: the oldest request and the queued ones that may join it (none when
        nothing is pending)."""
        if not self._pending:
            return []
        first = self._pending[0]
        batch, samples, groups = [], 0, set()
        for job in self._pending:
            room = job.group in groups or len(groups) < self.cache.capacity
            if job.settings != first.settings or not room:
                continue
            size = self._forward_size(samples + job.n, len(groups | {job.group}), job.settings)
            if not batch or size <= self.max_batch:
                batch.append(job)
                samples += job.n
                groups.add(job.group)
        return batch

    def _size(self, batch: list[Job]) -> int:
        if not batch:
            return 0
        groups = len({j.group for j in batch})
        return self._forward_size(sum(j.n for j in batch), groups, batch[0].settings)

    def _forward_size(self, samples: int, groups: int, settings: Settings) -> int:
        """Samples a forward computes for `samples` requested ones of `groups` tailor groups:
        with the null samples `draw` pads them with (many classes need many to fold)."""
        guided = settings.cfg_scale != 1.0
        return samples + padding(self.cache.model, samples, groups, guided)

    async def _run(self, batch: list[Job]) -> None:
        if not batch:  # every request pending was cancelled
            return
        self.batches += 1
        number = self.batches
        try:
            outcomes = await asyncio.to_thread(self._forward, batch, number)
        except Exception as e:  # a bug, not a bad request: fail this batch, keep serving
            log.exception("batch %d failed", number)
            outcomes = [e] * len(batch)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _forward(self, batch: list[Job], number: int) -> list[Result | Exception]:
        """On the worker thread: pin the batch's tailors (loading missing ones), one mixed
        sampling run, unpin. Requests whose tailor fails to load get the error; the rest run."""
        start = time.perf_counter()
        groups = list(dict.fromkeys(j.group for j in batch))
        failed = self.cache.acquire(groups)
        ok = [j for j in batch if j.group not in failed]
        try:
            labels = [self.cache.slot_class(j.class_id) for j in ok for _ in range(j.n)]
            names = self.cache.full.class_names
            seeds = [sample_seed(j.seed, names[j.class_id], i) for j in ok for i in range(j.n)]
            settings, model = batch[0].settings, self.cache.model
            images = (
                draw(model, self.diffusion, labels, seeds, settings, self.decode) if ok else None
            )
        finally:
            self.cache.release([g for g in groups if g not in failed])
        seconds = time.perf_counter() - start
        self.samples += len(labels)
        classes = len({j.class_id for j in ok})
        log.info("batch %d: %d samples of %d classes in %.2f s", number, len(labels), classes,
                 seconds)  # fmt: skip
        outcomes: list[Result | Exception] = []
        offset = 0
        for job in batch:
            if job.group in failed:
                outcomes.append(failed[job.group])
                continue
            part = images[offset : offset + job.n]  # [n, C, H, W]
            offset += job.n
            outcomes.append(Result(part, number, len(labels), classes, seconds))
        return outcomes
