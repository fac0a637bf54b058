"""The asyncio client: the same behaviour as `EmbeddingClient`, awaited."""

import asyncio
from collections.abc import Sequence

import grpc
from numpy.typing import ArrayLike

from solaris.clients._engine import (
    DEFAULT_OPTIONS,
    ClientOptions,
    Engine,
    Tls,
    call_metadata,
    one_item,
)
from solaris.clients._fallback import Fallback
from solaris.clients._result import Embedding, Embeddings, FallbackReason
from solaris.clients._stats import StatsSnapshot
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub


class AsyncEmbeddingClient:
    """`EmbeddingClient` for asyncio rankers; see it for the arguments. Use it from one event
    loop; `await close()` (or `async with`) when done. Closing it while calls are in flight
    cancels them: they raise CancelledError, as cancelled awaits do."""

    def __init__(
        self,
        target: str,
        dim: int,
        *,
        fallback: Fallback | ArrayLike | None = None,
        deadline: float = 0.05,
        options: ClientOptions = DEFAULT_OPTIONS,
        tls: Tls | None = None,
        token: str | None = None,
    ) -> None:
        self._engine = Engine(dim, fallback, deadline, options)
        channel_options = self._engine.channel_options()
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                target, tls.credentials(), options=[*channel_options, *tls.channel_options()]
            )
        self._metadata = call_metadata(token)
        self._stub = EmbeddingStoreStub(self._channel)
        self._prefetches: set[asyncio.Task[None]] = set()

    async def batch_get(
        self,
        user_id: str,
        item_ids: Sequence[str],
        deadline: float | None = None,
        *,
        prefetch_misses: bool = False,
    ) -> Embeddings:
        engine = self._engine
        attempt = engine.begin(user_id, item_ids, deadline)
        if attempt.skip is not None:
            return engine.skipped(attempt)
        try:
            response = await self._stub.BatchGet(
                attempt.request, timeout=attempt.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return engine.failed(attempt, error)
        result = engine.answered(attempt, response)
        if prefetch_misses and result.fallback_reason is FallbackReason.MISS:
            self.prefetch(user_id, engine.missed_items(attempt, result))
        return result

    async def get(self, user_id: str, item_id: str, deadline: float | None = None) -> Embedding:
        return (await self.batch_get(user_id, one_item(item_id), deadline)).row(0)

    def prefetch(
        self,
        user_id: str,
        item_ids: Sequence[str],
        history: Sequence[str] = (),
        priority: int = 0,
    ) -> None:
        """Sends a Prefetch in the background and returns at once (call it from the loop)."""
        loop = asyncio.get_running_loop()
        request = self._engine.prefetch_request(user_id, item_ids, history, priority)
        if request is None:
            return
        task = loop.create_task(self._send_prefetch(request))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _send_prefetch(self, request: pb.PrefetchRequest) -> None:
        ok = False
        try:
            await self._stub.Prefetch(
                request,
                timeout=self._engine.options.prefetch_timeout_seconds,
                metadata=self._metadata,
            )
            ok = True
        except grpc.RpcError:
            pass
        finally:
            self._engine.prefetch_finished(ok)

    @property
    def stats(self) -> StatsSnapshot:
        return self._engine.stats.snapshot()

    @property
    def breaker_state(self) -> str:
        return self._engine.breaker.state

    async def close(self) -> None:
        for task in list(self._prefetches):
            task.cancel()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncEmbeddingClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
