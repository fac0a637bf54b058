"""What a ranking service imports to read embeddings from the sidecar.

    from solaris.clients import EmbeddingClient

    client = EmbeddingClient("127.0.0.1:50051", dim=128)
    answer = client.batch_get("user-1", ["item-1", "item-2"], deadline=0.02)
    answer.values   # float32, 2 x 128, every row filled
    answer.status   # RowStatus per row: HIT, STALE, MISS or FALLBACK
    answer.tier     # RowTier per row: PAIR, USER, ITEM or GLOBAL (a MISS the sidecar
                    # filled from its aggregates), NONE (the fallback's values)

Exceptions: only for the caller's own mistakes. `ValueError` for bad arguments (each message
names the argument); `FallbackError` when the fallback returns something unusable; whatever the
fallback itself raises. Nothing the sidecar does (slow, down, killed, refusing) raises.
"""

from solaris.clients._async import AsyncEmbeddingClient
from solaris.clients._engine import ClientOptions, Tls
from solaris.clients._fallback import Fallback, FallbackError
from solaris.clients._result import Embedding, Embeddings, FallbackReason, RowStatus, RowTier
from solaris.clients._stats import LATENCY_BUCKETS, StatsSnapshot
from solaris.clients._sync import EmbeddingClient

__all__ = [
    "LATENCY_BUCKETS",
    "AsyncEmbeddingClient",
    "ClientOptions",
    "Embedding",
    "EmbeddingClient",
    "Embeddings",
    "Fallback",
    "FallbackError",
    "FallbackReason",
    "RowStatus",
    "RowTier",
    "StatsSnapshot",
    "Tls",
]
