"""The miss ladder end to end: a real sidecar on a real socket fills missed rows from the
user's, the item's or the global aggregate, says which per row, and keeps statuses as before."""

import time

import grpc
import numpy as np
import pytest

from solaris.app.compose import SidecarParts, sidecar_parts
from solaris.server.aggregates import aggregate_bytes
from solaris.server.l1 import MemoryStore, pair_bytes, user_bytes
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import Freshness
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.server.test_grpc_api import decode, vectors


def ask(user_id: str, item_ids: list[str], miss_fill: int = pb.ENRICHED) -> pb.BatchGetRequest:
    return pb.BatchGetRequest(user_id=user_id, item_ids=item_ids, miss_fill=miss_fill)


async def test_a_user_with_computed_pairs_gets_the_user_tier_for_a_new_item(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    stored = vectors(2)
    await sidecar.service.put("u1", ["a", "b"], stored, "v1")

    response = await stub.BatchGet(ask("u1", ["a", "new"]))

    assert list(response.statuses) == [pb.HIT, pb.MISS]
    assert list(response.tiers) == [pb.TIER_PAIR, pb.TIER_USER]
    values = decode(response)
    np.testing.assert_array_equal(values[0], stored[0])
    np.testing.assert_allclose(values[1], stored.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert response.model_version == "v1"
    assert response.ages_ms[1] == 0


async def test_a_user_with_none_gets_the_item_tier_then_the_global_mean(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    rows = vectors(3)
    await sidecar.service.put("u1", ["shared"], rows[:1], "v1")
    await sidecar.service.put("u2", ["shared", "other"], rows[1:], "v1")

    response = await stub.BatchGet(ask("cold", ["shared", "unknown"]))

    assert list(response.statuses) == [pb.MISS, pb.MISS]
    assert list(response.tiers) == [pb.TIER_ITEM, pb.TIER_GLOBAL]
    values = decode(response)
    # Written within the same instant: no decay, so the plain means.
    np.testing.assert_allclose(values[0], rows[:2].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values[1], rows.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert response.model_version == "v1"


async def test_a_cold_everything_gets_zeros_with_tier_none(stub: EmbeddingStoreStub) -> None:
    response = await stub.BatchGet(ask("cold", ["x", "y"]))

    assert list(response.statuses) == [pb.MISS, pb.MISS]
    assert list(response.tiers) == [pb.TIER_NONE, pb.TIER_NONE]
    assert not decode(response).any()
    assert response.model_version == ""


async def test_a_new_model_version_starts_its_aggregates_afresh(
    sidecar: Sidecar, parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    old, new = vectors(2, seed=1), vectors(1, seed=2)
    await sidecar.service.put("u1", ["a", "b"], old, "v1")
    await sidecar.service.put("u1", ["c"], new, "v2")

    response = await stub.BatchGet(ask("u1", ["unseen"]))

    assert list(response.tiers) == [pb.TIER_USER]
    assert response.model_version == "v2"
    np.testing.assert_array_equal(decode(response)[0], new[0])
    # An answer whose pairs are v1's takes no v2 aggregate: the item "a" has none of v2.
    response = await stub.BatchGet(ask("u9", ["a"]))
    assert list(response.tiers) == [pb.TIER_GLOBAL]
    np.testing.assert_array_equal(decode(response)[0], new[0])


async def test_an_enriched_row_is_a_miss_to_the_speculator_and_the_log(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    await sidecar.service.put("u1", ["a"], vectors(1), "v1")

    await stub.BatchGet(ask("u1", ["a", "new"]))

    logged = sidecar.service.request_log.snapshot()[-1]
    assert logged.statuses.tolist() == [pb.HIT, pb.MISS]


async def test_plain_misses_when_the_request_asks(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    await sidecar.service.put("u1", ["a"], vectors(1), "v1")

    response = await stub.BatchGet(ask("u1", ["a", "new"], pb.PLAIN))

    assert list(response.tiers) == [pb.TIER_PAIR, pb.TIER_NONE]
    assert not decode(response)[1].any()


async def test_the_server_default_is_plain_misses(
    sidecar: Sidecar, stub: EmbeddingStoreStub
) -> None:
    await sidecar.service.put("u1", ["a"], vectors(1), "v1")

    response = await stub.BatchGet(ask("u1", ["new"], pb.MISS_FILL_UNSPECIFIED))

    assert list(response.statuses) == [pb.MISS]
    assert list(response.tiers) == [pb.TIER_NONE]
    assert not decode(response).any()


@pytest.fixture
def ladder_on(settings: SidecarSettings) -> SidecarParts:
    return sidecar_parts(settings.model_copy(update={"miss_ladder": True}))


async def test_the_miss_ladder_flag_makes_enriched_the_default(ladder_on: SidecarParts) -> None:
    running = ladder_on.sidecar()
    await running.start()
    try:
        await running.service.put("u1", ["a"], vectors(1), "v1")
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = EmbeddingStoreStub(channel)
            response = await stub.BatchGet(pb.BatchGetRequest(user_id="u1", item_ids=["new"]))
            plain = await stub.BatchGet(ask("u1", ["new"], pb.PLAIN))
            single = await stub.Get(pb.GetRequest(user_id="u1", item_id="new"))
    finally:
        await running.stop(grace=0)
    assert list(response.statuses) == [pb.MISS]  # an old client, reading statuses, sees MISS
    assert list(response.tiers) == [pb.TIER_USER]
    assert list(plain.tiers) == [pb.TIER_NONE]
    assert (single.status, single.tier) == (pb.MISS, pb.TIER_USER)


async def test_an_unknown_miss_fill_is_invalid_naming_the_field(
    stub: EmbeddingStoreStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.BatchGet(ask("u1", ["a"], 9))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("miss_fill:")


def test_the_l1_byte_cap_stays_exact_with_aggregates() -> None:
    dim = 8
    cap = 40 * pair_bytes(dim) + 4 * user_bytes("u00") + 12 * aggregate_bytes("i000", dim)
    store = MemoryStore(cap, dim, aggregate_share=0.5)
    rng = np.random.default_rng(0)
    at = time.time()
    for user in range(30):
        items = [f"i{(user * 7 + k) % 90:03d}" for k in range(5)]
        rows = rng.standard_normal((5, dim)).astype(np.float32)
        store.write_sync(f"u{user:02d}", items, rows, Freshness.starting("v1", at, 60, 60))
        held_users = {store._users.ids[n] for n in store._users.numbers.values()}
        expected = (
            len(store) * pair_bytes(dim)
            + sum(user_bytes(u) for u in held_users)
            + store.aggregates.nbytes
        )
        assert store.nbytes == expected <= cap
    assert len(store.aggregates) <= store.aggregates.capacity
    assert store.aggregates.nbytes == sum(
        aggregate_bytes(key, dim) for _, key in store.aggregates._slots
    )
    assert store.aggregates.nbytes > 0
    assert store.evictions > 0


def test_recent_pairs_weigh_more_in_a_users_aggregate() -> None:
    dim = 4
    store = MemoryStore(1024**2, dim, aggregate_share=0.25, half_life_seconds=10.0)
    old, new = np.ones((1, dim), np.float32), np.full((1, dim), 3.0, np.float32)
    store.write_sync("u", ["a"], old, Freshness.starting("v1", 1000.0, 60, 60))
    store.write_sync("u", ["b"], new, Freshness.starting("v1", 1010.0, 60, 60))
    values = np.zeros((1, dim), np.float32)

    tiers, version = store.aggregates.fill("u", ["c"], values, np.array([0]), "v1", 1010.0)

    # One half-life later the old pair weighs 1/2 and the new one 1: (1/2 + 3) / 1.5.
    np.testing.assert_allclose(values[0], (0.5 * 1 + 3) / 1.5, rtol=1e-6)
    assert (tiers.tolist(), version) == ([2], "v1")


def test_aggregates_not_updated_within_their_max_age_are_not_served() -> None:
    dim = 4
    store = MemoryStore(1024**2, dim, aggregate_share=0.25, aggregate_max_age_seconds=100.0)
    store.write_sync("u", ["a"], np.ones((1, dim), np.float32), Freshness.starting("v1", 0, 1, 1))
    values = np.zeros((2, dim), np.float32)

    fresh, _ = store.aggregates.fill("u", ["b", "c"], values, np.array([0, 1]), "v1", 99.0)
    old, version = store.aggregates.fill("x", ["a", "c"], values, np.array([0, 1]), "v1", 100.0)

    assert fresh.tolist() == [2, 2]
    assert (old.tolist(), version) == ([5, 5], "")
