"""The precompute daemon: takes pairs from a work source, runs the model on them in batches,
and writes the embeddings to the store.

It runs on its own thread, never on the serving event loop. Per batch it drops pairs already
fresh in the store, groups the rest by user (so the model encodes each user's history once),
and writes the results with the model version and expiry. A batch that raises is split in
halves and each half tried again, down to single pairs; a pair that fails alone is a poison
pair: dropped and counted, never retried, and its batch-mates are still computed.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from solaris.precompute.features import UserWork
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.speculator import Pair
from solaris.server.errors import Unavailable
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import REDIS_ERRORS
from solaris.server.store import FLOAT32, Freshness, RowStatus, Store, UserItems, UserVectors

_POLL_SECONDS = 0.2
_PAUSE = 1.0
logger = logging.getLogger("solaris.precompute")


def _yield_cpu_to_serving() -> None:
    """Lowers this thread's CPU priority, so that when cores are short the serving threads
    in the same process run first. ONNX Runtime runs single-threaded batches on the calling
    thread, so the model's work is lowered with it. Linux only; elsewhere a no-op.

    Only the model's thread is lowered: the daemon's own thread holds the GIL (taking work,
    the embedded speculator's learning), and at idle priority it would be kept off a busy
    core while serving threads wait on that GIL, and wake late from every pause it takes."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        logger.info("could not lower the runner thread's priority")


class WorkSource(Protocol):
    """Where pairs to compute come from: the Prefetch queue, the embedded speculator, or the
    shared work stream."""

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]: ...

    def ack(self, tasks: list[PrefetchTask]) -> None:
        """Marks tasks done once their pairs are stored (or dropped as poison)."""

    def close(self) -> None: ...


class Model(Protocol):
    model_version: str

    def compute(self, work: Sequence[UserWork]) -> np.ndarray: ...


@dataclass
class DaemonStats:
    """Counters since start; read them for metrics."""

    pairs_computed: int = 0
    pairs_already_fresh: int = 0
    batches: int = 0
    failed_batches: int = 0
    poison_pairs_dropped: int = 0
    write_failures: int = 0
    source_errors: int = 0
    loop_errors: int = 0


class HistoryBook:
    """Each user's latest known history, for the users seen most recently: capped in bytes,
    the least recent user dropped first (and counted)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        """What the kept histories take, as `history_size` counts it."""
        self.evicted_users = 0
        self._histories: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._histories)

    def update(self, user_id: str, history: tuple[str, ...]) -> None:
        """Remembers `history`; an empty one keeps what was known. A history larger than the
        whole cap is not kept."""
        if history:
            self._forget(user_id)
            self._histories[user_id] = history
            self.nbytes += history_size(user_id, history)
        if user_id in self._histories:
            self._histories.move_to_end(user_id)
            while self.nbytes > self.max_bytes:
                self._forget(next(iter(self._histories)))
                self.evicted_users += 1

    def get(self, user_id: str) -> tuple[str, ...]:
        return self._histories.get(user_id, ())

    def _forget(self, user_id: str) -> None:
        history = self._histories.pop(user_id, None)
        if history is not None:
            self.nbytes -= history_size(user_id, history)


_HISTORY_ENTRY_BYTES = 120
"""A history's place in the book beside its strings: the dict entry and the tuple's header."""


def history_size(user_id: str, history: tuple[str, ...]) -> int:
    """The memory one user's history takes in a HistoryBook: its strings as Python objects,
    the tuple's pointers and the entry (measured: 256 ids of 256 bytes take about 85 KB)."""
    strings = sys.getsizeof(user_id) + sum(map(sys.getsizeof, history))
    return _HISTORY_ENTRY_BYTES + 8 * len(history) + strings


class _Stopped(Exception):
    """The daemon was stopped with a batch in hand: it is left for a retry, not computed."""


class PrecomputeDaemon:
    """Start it, and it fills the store from the work source until it is stopped."""

    def __init__(
        self,
        model: Model,
        store: Store,
        source: WorkSource,
        settings: PrecomputeSettings,
        ttl_seconds: float,
        stale_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is wall-clock seconds; the replay passes a simulated one."""
        self.clock = clock
        self.model = model
        self.store = store
        self.source = source
        self.settings = settings
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self.histories = HistoryBook(settings.history_bytes)
        self.stats = DaemonStats()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._model_thread: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._model_thread = ThreadPoolExecutor(
            1, thread_name_prefix="solaris-runner", initializer=_yield_cpu_to_serving
        )
        self._thread = threading.Thread(target=self._run, name="solaris-precompute", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes the batch in hand, then returns."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._model_thread is not None:
            self._model_thread.shutdown(wait=False)

    def _run(self) -> None:
        with asyncio.Runner() as loop:
            while not self._stopping.is_set():
                try:
                    tasks = self._gather()
                    stored = bool(tasks) and loop.run(self.process(tasks))
                    if stored:
                        self.source.ack(tasks)
                except REDIS_ERRORS as error:
                    self.stats.source_errors += 1
                    logger.warning("Redis unreachable (%r); retrying in %.0fs", error, _PAUSE)
                    self._stopping.wait(_PAUSE)
                except Exception:
                    # A bug must not silently stop the daemon. Unacknowledged tasks on the work
                    # stream are claimed again; those from the in-process queue are lost.
                    self.stats.loop_errors += 1
                    logger.exception("precompute loop failed; retrying in %.0fs", _PAUSE)
                    self._stopping.wait(_PAUSE)
            loop.run(self.store.close())
        self.source.close()

    def _gather(self) -> list[PrefetchTask]:
        """Tasks for one batch: as many per take as fit the batch_pairs left, judged by the
        largest task taken so far, until they hold batch_pairs pairs or batch_wait_ms has
        passed. So what a daemon holds stays about one batch (finished long before another
        daemon may claim it), in a round trip or two rather than one per task."""
        tasks = self.source.take(1, timeout=_POLL_SECONDS)
        end = time.monotonic() + self.settings.batch_wait_ms / 1000
        pairs = sum(len(t.item_ids) for t in tasks)
        while tasks and pairs < self.settings.batch_pairs and (left := end - time.monotonic()) > 0:
            largest = max(len(t.item_ids) for t in tasks)
            more = self.source.take(max(1, (self.settings.batch_pairs - pairs) // largest), left)
            if not more:
                break
            tasks.extend(more)
            pairs += sum(len(t.item_ids) for t in more)
        return tasks

    async def process(self, tasks: Sequence[PrefetchTask]) -> bool:
        """Computes and stores every pair in `tasks` not already fresh, batch by batch.
        Returns whether all were stored: if not, the tasks stay unacknowledged for a retry."""
        for task in tasks:
            self.histories.update(task.user_id, task.history)
        pairs = await self._stale_pairs(tasks)
        size = self.settings.batch_pairs
        stored = True
        for start in range(0, len(pairs), size):
            stored &= await self._compute_and_store(pairs[start : start + size])
        return stored

    async def _stale_pairs(self, tasks: Sequence[PrefetchTask]) -> list[Pair]:
        """The tasks' pairs not fresh in the store, read for every user at once."""
        items_by_user: dict[str, dict[str, None]] = {}
        for task in tasks:
            items_by_user.setdefault(task.user_id, {}).update(dict.fromkeys(task.item_ids))
        now = self.clock()
        wanted = [UserItems(user_id, list(items)) for user_id, items in items_by_user.items()]
        pairs: list[Pair] = []
        for (user_id, items), rows in zip(
            wanted, await self.store.read_many(wanted, FLOAT32, now), strict=True
        ):
            fresh = rows.statuses(now) == RowStatus.HIT
            self.stats.pairs_already_fresh += int(fresh.sum())
            pairs.extend(
                (user_id, item) for item, done in zip(items, fresh, strict=True) if not done
            )
        return pairs

    async def _compute_and_store(self, pairs: list[Pair]) -> bool:
        work = self._group_by_user(pairs)
        try:
            vectors = self._compute(work)
        except _Stopped:
            return False  # the tasks stay unacknowledged, for another daemon or a restart
        except Exception:
            return await self._retry_in_halves(pairs)
        freshness = Freshness.starting(
            self.model.model_version, self.clock(), self.ttl_seconds, self.stale_seconds
        )
        try:
            await self._store(work, vectors, freshness)
        except (Unavailable, *REDIS_ERRORS) as error:
            self.stats.write_failures += 1
            logger.warning("could not store %d pairs (%r); left for a retry", len(pairs), error)
            return False
        self.stats.batches += 1
        self.stats.pairs_computed += len(pairs)
        return True

    async def _store(self, work: list[UserWork], vectors: np.ndarray, freshness: Freshness) -> None:
        ends = np.cumsum([len(user_work.item_ids) for user_work in work])[:-1]
        batch = [
            UserVectors(user_work.user_id, user_work.item_ids, rows)
            for user_work, rows in zip(work, np.split(vectors, ends), strict=True)
        ]
        await self.store.write_many(batch, freshness)

    def _compute(self, work: list[UserWork]) -> np.ndarray:
        """The model's vectors for `work`, computed on the model's thread once started (never on
        this one then: only the model's thread runs at idle priority). Raises `_Stopped` once
        `stop` has shut that thread down."""
        runner = self._model_thread
        if runner is None:
            return self.model.compute(work)
        try:
            future = runner.submit(self.model.compute, work)
        except RuntimeError:  # shut down by stop()
            raise _Stopped from None
        return future.result()

    async def _retry_in_halves(self, pairs: list[Pair]) -> bool:
        self.stats.failed_batches += 1
        if len(pairs) == 1:
            self.stats.poison_pairs_dropped += 1
            logger.exception("dropping poison pair %s: the model fails on it alone", pairs[0])
            return True
        logger.warning("a batch of %d pairs failed; retrying it in halves", len(pairs))
        middle = len(pairs) // 2
        first = await self._compute_and_store(pairs[:middle])
        second = await self._compute_and_store(pairs[middle:])
        return first and second

    def _group_by_user(self, pairs: list[Pair]) -> list[UserWork]:
        items_by_user: dict[str, list[str]] = {}
        for user_id, item_id in pairs:
            items_by_user.setdefault(user_id, []).append(item_id)
        return [
            UserWork(user_id, self.histories.get(user_id), tuple(items))
            for user_id, items in items_by_user.items()
        ]
