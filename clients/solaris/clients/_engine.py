"""The logic both clients share: argument checks, the budget, the breaker, decoding and
fallbacks, counters. The two clients only move requests over their own kind of channel."""

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np
from numpy.typing import ArrayLike

from solaris.clients._breaker import CircuitBreaker
from solaris.clients._fallback import Fallback, fallback_rows, resolve_fallback
from solaris.clients._latency import RecentDurations
from solaris.clients._result import Embeddings, FallbackReason, RowStatus, RowTier
from solaris.clients._stats import ClientStats
from solaris.v1 import embedding_store_pb2 as pb
from solaris.wire import MAX_PRIORITY, max_message_bytes

logger = logging.getLogger("solaris.clients")

_WIRE_DTYPES: dict[int, np.dtype[np.floating[Any]]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
}
_HIT, _MISS, _STALE = int(RowStatus.HIT), int(RowStatus.MISS), int(RowStatus.STALE)
_AGGREGATE_TIERS = (int(RowTier.USER), int(RowTier.ITEM), int(RowTier.GLOBAL))
_MISS_FILLS = {"default": pb.MISS_FILL_UNSPECIFIED, "enriched": pb.ENRICHED, "plain": pb.PLAIN}
_FAILURES = {grpc.StatusCode.DEADLINE_EXCEEDED: FallbackReason.DEADLINE}
_TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class ClientOptions:
    """Tuning. The defaults suit a sidecar on loopback with its default limits."""

    wire_dtype: Literal["float32", "float16"] = "float32"
    """float16 halves the bytes on the wire; values still come back as float32."""
    max_items: int = 4096
    """The sidecar's max_items: larger requests raise here instead of failing there."""
    max_id_bytes: int = 256
    """The sidecar's max_id_bytes."""
    failures_to_open: int = 5
    """Consecutive failed calls (deadline or transport) that open the breaker."""
    open_seconds: float = 1.0
    """How long the open breaker skips calls before letting a probe through."""
    fallback_reserve_seconds: float = 0.0005
    """Budget kept back for the fallback. The slowest fallback of the last 10 s raises it, but
    a slow callable's first run is unknown: set this to its worst time to keep every call
    within its deadline from the start."""
    skip_quantile: float = 0.5
    """Skip the call when the budget left is below this quantile of recent call durations."""
    prefetch_timeout_seconds: float = 1.0
    max_prefetches_in_flight: int = 64
    """Prefetches beyond this many unanswered are dropped (and counted), never queued."""
    miss_fill: Literal["default", "enriched", "plain"] = "default"
    """Ask for missed rows filled from the sidecar's aggregates ("enriched"; their tier says
    which), zero-filled ("plain"), or as the sidecar's --miss-ladder says ("default"). Either
    way the fallback fills only the rows no tier filled."""


DEFAULT_OPTIONS = ClientOptions()


@dataclass(frozen=True)
class Tls:
    """TLS to a sidecar serving it (`--tls-cert`), in PEM bytes: the certificates of the CA
    that signed the sidecar's (None: the system's), and for mutual TLS (`--tls-client-ca`) the
    client's private key and certificate chain."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None
    """The name the sidecar's certificate must carry, where it is not the target's host (a
    sidecar reached by IP, or through a Service name its certificate does not list)."""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """What every call carries for a sidecar with `--auth-token`."""
    return (("authorization", f"Bearer {token}"),) if token else None


@dataclass(slots=True)
class Attempt:
    """One `batch_get` from start to answer."""

    user_id: str
    item_ids: list[str]
    started: float
    request: pb.BatchGetRequest
    timeout: float
    skip: FallbackReason | None


class Engine:
    def __init__(
        self,
        dim: int,
        fallback: Fallback | ArrayLike | None,
        deadline: float,
        options: ClientOptions,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be at least 1, got {dim}")
        _check_budget("deadline", deadline)
        self.dim = dim
        self.deadline = deadline
        self.options = options
        self.fallback = resolve_fallback(fallback, dim)
        self.breaker = CircuitBreaker(options.failures_to_open, options.open_seconds)
        self.stats = ClientStats()
        self._call_durations = RecentDurations()
        self._fallback_durations = RecentDurations(min_samples=1)
        self._wire_dtype = pb.FLOAT16 if options.wire_dtype == "float16" else pb.FLOAT32
        self._prefetch_lock = threading.Lock()
        self._prefetches_in_flight = 0
        self._logged: set[str] = set()

    def channel_options(self) -> list[tuple[str, int]]:
        """Message limits that fit the largest allowed batch; no retries, which could overrun
        the caller's deadline; keepalive so a dead connection is found; quick reconnects so a
        restarted sidecar is used again within a second."""
        options = self.options
        limit = max_message_bytes(options.max_items, options.max_id_bytes, 0, self.dim)
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]

    def begin(self, user_id: str, item_ids: Sequence[str], deadline: float | None) -> Attempt:
        """Checks the arguments (raising on bad ones) and decides whether to call at all."""
        started = time.monotonic()
        budget = self.deadline if deadline is None else deadline
        _check_budget("deadline", budget)
        items = _id_list("item_ids", item_ids)
        self._check_ids(user_id, items)
        try:
            request = pb.BatchGetRequest(
                user_id=user_id,
                item_ids=items,
                dtype=self._wire_dtype,
                miss_fill=_MISS_FILLS[self.options.miss_fill],
            )
        except TypeError:
            _name_bad_id(items)
            raise
        spent = time.monotonic() - started
        timeout = budget - spent - self._fallback_reserve()
        return Attempt(user_id, items, started, request, timeout, self._skip_reason(timeout))

    def skipped(self, attempt: Attempt) -> Embeddings:
        return self._all_fallback(attempt, attempt.skip or FallbackReason.BUDGET)

    def failed(self, attempt: Attempt, error: grpc.RpcError) -> Embeddings:
        code = error.code()
        if code in _FAILURES or code in _TRANSPORT_CODES:
            self.breaker.failed()
            return self._all_fallback(attempt, _FAILURES.get(code, FallbackReason.UNAVAILABLE))
        self.breaker.succeeded()
        self._log_once(f"the sidecar refused BatchGet: {code.name}: {error.details()}")
        return self._all_fallback(attempt, FallbackReason.ERROR)

    def answered(self, attempt: Attempt, response: pb.BatchGetResponse) -> Embeddings:
        self.breaker.succeeded()
        self._call_durations.add(time.monotonic() - attempt.started)
        decoded = self._decode(attempt, response)
        if decoded is None:
            return self._all_fallback(attempt, FallbackReason.ERROR)
        values, status, tier = decoded
        unfilled = tier == RowTier.NONE
        reason = None
        if unfilled.any():
            reason = FallbackReason.MISS
            items = [attempt.item_ids[i] for i in np.flatnonzero(unfilled)]
            values[unfilled] = self._fallback_rows(attempt.user_id, items)
        return self._finish(attempt, values, status, tier, response.model_version, reason)

    def missed_items(self, attempt: Attempt, result: Embeddings) -> list[str]:
        return [attempt.item_ids[i] for i in np.flatnonzero(result.status == RowStatus.MISS)]

    def prefetch_request(
        self, user_id: str, item_ids: Sequence[str], history: Sequence[str], priority: int
    ) -> pb.PrefetchRequest | None:
        """The request to send, or None when it is dropped: breaker open, or too many unanswered."""
        items, history = _id_list("item_ids", item_ids), _id_list("history", history)
        self._check_ids(user_id, items)
        if not all(history):
            _name_bad_id(history, "history")
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority: must be 0 to {MAX_PRIORITY}, got {priority}")
        try:
            request = pb.PrefetchRequest(
                user_id=user_id, item_ids=items, history=history, priority=priority
            )
        except TypeError:
            _name_bad_id(items)
            _name_bad_id(history, "history")
            raise
        with self._prefetch_lock:
            full = self._prefetches_in_flight >= self.options.max_prefetches_in_flight
            if full or self.breaker.state == "open":
                self.stats.record_prefetch("dropped")
                return None
            self._prefetches_in_flight += 1
        self.stats.record_prefetch("sent")
        return request

    def prefetch_finished(self, ok: bool) -> None:
        with self._prefetch_lock:
            self._prefetches_in_flight -= 1
        if not ok:
            self.stats.record_prefetch("failed")

    def _check_ids(self, user_id: str, item_ids: list[str]) -> None:
        if not isinstance(user_id, str) or not user_id:
            raise ValueError(f"user_id: must be a non-empty string, got {user_id!r}")
        max_bytes = self.options.max_id_bytes
        if len(user_id) * 4 > max_bytes and len(user_id.encode(errors="replace")) > max_bytes:
            raise ValueError(f"user_id: longer than {max_bytes} bytes of UTF-8")
        if not item_ids:
            raise ValueError("item_ids: must not be empty")
        if len(item_ids) > self.options.max_items:
            raise ValueError(
                f"item_ids: {len(item_ids)} ids, at most {self.options.max_items} allowed"
            )
        if not all(item_ids):
            _name_bad_id(item_ids)
        # A character is at most 4 UTF-8 bytes, so short ids skip the encode.
        try:
            longest = max(map(len, item_ids))
        except TypeError:
            _name_bad_id(item_ids)
            raise
        if longest * 4 > max_bytes:
            for index, item_id in enumerate(item_ids):
                if len(item_id.encode(errors="replace")) > max_bytes:
                    raise ValueError(f"item_ids[{index}]: longer than {max_bytes} bytes of UTF-8")

    def _fallback_reserve(self) -> float:
        return max(self.options.fallback_reserve_seconds, self._fallback_durations.maximum())

    def _skip_reason(self, timeout: float) -> FallbackReason | None:
        """Budget first: a call skipped for time must not take the breaker's probe slot."""
        typical = self._call_durations.quantile(self.options.skip_quantile)
        if timeout <= 0 or (typical is not None and timeout < typical):
            return FallbackReason.BUDGET
        if not self.breaker.allow():
            return FallbackReason.BREAKER_OPEN
        return None

    def _decode(
        self, attempt: Attempt, response: pb.BatchGetResponse
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The values, statuses and tiers, or None for an answer that does not fit."""
        rows, dim = len(attempt.item_ids), self.dim
        wire = _WIRE_DTYPES.get(response.dtype)
        embeddings = response.embeddings  # each read of a bytes field copies it: read it once
        statuses, tiers = response.statuses, response.tiers
        if (
            wire is None
            or response.dim != dim
            or len(statuses) != rows
            or len(tiers) not in (0, rows)  # none from a sidecar older than the ladder
            or len(embeddings) != rows * dim * wire.itemsize
        ):
            self._log_once(
                f"the sidecar's answer does not fit: dim {response.dim} (expected {dim}), "
                f"dtype {response.dtype}, {len(statuses)} statuses and {len(tiers)} tiers "
                f"for {rows} items"
            )
            return None
        values = np.frombuffer(embeddings, wire).reshape(rows, dim).astype(np.float32)
        codes = np.fromiter(statuses, np.int64, rows)  # proto3 enums are open: any int32
        served = (codes == _HIT) | (codes == _STALE)
        status = np.where(served, codes, _MISS).astype(np.uint8)
        # A MISS row counts as filled only with a tier the client knows; anything else
        # (none sent, unknown, or PAIR on a MISS) gets the fallback.
        tier_codes = np.fromiter(tiers, np.int64, len(tiers)) if len(tiers) else np.zeros(rows)
        enriched = ~served & np.isin(tier_codes, _AGGREGATE_TIERS)
        tier = np.where(served, RowTier.PAIR, np.where(enriched, tier_codes, RowTier.NONE))
        return values, status, tier.astype(np.uint8)

    def _all_fallback(self, attempt: Attempt, reason: FallbackReason) -> Embeddings:
        values = self._fallback_rows(attempt.user_id, attempt.item_ids)
        status = np.full(len(attempt.item_ids), RowStatus.FALLBACK, np.uint8)
        tier = np.full(len(attempt.item_ids), RowTier.NONE, np.uint8)
        return self._finish(attempt, values, status, tier, "", reason)

    def _fallback_rows(self, user_id: str, item_ids: list[str]) -> np.ndarray:
        started = time.monotonic()
        rows = fallback_rows(self.fallback, user_id, item_ids, self.dim)
        self._fallback_durations.add(time.monotonic() - started)
        return rows

    def _finish(
        self,
        attempt: Attempt,
        values: np.ndarray,
        status: np.ndarray,
        tier: np.ndarray,
        model_version: str,
        reason: FallbackReason | None,
    ) -> Embeddings:
        self.stats.record_call(status, tier, reason, time.monotonic() - attempt.started)
        return Embeddings(values, status, model_version, reason, tier)

    def _log_once(self, message: str) -> None:
        if message not in self._logged and len(self._logged) < 100:
            self._logged.add(message)
            logger.warning("%s (falling back; logged once)", message)


def _id_list(name: str, ids: Sequence[str]) -> list[str]:
    """The ids as a list. A lone str is a Sequence[str] too, of one-character ids: refused, not
    read as one id per character."""
    if isinstance(ids, str | bytes):
        kind = type(ids).__name__
        raise ValueError(f"{name}: must be a sequence of ids, not one {kind}; wrap it: [id]")
    return list(ids)


def one_item(item_id: str) -> list[str]:
    """`get`'s one item as a batch, refusing what is not an id under its own name."""
    if not isinstance(item_id, str) or not item_id:
        raise ValueError(f"item_id: must be a non-empty string, got {item_id!r}")
    return [item_id]


def _name_bad_id(ids: list[str], field: str = "item_ids") -> None:
    """Raises ValueError naming the first id that is not a non-empty string. The checks in C
    (`all`, and protobuf's own type check) say only that one is bad; this says which."""
    for index, value in enumerate(ids):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{field}[{index}]: must be a non-empty string, got {value!r}")


def _check_budget(name: str, seconds: float) -> None:
    if not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise ValueError(f"{name}: must be a finite number of seconds above 0, got {seconds!r}")
