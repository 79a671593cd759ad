"""The tailor cache of `kind-dit serve`: one KIND model in memory whose tailor bank rows are cache
slots, filled from a parts directory on first use and recycled least-recently-used first.

Why a bank of slots rather than one model per class: the DiT keeps every tailor in one
`TailorBank` parameter `rows` [G, N] and picks each sample's row by its class (the class gate), so
a model whose G rows are *slots* serves any K classes of the parts directory in one mixed forward;
loading a tailor is writing one row (and its classes' label rows), with the learngene held once.

The slot model is an ordinary `DiT` built from the parts' config with K placeholder classes per
slot ("slot k.j": the j-th class of the group in slot k), so the model's own routing, checks and
guidance (the null class on the learngene alone, or on the null tailor, kept in a row of its own)
work unchanged; this cache maps the parts' class ids to slot classes. Every part file is checked
against the manifest's sha256 when it is read (`kind.store.parts.read_part`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kind.core.decomposition import PartsError
from kind.core.model import SIZES, DiT, ModelConfig, parse_size
from kind.io import sha256_file
from kind.store.parts import MANIFEST, load_learngene, read_manifest, read_part

log = logging.getLogger(__name__)

MIB = 1 << 20


def slot_config(full: ModelConfig, capacity: int, per_group: int) -> ModelConfig:
    """The config of a KIND DiT with `capacity` tailor groups as cache slots: the architecture of
    `full`, with `per_group` placeholder classes a slot (slot class k·per_group + j is the j-th
    class of the group in slot k). With a null tailor, bank row `capacity` holds it."""
    names = [f"slot {k}.{j}" for k in range(capacity) for j in range(per_group)]
    tau = [k for k in range(capacity) for _ in range(per_group)]
    return replace(full, class_names=names, class_to_group=tau, groups=None)


@dataclass
class CacheStats:
    """Counters since start (a hit or a miss is one group acquired for one batch)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0  # total time spent reading (and sha256-checking) tailor files
    last_load_seconds: float | None = None
    last_error: str | None = None


class TailorCache:
    """The slot model and which tailor group each slot holds, least recently used first.

    `acquire(groups)` pins the slots of a batch's groups, loading the missing ones; `release`
    unpins them after the forward. Only an unpinned slot is ever evicted, so a tailor a batch in
    flight uses stays in place. Mutations happen on the batcher's worker thread; the lock keeps
    `stats()` (read from the event loop) consistent and is never held while a file is read.
    """

    def __init__(
        self,
        parts: str | Path,
        capacity: int | None = None,
        budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.parts = Path(parts)
        self.manifest = read_manifest(self.parts)
        self.manifest_sha256 = sha256_file(self.parts / MANIFEST)  # to tell a swapped directory
        self.full = ModelConfig.from_dict(self.manifest["model"])
        self.classes = {c["id"]: c for c in self.manifest["classes"]}  # id -> {id, name, group}
        groups = sorted({c["group"] for c in self.classes.values()})
        # the classes of each group, in id order: slot class k·per_group + j is classes_of[g][j]
        self.classes_of = {g: sorted(c for c, e in self.classes.items() if e["group"] == g)
                           for g in groups}  # fmt: skip
        self.per_group = max((len(v) for v in self.classes_of.values()), default=1)
        self.slot_bytes = self._slot_bytes(groups)
        self.capacity = self._capacity(len(groups), capacity, budget_bytes)
        self.device = torch.device(device)
        self.model = self._build()
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # group -> slot, LRU first
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() gives slot 0 first
        self._pins = [0] * self.capacity
        self._hits = [0] * self.capacity
        self._lock = threading.Lock()
        self.counters = CacheStats()

    # ---- construction ----

    def _slot_bytes(self, groups: list[int]) -> int:
        """Bytes one slot takes in memory: a bank row (a group's factors in every gated layer)
        plus `per_group` label rows, in fp32. From the manifest: a tailor file's parameters are
        its factors plus its classes' label rows."""
        # a damaged manifest may lack some groups' entries: size the slot from one it lists
        listed = [g for g in groups if str(g) in self.manifest["tailors"]]
        if not listed:
            raise PartsError(f"{self.parts} holds no class tailors: there is nothing to serve")
        hidden = SIZES[parse_size(self.full.size)[0]][1]
        g = listed[0]
        row = self.manifest["tailors"][str(g)]["params"] - len(self.classes_of[g]) * hidden
        return (row + self.per_group * hidden) * torch.empty((), dtype=torch.float32).element_size()

    def _capacity(self, groups: int, capacity: int | None, budget_bytes: int | None) -> int:
        """K slots: the count asked for, or as many as fit the memory budget; never more than
        the parts hold."""
        if capacity is None:
            capacity = int(budget_bytes // self.slot_bytes) if budget_bytes is not None else groups
            if capacity < 1:
                raise ValueError(
                    f"a cache of {budget_bytes / MIB:.3g} MiB holds no tailor: one takes "
                    f"{self.slot_bytes / MIB:.3g} MiB; give --cache-mb at least that"
                )
        if capacity < 1:
            raise ValueError(f"the cache needs at least one tailor slot, got {capacity}")
        return min(capacity, groups)

    def _build(self) -> DiT:
        """The slot model: the learngene from the parts (verified), empty slots, and the null
        tailor (if the model has one) in the row after the slots, where it stays."""
        model = DiT(slot_config(self.full, self.capacity, self.per_group))
        with torch.no_grad():  # an empty slot holds nothing, not a random tailor
            model.y_embedder.table.zero_()
            if model.tailors is not None:  # None: tailor rank 0, label rows only
                model.tailors.rows.zero_()
        load_learngene(model, self.parts)
        if self.full.null_group is not None and model.tailors is not None:  # rank 0: holds nothing
            g = self.full.null_group
            state = read_part(self.parts, self.manifest["tailors"][str(g)], str(g))
            with torch.no_grad():
                model.tailors.rows[self.capacity] = model.tailor_row(state, g)
        return model.eval().requires_grad_(False).to(self.device)

    # ---- the cache ----

    def group_of(self, class_id: int) -> int:
        return self.classes[class_id]["group"]

    def slot_class(self, class_id: int) -> int:
        """The slot model's class id for class `class_id` (its group must be acquired)."""
        g = self.group_of(class_id)
        return self._slot_of[g] * self.per_group + self.classes_of[g].index(class_id)

    def acquire(self, groups: list[int]) -> dict[int, PartsError]:
        """Pin a slot for each of `groups` (at most `capacity`), loading the tailors not in the
        cache; returns the groups that could not be loaded, with the error (those get no slot and
        need no release). Any failure, a damaged file or a bug or an out-of-memory error alike,
        is that group's alone: its batch-mates still run and no slot stays pinned or lost."""
        if len(set(groups)) > self.capacity:
            raise ValueError(
                f"{len(set(groups))} groups in one batch; the cache holds {self.capacity}"
            )
        failed = {}
        for g in groups:
            try:
                self._pin(g)
            except Exception as e:
                failed[g] = self._load_error(g, e)
        return failed

    def _load_error(self, group: int, error: Exception) -> PartsError:
        """The error a group's requests get when its tailor fails to load (it names the classes
        and the cause), counted and logged; an unexpected exception is logged with its traceback."""
        names = [self.classes[c]["name"] for c in self.classes_of[group]]
        expected = isinstance(error, PartsError | ValueError | OSError)
        cause = str(error) if expected else f"{type(error).__name__}: {error}"
        message = f"the tailor of class(es) {names} could not be loaded: {cause}"
        with self._lock:
            self.counters.load_errors += 1
            self.counters.last_error = message
        log.error(message, exc_info=None if expected else error)
        return PartsError(message)

    def release(self, groups: list[int]) -> None:
        with self._lock:
            for g in groups:
                self._pins[self._slot_of[g]] -= 1

    def _pin(self, group: int) -> None:
        with self._lock:
            if group in self._slot_of:
                slot = self._slot_of[group]
                self._slot_of.move_to_end(group)
                self._pins[slot] += 1
                self._hits[slot] += 1
                self.counters.hits += 1
                return
            self.counters.misses += 1
        row, labels = self._read(group)  # outside the lock: disk and sha256
        with self._lock:
            slot = self._free_slot()
            try:
                self._write(slot, row, labels)
            except BaseException:
                self._free.append(slot)  # a slot half written holds nothing: free again
                raise
            self._slot_of[group] = slot
            self._pins[slot], self._hits[slot] = 1, 0

    def _read(self, group: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """A group's bank row [N] and its classes' label rows [hidden] from its tailor file,
        checked against the manifest; PartsError naming what is missing."""
        start = time.perf_counter()
        entry = self.manifest["tailors"].get(str(group))
        if entry is None:
            raise PartsError(
                f"{self.parts / MANIFEST} lists no tailor file for group {group}; the parts "
                "directory is incomplete: write it again with kind-dit decompose"
            )
        try:
            state = read_part(self.parts, entry, str(group))
        except PartsError as e:
            manifest = self.parts / MANIFEST
            if not manifest.is_file() or sha256_file(manifest) != self.manifest_sha256:
                raise PartsError(
                    f"{self.parts} changed since the server started (its manifest differs), so "
                    "its tailors no longer fit the learngene served; restart kind-dit serve"
                ) from e
            raise
        try:
            row = self.model.tailor_row(state, group) if self.model.tailors is not None else None
            labels = [state[f"y_embedder.rows.{c}"] for c in self.classes_of[group]]
        except KeyError as e:
            raise PartsError(f"{entry['file']} lacks {e.args[0]!r}") from None
        took = time.perf_counter() - start
        with self._lock:
            self.counters.load_seconds += took
            self.counters.last_load_seconds = took
        return row, labels

    def _free_slot(self) -> int:
        """A free slot, else the least recently used unpinned one (evicted); call with the lock."""
        if self._free:
            return self._free.pop()
        for group, slot in self._slot_of.items():  # least recently used first
            if not self._pins[slot]:
                del self._slot_of[group]
                self.counters.evictions += 1
                log.debug("evicted tailor group %d from slot %d", group, slot)
                return slot
        raise RuntimeError("every cache slot is in use by the batch in flight")  # see acquire

    @torch.no_grad()
    def _write(self, slot: int, row: torch.Tensor | None, labels: list[torch.Tensor]) -> None:
        """A group's bank row into row `slot`, its classes' label rows into the slot's classes."""
        if row is not None:
            self.model.tailors.rows[slot] = row.to(self.device)
        table, row_of = self.model.y_embedder.table, self.model.y_embedder.host_row_of
        for j, label in enumerate(labels):
            table[row_of[slot * self.per_group + j]] = label.to(self.device)

    def stats(self) -> dict:
        """What GET /cache reports: the loaded tailors (least recently used first) and counters."""
        with self._lock:
            loaded = [
                {
                    "group": g,
                    "classes": [self.classes[c]["name"] for c in self.classes_of[g]],
                    "slot": s,
                    "hits": self._hits[s],
                    "in_use": self._pins[s] > 0,
                }
                for g, s in self._slot_of.items()
            ]
            counters = dict(vars(self.counters))
        return {
            "capacity": self.capacity,
            "loaded": loaded,
            "bytes": len(loaded) * self.slot_bytes,
            "capacity_bytes": self.capacity * self.slot_bytes,
            "slot_bytes": self.slot_bytes,
            **counters,
        }
