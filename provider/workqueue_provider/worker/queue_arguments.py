"""What the worker needs to know of its queue's arguments, read over AMQP (no management API)."""

from __future__ import annotations

from typing import Any

from workqueue_provider.amqp.queues import QueueSpec, declare, depth
from workqueue_provider.exceptions import QueueMismatchError

_DLX = "x-dead-letter-exchange"
_PROBE = "workqueue-probe-no-such-exchange"


def dead_letter_exchange(connection: Any, queue_name: str) -> str | None:
    """The queue's dead-letter exchange ('' is the default exchange), or None when it has none.

    AMQP has no "read a queue's arguments": a declare with a dead-letter exchange no queue uses is
    refused with the existing value (``declare`` adopts each other differing argument and asks again).
    The queue must exist (checked first), so the probe never creates one.
    """
    depth(connection, queue_name)  # QueueNotFoundError if missing
    try:
        declare(connection, QueueSpec(queue_name, extra_arguments={_DLX: _PROBE}))
    except QueueMismatchError as e:
        if _DLX in e.differences:
            current = e.differences[_DLX][0]
            return None if current is None else str(current)
    return None
