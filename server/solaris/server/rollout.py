"""Model rollouts without a cliff: which model version a sidecar serves, and when it moves on.

Daemons announce their model version (`announce`, every few seconds) in one Redis hash: each
version with when it was first announced and when last. A version not announced for
`ALIVE_SECONDS` starts afresh when it comes back (a rollback is a rollout too). Announcing
sets nothing a sidecar serves: each sidecar chooses (`Rollout`).

- Pinned (`--model-version`, or the model of a daemon in the same process): that version only.
- Else at start: the newest version first announced at least the deadline ago, else the oldest
  known (what the fleet served before a rollout began). Then the *latest*, the live version
  announced first most recently, is the candidate while it is not the one served. In the
  background, at most `samples_per_second` times a second, the sidecar takes the latest read it
  answered and asks Redis, in one round trip (a user's keys share a slot), which of up to
  `SAMPLE_ITEMS` of its pairs each version holds (EXISTS: integers come back, not values). The
  candidate's misses go to the work stream, where its daemons (each version's its own consumer
  group) compute them. Once, over the last `window_reads` such reads, the candidate holds
  `fraction` of what the served version holds, or once `deadline_seconds` have passed since it
  was first announced, the sidecar switches: one log line, a counter.

A read never waits for any of this: it only leaves itself in one slot while there is a
candidate. Daemons older than this set `MODEL_VERSION_KEY` instead; with no announcement in
Redis, a sidecar serves that version, and follows it at once, as it did before.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from solaris.server.errors import Unavailable
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.reachability import (
    REDIS_ERRORS,
    SLOW_REDIS_SECONDS,
    Reachability,
    within,
)
from solaris.server.redis_store import (
    MODEL_VERSION_KEY,
    AsyncClient,
    BlockingClient,
    RedisStore,
    user_key_prefix,
)
from solaris.server.request_log import LoggedRequest

VERSIONS_KEY = "solaris:model-versions"
ALIVE_SECONDS = 60.0
"""A version not announced for this long has no daemon: it is no candidate, and its first
announcement starts afresh. Daemons announce every 5 s, between batches."""
FORGET_SECONDS = 7 * 24 * 3600.0
"""A version not announced for this long is dropped from the hash (its keys expired long ago)."""
POLL_SECONDS = 5.0
"""How often a sidecar reads the announcements (every half second while it serves none)."""
_UNKNOWN_POLL_SECONDS = 0.5
_IDLE_TICK_SECONDS = 0.5
SAMPLE_ITEMS = 64
"""Most pairs of one read looked up under both versions: a shadow read's bytes stay small."""
logger = logging.getLogger("solaris.rollout")

_ANNOUNCE = """
local now = tonumber(ARGV[2])
local first = now
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
    local f, l = string.match(old, '^(%S+) (%S+)$')
    if f and now - tonumber(l) <= tonumber(ARGV[3]) then first = tonumber(f) end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.3f %.3f', first, now))
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    local l = string.match(all[i + 1], ' (%S+)$')
    if not l or now - tonumber(l) > tonumber(ARGV[4]) then redis.call('HDEL', KEYS[1], all[i]) end
end
return string.format('%.3f', first)
"""
"""One key, so one slot: it runs as it is on a Redis Cluster."""


def announce(client: BlockingClient, model_version: str, now: float | None = None) -> float:
    """Announces that a daemon computes `model_version` (wall-clock `now`); returns when the
    version was first announced, in this run of announcements."""
    stamp = time.time() if now is None else now
    args = (model_version, f"{stamp:.3f}", ALIVE_SECONDS, FORGET_SECONDS)
    first = client.eval(_ANNOUNCE, 1, VERSIONS_KEY, *args)
    return float(first)


@dataclass(frozen=True)
class Announced:
    """When a version was first announced (in its current run) and last, wall-clock seconds."""

    first: float
    last: float


def parse_versions(raw: Mapping[bytes, bytes]) -> dict[str, Announced]:
    """The announcements in the hash; a field that is not two numbers is passed over."""
    versions: dict[str, Announced] = {}
    for name, value in raw.items():
        try:
            first, last = map(float, value.split())
        except ValueError:
            continue
        versions[name.decode(errors="replace")] = Announced(first, last)
    return versions


def latest(versions: Mapping[str, Announced], now: float) -> str:
    """The live version first announced most recently; "" when none is live."""
    alive = [(at.first, name) for name, at in versions.items() if now - at.last <= ALIVE_SECONDS]
    return max(alive)[1] if alive else ""


def first_served(versions: Mapping[str, Announced], now: float, deadline_seconds: float) -> str:
    """What a sidecar that serves nothing yet starts with: the newest version whose rollout
    deadline has passed, else the oldest known (the one served before the rollout began)."""
    settled = [(at.first, n) for n, at in versions.items() if now - at.first >= deadline_seconds]
    if settled:
        return max(settled)[1]
    return min((at.first, name) for name, at in versions.items())[1] if versions else ""


@dataclass(frozen=True)
class RolloutPolicy:
    """When a sidecar following the latest version switches to it."""

    fraction: float = 0.95
    """Of the served version's sampled hit rate, what the candidate must reach."""
    deadline_seconds: float = 1800.0
    """After its first announcement, when the candidate is served whatever its hit rate."""
    samples_per_second: float = 5.0
    """Shadow reads a second while there is a candidate; 0 for none (the deadline decides)."""
    window_reads: int = 100
    """Shadow reads the two hit rates are compared over."""


class Coverage:
    """Pairs looked up, and how many of them each version held, over the last reads."""

    def __init__(self, reads: int) -> None:
        self._reads: deque[tuple[int, int, int]] = deque(maxlen=reads)
        self.pairs = self.served = self.candidate = 0

    def add(self, pairs: int, served: int, candidate: int) -> None:
        if len(self._reads) == self._reads.maxlen:
            dropped = self._reads[0]
            self.pairs -= dropped[0]
            self.served -= dropped[1]
            self.candidate -= dropped[2]
        self._reads.append((pairs, served, candidate))
        self.pairs += pairs
        self.served += served
        self.candidate += candidate

    @property
    def full(self) -> bool:
        return len(self._reads) == self._reads.maxlen

    def rate(self, held: int) -> float:
        return held / self.pairs if self.pairs else 0.0

    def clear(self) -> None:
        self._reads.clear()
        self.pairs = self.served = self.candidate = 0


@dataclass
class RolloutStats:
    """Counters since start, for metrics."""

    switches: int = 0
    deadline_switches: int = 0
    """Of the switches, those the deadline made (the candidate's hit rate fell short)."""
    shadow_reads: int = 0
    shadow_pairs: int = 0
    work_pairs: int = 0
    """The candidate's misses added to the work stream."""
    errors: int = 0
    """Announcements, shadow reads and work not read or added: Redis failed or was slow."""


Submit = Callable[[PrefetchTask], Awaitable[None]]


class Rollout:
    """Chooses the version `store` serves. Background work of a sidecar with Redis: `start()`,
    `stop()`; `observe` is a request-log listener."""

    def __init__(
        self,
        client: AsyncClient,
        store: RedisStore,
        policy: RolloutPolicy,
        reachability: Reachability,
        submit: Submit | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`submit` adds work (the sidecar's work queue); `clock` is wall-clock seconds, the
        daemons' announcements' clock."""
        self.client = client
        self.store = store
        self.policy = policy
        self.reachability = reachability
        self.submit = submit
        self.clock = clock
        self.pinned = False
        self.candidate = ""
        self.candidate_since = 0.0
        self.coverage = Coverage(policy.window_reads)
        self.stats = RolloutStats()
        self._latest_read: LoggedRequest | None = None
        self._stopping = asyncio.Event()
        self._running: asyncio.Task[None] | None = None

    @property
    def served(self) -> str:
        return self.store.model_version

    def pin(self, model_version: str) -> None:
        """Serves `model_version` and no other."""
        self.pinned = True
        self.candidate = ""
        self.store.use_version(model_version)

    def observe(self, request: LoggedRequest) -> None:
        """On the serving path: keeps the latest read, for a shadow read, while there is a
        candidate."""
        if self.candidate:
            self._latest_read = request

    async def start(self) -> None:
        """Reads the announcements once before the sidecar serves, then follows them."""
        if self.pinned:
            return
        self._stopping.clear()
        await self.poll()
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        if self._running is not None:
            await self._running
            self._running = None

    async def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_seconds()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._tick_seconds())
            try:
                if time.monotonic() >= next_poll:
                    await self.poll()
                    next_poll = time.monotonic() + self._poll_seconds()
                if self.candidate:
                    await self.shadow_read()
                    self.decide()
            except Exception:
                # A bug must not leave the sidecar on one version for good: log, go on.
                self.stats.errors += 1
                logger.exception("rollout step failed; trying again")

    def _poll_seconds(self) -> float:
        return POLL_SECONDS if self.served else _UNKNOWN_POLL_SECONDS

    def _tick_seconds(self) -> float:
        rate = self.policy.samples_per_second
        return 1 / rate if self.candidate and rate > 0 else _IDLE_TICK_SECONDS

    async def poll(self) -> None:
        """Reads the announcements: serves one if none yet, and takes the latest as candidate."""
        versions = await self._announced()
        if not versions:
            return  # Redis unreachable, or restarted empty: what is served stays
        now = self.clock()
        if not self.served:
            self._switch(first_served(versions, now, self.policy.deadline_seconds), "start")
        newest = latest(versions, now)
        if not newest or newest == self.served:
            self.candidate = ""
        elif newest != self.candidate:
            self.candidate, self.candidate_since = newest, versions[newest].first
            self.coverage.clear()
            logger.info(
                "model version %s announced; serving %s until it covers the reads",
                newest,
                self.served,
            )
        self.decide()

    async def _announced(self) -> dict[str, Announced]:
        if not self.reachability.worth_trying():
            return {}
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(VERSIONS_KEY)
        pipe.get(MODEL_VERSION_KEY)
        try:
            raw, legacy = await within(pipe.execute(), SLOW_REDIS_SECONDS, self.reachability)
        except REDIS_ERRORS as error:
            self._failed("announcements not read", error)
            return {}
        if raw or not legacy:
            return parse_versions(raw)
        # Only older daemons: their one version, taken at once (-inf: its deadline is past).
        return {legacy.decode(errors="replace"): Announced(-float("inf"), self.clock())}

    async def shadow_read(self) -> None:
        """Looks up the latest read's pairs (up to SAMPLE_ITEMS) under both versions, in one
        round trip, and adds the candidate's misses to the work stream."""
        request, self._latest_read = self._latest_read, None
        if request is None or not self.reachability.worth_trying():
            return
        user, candidate = request.user_id, self.candidate
        items = list(dict.fromkeys(request.item_ids))
        if len(items) > SAMPLE_ITEMS:
            items = random.sample(items, SAMPLE_ITEMS)
        served_prefix = user_key_prefix(self.served, user)
        candidate_prefix = user_key_prefix(candidate, user)
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(*(served_prefix + item for item in items))
        for item in items:
            pipe.exists(candidate_prefix + item)
        try:
            served, *held = await within(pipe.execute(), SLOW_REDIS_SECONDS, self.reachability)
        except REDIS_ERRORS as error:
            self._failed("shadow read failed", error)
            return
        if candidate != self.candidate:
            return  # a poll moved on meanwhile
        missing = tuple(item for item, found in zip(items, held, strict=True) if not found)
        self.coverage.add(len(items), int(served), len(items) - len(missing))
        self.stats.shadow_reads += 1
        self.stats.shadow_pairs += len(items)
        if missing:
            await self._add_work(PrefetchTask(user, missing))

    async def _add_work(self, task: PrefetchTask) -> None:
        if self.submit is None:
            return
        try:
            await self.submit(task)
        except Unavailable as error:
            self._failed("candidate's misses not added to the work stream", error)
            return
        self.stats.work_pairs += len(task.item_ids)

    def decide(self) -> None:
        """Switches to the candidate once it covers the reads, or at its deadline."""
        if not self.candidate or self.pinned:
            return
        coverage = self.coverage
        if coverage.full and coverage.candidate >= self.policy.fraction * coverage.served:
            self._switch(self.candidate, "coverage")
        elif self.clock() >= self.candidate_since + self.policy.deadline_seconds:
            self._switch(self.candidate, "deadline")

    def _switch(self, version: str, reason: str) -> None:
        coverage, old = self.coverage, self.served
        if reason == "start":
            logger.info("serving model version %s", version)
        else:
            self.stats.switches += 1
            self.stats.deadline_switches += reason == "deadline"
            logger.info(
                "model version %s -> %s (%s): it held %.1f%% of %d sampled pairs, %s %.1f%%",
                old,
                version,
                reason,
                100 * coverage.rate(coverage.candidate),
                coverage.pairs,
                old,
                100 * coverage.rate(coverage.served),
            )
        self.store.use_version(version)
        self.candidate = ""
        self.coverage.clear()

    def _failed(self, what: str, error: BaseException) -> None:
        self.stats.errors += 1
        logger.debug("rollout: %s (%r)", what, error)
