"""The EmbeddingStore handlers: unpack each request, call the core, pack the answer. Registered
by hand (not through the generated servicer base class) so that request parsing can name a
field holding bad UTF-8."""

import time
from typing import Any

import grpc

from solaris.server.core import EmbeddingService
from solaris.server.grpc_api import converters
from solaris.server.grpc_api.status import Context, grpc_errors
from solaris.v1 import embedding_store_pb2 as pb


class EmbeddingStoreHandlers:
    """gRPC handlers for solaris.v1.EmbeddingStore."""

    def __init__(self, service: EmbeddingService) -> None:
        self.service = service

    @grpc_errors
    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        dtype = converters.dtype_from_proto(request.dtype)
        result = await self.service.get(request.user_id, request.item_id, dtype, _deadline(context))
        return converters.get_response(result)

    @grpc_errors
    async def BatchGet(self, request: pb.BatchGetRequest, context: Context) -> pb.BatchGetResponse:
        dtype = converters.dtype_from_proto(request.dtype)
        result = await self.service.batch_get(
            request.user_id, request.item_ids, dtype, _deadline(context)
        )
        return converters.batch_get_response(result)

    @grpc_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: Context) -> pb.PrefetchResponse:
        result = await self.service.prefetch(
            request.user_id,
            request.item_ids,
            request.history,
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
            response_serializer=lambda message: message.SerializeToString(),
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _deadline(context: Context) -> float | None:
    """The caller's deadline as a time.monotonic() instant, or None if it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
