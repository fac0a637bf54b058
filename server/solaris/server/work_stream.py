"""The shared work queue on a Redis Stream with one consumer group.

Sidecars XADD Prefetch work (capped with MAXLEN ~); daemons XREADGROUP it, acknowledge each
entry only after its pairs are written, and claim entries a dead daemon left pending
(XAUTOCLAIM after `claim_idle_seconds`). An entry is read by one consumer at a time, so two
daemons do not compute the same task; the store's freshness check drops the rest. The stream
is first come, first served: Prefetch priority orders only the in-process queue.
"""

import json
import logging
import time
from dataclasses import replace

import redis
import redis.asyncio
import redis.exceptions

from solaris.server.errors import Unavailable
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import REDIS_ERRORS, Reachability, within
from solaris.server.redis_store import MODEL_VERSION_KEY
from solaris.server.redis_streams import (
    Entry,
    StreamFields,
    autoclaimed,
    process_name,
    stream_entries,
)

_PUBLISH_EVERY_SECONDS = 5.0
STREAM_KEY = "solaris:work"
GROUP = "solaris-precompute"
logger = logging.getLogger("solaris.redis")


def encode_task(task: PrefetchTask) -> StreamFields:
    return {"task": json.dumps([task.user_id, task.item_ids, task.history, task.priority])}


def decode_task(entry_id: str, fields: dict[bytes, bytes]) -> PrefetchTask | None:
    """The task in a stream entry, or None for an entry that is not one of ours."""
    try:
        user_id, items, history, priority = json.loads(fields[b"task"])
        task = PrefetchTask(user_id, tuple(items), tuple(history), int(priority))
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(user_id, str) or not all(isinstance(i, str) and i for i in task.item_ids):
        return None
    return replace(task, receipt=entry_id)


class StreamWorkQueue:
    """The sidecar's side: adds Prefetch tasks to the stream."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        max_length: int,
        timeout_seconds: float,
        reachability: Reachability | None = None,
    ) -> None:
        self.client = client
        self.max_length = max_length
        self.timeout_seconds = timeout_seconds
        self.reachability = reachability or Reachability()

    async def submit(self, task: PrefetchTask) -> None:
        """Adds `task`, or raises Unavailable when Redis did not take it within the timeout
        (it may still: an XADD past its budget runs on, and a task twice is computed once)."""
        adding = self.client.xadd(
            STREAM_KEY, encode_task(task), maxlen=self.max_length, approximate=True
        )
        try:
            await within(adding, self.timeout_seconds, self.reachability)
        except REDIS_ERRORS as error:
            raise Unavailable(f"work queue: Redis unreachable ({error!r})") from error


class StreamWorkSource:
    """The daemon's side: reads tasks as one consumer of the group, blocking in its thread."""

    def __init__(self, client: redis.Redis, claim_idle_seconds: float, model_version: str) -> None:
        self.client = client
        self.model_version = model_version
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.consumer = process_name()
        self.claimed = 0
        self.malformed = 0
        self._group_ready = False
        self._claim_cursor = "0-0"
        self._version_published_at = -float("inf")

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]:
        """Entries left pending by a dead consumer first, then new ones (waiting `timeout`)."""
        self._join()
        try:
            found = self._claim_abandoned(max_tasks) or self._read_new(max_tasks, timeout)
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" in str(error):
                self._group_ready = False  # Redis restarted empty: join again next time
            raise
        return self._decode(found)

    def close(self) -> None:
        self.client.close()

    def ack(self, tasks: list[PrefetchTask]) -> None:
        receipts = [task.receipt for task in tasks if task.receipt]
        if receipts:
            self.client.xack(STREAM_KEY, GROUP, *receipts)

    def _join(self) -> None:
        """Makes the consumer group (once, or again after Redis lost it) and publishes our
        model version every few seconds, so that sidecars find it even after Redis restarted
        empty. Lazily, so that a daemon started while Redis is down joins once it is up."""
        now = time.monotonic()
        if now - self._version_published_at >= _PUBLISH_EVERY_SECONDS:
            self.client.set(MODEL_VERSION_KEY, self.model_version)
            self._version_published_at = now
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(STREAM_KEY, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def _read_new(self, max_tasks: int, timeout: float | None) -> list[Entry]:
        block_ms = max(1, int((timeout or 0) * 1000))
        answer = self.client.xreadgroup(
            GROUP, self.consumer, {STREAM_KEY: ">"}, count=max_tasks, block=block_ms
        )
        return [entry for _, news in stream_entries(answer) for entry in news]

    def _claim_abandoned(self, max_tasks: int) -> list[Entry]:
        self._claim_cursor, claimed = autoclaimed(
            self.client.xautoclaim(
                STREAM_KEY,
                GROUP,
                self.consumer,
                self.claim_idle_ms,
                self._claim_cursor,
                count=max_tasks,
            )
        )
        if claimed:
            self.claimed += len(claimed)
            logger.warning("claimed %d tasks left pending by a stopped daemon", len(claimed))
        return claimed

    def _decode(self, found: list[Entry]) -> list[PrefetchTask]:
        tasks: list[PrefetchTask] = []
        malformed: list[bytes] = []
        for entry_id, fields in found:
            task = decode_task(entry_id.decode(), fields)
            if task is None:
                malformed.append(entry_id)
            else:
                tasks.append(task)
        if malformed:
            self.malformed += len(malformed)
            logger.warning("dropping %d malformed work entries", len(malformed))
            self.client.xack(STREAM_KEY, GROUP, *malformed)
        return tasks
