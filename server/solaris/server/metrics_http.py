"""/metrics over HTTP on an asyncio event loop: one coroutine per connection, not a thread,
and a bounded number of them.

prometheus_client's own server holds a thread per open connection (300 idle connections made
311 threads) behind a listen backlog of 5. Here a connection gets one request, one answer and
is closed; one that sends nothing within READ_TIMEOUT_SECONDS, sends a head past
MAX_HEAD_BYTES, or finds MAX_CONNECTIONS already open is closed at once. The sidecar runs it
on its own loop; the daemon, which has none, on a thread of its own (`ThreadedMetricsServer`).
"""

import asyncio
import os
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from solaris.server.settings import BindError, host_port

MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0
BACKLOG = 128
_PATHS = (b"/metrics", b"/")


class MetricsServer:
    """Serves a registry's metrics at /metrics on the running event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.open_connections = 0
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listens on `host`:`port` (0: a free one) and returns the port.

        Raises:
            BindError: naming metrics_port.
        """
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_HEAD_BYTES, backlog=BACKLOG
            )
        except OSError as error:
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            raise BindError("metrics_port", host_port(host, port), reason) from error
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.open_connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_SECONDS)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass  # a client gone, slow or malformed gets nothing more
        finally:
            self.open_connections -= 1
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD") or path not in _PATHS:
            return _response(b"404 Not Found", b"text/plain", b"not found: GET /metrics\n")
        body = generate_latest(self.registry)
        return _response(
            b"200 OK", CONTENT_TYPE_LATEST.encode(), b"" if method == b"HEAD" else body
        )


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
    )
    return head + body


class ThreadedMetricsServer:
    """A MetricsServer on an event loop of its own, on one thread: for a process without a
    loop (the daemon)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._metrics = MetricsServer(registry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics", daemon=True)

    def start(self, host: str, port: int) -> int:
        """Listens (raising BindError as MetricsServer does) and returns the port."""
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._metrics.start(host, port), self._loop)
        try:
            return started.result()
        except BindError:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self._metrics.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
