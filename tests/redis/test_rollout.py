"""Model rollouts on a real redis-server: daemons (the real daemon loop, with a model that
writes one constant per version, so that a served row tells its version) announce versions,
sidecars on real sockets serve steady traffic over gRPC and switch only once the new version
covers the reads, or at the deadline; pinned sidecars never switch."""

import asyncio
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from solaris.app.compose import daemon_l2
from solaris.precompute.daemon import PrecomputeDaemon
from solaris.precompute.features import UserWork
from solaris.precompute.settings import PrecomputeSettings
from solaris.server import rollout as rollout_module
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import Reachability
from solaris.server.redis_store import (
    DAEMON_REDIS_TIMEOUT_SECONDS,
    MODEL_VERSION_KEY,
    RedisStore,
    connect,
    connect_blocking,
    pair_key,
)
from solaris.server.request_log import LoggedRequest
from solaris.server.rollout import (
    ALIVE_SECONDS,
    VERSIONS_KEY,
    Announced,
    Rollout,
    RolloutPolicy,
    announce,
    first_served,
    latest,
    parse_versions,
)
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import FLOAT32, Freshness
from solaris.server.tiered import TieredStore
from solaris.server.work_stream import STREAM_KEY, StreamWorkQueue, StreamWorkSource, decode_task
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM
from tests.redis.conftest import NO_DAEMON, RedisProcess, started
from tests.redis.test_shared import submit_all

USERS = [f"user-{n}" for n in range(4)]
ITEMS = [f"item-{k}" for k in range(16)]
VALUE = {"v1": 1.0, "v2": 2.0}
"""What each version's model computes for every pair."""
FLOOR = 0.9
"""The hit rate of any 32 answers in a row, throughout a rollout the new version covers."""


class ConstantModel:
    """A model that computes `value` for every pair, under `model_version`."""

    def __init__(self, model_version: str) -> None:
        self.model_version = model_version

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        pairs = sum(len(user.item_ids) for user in work)
        return np.full((pairs, DIM), VALUE[self.model_version], np.float32)


class Daemon:
    """A real daemon on the work stream, computing one version."""

    def __init__(self, settings: SidecarSettings, model_version: str) -> None:
        client = connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
        source = StreamWorkSource(client, settings.claim_idle_seconds, model_version)
        self.daemon = PrecomputeDaemon(
            ConstantModel(model_version),
            daemon_l2(settings, model_version),
            source,
            PrecomputeSettings(batch_wait_ms=1.0, batch_pairs=64),
            settings.ttl_seconds,
            settings.stale_seconds,
        )
        self.daemon.start()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    running: list[Daemon] = []
    yield running
    for each in running:
        each.daemon.stop()


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sidecars read the announcements every 0.2 s, not 5 s: the tests wait less."""
    monkeypatch.setattr(rollout_module, "POLL_SECONDS", 0.2)


async def write_version(server: RedisProcess, version: str, users: list[str]) -> None:
    """`version`'s pairs for `users`, as its daemon writes them."""
    client = connect(server.url, 5.0)
    store = RedisStore(client, DIM, version)
    freshness = Freshness.starting(version, time.time(), 3600, 60)
    vectors = np.full((len(ITEMS), DIM), VALUE[version], np.float32)
    for user in users:
        await store.write(user, ITEMS, vectors, freshness)
    await client.aclose()


def rolling(settings: SidecarSettings, **policy: float | str) -> SidecarSettings:
    knobs = {"rollout_samples_per_second": 50.0, "rollout_window_reads": 32, **policy}
    return settings.model_copy(update={"port": 0, **knobs})


def rollout_of(sidecar: Sidecar) -> Rollout:
    return next(work for work in sidecar.background if isinstance(work, Rollout))


@dataclass
class Answer:
    version: str
    hits: int
    rows: int
    row_versions: set[str]
    """The versions of the served rows, told by their values."""


@dataclass
class Traffic:
    """Steady BatchGets of random users from one sidecar, each answer's misses prefetched (as
    `solaris.clients` does with prefetch_misses), until stopped."""

    sidecar: Sidecar
    answers: list[Answer] = field(default_factory=list)

    async def run(self, stopping: asyncio.Event) -> None:
        users = random.Random(0)
        async with grpc.aio.insecure_channel(self.sidecar.address) as channel:
            stub = EmbeddingStoreStub(channel)
            while not stopping.is_set():
                request = pb.BatchGetRequest(user_id=users.choice(USERS), item_ids=ITEMS)
                response = await stub.BatchGet(request, timeout=5)
                self.answers.append(answered(response))
                missed = [i for i, s in zip(ITEMS, response.statuses, strict=True) if s == pb.MISS]
                if missed:
                    prefetch = pb.PrefetchRequest(user_id=request.user_id, item_ids=missed)
                    await stub.Prefetch(prefetch, timeout=5)
                await asyncio.sleep(0.005)

    def lowest_hit_rate(self, run: int = 32) -> float:
        hits = [answer.hits / answer.rows for answer in self.answers]
        windows = [sum(hits[i : i + run]) / run for i in range(len(hits) - run + 1)]
        return min(windows)


def answered(response: pb.BatchGetResponse) -> Answer:
    values = np.frombuffer(response.embeddings, np.float32).reshape(-1, DIM)
    served = np.array(response.statuses) != pb.MISS
    by_value = {value: version for version, value in VALUE.items()}
    row_versions = {by_value.get(float(row[0]), "?") for row in values[served]}
    return Answer(response.model_version, int(served.sum()), len(values), row_versions)


async def drive(flows: list[Traffic], sidecars: list[Sidecar], stopping: asyncio.Event) -> None:
    for sidecar in sidecars:
        flows.append(Traffic(sidecar))
    await asyncio.gather(*(flow.run(stopping) for flow in flows))


async def eventually(condition: Callable[[], bool], patience: float = 60.0) -> bool:
    """Polls `condition()` on the event loop (the sidecars run on it) until it holds."""
    end = time.monotonic() + patience
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return False


def in_turn(versions: list[str]) -> list[str]:
    """The versions answers named, each once, in the order they came: one switch is two."""
    return [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]


def one_version_each(answers: list[Answer]) -> bool:
    """Every answer's served rows are of the version it names, and of no other."""
    return all(
        a.row_versions <= {a.version} and (a.hits == 0) == (a.version == "") for a in answers
    )


async def test_a_covered_new_version_takes_over_without_a_cliff_and_pinned_sidecars_stay(
    shared_settings: SidecarSettings,
    redis_server: RedisProcess,
    sidecars: list[Sidecar],
    daemons: list[Daemon],
) -> None:
    await write_version(redis_server, "v1", USERS)
    daemons.append(Daemon(shared_settings, "v1"))
    following = await started(rolling(shared_settings, rollout_fraction=1.0), NO_DAEMON)
    pinned = await started(rolling(shared_settings, model_version="v1"), NO_DAEMON)
    sidecars += [following, pinned]
    assert await eventually(lambda: rollout_of(following).served == "v1")
    flows: list[Traffic] = []
    stopping = asyncio.Event()
    driving = asyncio.ensure_future(drive(flows, [following, pinned], stopping))
    try:
        assert await eventually(lambda: len(flows) == 2 and len(flows[0].answers) > 50)
        daemons.append(Daemon(shared_settings, "v2"))
        assert await eventually(lambda: rollout_of(following).served == "v2")
        switched_at = len(flows[0].answers)
        assert await eventually(lambda: len(flows[0].answers) > switched_at + 100)
    finally:
        stopping.set()
        await driving
    follower, steady = flows
    print(f"lowest hit rate of 32 answers in a row: {follower.lowest_hit_rate():.3f}")
    assert in_turn([a.version for a in follower.answers]) == ["v1", "v2"]
    assert follower.lowest_hit_rate() >= FLOOR
    assert one_version_each(follower.answers)
    assert {a.version for a in steady.answers} == {"v1"}
    assert steady.lowest_hit_rate() == 1.0
    stats = rollout_of(following).stats
    assert (stats.switches, stats.deadline_switches) == (1, 0)
    assert stats.work_pairs > 0  # v2's misses on sampled reads became its daemon's work
    assert rollout_of(pinned).stats.switches == rollout_of(pinned).stats.shadow_reads == 0
    text = generate_latest(following.registry).decode()
    assert 'solaris_model_version_info{candidate="",pinned="false",served="v2"} 1.0' in text
    assert "solaris_rollout_switches_total 1.0" in text
    pinned_text = generate_latest(pinned.registry).decode()
    assert 'solaris_model_version_info{candidate="",pinned="true",served="v1"} 1.0' in pinned_text


async def test_a_new_version_that_never_covers_the_reads_takes_over_at_its_deadline(
    shared_settings: SidecarSettings, redis_server: RedisProcess, sidecars: list[Sidecar]
) -> None:
    await write_version(redis_server, "v1", USERS)
    announce(redis_server.client(), "v1", time.time() - 3600)
    sidecar = await started(rolling(shared_settings, rollout_deadline_seconds=5.0), NO_DAEMON)
    sidecars.append(sidecar)
    rollout = rollout_of(sidecar)
    assert rollout.served == "v1"
    flows: list[Traffic] = []
    stopping = asyncio.Event()
    driving = asyncio.ensure_future(drive(flows, [sidecar], stopping))
    try:
        assert await eventually(lambda: len(flows) == 1 and len(flows[0].answers) > 20)
        announce(redis_server.client(), "v2")  # no daemon computes it: it never covers a read
        assert await eventually(lambda: rollout.served == "v2")
        switched_at = len(flows[0].answers)
        assert await eventually(lambda: len(flows[0].answers) > switched_at + 20)
    finally:
        stopping.set()
        await driving
    answers = flows[0].answers
    assert (rollout.stats.switches, rollout.stats.deadline_switches) == (1, 1)
    assert one_version_each(answers)
    assert in_turn([a.version for a in answers]) == ["v1", ""]  # v2 holds nothing yet
    assert rollout.stats.shadow_reads > 0
    assert rollout.stats.work_pairs > 0  # its misses became work, for daemons it never had


def test_each_versions_daemons_compute_every_task(
    shared_settings: SidecarSettings, redis_server: RedisProcess, daemons: list[Daemon]
) -> None:
    daemons += [Daemon(shared_settings, "v1"), Daemon(shared_settings, "v2")]
    tasks = [PrefetchTask(user, tuple(ITEMS)) for user in USERS]
    asyncio.run(submit_all(shared_settings, tasks))
    client = redis_server.client()
    keys = [pair_key(v, user, item) for v in VALUE for user in USERS for item in ITEMS]
    end = time.monotonic() + 30
    while client.exists(*keys) < len(keys) and time.monotonic() < end:
        time.sleep(0.05)
    assert client.exists(*keys) == len(keys)
    computed = [each.daemon.stats.pairs_computed for each in daemons]
    assert computed == [len(USERS) * len(ITEMS)] * 2
    assert set(parse_versions(client.hgetall(VERSIONS_KEY))) == {"v1", "v2"}


def test_a_version_announced_again_after_a_silence_starts_afresh(
    redis_server: RedisProcess,
) -> None:
    client = redis_server.client()
    assert announce(client, "v1", 1000.0) == 1000.0
    assert announce(client, "v1", 1005.0) == 1000.0  # its daemons run on
    assert announce(client, "v1", 1005.0 + ALIVE_SECONDS + 1) == 1005.0 + ALIVE_SECONDS + 1
    assert announce(client, "v2", 10**9) == 10**9  # v1 is forgotten: not seen for years
    assert set(parse_versions(client.hgetall(VERSIONS_KEY))) == {"v2"}


def test_the_latest_is_the_live_version_announced_first_most_recently() -> None:
    now = 10_000.0
    versions = {
        "old": Announced(first=1_000.0, last=now),
        "new": Announced(first=9_000.0, last=now),
        "gone": Announced(first=9_500.0, last=now - ALIVE_SECONDS - 1),
    }
    assert latest(versions, now) == "new"
    assert latest({"gone": versions["gone"]}, now) == ""
    # A sidecar starting mid-rollout serves what the fleet served, and rolls on from there.
    assert first_served(versions, now, deadline_seconds=3_000) == "old"
    assert first_served(versions, now, deadline_seconds=500) == "gone"
    assert first_served({"new": versions["new"]}, now, deadline_seconds=3_000) == "new"
    assert parse_versions({b"v": b"1 2", b"bad": b"x"}) == {"v": Announced(1.0, 2.0)}


async def test_a_sidecar_serves_what_older_daemons_published_at_once(
    redis_server: RedisProcess,
) -> None:
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM)
    rollout = Rollout(client, store, RolloutPolicy(), Reachability())
    await rollout.poll()
    assert rollout.served == ""
    redis_server.client().set(MODEL_VERSION_KEY, "v1")
    await rollout.poll()
    assert rollout.served == "v1"
    redis_server.client().set(MODEL_VERSION_KEY, "v2")
    await rollout.poll()
    await client.aclose()
    assert (rollout.served, rollout.stats.deadline_switches) == ("v2", 1)


async def test_a_read_serves_no_row_of_a_version_it_does_not_serve(
    redis_server: RedisProcess,
) -> None:
    client = connect(redis_server.url, 1.0)
    l1 = MemoryStore(1024**2, DIM)
    now = time.time()
    l1.write_sync("user", ["a", "b"], np.full((2, DIM), 1.0), Freshness.starting("v1", now, 60, 60))
    await RedisStore(client, DIM, "v2").write(
        "user", ["a"], np.full((1, DIM), 2.0), Freshness.starting("v2", now, 60, 60)
    )
    tiered = TieredStore(l1, RedisStore(client, DIM, "v2"), 1.0)
    rows = await tiered.read("user", ["a", "b"], FLOAT32, time.time())
    await client.aclose()
    assert rows.model_version == "v2"
    assert rows.values[:, 0].tolist() == [2.0, 0.0]  # b, held in L1 as v1 only, is a MISS
    assert rows.statuses(time.time()).tolist() == [1, 2]


async def test_a_candidates_misses_on_sampled_reads_become_work(
    redis_server: RedisProcess,
) -> None:
    await write_version(redis_server, "v1", USERS[:1])
    await write_version(redis_server, "v2", USERS[:1])
    client = connect(redis_server.url, 1.0)
    queue = StreamWorkQueue(client, 256 * 1024**2, 32, 1.0)
    rollout = Rollout(client, RedisStore(client, DIM, "v1"), RolloutPolicy(), Reachability())
    rollout.submit = queue.submit
    announce(redis_server.client(), "v2")
    await rollout.poll()
    assert rollout.candidate == "v2"
    user, other = USERS[0], USERS[1]
    for user_id, items in ((user, [*ITEMS[:4], "new"]), (other, ITEMS[:3])):
        statuses = np.ones(len(items), np.uint8)
        rollout.observe(LoggedRequest(user_id, tuple(items), statuses, 0.0, np.zeros(len(items))))
        await rollout.shadow_read()
    await client.aclose()
    tasks = [decode_task(i.decode(), f) for i, f in redis_server.client().xrange(STREAM_KEY)]
    assert [(t.user_id, t.item_ids) for t in tasks if t] == [
        (user, ("new",)),
        (other, tuple(ITEMS[:3])),
    ]
    coverage = rollout.coverage
    assert (coverage.pairs, coverage.served, coverage.candidate) == (8, 4, 4)
