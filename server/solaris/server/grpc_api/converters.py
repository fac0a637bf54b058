"""The one place where protobuf messages meet the core's plain Python and numpy types.

BatchGet's answer is encoded here byte for byte rather than through the generated message:
filling `repeated` fields from numpy means a Python int per row, twice, on every read. The
bytes are what the generated serializer writes (fields in number order, proto3 defaults left
out), so any protobuf parser reads them; tests/server/test_wire.py holds the two together.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from solaris.server.core import BatchResult
from solaris.server.errors import InvalidArgument
from solaris.server.store import FLOAT16, FLOAT32, RowStatus
from solaris.v1.embedding_store_pb2 import Dtype as DtypeProto
from solaris.v1.embedding_store_pb2 import GetResponse as GetResponseProto
from solaris.v1.embedding_store_pb2 import MissFill as MissFillProto
from solaris.v1.embedding_store_pb2 import PrefetchResponse as PrefetchResponseProto
from solaris.v1.embedding_store_pb2 import RowStatus as RowStatusProto
from solaris.v1.embedding_store_pb2 import RowTier as RowTierProto

_DTYPES: dict[int, np.dtype] = {
    DtypeProto.DTYPE_UNSPECIFIED: FLOAT32,
    DtypeProto.FLOAT32: FLOAT32,
    DtypeProto.FLOAT16: FLOAT16,
}
_ROW_STATUSES: dict[int, RowStatusProto] = {
    RowStatus.HIT: RowStatusProto.HIT,
    RowStatus.MISS: RowStatusProto.MISS,
    RowStatus.STALE: RowStatusProto.STALE,
}
_VARINT = 0
_LENGTH_DELIMITED = 2
# BatchGetResponse's field keys (number << 3 | wire type: one byte for numbers under 16), the
# numbers as in protos/solaris/v1/embedding_store.proto.
_DIM_KEY = bytes((1 << 3 | _VARINT,))
_DTYPE_FIELDS = {
    FLOAT16: bytes((2 << 3 | _VARINT, DtypeProto.FLOAT16)),
    FLOAT32: bytes((2 << 3 | _VARINT, DtypeProto.FLOAT32)),
}
_EMBEDDINGS_KEY = bytes((3 << 3 | _LENGTH_DELIMITED,))
_STATUSES_KEY = bytes((4 << 3 | _LENGTH_DELIMITED,))
_MODEL_VERSION_KEY = bytes((5 << 3 | _LENGTH_DELIMITED,))
_AGES_MS_KEY = bytes((6 << 3 | _LENGTH_DELIMITED,))
_TIERS_KEY = bytes((7 << 3 | _LENGTH_DELIMITED,))
_GROUP_SHIFTS = np.arange(0, 35, 7, dtype=np.uint32)[:, np.newaxis]
"""Where a uint32 varint's 7-bit groups start, low first: at most five."""
_CONTINUED = np.uint32(0x80)
_LOW_SEVEN = np.uint32(0x7F)


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse, naming the field that broke it."""

    error: InvalidArgument


def dtype_from_proto(dtype: int) -> np.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidArgument("dtype", f"unknown value {dtype}; use FLOAT16 or FLOAT32") from None


def enrich_from_proto(miss_fill: int) -> bool | None:
    """A request's miss_fill as the core's `enrich`: None for the sidecar's default."""
    if miss_fill == MissFillProto.MISS_FILL_UNSPECIFIED:
        return None
    if miss_fill in (MissFillProto.ENRICHED, MissFillProto.PLAIN):
        return miss_fill == MissFillProto.ENRICHED
    raise InvalidArgument("miss_fill", f"unknown value {miss_fill}; use ENRICHED or PLAIN")


def _dtype_to_proto(dtype: np.dtype) -> DtypeProto:
    return DtypeProto.FLOAT16 if dtype == FLOAT16 else DtypeProto.FLOAT32


def batch_get_bytes(result: BatchResult) -> bytes:
    """The serialized BatchGetResponse for a read: BatchGet's response serializer."""
    values = np.ascontiguousarray(result.values)
    version = result.model_version.encode()
    parts: list[bytes | memoryview] = []
    if values.shape[1]:
        parts += (_DIM_KEY, _varint(values.shape[1]))
    parts.append(_DTYPE_FIELDS.get(values.dtype, _DTYPE_FIELDS[FLOAT32]))
    if values.size:
        # A view, not a copy: bytes.join reads the array's buffer.
        parts += (_EMBEDDINGS_KEY, _varint(values.nbytes), values.data)
    if result.statuses.size:
        # RowStatus values are under 0x80: a varint of one byte each.
        statuses = result.statuses.astype(np.uint8, copy=False).tobytes()
        parts += (_STATUSES_KEY, _varint(len(statuses)), statuses)
    if version:
        parts += (_MODEL_VERSION_KEY, _varint(len(version)), version)
    parts += _packed(_AGES_MS_KEY, result.ages_ms)
    if result.tiers.size:
        # RowTier values are under 0x80 too.
        tiers = result.tiers.astype(np.uint8, copy=False).tobytes()
        parts += (_TIERS_KEY, _varint(len(tiers)), tiers)
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def _varint(value: int) -> bytes:
    """`value` as a varint. Cached: an answer's lengths repeat (its row count and dim do)."""
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _packed(key: bytes, values: np.ndarray) -> tuple[bytes, ...]:
    """A packed repeated uint32 (or enum) field; nothing for no values, as proto3 writes it."""
    if not values.size:
        return ()
    payload = _packed_varints(values)
    return key, _varint(len(payload)), payload


def _packed_varints(values: np.ndarray) -> bytes:
    """Each of `values` (uint32 range) as a varint, back to back: a packed field's payload."""
    top = int(values.max())
    if top < 0x80:  # statuses, and ages under 128 ms: one byte each
        return values.astype(np.uint8, copy=False).tobytes()
    groups = (top.bit_length() + 6) // 7
    # Built group-major, (groups, n), so each numpy call runs along the values. Byte k is
    # group k with the continuation bit while higher groups remain: min(shifted, 0x80) is
    # 0x80 then, and the group itself (under 0x80) once none does.
    shifted = values.astype(np.uint32, copy=False) >> _GROUP_SHIFTS[:groups]
    encoded = np.minimum(shifted, _CONTINUED)
    encoded |= shifted & _LOW_SEVEN
    by_value: np.ndarray = np.ascontiguousarray(encoded.T, dtype=np.uint8)
    if int(values.min()) >> 7 * (groups - 1):  # every value takes all the groups (ages
        return by_value.tobytes()  # of rows computed together mostly do)
    # Past a value's last group every byte is 0, and before it none is (the continuation
    # bit, or a nonzero top group), so the nonzero bytes are the varint; the first byte is
    # always kept, for the value 0.
    kept = by_value != 0
    kept[:, 0] = True
    varints: np.ndarray = by_value[kept]
    return varints.tobytes()


def get_response(result: BatchResult) -> GetResponseProto:
    return GetResponseProto(
        dim=result.values.shape[1],
        dtype=_dtype_to_proto(result.values.dtype),
        embedding=result.values[0].tobytes(),
        status=_ROW_STATUSES[int(result.statuses[0])],
        model_version=result.model_version,
        age_ms=int(result.ages_ms[0]),
        tier=cast(RowTierProto, int(result.tiers[0])),
    )


def prefetch_response(queued: int, already_fresh: int) -> PrefetchResponseProto:
    return PrefetchResponseProto(queued=queued, already_fresh=already_fresh)


def lenient_deserializer(message_type: type[Message]) -> Callable[[bytes], object]:
    """Parses a request, or returns a MalformedRequest naming the bad field.

    The protobuf runtime refuses a string field holding invalid UTF-8 without saying which
    field; gRPC would then answer INTERNAL. Re-reading the bytes field by field finds it, so
    the caller gets INVALID_ARGUMENT and the field's name.
    """

    def deserialize(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return MalformedRequest(_locate_decode_error(message_type, data, error))

    return deserialize


def _locate_decode_error(
    message_type: type[Message], data: bytes, error: DecodeError
) -> InvalidArgument:
    try:
        fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return InvalidArgument("request", f"not a valid {message_type.DESCRIPTOR.name}")
    by_number = message_type.DESCRIPTOR.fields_by_number
    occurrences: dict[int, int] = {}
    for position in range(len(fields)):
        field = fields[position]
        index = occurrences.get(field.field_number, 0)
        occurrences[field.field_number] = index + 1
        descriptor = by_number.get(field.field_number)
        if descriptor is None or field.wire_type != _LENGTH_DELIMITED:
            continue
        try:
            field.data.decode("utf-8")
        except UnicodeDecodeError:
            name = f"{descriptor.name}[{index}]" if descriptor.is_repeated else descriptor.name
            return InvalidArgument(name, "not valid UTF-8")
    return InvalidArgument("request", f"not a valid {message_type.DESCRIPTOR.name}: {error}")
