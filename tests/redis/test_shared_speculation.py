"""One speculator for every sidecar, over Redis: real redis-server processes, a real sidecar
over gRPC shipping its reads, and a real `solaris precompute` process that speculates on them."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

from solaris.precompute.export import ExportReport
from solaris.precompute.shared_speculation import SharedSpeculation, lease_key, shard_of
from solaris.precompute.speculator import Policy, SpeculationSettings
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import RedisStore, connect, pair_key, read_stale_at
from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import (
    EPOCH_SECONDS,
    FIELD,
    REQUEST_STREAM_KEY,
    RequestEncoder,
    encode_entries,
    encode_request,
    entry_bytes,
)
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import Freshness, RowStatus
from solaris.server.work_stream import STREAM_KEY, decode_task, encode_task, work_group
from solaris.v1 import embedding_store_pb2 as pb
from tests.conftest import DIM, wait_until
from tests.redis.conftest import NO_DAEMON, RedisProcess, batch_get, started

MISSES_ONLY = SpeculationSettings(100.0, frozenset({Policy.MISS}))
LEASE_KEY = lease_key(0, 1)


def speculation(
    server: RedisProcess, settings: SpeculationSettings = MISSES_ONLY, **knobs: float
) -> SharedSpeculation:
    return SharedSpeculation(server.client(), settings, DIM, "v1", **knobs)  # type: ignore[arg-type]


def log_misses(server: RedisProcess, user: str, items: list[str]) -> None:
    statuses = np.full(len(items), RowStatus.MISS, np.uint8)
    request = LoggedRequest(user, tuple(items), statuses, time.time(), np.full(len(items), -np.inf))
    server.client().xadd(REQUEST_STREAM_KEY, encode_request(request))


def daemons_joined(server: RedisProcess) -> None:
    """What a daemon does on start: make the work stream's consumer group."""
    server.client().xgroup_create(STREAM_KEY, work_group("v1"), id="0", mkstream=True)


def added_tasks(server: RedisProcess) -> list[PrefetchTask]:
    entries = server.client().xrange(STREAM_KEY)
    tasks = [decode_task(entry_id.decode(), fields) for entry_id, fields in entries]
    return [task for task in tasks if task is not None]


def waiting_tasks(server: RedisProcess) -> int:
    return int(server.client().xinfo_groups(STREAM_KEY)[0]["lag"] or 0)


@pytest.fixture
def speculating_daemon(
    redis_server: RedisProcess, tiny_model: ExportReport
) -> Iterator[subprocess.Popen[bytes]]:
    """`solaris precompute` with the miss policy only, once it holds the speculator lease."""
    command = [sys.executable, "-m", "solaris.app.cli", "precompute"]
    command += ["--redis", redis_server.url, "--model", str(tiny_model.path), "--dim", str(DIM)]
    command += ["--speculation", "miss", "--batch-wait-ms", "1"]
    daemon = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: redis_server.client().exists(LEASE_KEY) == 1, timeout=60)
        yield daemon
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


async def test_a_sidecars_misses_become_hits_with_no_prefetch_at_all(
    shared_settings: SidecarSettings,
    redis_server: RedisProcess,
    speculating_daemon: subprocess.Popen[bytes],
    sidecars: list[Sidecar],
) -> None:
    sidecar = await started(shared_settings, NO_DAEMON)
    sidecars.append(sidecar)
    items = [f"item-{n}" for n in range(20)]
    first = await batch_get(sidecar, "user-1", items)
    assert set(first.statuses) == {pb.MISS}
    for _ in range(200):
        answer = await batch_get(sidecar, "user-1", items)
        if set(answer.statuses) == {pb.HIT}:
            break
        await asyncio.sleep(0.05)
    assert set(answer.statuses) == {pb.HIT}
    speculating_daemon.terminate()
    assert await asyncio.to_thread(speculating_daemon.wait, 30) == 0
    assert redis_server.client().exists(LEASE_KEY) == 0, "a stopped speculator frees the lease"


def test_one_speculator_leads_and_another_takes_over_when_it_stops(
    redis_server: RedisProcess,
) -> None:
    daemons_joined(redis_server)
    first = speculation(redis_server, lease_seconds=2)
    second = speculation(redis_server, lease_seconds=2)
    first.start()
    assert wait_until(lambda: first.stats.leading, timeout=5)
    second.start()
    try:
        time.sleep(1.0)
        assert not second.stats.leading
        log_misses(redis_server, "user-1", ["a"])
        assert wait_until(lambda: first.stats.requests_read == 1, timeout=5)
        assert second.stats.requests_read == 0
        first.stop()
        assert wait_until(lambda: second.stats.leading, timeout=5)
        log_misses(redis_server, "user-2", ["b"])
        assert wait_until(lambda: second.stats.requests_read == 1, timeout=5)
        # A new leader's budget starts empty: the work may come a round after the read.
        assert wait_until(lambda: len(added_tasks(redis_server)) == 2, timeout=5)
    finally:
        second.stop()
    assert [(task.user_id, task.item_ids) for task in added_tasks(redis_server)] == [
        ("user-1", ("a",)),
        ("user-2", ("b",)),
    ]


def test_sharded_speculators_split_the_users_between_them(redis_server: RedisProcess) -> None:
    daemons_joined(redis_server)
    first = speculation(redis_server, shards=2)
    second = speculation(redis_server, shards=2)
    for speculator in (first, second):
        speculator.start()
    try:
        assert wait_until(lambda: first.stats.leading and second.stats.leading, timeout=10)
        shards = [first.lease.shard, second.lease.shard]
        assert sorted(shards) == [0, 1]  # type: ignore[type-var]
        users = [f"user-{n}" for n in range(20)]
        for user in users:
            log_misses(redis_server, user, ["a"])
        assert wait_until(lambda: first.stats.pairs_added + second.stats.pairs_added == 20, 10)
    finally:
        for speculator in (first, second):
            speculator.stop()
    for speculator, shard in zip((first, second), shards, strict=True):
        mine = [user for user in users if shard_of(user, 2) == shard]
        assert speculator.stats.requests_read == len(mine)
    assert sorted(task.user_id for task in added_tasks(redis_server)) == sorted(users)


def test_a_speculator_moved_to_another_shard_forgets_the_users_of_the_last(
    redis_server: RedisProcess,
) -> None:
    client = redis_server.client()
    speculator = speculation(redis_server, shards=2)
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        first = speculator.lease.shard
        users = [f"user-{n}" for n in range(20)]
        old_users = [user for user in users if shard_of(user, 2) == first]
        for user in old_users:
            log_misses(redis_server, user, ["a"])
        assert wait_until(lambda: speculator.stats.requests_read == len(old_users), timeout=5)
        client.set(lease_key(first, 2), "another-daemon", px=60_000)  # type: ignore[arg-type]
        # Led, not only held: the streams' ends are found once it leads.
        assert wait_until(lambda: speculator._led_shard not in (None, first), timeout=5)
        daemons_joined(redis_server)
        new_users = [user for user in users if user not in old_users]
        for user in new_users:
            log_misses(redis_server, user, ["a"])
        assert wait_until(lambda: speculator.stats.pairs_added == len(new_users), timeout=5)
        time.sleep(0.5)
    finally:
        speculator.stop()
    assert sorted(task.user_id for task in added_tasks(redis_server)) == sorted(new_users)


def test_no_work_is_added_past_what_the_daemons_may_have_waiting(
    redis_server: RedisProcess,
) -> None:
    client = redis_server.client()
    speculator = speculation(
        redis_server, SpeculationSettings(100.0, frozenset({Policy.MISS})), max_waiting_tasks=3
    )
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        for user in range(40):
            log_misses(redis_server, f"user-{user}", ["a"])
        assert wait_until(lambda: speculator.stats.requests_read == 40, timeout=5)
        time.sleep(1.0)  # a second's budget (100 pairs) saved up while no daemon had joined
        daemons_joined(redis_server)
        waits = speculator.stats.waits_for_backlog
        assert wait_until(lambda: speculator.stats.waits_for_backlog > waits + 2, timeout=10)
        assert waiting_tasks(redis_server) == 3
        client.xreadgroup(work_group("v1"), "test", {STREAM_KEY: ">"})
        assert wait_until(lambda: speculator.stats.tasks_added == 6, timeout=10)
        time.sleep(0.3)
        assert waiting_tasks(redis_server) == 3
    finally:
        speculator.stop()


def test_a_pair_already_fresh_in_redis_is_not_added(redis_server: RedisProcess) -> None:
    asyncio.run(write_v1(redis_server, "user-1", "fresh"))
    daemons_joined(redis_server)
    speculator = speculation(redis_server)
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        log_misses(redis_server, "user-1", ["fresh", "missing"])
        assert wait_until(lambda: speculator.stats.pairs_added == 1, timeout=5)
    finally:
        speculator.stop()
    assert [task.item_ids for task in added_tasks(redis_server)] == [("missing",)]


def test_nothing_is_added_while_no_daemon_has_joined(redis_server: RedisProcess) -> None:
    speculator = speculation(redis_server)
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        log_misses(redis_server, "user-1", ["a"])
        assert wait_until(lambda: speculator.stats.waits_for_backlog > 2, timeout=5)
        assert speculator.stats.pairs_added == 0
        daemons_joined(redis_server)
        assert wait_until(lambda: speculator.stats.pairs_added == 1, timeout=5)
    finally:
        speculator.stop()


def test_added_work_carries_the_users_latest_prefetch_history(redis_server: RedisProcess) -> None:
    daemons_joined(redis_server)
    speculator = speculation(redis_server)
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        hinted = PrefetchTask("user-1", ("p",), history=("seen-1", "seen-2"))
        redis_server.client().xadd(STREAM_KEY, encode_task(hinted))
        assert wait_until(lambda: speculator.histories.get("user-1") != (), timeout=5)
        log_misses(redis_server, "user-1", ["m"])
        assert wait_until(lambda: speculator.stats.pairs_added == 1, timeout=5)
    finally:
        speculator.stop()
    added = added_tasks(redis_server)[-1]
    assert (added.item_ids, added.history) == (("m",), ("seen-1", "seen-2"))


def test_a_malformed_read_is_skipped_and_the_next_one_learnt(redis_server: RedisProcess) -> None:
    daemons_joined(redis_server)
    speculator = speculation(redis_server)
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        for bad in (["user-1", ["a", "b"], [1], 0.0], ["user-1", ["a"], [1], float("nan")]):
            redis_server.client().xadd(REQUEST_STREAM_KEY, {"request": json.dumps(bad)})
        log_misses(redis_server, "user-2", ["c"])
        assert wait_until(lambda: speculator.stats.pairs_added == 1, timeout=5)
    finally:
        speculator.stop()
    assert speculator.stats.malformed_reads == 2
    assert speculator.stats.requests_read == 1


def test_a_read_in_parts_and_a_read_from_an_older_sidecar_are_both_learnt(
    redis_server: RedisProcess,
) -> None:
    """A read too large for one entry comes in parts, with another sidecar's entry (here in
    the JSON of sidecars before the binary form) between them: the speculator learns both."""
    daemons_joined(redis_server)
    speculator = speculation(redis_server, SpeculationSettings(10_000.0, frozenset({Policy.MISS})))
    items = [f"item-{n:03d}-" + "x" * 100 for n in range(200)]
    misses = np.full(len(items), RowStatus.MISS, np.uint8)
    large = LoggedRequest("user-1", tuple(items), misses, time.time(), np.zeros(len(items)))
    first, *rest = encode_entries(large, entry_bytes(128))
    older = json.dumps(["user-2", ["old"], [RowStatus.MISS], time.time()])
    client = redis_server.client()
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        client.xadd(REQUEST_STREAM_KEY, {FIELD: first})
        client.xadd(REQUEST_STREAM_KEY, {"request": older})
        for part in rest:
            client.xadd(REQUEST_STREAM_KEY, {FIELD: part})
        assert wait_until(lambda: speculator.stats.pairs_added == len(items) + 1, timeout=10)
    finally:
        speculator.stop()
    assert rest, "the large read went in parts"
    assert speculator.stats.requests_read == 2
    added = {(task.user_id, item) for task in added_tasks(redis_server) for item in task.item_ids}
    assert added == {("user-1", item) for item in items} | {("user-2", "old")}


def test_a_speculator_learns_ids_defined_before_it_started_once_the_sidecar_defines_them_again(
    redis_server: RedisProcess,
) -> None:
    """A speculator starts from the newest entry, so the ids a sidecar defined before are
    unknown to it: those items are left out and counted, never named wrongly, until the
    sidecar's next epoch defines them again."""
    daemons_joined(redis_server)
    speculator = speculation(redis_server)
    now = [0.0]
    sidecar = RequestEncoder(clock=lambda: now[0])
    client = redis_server.client()
    items = tuple(f"item-{n}" for n in range(5))

    def log(user: str) -> None:
        misses = np.full(len(items), RowStatus.MISS, np.uint8)
        read = LoggedRequest(user, items, misses, time.time(), np.full(len(items), -np.inf))
        for value in sidecar.encode(read, entry_bytes(256)):
            client.xadd(REQUEST_STREAM_KEY, {FIELD: value})

    log("user-1")  # defines the items, before the speculator reads
    speculator.start()
    try:
        assert wait_until(lambda: speculator.stats.leading, timeout=5)
        log("user-2")
        assert wait_until(lambda: speculator.stats.unknown_items == len(items), timeout=5)
        now[0] = EPOCH_SECONDS
        log("user-3")
        assert wait_until(lambda: speculator.stats.pairs_added == len(items), timeout=5)
    finally:
        speculator.stop()
    assert speculator.stats.requests_read == 2
    assert speculator.stats.unknown_items == len(items)
    assert speculator.stats.id_table_bytes > 0
    added = {(task.user_id, item) for task in added_tasks(redis_server) for item in task.item_ids}
    assert added == {("user-3", item) for item in items}


def test_freshness_is_read_from_headers_and_a_bad_value_is_never_fresh(
    redis_server: RedisProcess,
) -> None:
    freshness = asyncio.run(write_v1(redis_server, "user-1", "good"))
    client = redis_server.client()
    client.set(pair_key("v1", "user-1", "garbage"), b"\x00" * 40)
    items = ["good", "garbage", "absent"]

    stale_at = read_stale_at(client, DIM, "v1", [("user-1", item) for item in items])

    assert stale_at.tolist() == [freshness.stale_at, -np.inf, -np.inf]
    good = [("user-1", "good")]
    assert read_stale_at(client, DIM + 1, "v1", good).tolist() == [-np.inf]
    assert read_stale_at(client, DIM, "v2", good).tolist() == [-np.inf]


async def write_v1(server: RedisProcess, user: str, item: str) -> Freshness:
    client = connect(server.url, 1.0)
    freshness = Freshness.starting("v1", time.time(), 60, 60)
    await RedisStore(client, DIM, "v1").write(user, [item], np.ones((1, DIM)), freshness)
    await client.aclose()
    return freshness
