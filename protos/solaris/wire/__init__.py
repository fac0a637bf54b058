"""What both ends of the solaris.v1 contract must compute alike, written once: the sidecar
sizes its gRPC limits with it and the client its channel's, so the two never disagree."""

MAX_PRIORITY = 1000
"""The highest Prefetch priority the sidecar accepts."""

_MESSAGE_ROOM_BYTES = 64 * 1024
_ID_OVERHEAD_BYTES = 8
_ROW_OVERHEAD_BYTES = 16


def max_message_bytes(max_items: int, max_id_bytes: int, max_history: int, dim: int) -> int:
    """The largest message either way: a full-size request (ids with their protobuf framing)
    or a full-size float32 answer (values, status and age per row), with room to spare."""
    request = (max_items + max_history + 1) * (max_id_bytes + _ID_OVERHEAD_BYTES)
    answer = max_items * (dim * 4 + _ROW_OVERHEAD_BYTES)
    return max(request, answer) + _MESSAGE_ROOM_BYTES
