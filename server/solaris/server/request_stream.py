"""The request log on a capped Redis stream, so that one speculator sees every sidecar's
traffic. Reads never wait on Redis: a read appends to a bounded buffer, and a background task
ships the buffer in pipelined XADDs (`MAXLEN ~`). When Redis is slow or down, the buffer keeps
the newest requests and counts the ones it dropped.
"""

import asyncio
import contextlib
import json
import logging
import math
from collections import deque

import numpy as np
import redis.asyncio

from solaris.server.redis_streams import StreamFields
from solaris.server.request_log import LoggedRequest
from solaris.server.tiered import REDIS_ERRORS

REQUEST_STREAM_KEY = "solaris:requests"
_SHIP_EVERY_SECONDS = 0.05
_SHIP_AT_MOST = 500
logger = logging.getLogger("solaris.redis")


def encode_request(request: LoggedRequest) -> StreamFields:
    """JSON: `[user, items, statuses, time, stale_at]`, a stale_at that is not finite as null."""
    statuses = [int(status) for status in request.statuses]
    stale_at = [float(at) if math.isfinite(at) else None for at in request.stale_at]
    fields = [request.user_id, request.item_ids, statuses, request.time, stale_at]
    return {"request": json.dumps(fields)}


def decode_request(fields: dict[bytes, bytes]) -> LoggedRequest | None:
    """The request in a stream entry, or None for an entry that is not one of ours. An entry
    from a sidecar that predates `stale_at` reads as never going stale (no refresh)."""
    try:
        user_id, items, statuses, at, *rest = json.loads(fields[b"request"])
        stale_at = rest[0] if rest else [math.inf] * len(items)
        well_formed = (
            isinstance(user_id, str)
            and all(isinstance(item, str) for item in items)
            and all(isinstance(status, int) and 0 <= status <= 255 for status in statuses)
            and len(items) == len(statuses) == len(stale_at)
            and _is_time(at)
            and all(until is None or isinstance(until, int | float) for until in stale_at)
        )
        if not well_formed:
            return None
        stale = np.array([-math.inf if until is None else until for until in stale_at], float)
        if np.isnan(stale).any():
            return None
        statuses_array = np.array(statuses, np.uint8)
        return LoggedRequest(user_id, tuple(items), statuses_array, float(at), stale)
    except (KeyError, ValueError, TypeError):
        return None


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class RequestShipper:
    """Ships the sidecar's logged reads to the request stream, off the serving path."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        max_length: int,
        timeout_seconds: float,
        buffer_requests: int = 10_000,
    ) -> None:
        self.client = client
        self.max_length = max_length
        self.timeout_seconds = timeout_seconds
        self.shipped = 0
        self.dropped = 0
        self._buffer: deque[LoggedRequest] = deque(maxlen=buffer_requests)
        self._stopping = asyncio.Event()
        self._shipping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Ships in the background, from the running event loop, until `stop`."""
        self._stopping.clear()
        self._shipping = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Stops shipping, then ships what the buffer still holds, once. Stopping is asked
        for, not cancelled: on Python 3.11 a cancel that lands as `ship`'s own timeout ends
        can be lost, and the loop would go on (seen here: a sidecar that never exited)."""
        self._stopping.set()
        if self._shipping is not None:
            await self._shipping
            self._shipping = None
        await self.ship()

    def append(self, request: LoggedRequest) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(request)

    async def run(self) -> None:
        """Ships every `_SHIP_EVERY_SECONDS` until `stop`."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _SHIP_EVERY_SECONDS)
            await self.ship()

    async def ship(self) -> None:
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), _SHIP_AT_MOST))]
        if not batch:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for request in batch:
                    pipe.xadd(
                        REQUEST_STREAM_KEY,
                        encode_request(request),
                        maxlen=self.max_length,
                        approximate=True,
                    )
                await asyncio.wait_for(pipe.execute(), self.timeout_seconds)
            self.shipped += len(batch)
        except asyncio.CancelledError:
            self.dropped += len(batch)
            raise
        except REDIS_ERRORS as error:
            self.dropped += len(batch)
            logger.debug("request log not shipped (%r)", error)
