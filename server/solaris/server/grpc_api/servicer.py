"""The EmbeddingStore handlers: unpack each request, call the core, pack the answer. Registered
by hand (not through the generated servicer base class) so that request parsing can name a
field holding bad UTF-8, and so that BatchGet's answer is encoded straight from the core's
arrays (`converters.batch_get_bytes`) rather than through the generated message.

A repeated string field makes a new Python string for each element every time it is iterated,
so each handler copies its id lists into tuples once: the core validates, reads, logs and
queues from those (a tuple is also what the request log keeps, so it is not copied again).
"""

import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from solaris.server.core import BatchResult, EmbeddingService
from solaris.server.grpc_api import converters
from solaris.server.grpc_api.admission import ANSWER_OVERHEAD_BYTES, Admission, answer_bytes
from solaris.server.grpc_api.status import Context, grpc_errors
from solaris.v1 import embedding_store_pb2 as pb

_RESPONSE_SERIALIZERS: dict[str, Callable[[Any], bytes]] = {
    "BatchGet": converters.batch_get_bytes,
}
"""Handlers that answer something other than their generated response message."""


class EmbeddingStoreHandlers:
    """gRPC handlers for solaris.v1.EmbeddingStore. Each call is admitted first: counted for
    the drain, and its answer's bytes counted until sent."""

    def __init__(self, service: EmbeddingService, admission: Admission) -> None:
        self.service = service
        self.admission = admission
        self.dim = service.settings.dim
        self.max_items = service.settings.max_items

    @grpc_errors
    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        dtype = converters.dtype_from_proto(request.dtype)
        enrich = converters.enrich_from_proto(request.miss_fill)
        self.admission.admit(context, answer_bytes(1, self.dim, dtype))
        result = await self.service.get(
            request.user_id, request.item_id, dtype, _deadline(context), enrich
        )
        return converters.get_response(result)

    @grpc_errors
    async def BatchGet(self, request: pb.BatchGetRequest, context: Context) -> BatchResult:
        """Answers the core's result; the registered serializer encodes it."""
        dtype = converters.dtype_from_proto(request.dtype)
        enrich = converters.enrich_from_proto(request.miss_fill)
        rows = min(len(request.item_ids), self.max_items)  # more is refused, naming the field
        self.admission.admit(context, answer_bytes(rows, self.dim, dtype))
        return await self.service.batch_get(
            request.user_id, tuple(request.item_ids), dtype, _deadline(context), enrich
        )

    @grpc_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: Context) -> pb.PrefetchResponse:
        self.admission.admit(context, ANSWER_OVERHEAD_BYTES)
        result = await self.service.prefetch(
            request.user_id,
            tuple(request.item_ids),
            tuple(request.history),
            request.priority,
            _deadline(context),
        )
        return converters.prefetch_response(result.queued, result.already_fresh)


def add_to_server(servicer: EmbeddingStoreHandlers, server: grpc.aio.Server) -> None:
    """Registers the servicer with request parsing that names a field holding bad UTF-8."""
    service = pb.DESCRIPTOR.services_by_name["EmbeddingStore"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=converters.lenient_deserializer(
                getattr(pb, method.input_type.name)
            ),
            response_serializer=_RESPONSE_SERIALIZERS.get(method.name, _serialize),
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _deadline(context: Context) -> float | None:
    """The caller's deadline as a time.monotonic() instant, or None if it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
