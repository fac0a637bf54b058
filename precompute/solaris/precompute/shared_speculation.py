"""One speculator for every pod. With Redis, each sidecar ships the reads it answers to the
request stream; whichever daemon holds the speculator lease reads that stream, speculates
over all of it, and adds the pairs it chooses to the shared work stream, where every daemon
takes work. One speculator, not one per daemon: its budget is the fleet's, and no two
speculators choose the same pair.

The lease is a Redis key with an expiry that its holder renews; when the holder stops or
dies, another daemon takes it once it expires and starts learning afresh from new reads.
Where one speculator cannot follow the fleet's reads, `shards` splits the users (by a stable
hash) among that many speculators, each under a lease of its own and a share of the budget;
a daemon leads at most one shard.
Prefetch work keeps going straight to the work stream (the ranker's own word needs no
guessing); the speculator adds work only while the daemons have little waiting, so it fills
their idle capacity and keeps at most about `max_waiting_tasks` ahead of new Prefetch work.
It also reads the Prefetch tasks going by, for their users' histories: the tasks it adds carry
the latest one, so whichever daemon takes them computes with it.
"""

import contextlib
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis.exceptions

from solaris.precompute.daemon import HistoryBook
from solaris.precompute.speculator import (
    Speculated,
    SpeculationSettings,
    Speculator,
    by_user,
)
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import REDIS_ERRORS
from solaris.server.redis_store import BlockingClient, read_stale_at
from solaris.server.redis_streams import (
    entries,
    process_name,
    shard_keys,
    shard_of,
    stream_entries,
)
from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import REQUEST_STREAM_KEY, PartJoiner, RequestDecoder
from solaris.server.work_stream import (
    STREAM_KEY,
    decode_task,
    encode_tasks,
    work_entry_bytes,
    work_group,
    work_stream_length,
)

LEASE_PREFIX = "solaris:speculator"
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


def lease_key(shard: int, shards: int) -> str:
    return f"{LEASE_PREFIX}:{shard}-of-{shards}"


class Lease:
    """One of `shards` leases, each held by one holder at a time for `seconds` after its last
    renewal; a holder holds at most one."""

    def __init__(self, client: BlockingClient, seconds: float, shards: int = 1) -> None:
        self.client = client
        self.ms = int(seconds * 1000)
        self.shards = shards
        self.shard: int | None = None
        self.holder = process_name()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Renews the shard held, or takes a free one (trying them from a random one, so that
        daemons starting together spread out); False if none is ours."""
        if self.shard is not None:
            key = lease_key(self.shard, self.shards)
            if self._renew(keys=[key], args=[self.holder, self.ms]):
                return True
            self.shard = None
        first = random.randrange(self.shards)
        for offset in range(self.shards):
            shard = (first + offset) % self.shards
            if self.client.set(lease_key(shard, self.shards), self.holder, nx=True, px=self.ms):
                self.shard = shard
                return True
        return False

    def release(self) -> None:
        if self.shard is not None:
            self._release(keys=[lease_key(self.shard, self.shards)], args=[self.holder])
            self.shard = None


@dataclass
class SharedSpeculationStats:
    leading: bool = False
    requests_read: int = 0
    tasks_added: int = 0
    pairs_added: int = 0
    waits_for_backlog: int = 0
    malformed_reads: int = 0
    unknown_items: int = 0
    """Items left out of reads for an id not yet learnt (the module's docstring in
    solaris.server.request_stream): at most `EPOCH_SECONDS` after the speculator starts."""
    id_table_bytes: int = 0
    """Memory the sidecars' tables of ids take here."""
    incomplete_reads: int = 0
    """Reads too large for one entry of which some parts never came (trimmed, or sent
    before this speculator started reading)."""
    redis_errors: int = 0


class SharedSpeculation:
    """Runs on its own thread: `start()`, then `stop()`."""

    def __init__(
        self,
        client: BlockingClient,
        settings: SpeculationSettings,
        dim: int,
        model_version: str,
        lease_seconds: float = 10.0,
        max_waiting_tasks: int = 200,
        work_stream_bytes: int = 256 * 1024**2,
        max_id_bytes: int = 256,
        history_bytes: int = 64 * 1024**2,
        shards: int = 1,
        stream_shards: int = 1,
    ) -> None:
        """`max_waiting_tasks`: work entries no daemon has taken yet above which the
        speculator adds none. `settings.budget_pairs_per_second` is this shard's share.
        `work_stream_bytes`, `max_id_bytes` and `stream_shards` shape the streams as the
        sidecars do."""
        self.client = client
        self.settings = settings
        self.dim = dim
        self.model_version = model_version
        self.lease = Lease(client, lease_seconds, shards)
        self.max_waiting_tasks = max_waiting_tasks
        self.request_keys = shard_keys(REQUEST_STREAM_KEY, stream_shards)
        self.work_keys = shard_keys(STREAM_KEY, stream_shards)
        self.work_stream_length = work_stream_length(
            work_stream_bytes // stream_shards, max_id_bytes
        )
        self.work_entry_bytes = work_entry_bytes(max_id_bytes)
        self.stats = SharedSpeculationStats()
        self._speculator: Speculator | None = None
        self._led_shard: int | None = None
        self.histories = HistoryBook(history_bytes)
        self._decoder = RequestDecoder()
        """Kept when the lead is lost: a sender's numbers never change meaning."""
        self._parts = PartJoiner()
        self._cursors = dict.fromkeys(self.request_keys + self.work_keys, "0-0")
        self._turn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="solaris-speculator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(*REDIS_ERRORS):  # if not released, it expires
            self.lease.release()
        self._lose_lead()
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
        if not self._lead():
            self._stop.wait(self.lease.ms / 3000)
            return
        self._read_streams()
        waiting = self._waiting_tasks()
        if waiting >= self.max_waiting_tasks:
            self.stats.waits_for_backlog += 1
            return
        if self._lead():  # again: the round may have outlasted the lease
            self._add_work(self.max_waiting_tasks - waiting)

    def _lead(self) -> bool:
        """Holds a lease and speculates for its shard; False when no lease is ours. A lease
        lost and another taken means another shard's users: learnt afresh."""
        if not self.lease.hold():
            self._lose_lead()
            return False
        if self._speculator is None or self._led_shard != self.lease.shard:
            self._lose_lead()
            self._take_lead()
        return True

    def _take_lead(self) -> None:
        """Starts from the newest entries: older ones are served already or out of date."""
        for key in self._cursors:
            newest = entries(self.client.xrevrange(key, count=1))
            self._cursors[key] = newest[0][0].decode() if newest else "0-0"
        self._speculator = Speculator(self.settings, self._stale_at)
        self._parts = PartJoiner()
        self._led_shard = self.lease.shard
        self.stats.leading = True
        lease = self.lease
        logger.info("speculating, shard %d of %d (%s)", lease.shard, lease.shards, lease.holder)

    def _lose_lead(self) -> None:
        if self.stats.leading:
            logger.info("no longer the speculator")
        self._speculator = None
        self._led_shard = None
        self.stats.leading = False

    def _read_streams(self) -> None:
        """New reads to learn from, and new Prefetch tasks for their histories: each stream
        key read on its own (on a cluster one XREAD reads one slot), without waiting; when
        none had any, waiting on one request shard (the next in turn) for more."""
        assert self._speculator is not None
        reads: list[LoggedRequest] = []
        found = False
        for key in self._cursors:
            found |= self._read_stream(key, None, reads)
        if not found:
            self._turn = (self._turn + 1) % len(self.request_keys)
            self._read_stream(self.request_keys[self._turn], _READ_BLOCK_MS, reads)
        self._speculator.observe(reads)
        self.stats.requests_read += len(reads)
        self.stats.malformed_reads = self._decoder.malformed
        self.stats.unknown_items = self._decoder.unknown_items
        self.stats.id_table_bytes = self._decoder.nbytes

    def _read_stream(self, key: str, block_ms: int | None, reads: list[LoggedRequest]) -> bool:
        """Reads `key` from its cursor, adding its reads to `reads`; whether it had news."""
        answer = self.client.xread({key: self._cursors[key]}, count=_READ_AT_MOST, block=block_ms)
        found = False
        for _, news in stream_entries(answer):
            for entry_id, fields in news:
                found = True
                self._cursors[key] = entry_id.decode()
                if key in self.request_keys:
                    reads += self._our_read(fields)
                else:
                    self._learn_history(entry_id.decode(), fields)
        return found

    def _our_read(self, fields: dict[bytes, bytes]) -> list[LoggedRequest]:
        """The read in a request stream entry, if well formed and of this shard's users; a
        read sent in parts, once its last part comes. Every entry is decoded, whoever's: the
        ids it defines may be any shard's."""
        entry = self._decoder.decode(fields)
        if entry is None or not self._ours(entry.request.user_id):
            return []
        incomplete = self._parts.incomplete
        joined = self._parts.add(entry)
        self.stats.incomplete_reads += self._parts.incomplete - incomplete
        return [] if joined is None else [joined]

    def _learn_history(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        task = decode_task(entry_id, fields)
        if task is not None and task.history and self._ours(task.user_id):
            self.histories.update(task.user_id, task.history)

    def _ours(self, user_id: str) -> bool:
        return self.lease.shards == 1 or shard_of(user_id, self.lease.shards) == self.lease.shard

    def _waiting_tasks(self) -> int:
        """Entries of the work stream (all its shards) no daemon has read yet."""
        return sum(self._waiting_in(key) for key in self.work_keys)

    def _waiting_in(self, key: str) -> int:
        """Entries of one work shard no daemon of our model version has read yet. With none in
        its group (none started yet, or Redis restarted empty) nothing would take work: counted
        as full."""
        try:
            groups = self.client.xinfo_groups(key)
        except redis.exceptions.ResponseError:
            return self.max_waiting_tasks  # no work stream yet
        name = work_group(self.model_version).encode()
        group = next((g for g in groups if g["name"] == name), None)
        if group is None:
            return self.max_waiting_tasks
        if group.get("lag") is not None:
            return int(group["lag"])
        # Redis leaves lag unknown after some trims and deletions: count the entries instead.
        after = b"(" + group["last-delivered-id"]
        return len(entries(self.client.xrange(key, after, "+", count=self.max_waiting_tasks)))

    def _add_work(self, max_tasks: int) -> None:
        """Up to `max_tasks` tasks, one per user; what does not reach the stream goes back to
        the queue."""
        speculator = self._speculator
        assert speculator is not None
        added = list(by_user(speculator.take(max_users=max_tasks)).values())
        if not added:
            return
        try:
            self._xadd_tasks(added)
        except Exception:
            speculator.put_back(entry for entries in added for entry in entries)
            raise
        self.stats.tasks_added += len(added)
        self.stats.pairs_added += sum(len(entries) for entries in added)

    def _xadd_tasks(self, tasks: list[list[Speculated]]) -> None:
        """Each list holds one user's pairs."""
        with self.client.pipeline(transaction=False) as pipe:
            for entries in tasks:
                user_id = entries[0].user_id
                items = tuple(entry.item_id for entry in entries)
                task = PrefetchTask(user_id, items, self.histories.get(user_id))
                key = self.work_keys[shard_of(user_id, len(self.work_keys))]
                for entry in encode_tasks(task, self.work_entry_bytes):
                    pipe.xadd(key, entry, maxlen=self.work_stream_length, approximate=True)
            pipe.execute()

    def _stale_at(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return read_stale_at(self.client, self.dim, self.model_version, pairs)
