"""Fallback values for rows the sidecar could not serve. A fallback that fails is a bug in the
caller's code, so it raises; nothing the sidecar does ever makes a call raise."""

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

Fallback = Callable[[str, Sequence[str]], ArrayLike]
"""`(user_id, item_ids) -> array of len(item_ids) x dim`: a distilled model, item-only
embeddings, anything fast and local."""


class FallbackError(Exception):
    """The fallback returned something that is not a `len(item_ids) x dim` array of numbers."""


def resolve_fallback(spec: Fallback | ArrayLike | None, dim: int) -> Fallback:
    """None means zeros; an array of shape (dim,) is used for every row; a callable is called."""
    if spec is None:
        return lambda user_id, item_ids: np.zeros((len(item_ids), dim), np.float32)
    if callable(spec):
        return spec
    vector = np.asarray(spec, dtype=np.float32)
    if vector.shape != (dim,):
        raise ValueError(f"fallback: a fixed vector must have shape ({dim},), got {vector.shape}")
    return lambda user_id, item_ids: np.broadcast_to(vector, (len(item_ids), dim))


def fallback_rows(
    fallback: Fallback, user_id: str, item_ids: Sequence[str], dim: int
) -> np.ndarray:
    """Calls the fallback and checks what it returned."""
    returned = fallback(user_id, item_ids)
    try:
        rows = np.array(returned, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise FallbackError(f"fallback returned {type(returned).__name__}: {error}") from error
    if rows.shape != (len(item_ids), dim):
        raise FallbackError(
            f"fallback returned shape {rows.shape} for {len(item_ids)} items, "
            f"expected ({len(item_ids)}, {dim})"
        )
    return rows
