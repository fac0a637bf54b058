"""The shared work queue on a Redis Stream with one consumer group (on each of its shards).

Sidecars (and the shared speculator) XADD Prefetch work; daemons XREADGROUP it, acknowledge each
entry only after its pairs are written, and claim entries a dead daemon left pending
(XAUTOCLAIM after `claim_idle_seconds`). An entry is read by one consumer of a group at a time,
so two daemons do not compute the same task; the store's freshness check drops the rest. Each
model version's daemons are a group of their own (`work_group`): during a rollout every task
reaches a daemon of each version, which computes the pairs not fresh under its own. The stream
is first come, first served: Prefetch priority orders only the in-process queue.

Bounded in bytes: an entry holds at most `work_entry_bytes` (a larger task goes in several,
each a task of its own with a share of the items; its history cut, where it must be, to the
most recent items that fit half an entry: the model reads only the most recent anyway), and
the stream keeps `work_stream_length(budget)` entries (`MAXLEN ~`); sharded, each shard keeps
its share of the budget. A task goes to its user's shard (see `solaris.server.redis_streams`).
"""

import json
import logging
import time
from dataclasses import replace

import redis.exceptions

from solaris.server.errors import Unavailable
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import LOST as REDIS_LOST
from solaris.server.reachability import REDIS_ERRORS, Reachability, within
from solaris.server.redis_store import AsyncClient, BlockingClient
from solaris.server.redis_streams import (
    Entry,
    StreamFields,
    autoclaimed,
    process_name,
    shard_keys,
    shard_of,
    stream_entries,
)
from solaris.server.rollout import announce

_PUBLISH_EVERY_SECONDS = 5.0
MAX_TASK_ITEMS = 128
"""The most pairs in one entry, so that a daemon takes a batch's worth of tasks in one read and
holds about one batch (256 pairs by default) at a time, whatever the size of a Prefetch."""
STREAM_KEY = "solaris:work"
GROUP = "solaris-precompute"
"""What each version's consumer group is named after (`work_group`)."""
logger = logging.getLogger("solaris.redis")


_NODE_BYTES = 16 * 1024
_REDIS_ENTRY_OVERHEAD = 64 + 512
"""Redis's bytes beside an entry's value: in its stream node, and the stream's index (as
measured for the request stream)."""
_ESCAPED = 6
"""The most JSON bytes per byte of an id (a control character is written `\\u001f`)."""


def work_entry_bytes(max_id_bytes: int) -> int:
    """The most bytes one entry's value holds: 16 KiB less Redis's overhead, or the next power
    of two where a user and one item at `max_id_bytes`, escaped, would not fit in half that."""
    node = _NODE_BYTES
    while (node - 64) // 2 < 2 * _ESCAPED * max_id_bytes + 64:
        node *= 2
    return node - 64


def work_stream_length(budget_bytes: int, max_id_bytes: int) -> int:
    """The MAXLEN that keeps the work stream within `budget_bytes` of Redis memory when every
    entry is as large as it may be; two kept back for `MAXLEN ~`, which trims whole nodes."""
    return budget_bytes // (work_entry_bytes(max_id_bytes) + _REDIS_ENTRY_OVERHEAD) - 2


def work_group(model_version: str) -> str:
    """The consumer group of the daemons computing `model_version`."""
    return f"{GROUP}:{model_version}"


def least_work_budget(max_id_bytes: int) -> int:
    """The smallest budget that keeps one entry."""
    return 3 * (work_entry_bytes(max_id_bytes) + _REDIS_ENTRY_OVERHEAD)


def encode_task(task: PrefetchTask) -> StreamFields:
    """One entry holding all of `task`, whatever its size (`encode_tasks` keeps to a bound)."""
    return {"task": _encoded(task)}


def encode_tasks(task: PrefetchTask, max_bytes: int) -> list[StreamFields]:
    """The entries for `task`, each at most `max_bytes` (`work_entry_bytes`) and
    `MAX_TASK_ITEMS` items: one, unless the task is larger; then parts of its items, each with
    the history's most recent items that fit half an entry."""
    whole = _encoded(task)
    if len(whole) <= max_bytes and len(task.item_ids) <= MAX_TASK_ITEMS:
        return [{"task": whole}]
    history = _recent_fitting(task.user_id, task.history, max_bytes // 2)
    base = len(_encoded(PrefetchTask(task.user_id, (), history, task.priority)))
    entries: list[StreamFields] = []
    start, used = 0, base
    for index, size in enumerate(map(_json_bytes, task.item_ids)):
        if index > start and (used + size > max_bytes or index - start == MAX_TASK_ITEMS):
            entries.append(_part(task, start, index, history))
            start, used = index, base
        used += size
    entries.append(_part(task, start, len(task.item_ids), history))
    return entries


def _part(task: PrefetchTask, start: int, end: int, history: tuple[str, ...]) -> StreamFields:
    part = PrefetchTask(task.user_id, task.item_ids[start:end], history, task.priority)
    return {"task": _encoded(part)}


def _recent_fitting(user_id: str, history: tuple[str, ...], room: int) -> tuple[str, ...]:
    used = _json_bytes(user_id) + 16
    kept = 0
    for item in reversed(history):
        used += _json_bytes(item)
        if used > room:
            break
        kept += 1
    return history[len(history) - kept :]


def _json_bytes(text: str) -> int:
    """An id's bytes in a task's JSON, with the comma after it."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 1


def _encoded(task: PrefetchTask) -> bytes:
    fields = [task.user_id, task.item_ids, task.history, task.priority]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


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
    """The sidecar's side: adds Prefetch tasks to the stream (a user's to the user's shard)."""

    def __init__(
        self,
        client: AsyncClient,
        budget_bytes: int,
        max_id_bytes: int,
        timeout_seconds: float,
        reachability: Reachability | None = None,
        shards: int = 1,
    ) -> None:
        """`budget_bytes` is the whole stream's: each of `shards` keys keeps its share."""
        self.client = client
        self.keys = shard_keys(STREAM_KEY, shards)
        self.max_length = work_stream_length(budget_bytes // shards, max_id_bytes)
        self.entry_bytes = work_entry_bytes(max_id_bytes)
        self.timeout_seconds = timeout_seconds
        self.reachability = reachability or Reachability()

    async def submit(self, task: PrefetchTask) -> None:
        """Adds `task`, or raises Unavailable when Redis did not take it within the timeout
        (it may still: an XADD past its budget runs on, and a task twice is computed once)."""
        key = self.keys[shard_of(task.user_id, len(self.keys))]
        pipe = self.client.pipeline(transaction=False)
        for entry in encode_tasks(task, self.entry_bytes):
            pipe.xadd(key, entry, maxlen=self.max_length, approximate=True)
        try:
            await within(pipe.execute(), self.timeout_seconds, self.reachability)
        except REDIS_ERRORS as error:
            if isinstance(error, TimeoutError) and not isinstance(error, REDIS_LOST):
                raise Unavailable(f"work queue: {error}") from error
            raise Unavailable(f"work queue: Redis unreachable ({error!r})") from error


_SHARDED_BLOCK_MS = 100
"""Longest a daemon waits on one shard while others may get work: how late it may see it."""


class StreamWorkSource:
    """The daemon's side: reads tasks as one consumer of the group of each shard, blocking in
    its thread. Each take looks at the shards in turn from the next one, so that none waits
    behind another; a receipt names the shard its entry came from."""

    def __init__(
        self, client: BlockingClient, claim_idle_seconds: float, model_version: str, shards: int = 1
    ) -> None:
        self.client = client
        self.keys = shard_keys(STREAM_KEY, shards)
        self.model_version = model_version
        self.group = work_group(model_version)
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.consumer = process_name()
        self.claimed = 0
        self.malformed = 0
        self._group_ready = False
        self._claim_cursors = dict.fromkeys(self.keys, "0-0")
        self._turn = 0
        self._version_published_at = -float("inf")

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]:
        """Entries left pending by a dead consumer first (one shard a take, in turn), then new
        ones (waiting `timeout`)."""
        self._join()
        self._turn = (self._turn + 1) % len(self.keys)
        order = self.keys[self._turn :] + self.keys[: self._turn]
        try:
            found = self._claim_abandoned(order[0], max_tasks) or self._read_new(
                order, max_tasks, timeout
            )
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" in str(error):
                self._group_ready = False  # Redis restarted empty: join again next time
            raise
        return self._decode(found)

    def close(self) -> None:
        self.client.close()

    def ack(self, tasks: list[PrefetchTask]) -> None:
        by_key: dict[str, list[str]] = {}
        for task in tasks:
            if task.receipt:
                key, _, entry_id = task.receipt.rpartition(" ")
                by_key.setdefault(key or self.keys[0], []).append(entry_id)
        for key, receipts in by_key.items():
            self.client.xack(key, self.group, *receipts)

    def _join(self) -> None:
        """Makes the consumer groups (once, or again after Redis lost one) and announces our
        model version every few seconds, so that sidecars find it even after Redis restarted
        empty. Lazily, so that a daemon started while Redis is down joins once it is up."""
        now = time.monotonic()
        if now - self._version_published_at >= _PUBLISH_EVERY_SECONDS:
            announce(self.client, self.model_version)
            self._version_published_at = now
        if self._group_ready:
            return
        for key in self.keys:
            try:
                self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self._group_ready = True

    def _read_new(
        self, order: tuple[str, ...], max_tasks: int, timeout: float | None
    ) -> list[tuple[str, Entry]]:
        """New entries of the first shard in `order` that has some: each shard but the last
        looked at without waiting (on a cluster the shards are on different nodes, which one
        blocking read cannot wait on together), then the last waited on."""
        for key in order[:-1]:
            if found := self._read_shard(key, max_tasks, None):
                return found
        block_ms = max(1, int((timeout or 0) * 1000))
        if len(order) > 1:
            block_ms = min(block_ms, _SHARDED_BLOCK_MS)
        return self._read_shard(order[-1], max_tasks, block_ms)

    def _read_shard(
        self, key: str, max_tasks: int, block_ms: int | None
    ) -> list[tuple[str, Entry]]:
        answer = self.client.xreadgroup(
            self.group, self.consumer, {key: ">"}, count=max_tasks, block=block_ms
        )
        return [(key, entry) for _, news in stream_entries(answer) for entry in news]

    def _claim_abandoned(self, key: str, max_tasks: int) -> list[tuple[str, Entry]]:
        self._claim_cursors[key], claimed = autoclaimed(
            self.client.xautoclaim(
                key,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                self._claim_cursors[key],
                count=max_tasks,
            )
        )
        if claimed:
            self.claimed += len(claimed)
            logger.warning("claimed %d tasks left pending by a stopped daemon", len(claimed))
        return [(key, entry) for entry in claimed]

    def _decode(self, found: list[tuple[str, Entry]]) -> list[PrefetchTask]:
        tasks: list[PrefetchTask] = []
        malformed: dict[str, list[bytes]] = {}
        for key, (entry_id, fields) in found:
            receipt = entry_id.decode() if len(self.keys) == 1 else f"{key} {entry_id.decode()}"
            task = decode_task(receipt, fields)
            if task is None:
                malformed.setdefault(key, []).append(entry_id)
            else:
                tasks.append(task)
        for key, ids in malformed.items():
            self.malformed += len(ids)
            logger.warning("dropping %d malformed work entries", len(ids))
            self.client.xack(key, self.group, *ids)
        return tasks
