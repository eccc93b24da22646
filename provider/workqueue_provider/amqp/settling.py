"""Settling the items a worker finished: a receipt each (or per batch), confirmed, then the ack.

The half of :class:`workqueue_provider.amqp.consumer.QueueConsumer` that writes the item account:
receipts go to the ledger (``Q.receipts``, amqp/receipts.py) on a channel in publisher-confirm mode,
pipelined; an item is acked only once its receipt is confirmed (stored on disk). With ``max_items``
an ack that would let the broker send more than the items left waits until items are taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.spec

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.queues import FILL_HEADER
from workqueue_provider.amqp.subscriptions import Subscriptions

if TYPE_CHECKING:
    from workqueue_provider.amqp.deliveries import Delivery

RECEIPT_DELAY = 0.05  # seconds a finished item's receipt may wait for others to share it


class Settling:
    """Mixed into QueueConsumer, which owns the channels and the state named below."""

    max_items: int | None
    batch_receipts: bool
    acked: int
    rejected: int
    _channel: Any
    _ledger: Any
    _ledger_gone: bool
    _receipt_returned: bool
    _outstanding: set[int]
    _subscriptions: Subscriptions
    _deferred: list[int]
    _finished: list[Delivery]
    _finished_since: float
    _confirming: dict[int, list[Delivery]]
    _confirming_items: int
    _sent: int
    _waiting: bool

    if TYPE_CHECKING:
        @property
        def remaining(self) -> int | None: ...
        def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None: ...
        def wait_until(self, seconds: float, until: Callable[[], bool]) -> None: ...
        def wake(self) -> None: ...
        def _call(self, action: Callable[[], Any], *, ledger: bool = False) -> None: ...
        queue_name: str

    @property
    def ledger_gone(self) -> bool:
        """The receipts queue disappeared while we worked (a receipt came back, and the reconnect found no queue)."""
        return self._ledger_gone

    @property
    def unsettled(self) -> int:
        """Items finished whose receipt or ack is still on its way."""
        return len(self._finished) + self._confirming_items

    @property
    def _receipts_due(self) -> bool:
        """Whether the finished items' receipt goes out at a pump that doesn't wait: once half the window
        is finished items, or the oldest of them finished ``RECEIPT_DELAY`` ago (a pump that waits always
        sends it first). Items shorter than the broker's round trip so share one receipt, confirm and ack."""
        return bool(self._finished) and (len(self._finished) >= max(1, self._subscriptions.window // 2)
                                         or time.monotonic() - self._finished_since >= RECEIPT_DELAY)

    def finish(self, delivery: Delivery) -> None:
        """The item's work is done: its receipt goes to the ledger (now, or with ``batch_receipts`` once it
        is due, one receipt for all items finished since: :attr:`_receipts_due`), and the item is acked once
        the broker confirms the receipt (stored on disk). Nothing waits here. If the connection drops first,
        the item comes back and is processed again (a duplicate, never a loss)."""
        if self._ledger is None or self._ledger_gone:
            self._call(lambda: self._ack([delivery]))
            return
        if not self._finished:
            self._finished_since = time.monotonic()
        self._finished.append(delivery)
        if not self.batch_receipts:
            self._call(self._send_receipts, ledger=True)

    def flush(self) -> None:
        """Wait until every finished item is acked. Raises ConsumerLost / ChannelTakenBack."""
        while self.unsettled:
            self.wait_until(1.0, lambda: not self.unsettled)

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Give the item back (``requeue``), or let the queue dead-letter it (or drop it without a DLX)."""
        self._call(lambda: self._channel.basic_reject(delivery.tag, requeue=requeue))
        self._outstanding.discard(delivery.tag)
        self.rejected += 1

    def _send_receipts(self) -> None:
        batch, self._finished = self._finished, []
        if not batch:
            return
        if self._ledger is None or self._ledger_gone:
            self._ack(batch)
            return
        by_fill: dict[Any, list[Delivery]] = {}
        for delivery in batch:
            by_fill.setdefault((delivery.properties.headers or {}).get(FILL_HEADER), []).append(delivery)
        for group in by_fill.values():
            if len(group) == 1:
                receipts.record_processed(self._ledger, self.queue_name, group[0].properties)
            else:
                receipts.record_processed_batch(self._ledger, self.queue_name, [d.properties for d in group])
            self._sent += 1
            self._confirming[self._sent] = group
            self._confirming_items += len(group)

    def _on_confirm(self, frame: Any) -> None:
        """The broker stored (ack) or refused (nack) receipts up to a sequence number: ack the items
        whose receipt is stored; send a refused receipt again. Runs inside pika's event loop."""
        method = frame.method
        numbers = sorted(n for n in self._confirming if n <= method.delivery_tag) if method.multiple \
            else [method.delivery_tag]
        settled = [delivery for n in numbers for delivery in self._confirming.pop(n, [])]
        self._confirming_items -= len(settled)
        if self._receipt_returned:
            pass  # not acked: these items come back after the reconnect
        elif isinstance(method, pika.spec.Basic.Nack):
            self._finished.extend(settled)
            self._send_receipts()
        else:
            self._ack(settled)
        if self._waiting:
            self.wake()

    def _ack(self, batch: Sequence[Delivery]) -> None:
        """Ack, except what would let the broker send more than ``max_items``: those acks wait (the items
        are processed and their receipts stored already) until items are taken, or :meth:`close`."""
        if not batch:
            return
        tags = sorted(delivery.tag for delivery in batch)
        self.acked += len(tags)
        if self.max_items is not None:
            self._deferred.extend(tags)
            self._release_deferred()
            return
        if len(tags) > 1 and {t for t in self._outstanding if t <= tags[-1]} == set(tags):
            self._channel.basic_ack(tags[-1], multiple=True)
        else:
            for tag in tags:
                self._channel.basic_ack(tag)
        self._outstanding.difference_update(tags)

    def _release_deferred(self) -> None:
        while self._deferred:
            tag = self._deferred[0]
            remaining = self.remaining or 0
            if self._subscriptions.credit(self._outstanding, frozenset([tag])) > remaining:
                return
            self._deferred.pop(0)
            self._channel.basic_ack(tag)
            self._outstanding.discard(tag)

    def _on_return(self, *_args: Any) -> None:
        """A receipt came back unroutable: its queue is deleted, or unreachable from this node for now (a
        node cut off from the cluster). No item is acked from here on (the broker confirms a returned
        receipt, so a confirm proves nothing now); the next call raises ConsumerLost, and the reconnect
        tells the two apart (see QueueConsumer.connect). The items held go back: duplicates, never losses."""
        self._receipt_returned = True
