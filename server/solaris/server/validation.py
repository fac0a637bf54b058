"""Checks on request fields. Each failure names the field (and the index, for lists)."""

from collections.abc import Sequence

from solaris.server.errors import InvalidArgument
from solaris.wire import MAX_PRIORITY


def check_id(field: str, value: str, max_bytes: int) -> None:
    """An id is 1 to `max_bytes` bytes of UTF-8 (the transport has already checked UTF-8)."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    # A character is at most 4 UTF-8 bytes, so short ids skip the encode.
    if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
        raise InvalidArgument(field, f"longer than {max_bytes} bytes of UTF-8")


def check_id_list(
    field: str, values: Sequence[str], max_count: int, max_bytes: int, allow_empty: bool = False
) -> None:
    if not values and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    if len(values) > max_count:
        raise InvalidArgument(field, f"{len(values)} ids, at most {max_count} allowed")
    # The serving path: one pass in C for the common case, a per-id pass only to name a culprit.
    if all(values) and max(map(len, values), default=0) * 4 <= max_bytes:
        return
    for index, value in enumerate(values):
        check_id(f"{field}[{index}]", value, max_bytes)


def check_priority(priority: int) -> None:
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidArgument("priority", f"must be 0 to {MAX_PRIORITY}, got {priority}")
