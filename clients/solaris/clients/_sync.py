"""The blocking client."""

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
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub


class EmbeddingClient:
    """Reads embeddings from a solaris sidecar, and never lets the sidecar fail the caller.

    Every `batch_get` returns within its deadline (the caller's whole budget, fallback
    included) with every row filled: from the store, or from `fallback` where the store had
    nothing or the sidecar did not answer. Safe to share between threads; make one per process
    and reuse it (it holds one channel).

    Args:
        target: the sidecar's address, e.g. "127.0.0.1:50051".
        dim: values per embedding; must match the sidecar's.
        fallback: None for zeros, a vector of `dim` values, or a callable
            `(user_id, item_ids) -> len(item_ids) x dim array`.
        deadline: the default budget of a call, in seconds.
        options: tuning; see `ClientOptions`.
        tls: for a sidecar serving TLS: the CA to trust (and a client certificate); see `Tls`.
        token: for a sidecar with --auth-token: sent as `authorization: Bearer <token>`.
    """

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
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(
                target, tls.credentials(), options=[*channel_options, *tls.channel_options()]
            )
        self._metadata = call_metadata(token)
        self._stub = EmbeddingStoreStub(self._channel)

    def batch_get(
        self,
        user_id: str,
        item_ids: Sequence[str],
        deadline: float | None = None,
        *,
        prefetch_misses: bool = False,
    ) -> Embeddings:
        """Embeddings for `user_id` x each of `item_ids`, in order. With `prefetch_misses`,
        missed pairs are also sent as a Prefetch (without waiting for it)."""
        engine = self._engine
        attempt = engine.begin(user_id, item_ids, deadline)
        if attempt.skip is not None:
            return engine.skipped(attempt)
        try:
            response = self._stub.BatchGet(
                attempt.request, timeout=attempt.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return engine.failed(attempt, error)
        result = engine.answered(attempt, response)
        if prefetch_misses and result.fallback_reason is FallbackReason.MISS:
            self.prefetch(user_id, engine.missed_items(attempt, result))
        return result

    def get(self, user_id: str, item_id: str, deadline: float | None = None) -> Embedding:
        return self.batch_get(user_id, one_item(item_id), deadline).row(0)

    def prefetch(
        self,
        user_id: str,
        item_ids: Sequence[str],
        history: Sequence[str] = (),
        priority: int = 0,
    ) -> None:
        """Tells the sidecar these pairs will be wanted soon. Returns at once; the outcome is
        only counted (`stats`)."""
        request = self._engine.prefetch_request(user_id, item_ids, history, priority)
        if request is None:
            return
        try:
            call = self._stub.Prefetch.future(
                request,
                timeout=self._engine.options.prefetch_timeout_seconds,
                metadata=self._metadata,
            )
        except BaseException:
            self._engine.prefetch_finished(ok=False)
            raise
        # The callback is handed the call as a plain Future; the call itself knows its code.
        call.add_done_callback(
            lambda _: self._engine.prefetch_finished(call.code() == grpc.StatusCode.OK)
        )

    @property
    def stats(self) -> StatsSnapshot:
        return self._engine.stats.snapshot()

    @property
    def breaker_state(self) -> str:
        return self._engine.breaker.state

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
