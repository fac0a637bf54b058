"""Which reads the sidecar takes on, and when it may stop.

A read's answer is held in memory from the moment it is built until the caller's transport has
taken it, and a caller that stops reading (a stalled ranker, or an attacker with a small
flow-control window) holds it for as long as its connection lives. `Admission` counts the bytes
of the answers held so, and refuses a read that would take them past a cap with
RESOURCE_EXHAUSTED, so that no set of slow readers can take the process past its memory limit.

It also counts the calls in flight, for the drain. gRPC cancels, when its server stops, every
call it has received but not handed to the server yet, and every call still arriving until
the caller has its GOAWAY; so on SIGTERM the sidecar first answers every call until callers
pause (the calls already sent then have all reached it), then refuses new ones with
UNAVAILABLE until the last in flight has answered and callers have paused again (a caller
told UNAVAILABLE backs off, as solaris.clients' breaker does), and only then stops the server.
"""

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np

from solaris.server.errors import ResourceExhausted, Unavailable

SETTLE_SECONDS = 1.0
"""How long no call must come, while draining, for the calls already sent (in the caller's
hands, on the wire, or queued in gRPC) to have reached the handlers: long, because on a busy
machine gRPC's own threads may wait that long for a core. A quarter of the grace at most."""
POLL_SECONDS = 0.02
logger = logging.getLogger("solaris.server")
ROW_OVERHEAD_BYTES = 7
"""A row's status and tier (one byte each) and its age (a varint of up to five) beside its
values."""
ANSWER_OVERHEAD_BYTES = 256
"""An answer's fixed fields: dim, dtype, model version, and their keys."""


def answer_bytes(rows: int, dim: int, dtype: np.dtype) -> int:
    """The most bytes a read of `rows` rows answers with, once serialized."""
    return rows * (dim * dtype.itemsize + ROW_OVERHEAD_BYTES) + ANSWER_OVERHEAD_BYTES


class Admission:
    """Counts calls in flight and the bytes of their answers until gRPC has sent them."""

    def __init__(self, max_unsent_bytes: int) -> None:
        self.max_unsent_bytes = max_unsent_bytes
        self.unsent_bytes = 0
        self.calls = 0
        self.draining = False
        self.refused_full = 0
        """Reads refused because answers not yet sent held too many bytes."""
        self.refused_draining = 0
        """Calls refused because the sidecar was draining to stop."""
        self._last_call = -math.inf

    def admit(self, context: Any, answer_bytes: int) -> None:
        """Takes on a call whose answer holds up to `answer_bytes` until its caller has it: the
        call is counted until gRPC reports it done (sent, failed or cancelled).

        Raises:
            Unavailable: the sidecar is draining.
            ResourceExhausted: the answer would take the unsent bytes past the cap.
        """
        self._last_call = time.monotonic()
        if self.draining:
            self.refused_draining += 1
            raise Unavailable("the sidecar is stopping; call again (another sidecar)")
        if self.unsent_bytes + answer_bytes > self.max_unsent_bytes:
            self.refused_full += 1
            raise ResourceExhausted(
                f"answers not yet taken by their callers hold {self.unsent_bytes} bytes, and "
                f"this one ({answer_bytes} bytes) would pass the cap of {self.max_unsent_bytes} "
                "(max-unsent-bytes): some callers are not reading their answers; retry later"
            )
        self.unsent_bytes += answer_bytes
        self.calls += 1
        context.add_done_callback(lambda _: self._done(answer_bytes))

    def _done(self, answer_bytes: int) -> None:
        self.unsent_bytes -= answer_bytes
        self.calls -= 1

    async def drain(self, seconds: float) -> None:
        """Within `seconds`: answers every call for up to half of them, until callers pause
        (which answers those already sent when the drain began, even queued in gRPC); then
        refuses new calls until the last in flight has answered and callers have paused
        again, so that none is on its way when the server stops (gRPC cancels those)."""
        deadline = time.monotonic() + seconds
        settle = min(SETTLE_SECONDS, seconds / 4)
        paused = await self._until_quiet(time.monotonic() + seconds / 2, settle)
        logger.info(
            "draining: %s; refusing new calls, %d in flight",
            "callers paused" if paused else "callers did not pause",
            self.calls,
        )
        self.draining = True
        if await self._until_quiet(deadline, settle):
            return
        if self.calls:
            logger.warning("drain: %d calls still in flight at the end of the grace", self.calls)
        else:
            logger.warning("drain: callers were still calling at the end of the grace")

    async def _until_quiet(self, until: float, settle: float) -> bool:
        """Whether, by `until`, no call is in flight and none has come for `settle` s."""
        while True:
            if not self.calls and time.monotonic() - self._last_call >= settle:
                return True
            left = until - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(POLL_SECONDS, left))
