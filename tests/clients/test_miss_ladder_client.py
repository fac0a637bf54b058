"""The client and the miss ladder, against a real sidecar: the tier per row, the fallback only
where no tier filled a row, and stats by tier."""

import numpy as np

from solaris.clients import ClientOptions, EmbeddingClient, FallbackReason, RowStatus, RowTier
from tests.clients.conftest import ThreadedSidecar, vectors
from tests.conftest import DIM

FALLBACK = np.full(DIM, 7.0, np.float32)


def test_enriched_rows_keep_their_values_and_only_unfilled_ones_fall_back(
    threaded_sidecar: ThreadedSidecar,
) -> None:
    stored = vectors(2)
    threaded_sidecar.put("u1", ["a", "b"], stored)
    options = ClientOptions(miss_fill="enriched")
    with EmbeddingClient(
        threaded_sidecar.address, DIM, fallback=FALLBACK, deadline=2, options=options
    ) as client:
        answer = client.batch_get("u1", ["a", "new"])
        cold = client.batch_get("cold", ["nothing-here"])
        stats = client.stats

    assert answer.status.tolist() == [RowStatus.HIT, RowStatus.MISS]
    assert answer.tier.tolist() == [RowTier.PAIR, RowTier.USER]
    np.testing.assert_allclose(answer.values[1], stored.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert answer.fallback_reason is None
    assert answer.row(1).tier is RowTier.USER
    # The cold user still gets the global mean: every computed pair is of one version.
    assert cold.tier.tolist() == [RowTier.GLOBAL]
    assert stats.rows_by_tier[RowTier.PAIR] == 1
    assert stats.rows_by_tier[RowTier.USER] == 1
    assert stats.rows_by_tier[RowTier.GLOBAL] == 1
    assert stats.rows_by_status[RowStatus.MISS] == 2


def test_plain_misses_get_the_fallback_and_tier_none(threaded_sidecar: ThreadedSidecar) -> None:
    threaded_sidecar.put("u1", ["a"], vectors(1))
    options = ClientOptions(miss_fill="plain")
    with EmbeddingClient(
        threaded_sidecar.address, DIM, fallback=FALLBACK, deadline=2, options=options
    ) as client:
        answer = client.batch_get("u1", ["a", "new"])
        stats = client.stats

    assert answer.tier.tolist() == [RowTier.PAIR, RowTier.NONE]
    np.testing.assert_array_equal(answer.values[1], FALLBACK)
    assert answer.fallback_reason is FallbackReason.MISS
    assert stats.rows_by_tier[RowTier.NONE] == 1


def test_a_dead_sidecar_gives_tier_none(dead_address: str) -> None:
    with EmbeddingClient(dead_address, DIM, fallback=FALLBACK) as client:
        answer = client.batch_get("u1", ["a"])

    assert answer.tier.tolist() == [RowTier.NONE]
    assert client.stats.rows_by_tier[RowTier.NONE] == 1
