"""What a consumer hands out (a :class:`Delivery`) and how it says it lost its items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika.exceptions

#: what a dropped connection raises, from pika or the socket under it
LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed, pika.exceptions.StreamLostError,
        pika.exceptions.ConnectionWrongStateError, pika.exceptions.ChannelWrongStateError, ConnectionError, OSError)


class ConsumerLost(Exception):
    """The connection dropped: every unacked item is back in the queue."""


class ChannelTakenBack(Exception):
    """The broker closed the consuming channel (usually ``consumer_timeout``): its unacked items are back."""


@dataclass(frozen=True)
class Delivery:
    """One item taken from the queue, not yet acked."""

    tag: int
    body: bytes
    message_id: str | None
    redelivered: bool
    properties: Any  # pika.BasicProperties: the receipt copies the item's fill key and message id


def closing_reason(channel: Any) -> str:
    """Why the broker closed ``channel`` (its reply code and text), for error messages."""
    reason = getattr(channel, "_closing_reason", None)
    if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
        return f"{reason.reply_code} {reason.reply_text}"
    return repr(reason)
