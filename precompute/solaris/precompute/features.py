"""From string ids to the model's input arrays.

Ids of any string form are hashed into table rows with a stable hash (BLAKE2b), so the same
id maps to the same row in every process and every release. Row 0 is kept for padding. A
user's own ONNX model takes the same inputs, so it inherits this hashing.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def bucket(item_id: str, buckets: int) -> int:
    """The table row for `item_id`: 1 to buckets - 1."""
    digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def buckets(ids: Sequence[str], table_size: int) -> np.ndarray:
    return np.fromiter((bucket(i, table_size) for i in ids), dtype=np.int64, count=len(ids))


@dataclass(frozen=True, slots=True)
class UserWork:
    """One user's candidates to compute, with the history the model reads."""

    user_id: str
    history: tuple[str, ...]
    item_ids: tuple[str, ...]


@dataclass(frozen=True)
class TableSizes:
    """What the hashing needs to know of a model: its table sizes and history length."""

    item_buckets: int
    user_buckets: int
    history_cap: int


def model_inputs(work: Sequence[UserWork], sizes: TableSizes) -> dict[str, np.ndarray]:
    """The input arrays for one batch; output row i is the i-th item in `work` order.

    The history keeps its most recent `history_cap` items, most recent last, right-padded.
    """
    histories = [w.history[-sizes.history_cap :] if sizes.history_cap else () for w in work]
    longest = max((len(h) for h in histories), default=0)
    history = np.zeros((len(work), longest), np.int64)
    for row, items in enumerate(histories):
        history[row, : len(items)] = buckets(items, sizes.item_buckets)
    candidates = [item for w in work for item in w.item_ids]
    return {
        "user": buckets([w.user_id for w in work], sizes.user_buckets),
        "history": history,
        "history_length": np.array([len(h) for h in histories], np.int64),
        "candidate": buckets(candidates, sizes.item_buckets),
        "candidate_user": np.repeat(np.arange(len(work)), [len(w.item_ids) for w in work]),
    }
