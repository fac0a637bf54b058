"""One speculator for every pod. With Redis, each sidecar ships the reads it answers to the
request stream; whichever daemon holds the speculator lease reads that stream, speculates
over all of it, and adds the pairs it chooses to the shared work stream, where every daemon
takes work. One speculator, not one per daemon: its budget is the fleet's, and no two
speculators choose the same pair.

The lease is a Redis key with an expiry that its holder renews; when the holder stops or
dies, another daemon takes it once it expires and starts learning afresh from new reads.
Prefetch work keeps going straight to the work stream (the ranker's own word needs no
guessing); the speculator adds work only while the daemons have little waiting, so it fills
their idle capacity and keeps at most about `max_waiting_tasks` ahead of new Prefetch work.
It also reads the Prefetch tasks going by, for their users' histories: the tasks it adds carry
the latest one, so whichever daemon takes them computes with it.
"""

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis
import redis.exceptions

from solaris.precompute.daemon import HistoryBook
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.speculator import SpeculationSettings, Speculator
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import (
    DAEMON_REDIS_TIMEOUT_SECONDS,
    connect_blocking,
    read_stale_at,
)
from solaris.server.request_stream import REQUEST_STREAM_KEY, decode_request
from solaris.server.settings import ServeSettings
from solaris.server.tiered import REDIS_ERRORS
from solaris.server.work_stream import GROUP, STREAM_KEY, decode_task, encode_task

LEASE_KEY = "solaris:speculator"
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
_READ_AT_MOST = 200
"""Entries read per stream per round: a round (and so the lease's renewal) stays short."""
_READ_BLOCK_MS = 100
_PAUSE_SECONDS = 1.0
logger = logging.getLogger("solaris.precompute")


class Lease:
    """Held by one holder at a time, for `seconds` after its last renewal."""

    def __init__(self, client: redis.Redis, seconds: float) -> None:
        self.client = client
        self.ms = int(seconds * 1000)
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Takes the lease if free, renews it if ours; False if another holds it."""
        if self.client.set(LEASE_KEY, self.holder, nx=True, px=self.ms):
            return True
        return bool(self._renew(keys=[LEASE_KEY], args=[self.holder, self.ms]))

    def release(self) -> None:
        self._release(keys=[LEASE_KEY], args=[self.holder])


@dataclass
class SharedSpeculationStats:
    leading: bool = False
    requests_read: int = 0
    tasks_added: int = 0
    pairs_added: int = 0
    waits_for_backlog: int = 0
    malformed_reads: int = 0
    redis_errors: int = 0


class SharedSpeculation:
    """Runs on its own thread: `start()`, then `stop()`."""

    def __init__(
        self,
        client: redis.Redis,
        settings: SpeculationSettings,
        dim: int,
        model_version: str,
        lease_seconds: float = 10.0,
        max_waiting_tasks: int = 200,
        work_stream_length: int = 1_000_000,
        history_users: int = 100_000,
    ) -> None:
        """`max_waiting_tasks`: work entries no daemon has taken yet above which the
        speculator adds none."""
        self.client = client
        self.settings = settings
        self.dim = dim
        self.model_version = model_version
        self.lease = Lease(client, lease_seconds)
        self.max_waiting_tasks = max_waiting_tasks
        self.work_stream_length = work_stream_length
        self.stats = SharedSpeculationStats()
        self._speculator: Speculator | None = None
        self._histories = HistoryBook(history_users)
        self._cursors = {REQUEST_STREAM_KEY: "0-0", STREAM_KEY: "0-0"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="solaris-speculator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.stats.leading:
            with contextlib.suppress(*REDIS_ERRORS):  # if not released, it expires
                self.lease.release()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except REDIS_ERRORS as error:
                # What it learnt stays: if the lease is still ours once Redis answers, it goes on.
                self.stats.redis_errors += 1
                logger.warning("speculator: Redis error (%r); trying again", error)
                self._stop.wait(_PAUSE_SECONDS)
            except Exception:
                self._lose_lead()
                logger.exception("speculator: unexpected error; starting afresh")
                self._stop.wait(_PAUSE_SECONDS)

    def _step(self) -> None:
        if not self.lease.hold():
            self._lose_lead()
            self._stop.wait(self.lease.ms / 3000)
            return
        if self._speculator is None:
            self._take_lead()
        self._read_streams()
        if self._waiting_tasks() >= self.max_waiting_tasks:
            self.stats.waits_for_backlog += 1
            return
        self._add_work()

    def _take_lead(self) -> None:
        """Starts from the newest entries: older ones are served already or out of date."""
        self._speculator = Speculator(self.settings, self._fresh_until)
        for key in self._cursors:
            newest = self.client.xrevrange(key, count=1)
            self._cursors[key] = newest[0][0].decode() if newest else "0-0"
        self.stats.leading = True
        logger.info("speculating for every sidecar (lease %s)", self.lease.holder)

    def _lose_lead(self) -> None:
        if self.stats.leading:
            logger.info("no longer the speculator")
        self._speculator = None
        self.stats.leading = False

    def _read_streams(self) -> None:
        """New reads to learn from, and new Prefetch tasks for their histories."""
        assert self._speculator is not None
        answer = self.client.xread(self._cursors, count=_READ_AT_MOST, block=_READ_BLOCK_MS)
        for key, entries in answer or []:
            stream = key.decode()
            for entry_id, fields in entries:
                self._cursors[stream] = entry_id.decode()
                if stream == REQUEST_STREAM_KEY:
                    self._learn_read(fields)
                else:
                    self._learn_history(entry_id.decode(), fields)

    def _learn_read(self, fields: dict[bytes, bytes]) -> None:
        assert self._speculator is not None
        request = decode_request(fields)
        if request is None:
            self.stats.malformed_reads += 1
            return
        self._speculator.observe(request)
        self.stats.requests_read += 1

    def _learn_history(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        task = decode_task(entry_id, fields)
        if task is not None and task.history:
            self._histories.update(task.user_id, task.history)

    def _waiting_tasks(self) -> int:
        """Entries of the work stream no daemon has read yet. With no daemon in the group
        (none started yet, or Redis restarted empty) nothing would take work: counted as full."""
        try:
            groups = self.client.xinfo_groups(STREAM_KEY)
        except redis.exceptions.ResponseError:
            return self.max_waiting_tasks  # no work stream yet
        group = next((g for g in groups if g["name"] == GROUP.encode()), None)
        if group is None:
            return self.max_waiting_tasks
        if group.get("lag") is not None:
            return int(group["lag"])
        # Redis leaves lag unknown after some trims and deletions: count the entries instead.
        after = b"(" + group["last-delivered-id"]
        return len(self.client.xrange(STREAM_KEY, after, "+", count=self.max_waiting_tasks))

    def _add_work(self) -> None:
        assert self._speculator is not None
        chosen = self._speculator.take()
        by_user: dict[str, list[str]] = {}
        for entry in chosen:
            by_user.setdefault(entry.user_id, []).append(entry.item_id)
        if not by_user:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for user_id, items in by_user.items():
                history = self._histories.get(user_id)
                task = encode_task(PrefetchTask(user_id, tuple(items), history))
                pipe.xadd(STREAM_KEY, task, maxlen=self.work_stream_length, approximate=True)
            pipe.execute()
        self.stats.tasks_added += len(by_user)
        self.stats.pairs_added += len(chosen)

    def _fresh_until(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        return read_stale_at(self.client, self.dim, self.model_version, user_id, item_ids)


def shared_speculation(
    settings: ServeSettings, precompute: PrecomputeSettings, model_version: str
) -> SharedSpeculation | None:
    """The candidate for the one speculator over every sidecar's reads (None with speculation
    off); it speculates only while it holds the lease."""
    if not precompute.policies:
        return None
    return SharedSpeculation(
        connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS),
        precompute.speculation_settings(),
        settings.dim,
        model_version,
        work_stream_length=settings.work_stream_length,
        history_users=precompute.history_users,
    )
