"""Who may talk to the sidecar: TLS (and mutual TLS) credentials for its ports, and the
shared-token check every call but a health check must pass when a token is set."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from solaris.server.settings import SidecarSettings

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Methods any caller may use without the token: probes carry none."""
REFUSAL = "this sidecar wants metadata `authorization: Bearer <token>` with its --auth-token"


def server_credentials(settings: SidecarSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, requiring a client certificate signed by
    tls_client_ca when it is set; None for a plain port."""
    if not settings.tls_cert:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


if TYPE_CHECKING:  # grpc's classes take type arguments in its stubs alone
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, a call without `authorization: Bearer <token>`, but for
    the health service. The token is compared in constant time and never logged."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        if self._carries_token(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)

    def _carries_token(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def _refusing(handler: Handler) -> Handler:
    """A handler of the same kind as `handler` that refuses the call."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        _refuse,
        request_deserializer=None,  # a refused caller's request is never decoded
        response_serializer=handler.response_serializer,
    )
