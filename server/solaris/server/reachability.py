"""Whether Redis answers, judged from what Redis does and not from how busy we are.

Every Redis call of the sidecar (reads, writes, the work queue, the request-stream shipper)
goes through `Reachability.observe`, and a `RedisPing` asks Redis every half second, so that a
dead Redis shows within a second whatever the traffic (even when every read is an L1 hit).

Redis is *down* on evidence from Redis alone: a connection refused or reset, or a ping not
answered within `SLOW_REDIS_SECONDS` of being sent (with the same allowance for a busy loop as
every call: see `within`). A call the serving path stops waiting for at its own budget is not
evidence: it goes on in the background and its outcome is what counts. The clients' own socket
timeout (`CLIENT_TIMEOUT_SECONDS`) is only a backstop: redis-py measures it with a timer that
a starved process finds expired beside the answer, and counts it as Redis's. Each change is
logged once and reported to whoever watches (the health service).

On a Redis Cluster, Redis is the cluster, and it is down when any part of it is: the ping goes
to every master, and a master not answering (or the cluster saying CLUSTERDOWN, or no node
reachable) marks it down, since the users whose slots that master holds cannot be read. Once
a replica has taken over (about cluster-node-timeout plus an election) the client finds the
new master on its next call and the ping finds every master answering: up again.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions

REDIS_ERRORS = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)
"""What a Redis call may raise when Redis fails, or when we stop waiting for it (a cluster
client raises RedisClusterException, no RedisError, when it reaches no node)."""
LOST = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
    OSError,
)
"""What says Redis is not answering (a ResponseError is an answer, except a cluster's
CLUSTERDOWN: some of its slots have no master)."""
SLOW_REDIS_SECONDS = 1.0
"""A ping Redis has not answered in this long marks it down."""
CLIENT_TIMEOUT_SECONDS = 10.0
"""The clients' socket timeout: how long a call past its budget may run on."""
PING_EVERY_SECONDS = 0.5
WARM_CONNECTIONS = 16
"""Connections opened at start, so that the first reads need not open theirs."""
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0
_CATCH_UP_PASSES = 3
"""Loop passes a call gets past its budget: an answer already at our socket is taken."""
_MOST_LATE = 64
"""Calls past their budget still running, beyond which reads stop asking Redis."""
logger = logging.getLogger("solaris.redis")
T = TypeVar("T")


class Reachability:
    """Whether Redis is worth asking now, with exponential backoff after it was lost."""

    def __init__(self) -> None:
        self.up = True
        self.errors = 0
        """Redis calls failed."""
        self.timeouts = 0
        """Calls the caller stopped waiting for at its budget (they went on without it)."""
        self._watchers: list[Callable[[bool], None]] = []
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF_SECONDS
        self._late: set[asyncio.Future[Any]] = set()

    def watch(self, on_change: Callable[[bool], None]) -> None:
        """Calls `on_change(up)` each time Redis is lost or found again."""
        self._watchers.append(on_change)

    @property
    def late(self) -> int:
        """Calls past their budget that Redis has not answered yet."""
        return len(self._late)

    def worth_trying(self) -> bool:
        if len(self._late) >= _MOST_LATE:
            return False
        return self.up or time.monotonic() >= self._retry_at

    async def observe(self, call: Awaitable[T]) -> T:
        """`await call`, noting what it says about Redis."""
        try:
            result = await call
        except REDIS_ERRORS as error:
            self.errors += 1
            if isinstance(error, LOST):
                self.failed(error)
            raise
        self.succeeded()
        return result

    def failed(self, error: BaseException) -> None:
        if self.up:
            self.up = False
            self._backoff = _FIRST_BACKOFF_SECONDS
            logger.warning("Redis unreachable (%r): serving from L1 alone, retrying", error)
            self._notify()
        else:
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)
        self._retry_at = time.monotonic() + self._backoff

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            logger.warning("Redis reachable again")
            self._notify()

    def went_on_without(self, call: "asyncio.Future[T]") -> None:
        """`call` is past its caller's budget: it runs on, held here until Redis answers."""
        self.timeouts += 1
        self._late.add(call)
        call.add_done_callback(self._answered_late)

    async def settle(self) -> None:
        """Waits for the calls past their budget, so that closing their client is not taken
        for Redis failing."""
        if self._late:
            await asyncio.wait(set(self._late), timeout=SLOW_REDIS_SECONDS)

    def _answered_late(self, call: "asyncio.Future[T]") -> None:
        self._late.discard(call)
        if not call.cancelled():
            call.exception()  # observed already; retrieved so that asyncio does not log it

    def _notify(self) -> None:
        for on_change in self._watchers:
            on_change(self.up)


async def within(
    call: Awaitable[T], seconds: float, reachability: Reachability, until: float | None = None
) -> T:
    """`call`'s result if it comes within `seconds` of being sent (and by `until`, a
    time.monotonic() instant, if given), else TimeoutError.

    The budget measures Redis, not our event loop: it starts when the call is sent, not when it
    was asked for (a busy loop may run other work between the two), and when it passes, a few
    more loop passes let an answer already at our socket be read (a busy loop checks its timers
    and its sockets in one go). A call still running then goes on in the background, where its
    outcome tells `reachability` about Redis."""
    loop = asyncio.get_running_loop()
    sent: asyncio.Future[float] = loop.create_future()
    task = loop.create_task(_sent(call, sent, reachability))
    try:
        await asyncio.wait((sent,))
        end = sent.result() + seconds if until is None else min(sent.result() + seconds, until)
        await asyncio.wait((task,), timeout=max(0.0, end - loop.time()))
        for _ in range(_CATCH_UP_PASSES):
            if task.done():
                break
            await asyncio.sleep(0)
    finally:
        if not task.done():
            reachability.went_on_without(task)
    if not task.done():
        raise TimeoutError(f"Redis did not answer within {seconds * 1000:.0f} ms")
    return task.result()


async def _sent(call: Awaitable[T], sent: "asyncio.Future[float]", reachability: Reachability) -> T:
    sent.set_result(asyncio.get_running_loop().time())
    return await reachability.observe(call)


class RedisPing:
    """Pings Redis every `PING_EVERY_SECONDS`, so that `reachability` follows Redis even when
    no call needs it. Background work of the sidecar: at start, it pings on `WARM_CONNECTIONS`
    connections at once, so that the first reads find them open (opening one takes round trips
    a read's budget may not hold) and health is known before the sidecar serves."""

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        reachability: Reachability,
    ) -> None:
        self.client = client
        self.reachability = reachability
        self._stopping = asyncio.Event()
        self._pinging: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stopping.clear()
        await asyncio.gather(*(self.ping() for _ in range(WARM_CONNECTIONS)))
        self._pinging = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        if self._pinging is not None:
            await self._pinging
            self._pinging = None

    async def ping(self) -> None:
        try:
            await within(self._ping(), SLOW_REDIS_SECONDS, self.reachability)
        except TimeoutError as error:
            self.reachability.failed(error)
        except REDIS_ERRORS:
            pass  # observed

    async def _ping(self) -> object:
        """PING to the one node, or to every master of a cluster: a master not answering is
        some users' pairs out of reach (until its replica takes over)."""
        if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
            return await self.client.ping(target_nodes=redis.asyncio.cluster.RedisCluster.PRIMARIES)
        return await self.client.ping()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PING_EVERY_SECONDS)
            if not self._stopping.is_set():
                await self.ping()
