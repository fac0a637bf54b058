"""BatchGet's hand-encoded answer (converters.batch_get_bytes) against the generated protobuf
code: the generated parser reads every field back, and the bytes are the ones the generated
serializer writes for the same message."""

import numpy as np
import pytest
from google.protobuf import empty_pb2, unknown_fields

from solaris.server.core import BatchResult
from solaris.server.grpc_api.converters import batch_get_bytes
from solaris.server.store import FLOAT16, FLOAT32
from solaris.v1 import embedding_store_pb2 as pb

# Each side of every varint length boundary, and the largest uint32.
EDGE_AGES = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1]
AGE_BOUNDS = [2**7, 2**8, 2**14 + 1, 2**21 + 1, 2**28 + 1, 2**32]
VERSIONS = ["", "v1", "sha256:" + "ab" * 32, "modèle-ü", "模型", "\U0001f680", "x" * 300]


def random_result(seed: int) -> BatchResult:
    rng = np.random.default_rng(seed)
    rows, dim = int(rng.integers(1, 601)), int(rng.integers(1, 301))
    dtype = (FLOAT16, FLOAT32)[seed % 2]
    values = rng.standard_normal((rows, dim)).astype(dtype)
    statuses = rng.integers(1, 4, rows).astype(np.uint8)
    # The largest age decides how many bytes the longest varint takes: one, two, ... five.
    bound = AGE_BOUNDS[seed % len(AGE_BOUNDS)]
    ages = rng.integers(0, bound, rows, dtype=np.uint64).astype(np.uint32)
    edges = [age for age in EDGE_AGES if age < bound]
    ages[rng.integers(0, rows, len(edges))] = edges
    version = VERSIONS[seed % len(VERSIONS)]
    # HIT and STALE rows are the pair's own; a MISS row any tier of the ladder, or none.
    ladder = rng.integers(pb.TIER_USER, pb.TIER_NONE + 1, rows)
    tiers = np.where(statuses == pb.MISS, ladder, pb.TIER_PAIR).astype(np.uint8)
    return BatchResult(values, statuses, ages, version, tiers)


def plain(statuses: list[int]) -> np.ndarray:
    """The tiers of an answer with no row filled from the ladder."""
    return np.array([pb.TIER_NONE if s == pb.MISS else pb.TIER_PAIR for s in statuses], np.uint8)


def generated(result: BatchResult) -> pb.BatchGetResponse:
    """The same answer built through the generated message."""
    return pb.BatchGetResponse(
        dim=result.values.shape[1],
        dtype=pb.FLOAT16 if result.values.dtype == FLOAT16 else pb.FLOAT32,
        embeddings=result.values.tobytes(),
        statuses=result.statuses.tolist(),
        model_version=result.model_version,
        ages_ms=result.ages_ms.tolist(),
        tiers=result.tiers.tolist(),
    )


def field_numbers(data: bytes) -> list[int]:
    fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    return [fields[index].field_number for index in range(len(fields))]


@pytest.mark.parametrize("seed", range(40))
def test_the_generated_parser_reads_every_field_back(seed: int) -> None:
    result = random_result(seed)

    parsed = pb.BatchGetResponse.FromString(batch_get_bytes(result))

    assert parsed.dim == result.values.shape[1]
    assert parsed.dtype == (pb.FLOAT16 if result.values.dtype == FLOAT16 else pb.FLOAT32)
    wire = np.frombuffer(parsed.embeddings, result.values.dtype).reshape(-1, parsed.dim)
    np.testing.assert_array_equal(wire, result.values)
    assert list(parsed.statuses) == result.statuses.tolist()
    assert list(parsed.ages_ms) == result.ages_ms.tolist()
    assert parsed.model_version == result.model_version
    assert list(parsed.tiers) == result.tiers.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_the_bytes_are_the_generated_serializers(seed: int) -> None:
    result = random_result(seed)

    assert batch_get_bytes(result) == generated(result).SerializeToString()


def test_an_empty_model_version_is_left_out_as_proto3_does() -> None:
    result = BatchResult(
        np.zeros((2, 3), FLOAT32),
        np.array([pb.MISS, pb.MISS], np.uint8),
        np.zeros(2, np.uint32),
        "",
        plain([pb.MISS, pb.MISS]),
    )

    encoded = batch_get_bytes(result)

    assert field_numbers(encoded) == field_numbers(generated(result).SerializeToString())
    assert field_numbers(encoded) == [1, 2, 3, 4, 6, 7]

    assert pb.BatchGetResponse.FromString(encoded).model_version == ""


def test_a_row_view_is_encoded_as_its_values_not_its_base() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[::2, 1:4]  # neither C-contiguous nor starting at the base's first value
    statuses = np.array([1, 3], np.uint8)
    result = BatchResult(view, statuses, np.array([5, 300], np.uint32), "v", plain([1, 3]))

    parsed = pb.BatchGetResponse.FromString(batch_get_bytes(result))

    np.testing.assert_array_equal(np.frombuffer(parsed.embeddings, "<f4").reshape(2, 3), view)
    assert (list(parsed.statuses), list(parsed.ages_ms)) == ([1, 3], [5, 300])


@pytest.mark.parametrize("length", range(2, 6))
def test_ages_all_of_one_varint_length_are_the_generated_serializers(length: int) -> None:
    """A read's ages mostly take the same number of bytes (its rows were computed together),
    which the encoder writes without dropping bytes: each side of both boundaries."""
    low, high = 1 << 7 * (length - 1), min((1 << 7 * length) - 1, 2**32 - 1)
    rng = np.random.default_rng(length)
    ages = rng.integers(low, high, 300, dtype=np.uint64, endpoint=True).astype(np.uint32)
    ages[:2] = low, high
    result = BatchResult(
        np.ones((300, 4), FLOAT16), np.ones(300, np.uint8), ages, "v", plain([1] * 300)
    )

    assert batch_get_bytes(result) == generated(result).SerializeToString()
