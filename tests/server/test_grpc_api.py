"""The three RPCs end to end through the generated stub, against a real sidecar."""

import socket
import time

import grpc
import numpy as np
import pytest

from solaris.app.compose import SidecarParts, sidecar_parts
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import Freshness
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM


def vectors(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def decode(response: pb.BatchGetResponse) -> np.ndarray:
    wire = "<f2" if response.dtype == pb.FLOAT16 else "<f4"
    return np.frombuffer(response.embeddings, dtype=wire).reshape(-1, response.dim)


async def test_batch_get_returns_stored_rows_in_request_order_and_zero_fills_misses(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    stored = vectors(3)
    await sidecar.service.put("u1", ["a", "b", "c"], stored, "v1")

    response = await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["c", "x", "a"]))

    assert response.dim == DIM
    assert response.dtype == pb.FLOAT32
    values = decode(response)
    np.testing.assert_array_equal(values[0], stored[2])
    np.testing.assert_array_equal(values[1], np.zeros(DIM, np.float32))
    np.testing.assert_array_equal(values[2], stored[0])
    assert list(response.statuses) == [pb.HIT, pb.MISS, pb.HIT]
    assert response.model_version == "v1"
    assert response.ages_ms[1] == 0


async def test_batch_get_answers_stale_rows_with_their_age_and_version(
    sidecar: Sidecar, parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    stored = vectors(2)
    computed_at = time.time() - 3650  # past the hour's ttl, within the stale window
    old = Freshness.starting("v0", computed_at, ttl_seconds=3600, stale_seconds=600)
    parts.l1.write_sync("u1", ["old"], stored[:1], old)
    await sidecar.service.put("u1", ["new"], stored[1:], "v1")

    response = await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["old", "x", "new"]))

    assert list(response.statuses) == [pb.STALE, pb.MISS, pb.HIT]
    np.testing.assert_array_equal(decode(response)[[0, 2]], stored)
    assert response.model_version in ("v0", "v1")
    stale_age, miss_age, hit_age = response.ages_ms
    assert 3_650_000 <= stale_age <= (time.time() - computed_at) * 1000
    assert miss_age == 0
    assert hit_age < stale_age


async def test_batch_get_float16_is_the_stored_values_rounded(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    stored = vectors(2)
    await sidecar.service.put("u1", ["a", "b"], stored, "v1")

    response = await stub.BatchGet(
        pb.BatchGetRequest(user_id="u1", item_ids=["a", "b"], dtype=pb.FLOAT16)
    )

    assert response.dtype == pb.FLOAT16
    assert len(response.embeddings) == 2 * DIM * 2
    np.testing.assert_array_equal(decode(response), stored.astype(np.float16))


async def test_batch_get_is_logged_with_statuses(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    await sidecar.service.put("u1", ["a"], vectors(1), "v1")

    await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["a", "b"]))

    [logged] = sidecar.service.request_log.snapshot()
    assert (logged.user_id, logged.item_ids) == ("u1", ("a", "b"))
    assert logged.statuses.tolist() == [pb.HIT, pb.MISS]


async def test_get_returns_one_pair(sidecar: Sidecar, stub: EmbeddingStoreStub) -> None:
    stored = vectors(1)
    await sidecar.service.put("u1", ["a"], stored, "v7")

    hit = await stub.Get(pb.GetRequest(user_id="u1", item_id="a"))
    miss = await stub.Get(pb.GetRequest(user_id="u2", item_id="a"))

    np.testing.assert_array_equal(np.frombuffer(hit.embedding, "<f4"), stored[0])
    assert (hit.status, hit.model_version) == (pb.HIT, "v7")
    assert miss.status == pb.MISS
    assert miss.embedding == bytes(DIM * 4)


async def test_prefetch_queues_only_pairs_not_already_fresh(
    sidecar: Sidecar, parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    await sidecar.service.put("u1", ["a"], vectors(1), "v1")

    response = await stub.Prefetch(
        pb.PrefetchRequest(
            user_id="u1", item_ids=["a", "b", "c", "b"], history=["h1", "h2"], priority=5
        )
    )

    assert (response.queued, response.already_fresh) == (2, 1)
    [task] = parts.prefetch_queue.take(max_tasks=10, timeout=0)
    assert (task.user_id, task.item_ids, task.history, task.priority) == (
        "u1",
        ("b", "c"),
        ("h1", "h2"),
        5,
    )


async def test_full_prefetch_queue_is_resource_exhausted_and_keeps_what_was_queued(
    sidecar: Sidecar, parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    first = [f"i{n}" for n in range(8)]
    await stub.Prefetch(pb.PrefetchRequest(user_id="u1", item_ids=first))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Prefetch(pb.PrefetchRequest(user_id="u2", item_ids=["x", "y", "z"]))

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "prefetch queue full" in refused.value.details()
    tasks = parts.prefetch_queue.take(max_tasks=10, timeout=0)
    assert [(t.user_id, t.item_ids) for t in tasks] == [("u1", tuple(first))]


LONG_ID = "x" * 33
BAD_REQUESTS = [
    ("BatchGet", pb.BatchGetRequest(user_id="", item_ids=["a"]), "user_id"),
    ("BatchGet", pb.BatchGetRequest(user_id="u", item_ids=[]), "item_ids"),
    ("BatchGet", pb.BatchGetRequest(user_id="u", item_ids=["a"] * 65), "item_ids"),
    ("BatchGet", pb.BatchGetRequest(user_id="u", item_ids=["a", ""]), "item_ids[1]"),
    ("BatchGet", pb.BatchGetRequest(user_id=LONG_ID, item_ids=["a"]), "user_id"),
    ("BatchGet", pb.BatchGetRequest(user_id="u", item_ids=["a", LONG_ID]), "item_ids[1]"),
    ("BatchGet", pb.BatchGetRequest(user_id="u", item_ids=["a"], dtype=7), "dtype"),
    ("Get", pb.GetRequest(user_id="u", item_id=""), "item_id"),
    ("Get", pb.GetRequest(user_id="u", item_id="a", dtype=9), "dtype"),
    ("Prefetch", pb.PrefetchRequest(user_id="u", item_ids=[]), "item_ids"),
    ("Prefetch", pb.PrefetchRequest(user_id="u", item_ids=["a"], history=["h"] * 17), "history"),
    ("Prefetch", pb.PrefetchRequest(user_id="u", item_ids=["a"], priority=1001), "priority"),
]


@pytest.mark.parametrize(("method", "request_message", "field"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: EmbeddingStoreStub, method: str, request_message: object, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(stub, method)(request_message)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"{field}:")


def with_raw_string(field_number: int, raw: bytes) -> bytes:
    """A length-delimited field holding `raw`, which protobuf would refuse to build itself."""
    return bytes([field_number << 3 | 2, len(raw)]) + raw


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (with_raw_string(1, b"\xff\xfe") + with_raw_string(2, b"a"), "user_id"),
        (
            with_raw_string(1, b"u") + with_raw_string(2, b"a") + with_raw_string(2, b"\xc3"),
            "item_ids[1]",
        ),
    ],
)
async def test_non_utf8_ids_are_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, payload: bytes, field: str
) -> None:
    raw_batch_get = channel.unary_unary(
        "/solaris.v1.EmbeddingStore/BatchGet",
        request_serializer=lambda data: data,
        response_deserializer=pb.BatchGetResponse.FromString,
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw_batch_get(payload)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"{field}: not valid UTF-8"


async def test_bad_input_stores_and_logs_nothing(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    stored = vectors(1)
    await sidecar.service.put("u1", ["a"], stored, "v1")

    with pytest.raises(grpc.aio.AioRpcError):
        await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["a", ""]))

    assert sidecar.service.request_log.snapshot() == []
    response = await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["a"]))
    np.testing.assert_array_equal(decode(response)[0], stored[0])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_sidecar_on_an_ipv6_host_answers_at_its_bracketed_address(
    settings: SidecarSettings,
) -> None:
    sidecar = sidecar_parts(settings.model_copy(update={"host": "::1"})).sidecar()
    await sidecar.start()
    try:
        assert sidecar.address.startswith("[::1]:")
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            reply = await EmbeddingStoreStub(channel).Get(pb.GetRequest(user_id="u", item_id="i"))
        assert reply.status == pb.MISS
    finally:
        await sidecar.stop(grace=0)
