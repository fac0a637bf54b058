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

    The vector is kept as little-endian bytes in both wire dtypes, converted once when it is
    stored: a read then only joins rows, where casting 500 x 128 values to float16 would cost
    more than the rest of the read.
    Times are wall-clock seconds (time.time()) so they mean the same in every process that
    shares a store. Between `stale_at` and `expires_at` the embedding is still served, marked
    STALE; from `expires_at` on it is gone.
    """

    float32: bytes
    float16: bytes
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
        vector = np.ascontiguousarray(vector, dtype="<f4")
        return cls(
            vector.tobytes(),
            vector.astype("<f2").tobytes(),
            model_version,
            now,
            stale_at,
            stale_at + stale_seconds,
        )

    @property
    def vector(self) -> np.ndarray:
        return np.frombuffer(self.float32, dtype="<f4")

    def status(self, now: float) -> RowStatus:
        """HIT while fresh, STALE in the grace window, MISS once expired."""
        if now >= self.expires_at:
            return RowStatus.MISS
        return RowStatus.HIT if now < self.stale_at else RowStatus.STALE

    def age_ms(self, now: float) -> int:
        return max(0, int((now - self.computed_at) * 1000))

    def size_bytes(self, user_id: str, item_id: str) -> int:
        """What holding this entry under (user_id, item_id) costs, overhead included."""
        return (
            len(self.float32)
            + len(self.float16)
            + len(user_id)
            + len(item_id)
            + ENTRY_OVERHEAD_BYTES
        )
