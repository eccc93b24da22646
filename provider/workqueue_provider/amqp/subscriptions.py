"""The subscriptions (``basic.consume``) of one consuming channel, and the credit they give the broker.

A consumer's prefetch can't change once it consumes, and cancelling one makes pika hand back (reject)
the deliveries still on their way to it, which a quorum queue counts against their delivery limit.
So a wider window is a second subscription beside the first, never a cancel and a new one; only
stopping altogether cancels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Subscription:
    tag: str
    prefetch: int
    deliveries: set[int] = field(default_factory=set)
    registered: bool = False  # the broker answered consume-ok: the queue counts this consumer


class Subscriptions:
    """The live subscriptions of a channel; ``window`` is their total prefetch."""

    def __init__(self) -> None:
        self._live: dict[str, _Subscription] = {}

    @property
    def active(self) -> bool:
        return bool(self._live)

    @property
    def registered(self) -> bool:
        """Some subscription is live and confirmed (consume-ok): the queue's consumer count includes us."""
        return any(sub.registered for sub in self._live.values())

    @property
    def window(self) -> int:
        return sum(sub.prefetch for sub in self._live.values())

    def add(self, channel: Any, queue: str, prefetch: int, on_message: Callable[..., None]) -> None:
        """Subscribe with ``prefetch`` (the qos applies to the consumers started after it)."""
        channel.basic_qos(prefetch_count=prefetch)
        subscription: list[_Subscription] = []
        tag = channel.basic_consume(queue, on_message, auto_ack=False,
                                    callback=lambda _frame: setattr(subscription[0], "registered", True))
        subscription.append(_Subscription(tag, prefetch))
        self._live[tag] = subscription[0]

    def note(self, consumer_tag: str, delivery_tag: int) -> None:
        if consumer_tag in self._live:
            self._live[consumer_tag].deliveries.add(delivery_tag)

    def credit(self, outstanding: set[int], settling: frozenset[int] = frozenset()) -> int:
        """How many more items the broker may send, once ``settling`` are acked or rejected."""
        return sum(max(0, sub.prefetch - len((sub.deliveries & outstanding) - settling)) for sub in self._live.values())

    def cancel_all(self, channel: Any, on_cancelled: Callable[[Any], None] | None = None) -> int:
        """Cancel every subscription; returns how many cancel-oks ``on_cancelled`` will get."""
        tags, self._live = list(self._live), {}
        for tag in tags:
            channel.basic_cancel(tag, callback=on_cancelled)
        return len(tags)

    def forget(self) -> None:
        """The channel is gone (and its subscriptions with it)."""
        self._live = {}
