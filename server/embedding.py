"""The stored value: one pair's embedding with the metadata a read needs."""

import time
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

# Per-entry bookkeeping (dict slot, LRU links, the record, the key strings' headers): a
# conservative figure so that the byte cap bounds real memory, not only vector bytes.
ENTRY_OVERHEAD_BYTES = 400


class RowStatus(IntEnum):
    """What the store held for one requested pair; values match the proto's RowStatus."""

    HIT = 1
    MISS = 2
    STALE = 3


@dataclass(frozen=True, slots=True)
class Embedding:
    """One pair's latent from the foundation model.

    Times are wall-clock seconds (time.time()) so they mean the same in every process that
    shares a store. Between `stale_at` and `expires_at` the embedding is still served, marked
    STALE; from `expires_at` on it is gone.
    """

    vector: np.ndarray
    model_version: str
    computed_at: float
    stale_at: float
    expires_at: float

    @classmethod
    def fresh(
        cls,
        vector: np.ndarray,
        model_version: str,
        ttl_seconds: float,
        stale_seconds: float = 0.0,
        now: float | None = None,
    ) -> "Embedding":
        """An embedding computed now, fresh for `ttl_seconds`, then stale for `stale_seconds`."""
        now = time.time() if now is None else now
        stale_at = now + ttl_seconds
        return cls(
            np.ascontiguousarray(vector, dtype=np.float32),
            model_version,
            now,
            stale_at,
            stale_at + stale_seconds,
        )

    def status(self, now: float) -> RowStatus:
        """HIT while fresh, STALE in the grace window, MISS once expired."""
        if now >= self.expires_at:
            return RowStatus.MISS
        return RowStatus.HIT if now < self.stale_at else RowStatus.STALE

    def age_ms(self, now: float) -> int:
        return max(0, int((now - self.computed_at) * 1000))

    def size_bytes(self, user_id: str, item_id: str) -> int:
        """What holding this entry under (user_id, item_id) costs, overhead included."""
        return self.vector.nbytes + len(user_id) + len(item_id) + ENTRY_OVERHEAD_BYTES
