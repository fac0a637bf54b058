"""What a `batch_get` returns: every row filled, and a status per row saying where it came from."""

import enum
from dataclasses import dataclass

import numpy as np


class RowStatus(enum.IntEnum):
    """Where a row's values came from. The first three match the sidecar's own codes."""

    HIT = 1
    """Fresh from the store."""
    MISS = 2
    """The sidecar had no embedding for the pair: the row holds an aggregate the sidecar filled
    it with (see `tier`), or else the fallback's values."""
    STALE = 3
    """From the store, past its freshness window; the sidecar is refreshing it."""
    FALLBACK = 4
    """The sidecar gave no answer in time (see `fallback_reason`): the fallback's values."""


class RowTier(enum.IntEnum):
    """Which tier filled a row; the values match the sidecar's RowTier codes."""

    PAIR = 1
    """The pair's own embedding (HIT or STALE)."""
    USER = 2
    """A MISS the sidecar filled with the user's aggregate (a decayed mean of its pairs)."""
    ITEM = 3
    """A MISS the sidecar filled with the item's aggregate over users."""
    GLOBAL = 4
    """A MISS the sidecar filled with the model version's global mean."""
    NONE = 5
    """No tier: the row holds the fallback's values (a plain MISS, or FALLBACK)."""


class FallbackReason(enum.Enum):
    """Why some or all rows of an answer hold fallback values."""

    MISS = "miss"
    """The sidecar answered, but had nothing for some rows, not even an aggregate."""
    DEADLINE = "deadline"
    """The sidecar did not answer within the caller's budget."""
    UNAVAILABLE = "unavailable"
    """The sidecar could not be reached, or the connection broke mid-call."""
    BREAKER_OPEN = "breaker_open"
    """Skipped: recent calls failed, so the sidecar is taken to be down until a probe succeeds."""
    BUDGET = "budget"
    """Skipped: the budget left was shorter than recent calls have taken."""
    ERROR = "error"
    """The sidecar refused the call or sent an answer that does not fit (logged)."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One answer: `values[i]` is the embedding for `item_ids[i]`, whatever happened."""

    values: np.ndarray
    """float32, `len(item_ids) x dim`, in request order."""
    status: np.ndarray
    """One `RowStatus` code per row (uint8), so `status == RowStatus.HIT` is a row mask."""
    model_version: str
    """The model that computed the served rows; empty when none was served."""
    fallback_reason: FallbackReason | None
    """None when every row came from the store (its pairs or its aggregates)."""
    tier: np.ndarray
    """One `RowTier` code per row (uint8): PAIR, an aggregate's tier for a MISS the sidecar
    filled, or NONE for a row holding the fallback's values."""

    @property
    def served(self) -> np.ndarray:
        """Rows that hold the foundation model's embeddings (HIT or STALE)."""
        return np.isin(self.status, (RowStatus.HIT, RowStatus.STALE))

    def row(self, index: int) -> "Embedding":
        return Embedding(
            self.values[index],
            RowStatus(self.status[index]),
            self.model_version,
            self.fallback_reason,
            RowTier(self.tier[index]),
        )


@dataclass(frozen=True, slots=True)
class Embedding:
    """One pair's answer, from `get`."""

    vector: np.ndarray
    status: RowStatus
    model_version: str
    fallback_reason: FallbackReason | None
    tier: RowTier
