"""The blocking client against a real sidecar, a slow one, a dead port and a killed process."""

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from solaris.clients import (
    ClientOptions,
    EmbeddingClient,
    Embeddings,
    FallbackError,
    FallbackReason,
    RowStatus,
)
from solaris.server.settings import SidecarSettings
from solaris.v1 import embedding_store_pb2 as pb
from tests.clients.conftest import (
    MODEL_VERSION,
    ThreadedSidecar,
    free_port,
    vectors,
)
from tests.clients.faulty_sidecar import start_slow_sidecar
from tests.conftest import DIM, wait_until

SLACK = 0.25
"""What a call may take past its deadline: scheduling on a busy shared machine."""


def timed(call: Callable[[], Embeddings]) -> tuple[Embeddings, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def item_ids(count: int) -> list[str]:
    return [f"item-{n}" for n in range(count)]


def row_per_item(user_id: str, items: Sequence[str]) -> np.ndarray:
    """A fallback whose rows say which item they are for."""
    return np.array([[float(item.split("-")[1])] * DIM for item in items], np.float32)


def test_hits_come_back_exactly_as_stored(threaded_sidecar: ThreadedSidecar) -> None:
    stored = vectors(5)
    threaded_sidecar.put("user", item_ids(5), stored)
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2) as client:
        answer = client.batch_get("user", item_ids(5))
    assert np.array_equal(answer.values, stored)
    assert answer.values.dtype == np.float32
    assert list(answer.status) == [RowStatus.HIT] * 5
    assert answer.model_version == MODEL_VERSION
    assert answer.fallback_reason is None


def test_float16_on_the_wire_comes_back_as_float32(threaded_sidecar: ThreadedSidecar) -> None:
    stored = vectors(3)
    threaded_sidecar.put("user", item_ids(3), stored)
    options = ClientOptions(wire_dtype="float16")
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2, options=options) as client:
        answer = client.batch_get("user", item_ids(3))
    assert answer.values.dtype == np.float32
    assert np.array_equal(answer.values, stored.astype(np.float16).astype(np.float32))


def test_partial_misses_are_filled_from_the_fallback_and_flagged(
    threaded_sidecar: ThreadedSidecar,
) -> None:
    stored = vectors(2)
    threaded_sidecar.put("user", ["item-0", "item-2"], stored)
    asked: list[list[str]] = []

    def fallback(user_id: str, items: Sequence[str]) -> np.ndarray:
        asked.append(list(items))
        return row_per_item(user_id, items)

    with EmbeddingClient(threaded_sidecar.address, DIM, fallback=fallback, deadline=2) as client:
        answer = client.batch_get("user", item_ids(4))
    assert asked == [["item-1", "item-3"]]
    assert list(answer.status) == [RowStatus.HIT, RowStatus.MISS, RowStatus.HIT, RowStatus.MISS]
    assert np.array_equal(answer.values[[0, 2]], stored)
    assert np.array_equal(answer.values[[1, 3]], row_per_item("user", ["item-1", "item-3"]))
    assert list(answer.served) == [True, False, True, False]
    assert answer.fallback_reason is FallbackReason.MISS


def test_get_answers_one_pair(threaded_sidecar: ThreadedSidecar) -> None:
    stored = vectors(1)
    threaded_sidecar.put("user", ["item-0"], stored)
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2) as client:
        hit = client.get("user", "item-0")
        miss = client.get("user", "item-9")
    assert np.array_equal(hit.vector, stored[0])
    assert hit.status is RowStatus.HIT
    assert miss.status is RowStatus.MISS
    assert not miss.vector.any()


def test_misses_are_prefetched_when_asked(threaded_sidecar: ThreadedSidecar) -> None:
    threaded_sidecar.put("user", ["item-0"], vectors(1))
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2) as client:
        client.batch_get("user", item_ids(3))
        assert threaded_sidecar.queued_pairs() == 0
        client.batch_get("user", item_ids(3), prefetch_misses=True)
        assert wait_until(lambda: threaded_sidecar.queued_pairs() == 2)
        assert wait_until(lambda: client.stats.prefetches_sent == 1)


def test_a_sidecar_sleeping_past_the_deadline_yields_fallback_in_time(
    slow_sidecar: str,
) -> None:
    fixed = np.arange(DIM, dtype=np.float32)
    with EmbeddingClient(slow_sidecar, DIM, fallback=fixed) as client:
        answer, took = timed(lambda: client.batch_get("user", item_ids(4), deadline=0.2))
    assert took < 0.2 + SLACK
    assert answer.fallback_reason is FallbackReason.DEADLINE
    assert list(answer.status) == [RowStatus.FALLBACK] * 4
    assert np.array_equal(answer.values, np.tile(fixed, (4, 1)))


def test_a_sidecar_not_listening_yields_fallback_in_time(dead_address: str) -> None:
    with EmbeddingClient(dead_address, DIM) as client:
        answer, took = timed(lambda: client.batch_get("user", item_ids(4), deadline=0.5))
    assert took < 0.5 + SLACK
    assert answer.fallback_reason is FallbackReason.UNAVAILABLE
    assert not answer.values.any()
    assert answer.values.shape == (4, DIM)


def test_a_sidecar_killed_mid_call_yields_fallback_before_the_deadline(
    killable_sidecar: tuple[subprocess.Popen[str], str],
) -> None:
    process, address = killable_sidecar
    with EmbeddingClient(address, DIM) as client:
        client.batch_get("user", ["warm-up"], deadline=0.2)
        killer = threading.Timer(0.3, os.kill, (process.pid, signal.SIGKILL))
        killer.start()
        answer, took = timed(lambda: client.batch_get("user", item_ids(4), deadline=5))
        killer.join()
    assert answer.fallback_reason is FallbackReason.UNAVAILABLE
    assert took < 0.3 + 1.0
    assert list(answer.status) == [RowStatus.FALLBACK] * 4


def test_the_breaker_opens_after_failures_and_closes_once_the_sidecar_is_back(
    settings: SidecarSettings,
) -> None:
    port = free_port()
    options = ClientOptions(failures_to_open=3, open_seconds=0.2)
    with EmbeddingClient(f"127.0.0.1:{port}", DIM, deadline=0.5, options=options) as client:
        reasons = [client.batch_get("user", ["item-0"]).fallback_reason for _ in range(3)]
        assert reasons == [FallbackReason.UNAVAILABLE] * 3
        assert client.breaker_state == "open"
        skipped = client.batch_get("user", ["item-0"])
        assert skipped.fallback_reason is FallbackReason.BREAKER_OPEN

        sidecar = ThreadedSidecar(SidecarSettings(**{**vars(settings), "port": port}))
        try:
            sidecar.put("user", ["item-0"], vectors(1))
            assert wait_until(
                lambda: client.batch_get("user", ["item-0"]).fallback_reason is None, timeout=10
            )
            assert client.breaker_state == "closed"
        finally:
            sidecar.stop()
    assert client.stats.fallbacks_by_reason[FallbackReason.BREAKER_OPEN] >= 1


def test_calls_are_skipped_when_the_budget_is_below_recent_latency() -> None:
    server, port = start_slow_sidecar(delay=0.05, dim=DIM)
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", DIM, deadline=2) as client:
            for _ in range(8):
                assert client.batch_get("user", ["item-0"]).fallback_reason is FallbackReason.MISS
            answer = client.batch_get("user", ["item-0"], deadline=0.01)
    finally:
        server.stop(grace=0)
    assert answer.fallback_reason is FallbackReason.BUDGET


def test_stats_count_what_was_served(threaded_sidecar: ThreadedSidecar, dead_address: str) -> None:
    threaded_sidecar.put("user", ["item-0"], vectors(1))
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2) as client:
        client.batch_get("user", item_ids(4))
        client.batch_get("user", ["item-0"])
        stats = client.stats
    assert stats.calls == 2
    assert stats.rows == 5
    assert stats.rows_by_status[RowStatus.HIT] == 2
    assert stats.rows_by_status[RowStatus.MISS] == 3
    assert stats.hit_rate == pytest.approx(2 / 5)
    assert stats.fallback_rate(FallbackReason.MISS) == pytest.approx(1 / 2)
    assert sum(stats.latency_buckets) == 2
    with EmbeddingClient(dead_address, DIM) as down:
        down.batch_get("user", item_ids(2))
        assert down.stats.rows_by_status[RowStatus.FALLBACK] == 2
        assert down.stats.fallback_rate(FallbackReason.UNAVAILABLE) == 1.0


def test_prefetch_to_a_dead_sidecar_returns_at_once_and_is_counted(dead_address: str) -> None:
    with EmbeddingClient(dead_address, DIM) as client:
        client.prefetch("user", item_ids(3), history=["seen-1"])
        assert wait_until(lambda: client.stats.prefetches_failed == 1)


@pytest.mark.parametrize(
    ("user_id", "items", "named"),
    [
        ("", ["item-0"], "user_id"),
        ("user", [], "item_ids"),
        ("user", ["item-0", ""], "item_ids[1]"),
        ("user", item_ids(4097), "item_ids"),
        ("user", ["item-0", 7], "item_ids[1]"),
        ("u" * 300, ["item-0"], "user_id"),
    ],
)
def test_bad_arguments_raise_at_once_naming_the_argument(
    dead_address: str, user_id: str, items: list[str], named: str
) -> None:
    with (
        EmbeddingClient(dead_address, DIM) as client,
        pytest.raises(ValueError, match=re.escape(named)),
    ):
        client.batch_get(user_id, items)
    assert client.stats.calls == 0


@pytest.mark.parametrize(
    ("history", "priority", "named"),
    [(["seen", ""], 0, "history[1]"), ([], 1001, "priority"), ([7], 0, "history[0]")],
)
def test_bad_prefetch_arguments_raise_at_once(
    dead_address: str, history: list[str], priority: int, named: str
) -> None:
    with (
        EmbeddingClient(dead_address, DIM) as client,
        pytest.raises(ValueError, match=re.escape(named)),
    ):
        client.prefetch("user", ["item-0"], history, priority)
    assert client.stats.prefetches_sent == 0


LONE_STRING_CALLS: list[tuple[Callable[[EmbeddingClient], object], str]] = [
    (lambda client: client.batch_get("user", "abc"), "item_ids: must be a sequence of ids"),
    (lambda client: client.batch_get("user", b"abc"), "item_ids: must be a sequence of ids"),
    (lambda client: client.get("user", ["abc"]), "item_id: must be a non-empty string"),
    (lambda client: client.prefetch("user", "abc"), "item_ids: must be a sequence of ids"),
    (lambda client: client.prefetch("user", ["a"], "abc"), "history: must be a sequence of ids"),
]
"""Each call passes one string where a list of ids belongs (or a list where one id does), and
the message it must raise."""


@pytest.mark.parametrize(
    ("call", "named"),
    LONE_STRING_CALLS,
    ids=["batch_get-str", "batch_get-bytes", "get-list", "prefetch-items", "prefetch-history"],
)
def test_a_lone_string_is_refused_not_read_as_one_id_per_character(
    dead_address: str, call: Callable[[EmbeddingClient], object], named: str
) -> None:
    with (
        EmbeddingClient(dead_address, DIM) as client,
        pytest.raises(ValueError, match=re.escape(named)),
    ):
        call(client)
    assert (client.stats.calls, client.stats.prefetches_sent) == (0, 0)


def test_a_fixed_fallback_of_the_wrong_shape_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="fallback"):
        EmbeddingClient("127.0.0.1:1", DIM, fallback=np.zeros(DIM + 1))


def test_a_fallback_returning_the_wrong_shape_raises(dead_address: str) -> None:
    def short(user_id: str, items: Sequence[str]) -> np.ndarray:
        return np.zeros((len(items), DIM - 1))

    with (
        EmbeddingClient(dead_address, DIM, fallback=short) as client,
        pytest.raises(FallbackError, match=rf"expected \(2, {DIM}\)"),
    ):
        client.batch_get("user", item_ids(2))


def test_a_fallback_that_raises_is_not_swallowed(dead_address: str) -> None:
    def broken(user_id: str, items: Sequence[str]) -> np.ndarray:
        raise RuntimeError("distilled model not loaded")

    with (
        EmbeddingClient(dead_address, DIM, fallback=broken) as client,
        pytest.raises(RuntimeError, match="distilled model"),
    ):
        client.batch_get("user", item_ids(2))


@pytest.mark.parametrize(
    ("dim", "status"), [(DIM + 1, pb.MISS), (DIM, 300)], ids=["wrong dim", "unknown status"]
)
def test_an_answer_that_does_not_fit_is_a_fallback_not_an_error(dim: int, status: int) -> None:
    server, port = start_slow_sidecar(delay=0, dim=dim, status=status)
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", DIM, deadline=2) as client:
            answer = client.batch_get("user", item_ids(3))
    finally:
        server.stop(grace=0)
    assert answer.values.shape == (3, DIM)
    if status == 300:
        assert answer.fallback_reason is FallbackReason.MISS
        assert list(answer.status) == [RowStatus.MISS] * 3
    else:
        assert answer.fallback_reason is FallbackReason.ERROR
        assert list(answer.status) == [RowStatus.FALLBACK] * 3


def test_a_refusal_from_the_sidecar_is_a_fallback_and_keeps_the_breaker_closed(
    threaded_sidecar: ThreadedSidecar,
) -> None:
    options = ClientOptions(max_id_bytes=1000, failures_to_open=1)
    long_id = "x" * 100  # within the client's limit, past the sidecar's (32 bytes)
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=2, options=options) as client:
        answer = client.batch_get("user", [long_id])
        assert answer.fallback_reason is FallbackReason.ERROR
        assert client.breaker_state == "closed"


def test_an_id_longer_than_the_limit_raises_at_once(dead_address: str) -> None:
    with (
        EmbeddingClient(dead_address, DIM, options=ClientOptions(max_id_bytes=8)) as client,
        pytest.raises(ValueError, match=re.escape("item_ids[1]")),
    ):
        client.batch_get("user", ["short", "much-too-long"])


@pytest.mark.parametrize("deadline", [0, -1, float("inf"), float("nan"), "0.1"])
def test_a_deadline_that_is_not_a_positive_finite_number_raises(
    dead_address: str, deadline: object
) -> None:
    with (
        EmbeddingClient(dead_address, DIM) as client,
        pytest.raises(ValueError, match="deadline"),
    ):
        client.batch_get("user", ["a"], deadline=deadline)  # type: ignore[arg-type]


def test_prefetches_beyond_the_in_flight_limit_are_dropped(slow_sidecar: str) -> None:
    options = ClientOptions(max_prefetches_in_flight=2, prefetch_timeout_seconds=0.3)
    with EmbeddingClient(slow_sidecar, DIM, options=options) as client:
        for _ in range(3):
            client.prefetch("user", ["a"])
        assert client.stats.prefetches_dropped == 1
        assert wait_until(lambda: client.stats.prefetches_failed == 2)
        client.prefetch("user", ["a"])
        assert client.stats.prefetches_sent == 3


def test_prefetches_are_dropped_while_the_breaker_is_open(dead_address: str) -> None:
    options = ClientOptions(failures_to_open=1, open_seconds=30)
    with EmbeddingClient(dead_address, DIM, options=options) as client:
        client.batch_get("user", ["a"])
        client.prefetch("user", ["a"])
        assert client.stats.prefetches_dropped == 1
        assert client.stats.prefetches_sent == 0


def test_one_client_shared_by_threads_counts_every_call(
    threaded_sidecar: ThreadedSidecar,
) -> None:
    stored = vectors(4)
    threaded_sidecar.put("user", item_ids(4), stored)
    with EmbeddingClient(threaded_sidecar.address, DIM, deadline=5) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: client.batch_get("user", item_ids(4)), range(80)))
        stats = client.stats
    assert all(np.array_equal(answer.values, stored) for answer in answers)
    assert stats.calls == 80
    assert stats.rows_by_status[RowStatus.HIT] == 320
