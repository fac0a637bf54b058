"""Who may talk to the sidecar: TLS (and mutual TLS) credentials for its ports, and the
shared-token check every call but a health check must pass when a token is set."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

from solaris.server.settings import SettingsError, SidecarSettings, check_tls_files

logger = logging.getLogger("solaris.server")
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Methods any caller may use without the token: probes carry none."""
REFUSAL = "this sidecar wants metadata `authorization: Bearer <token>` with its --auth-token"


def server_credentials(settings: SidecarSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, requiring a client certificate signed by
    tls_client_ca when it is set, and served anew once the files change; None for a plain
    port."""
    if not settings.tls_cert:
        return None
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    # gRPC's docs let the fetcher return None for "no change"; its stubs leave None out.
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", files.renewed)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), fetcher, require_client_authentication=bool(settings.tls_client_ca)
    )


class CertificateFiles:
    """The TLS files, read again at a handshake once any has changed (cert-manager renews a
    Secret's files in place), so a renewed certificate is served without a restart. A renewal
    that does not check out (half written, a key not the certificate's) is logged, and the
    last good files stay in use until the next change."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.paths = (cert, key, client_ca)
        self._stamps = self._stat()

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.paths
        return grpc.ssl_server_certificate_configuration(
            [(Path(key).read_bytes(), Path(cert).read_bytes())],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        )

    def renewed(self) -> grpc.ServerCertificateConfiguration | None:
        """The files' configuration if they changed since last read and check out, else None
        (gRPC keeps what it has). gRPC calls this before each handshake."""
        try:
            stamps = self._stat()
            if stamps == self._stamps:
                return None
            self._stamps = stamps
            check_tls_files(*self.paths)
            configuration = self.configuration()
        except (OSError, SettingsError) as error:
            logger.warning("kept the TLS files in use: their renewal did not load (%s)", error)
            return None
        logger.info("serving the renewed TLS certificate in %s", self.paths[0])
        return configuration

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        found = [os.stat(path) for path in self.paths if path]
        return tuple((info.st_ino, info.st_size, info.st_mtime_ns) for info in found)


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
