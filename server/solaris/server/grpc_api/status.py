"""Maps the core's errors to gRPC status codes, in one decorator every RPC wears."""

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from solaris.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    SolarisError,
    Unavailable,
)
from solaris.server.grpc_api.converters import MalformedRequest

_STATUS_BY_ERROR: dict[type[SolarisError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

Servicer = TypeVar("Servicer")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Servicer, Any, Context], Awaitable[Any]]


def grpc_errors(handler: Handler[Servicer]) -> Handler[Servicer]:
    """Answers a malformed request or a SolarisError with its status and message."""

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Any, context: Context) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        try:
            return await handler(self, request, context)
        except SolarisError as error:
            status = _STATUS_BY_ERROR.get(type(error), grpc.StatusCode.INTERNAL)
            await context.abort(status, str(error))

    return wrapper
