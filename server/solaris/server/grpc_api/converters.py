"""The one place where protobuf messages meet the core's plain Python and numpy types."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from solaris.server.core import BatchResult
from solaris.server.errors import InvalidArgument
from solaris.server.store import FLOAT16, FLOAT32, RowStatus
from solaris.v1.embedding_store_pb2 import BatchGetResponse as BatchGetResponseProto
from solaris.v1.embedding_store_pb2 import Dtype as DtypeProto
from solaris.v1.embedding_store_pb2 import GetResponse as GetResponseProto
from solaris.v1.embedding_store_pb2 import PrefetchResponse as PrefetchResponseProto
from solaris.v1.embedding_store_pb2 import RowStatus as RowStatusProto

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
_LENGTH_DELIMITED = 2


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse, naming the field that broke it."""

    error: InvalidArgument


def dtype_from_proto(dtype: int) -> np.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidArgument("dtype", f"unknown value {dtype}; use FLOAT16 or FLOAT32") from None


def _dtype_to_proto(dtype: np.dtype) -> DtypeProto:
    return DtypeProto.FLOAT16 if dtype == FLOAT16 else DtypeProto.FLOAT32


def batch_get_response(result: BatchResult) -> BatchGetResponseProto:
    return BatchGetResponseProto(
        dim=result.values.shape[1],
        dtype=_dtype_to_proto(result.values.dtype),
        embeddings=result.values.tobytes(),
        statuses=result.statuses.tolist(),
        model_version=result.model_version,
        ages_ms=result.ages_ms.tolist(),
    )


def get_response(result: BatchResult) -> GetResponseProto:
    return GetResponseProto(
        dim=result.values.shape[1],
        dtype=_dtype_to_proto(result.values.dtype),
        embedding=result.values[0].tobytes(),
        status=_ROW_STATUSES[int(result.statuses[0])],
        model_version=result.model_version,
        age_ms=int(result.ages_ms[0]),
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
