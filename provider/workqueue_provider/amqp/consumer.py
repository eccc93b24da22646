"""Taking items from a work queue with a bounded prefetch, keeping the item account.

The worker side (``workqueue-consume`` and the in-process :mod:`workqueue_provider.worker.items`)
reaches the broker only through :class:`QueueConsumer`; pika stays in this package.

- Items arrive by ``basic.consume`` with a prefetch of at most ``prefetch`` unacked items, so the
  next item is already here when one is done (no round trip per item, as ``basic.get`` costs).
- ``max_items`` (None: no limit) is never exceeded, not even by a delivery held and handed back
  (a quorum queue counts that as a delivery against the item's delivery limit): the subscription's
  prefetch is at most the items left to take, and before an ack or reject would let the broker
  send more than that, the subscription is cancelled (and renewed later if items are still due).
- :meth:`QueueConsumer.finish` publishes the receipt of an item whose work is done to the ledger
  (``Q.receipts``, amqp/receipts.py) and acks the item only once the broker confirms the receipt
  (publisher confirms: stored on disk). Nothing blocks: confirms are pipelined, so the wait for a
  receipt's confirm overlaps the next items' work. pika's BlockingChannel has neither pipelined
  confirms nor a non-blocking consume, so these calls use the asynchronous channel under it
  (``_impl``), inside one BlockingConnection.
- Any item not acked goes back to the queue when the connection closes or drops.
- "The queue is empty" is believed only from a queue that answers: a quorum queue whose leader is
  paused or lost reads 0 messages and 0 consumers, so a reading that doesn't count our own confirmed
  subscription is asked again (see :meth:`QueueConsumer._ready_messages`), and a reading right
  after a reconnect must still hold a few seconds later. Items the queue sent us before it read 0
  are taken first: a round trip on the consuming channel brings them (no fixed wait).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.spec

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.deliveries import LOST, ChannelTakenBack, ConsumerLost, Delivery, closing_reason
from workqueue_provider.amqp.queues import depth
from workqueue_provider.amqp.settling import Settling
from workqueue_provider.amqp.subscriptions import Subscriptions
from workqueue_provider.exceptions import BrokerError, QueueNotFoundError

SETTLING_PATIENCE = 5.0  # seconds to wait for finished items to settle before asking the queue anyway
DELIVERY_LATENCY = 0.01  # seconds to wait for the items the broker sends once they have (~1 ms on a quorum queue)
AFTER_RECONNECT_SECONDS = 5.0  # after a reconnect, "the queue is empty" must still hold this long after
LEADERLESS_PATIENCE = 60.0  # seconds a queue may read "0 consumers" while delivering to us before we reconnect
LEADERLESS_RECHECK = 0.5  # seconds between two such readings

log = logging.getLogger(__name__)


class QueueConsumer(Settling):
    """One connection: a consuming channel (prefetch-bounded) and a ledger channel (transactions)."""

    def __init__(self, settings: BrokerSettings, queue_name: str, prefetch: int, max_items: int | None = None,
                 initial_prefetch: int | None = None, batch_receipts: bool = False):
        if prefetch < 1 or (max_items is not None and max_items < 1):
            raise ValueError(f"prefetch={prefetch} and max_items={max_items} must be at least 1")
        self.settings = settings
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.initial_window = min(prefetch, initial_prefetch or prefetch)  # widened up to prefetch when starved
        self.batch_receipts = batch_receipts  # items finished close together share a receipt (see _receipts_due)
        self.max_items = max_items
        self.acked = 0  # items acked as processed, over every connection
        self.rejected = 0  # items given back or dead-lettered after a failure, over every connection
        self.connection: pika.BlockingConnection | None = None
        self._channel: Any = None  # the consuming channel (pika's asynchronous channel)
        self._ledger: Any = None  # the ledger channel in tx mode; None: acks without receipts
        self._ledger_gone = False
        self._receipt_returned = False  # a receipt came back unroutable on this connection: see _on_return
        self._buffer: deque[Delivery] = deque()
        self._outstanding: set[int] = set()  # delivered, not yet acked or rejected
        self._subscriptions = Subscriptions()
        self._deferred: list[int] = []  # acks held back so the broker sends no more than max_items
        self._finished: list[Delivery] = []  # work done, receipt not sent yet (batch_receipts)
        self._finished_since = 0.0  # when the oldest of them finished
        self._confirming: dict[int, list[Delivery]] = {}  # items of each receipt sent, by publish sequence number
        self._confirming_items = 0
        self._sent = 0  # receipts published on the current ledger channel
        self._waiting = False
        self._wanted = True  # False once stop_deliveries() was called
        self._takes = 0
        self._connects = 0
        self._distrust_empty_until = 0.0  # after a reconnect: see queue_is_empty

    # -- connecting ---------------------------------------------------------------------------------
    def connect(self, *, keep_receipts: bool) -> None:
        """Connect and start consuming. Raises BrokerError (QueueNotFoundError if the queue is missing)."""
        self.close()
        self.connection = open_connection(self.settings)
        self._connects += 1
        if self._connects > 1:  # back after losing a node: its quorum queues may be electing a leader
            self._distrust_empty_until = time.monotonic() + AFTER_RECONNECT_SECONDS
        try:
            probe = self.connection.channel()
            probe.queue_declare(self.queue_name, passive=True)
            probe.close()
            self._channel = self._open_consuming_channel()
            self._receipt_returned = False
            if keep_receipts and not self._ledger_gone and not self._ledger_exists():
                self._ledger_gone = True  # deleted while we were away (a receipt came back): ack without receipts
            if keep_receipts and not self._ledger_gone:
                ledger = self.connection.channel()._impl
                ledger.add_on_return_callback(self._on_return)
                ledger.confirm_delivery(ack_nack_callback=self._on_confirm)
                self._ledger, self._sent = ledger, 0
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                raise QueueNotFoundError(f"Queue {self.queue_name!r} does not exist ({e.reply_code} {e.reply_text}): "
                                         "declare it first (DeclareQueueOperator).") from e
            raise BrokerError(f"The broker refused queue {self.queue_name!r}: {e.reply_code} {e.reply_text}") from e
        except LOST as e:
            raise ConsumerLost(repr(e)) from e
        if self._wanted:
            self._subscribe()

    def _ledger_exists(self) -> bool:
        """Whether ``Q.receipts`` exists (only a queue that is really gone makes a worker stop keeping receipts)."""
        assert self.connection is not None
        probe = self.connection.channel()
        try:
            probe.queue_declare(receipts.receipts_queue(self.queue_name), passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return False
            raise
        probe.close()
        return True

    def _open_consuming_channel(self) -> Any:
        """A channel of pika's asynchronous kind on this connection: its subscriptions can be renewed
        (a BlockingChannel allows one consume-ok per wait) and nothing on it blocks."""
        assert self.connection is not None
        opened: list[Any] = []

        def on_open(channel: Any) -> None:
            opened.append(channel)
            self.wake()
        self.connection._impl.channel(on_open_callback=on_open)
        self.pump(self.settings.socket_timeout, until=lambda: bool(opened))
        if not opened:
            raise ConsumerLost(f"no channel opened within {self.settings.socket_timeout:g} s")
        return opened[0]

    def record_start(self) -> bool:
        """Write the consumer record (receipts are being kept); False when the queue has no ledger."""
        connection, kept = self.connection, []
        assert connection is not None

        def record() -> None:
            channel = connection.channel()
            channel.confirm_delivery()
            try:
                receipts.record_consumer(channel, self.queue_name)
                kept.append(True)
            except receipts.NoLedger:
                kept.append(False)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        self._call(record)
        return kept[0]

    def _hand_back(self) -> None:
        self._subscriptions.cancel_all(self._channel)
        self.pump(0)
        for tag in self._deferred:
            self._channel.basic_ack(tag)
        self._deferred = []
        while self._buffer:
            self._channel.basic_reject(self._buffer.popleft().tag, requeue=True)
        done: list[Any] = []

        def barrier(_frame: Any) -> None:  # the channel answers once it has handled the acks and rejects
            done.append(True)
            self.wake()
        self._channel.basic_qos(prefetch_count=1, callback=barrier)
        self.pump(self.settings.socket_timeout, until=lambda: bool(done))

    def drop_ledger(self) -> None:
        """Ack without receipts from now on (the queue has no ledger)."""
        if self._ledger is not None:
            with contextlib.suppress(Exception):
                self._ledger.close()
        self._ledger = None

    def close(self) -> None:
        """Close the connection: items not acked go back to the queue. Items delivered and not started, and
        rejects sent, are handled by the broker before this returns, so the next reader finds them back."""
        if self._channel is not None and self.connection is not None and not self.connection.is_closed:
            with contextlib.suppress(Exception):
                self._hand_back()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
        self.connection = self._channel = self._ledger = None
        self._subscriptions.forget()
        self._deferred = []
        self._buffer.clear()
        self._outstanding.clear()
        self._finished, self._confirming, self._confirming_items = [], {}, 0

    # -- taking items ---------------------------------------------------------------------------------
    @property
    def remaining(self) -> int | None:
        """Items this process may still receive (None: no limit)."""
        if self.max_items is None:
            return None
        return self.max_items - self.acked - self.rejected - (len(self._outstanding) - len(self._deferred))

    @property
    def window(self) -> int:
        """The prefetch the broker was given, over every live subscription (widened for short items)."""
        return self._subscriptions.window

    @property
    def exhausted(self) -> bool:
        """Every item this process may take has been taken."""
        return self.remaining == 0 and not self._buffer

    def take(self, timeout: float) -> Delivery | None:
        """The next item, waiting up to ``timeout`` seconds for one; None if none came."""
        self._takes += 1
        if self._buffer and self._takes % 16 == 0:
            self.pump(0)  # with items at hand, still send receipts and acks, and take confirms, now and then
        if not self._buffer:
            if not self._subscriptions.active and self._wanted and (self.remaining is None or self.remaining > 0):
                self._call(self._subscribe)
            elif self._starved_by_receipts():
                self._call(self._widen)
            self._wait_for_items(timeout)
        return self._buffer.popleft() if self._buffer else None

    def next_delivery(self) -> Delivery | None:
        """The next item, if one is at hand or comes while the finished items settle (receipt confirmed,
        acked) or just after (the broker sends more once they are); None if none came by then, when the
        window is all credit, so :meth:`queue_is_empty` tells "none left" from "not here yet" (it takes the
        deliveries on their way first). So the end of a queue costs that settling and ~10 ms."""
        delivery = self.take(0)
        if delivery is None and self.unsettled:
            self.wait_until(SETTLING_PATIENCE, lambda: bool(self._buffer) or not self.unsettled)
            delivery = self.take(0) or self.take(DELIVERY_LATENCY)
        return delivery

    def stop_deliveries(self) -> None:
        """Take no more items: cancel the subscriptions and wait until the broker confirms (items it sent
        before that stay held, for :meth:`take`; pika hands back any still on their way)."""
        self._wanted = False
        cancelled: list[Any] = []

        def on_cancelled(frame: Any) -> None:
            cancelled.append(frame)
            self.wake()
        count = 0

        def cancel() -> None:
            nonlocal count
            count = self._subscriptions.cancel_all(self._channel, on_cancelled)
        self._call(cancel)
        self.wait_until(5.0, lambda: len(cancelled) >= count)

    def queue_is_empty(self) -> bool:
        """No item delivered to us and none ready in the queue (items other workers hold are not counted)."""
        assert self.connection is not None
        if self._buffer:
            return False
        ready = self._ready_messages()
        if ready is None:
            return False  # an item arrived while the queue was not answering
        self._await_deliveries_sent()
        if ready == 0 and not self._buffer and time.monotonic() < self._distrust_empty_until:
            # A quorum queue between leaders (its node was just lost) reads 0 messages for a moment: an
            # empty reading right after a reconnect is trusted only once it is still empty a little later.
            self._wait_for_items(self._distrust_empty_until - time.monotonic())
            self._distrust_empty_until = 0.0
            return not self._buffer and self.queue_is_empty()
        return ready == 0 and not self._buffer

    def _ready_messages(self) -> int | None:
        """The queue's ready messages; None if an item arrived while waiting for a trustworthy reading.

        A quorum queue whose leader does not answer (paused, partitioned, electing) reads "0 messages,
        0 consumers" from a passive declare, the same as an empty queue. Our own subscription, confirmed
        by the broker, is always counted by a queue that answers, so "0 consumers" then means "no
        answer": the reading is asked again until it counts us, and after ``LEADERLESS_PATIENCE`` seconds
        the connection is treated as lost (ConsumerLost: the caller's outage handling takes over)."""
        assert self.connection is not None
        deadline = time.monotonic() + LEADERLESS_PATIENCE
        warned = False
        while True:
            try:
                reading = depth(self.connection, self.queue_name)
            except QueueNotFoundError:
                raise
            except (BrokerError, *LOST) as e:
                raise ConsumerLost(repr(e)) from e
            if reading.consumers > 0 or not self._subscriptions.registered:
                return reading.messages
            if time.monotonic() >= deadline:
                raise ConsumerLost(f"queue {self.queue_name!r} has read 0 messages and 0 consumers for "
                                   f"{LEADERLESS_PATIENCE:g} s although it is delivering to us: its leader is not answering")
            if not warned:
                log.warning("Queue %r reads 0 consumers although it is delivering to us: its leader is not answering "
                            "(a quorum queue node paused or lost); asking again for up to %g s before reconnecting.",
                            self.queue_name, LEADERLESS_PATIENCE)
                warned = True
            self._wait_for_items(LEADERLESS_RECHECK)
            if self._buffer:
                return None

    def _await_deliveries_sent(self) -> None:
        """Take the items the queue sent us before it answered a reading: they are here once the consuming
        channel answers a request sent after that reading (a ``basic.qos``: every subscription sets its
        own before it consumes), as the broker handles a channel's messages in order. Items a cluster's
        other node relays (its quorum queue member beside our connection) get ``DELIVERY_LATENCY`` more."""
        answered: list[Any] = []

        def barrier(_frame: Any) -> None:
            answered.append(True)
            self.wake()
        self._call(lambda: self._channel.basic_qos(prefetch_count=1, callback=barrier))
        self.wait_until(self.settings.socket_timeout, lambda: bool(answered))
        if not self._buffer:
            self._wait_for_items(DELIVERY_LATENCY)

    def _wait_for_items(self, seconds: float) -> None:
        """Handle broker traffic for up to ``seconds``, returning early when an item arrives."""
        self.wait_until(seconds, lambda: bool(self._buffer))

    def wait_until(self, seconds: float, until: Callable[[], bool]) -> None:
        """Handle broker traffic until ``until`` holds or ``seconds`` pass; the callbacks that can make it
        hold (a delivery, a confirm) wake the wait at once."""
        self._waiting = True
        try:
            self.pump(seconds, until=until)
        finally:
            self._waiting = False

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Handle broker traffic (deliveries, commits, heartbeats) for up to ``seconds``: until the first
        event, or with ``until`` until it holds. Raises ConsumerLost / ChannelTakenBack."""
        connection = self.connection
        assert connection is not None
        if self._finished and (seconds > 0 or self._receipts_due):
            self._call(self._send_receipts, ledger=True)
        if self._deferred:
            self._call(self._release_deferred)
        if until is not None and until():
            return  # already holds (items that came while a probe ran): no wait for the next event
        deadline = time.monotonic() + seconds
        while True:
            left = max(0.0, deadline - time.monotonic())

            def process(limit: float = left) -> None:
                connection.process_data_events(time_limit=limit)
            self._call(process)
            if until is None or until() or left == 0:
                return

    def service(self) -> None:
        """Pump once if it is time: the finished items' receipt is due, or no item is at hand. With a
        window of 2 (items that take long) that is every item; with a widened window (items shorter than
        the broker's round trip) receipts, acks and deliveries go in batches, which makes such items cheap."""
        if self._receipts_due or not self._buffer:
            self.pump(0)

    def wake(self) -> None:
        """Make a :meth:`pump` in progress return at once."""
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(_nothing)

    # -- internals ------------------------------------------------------------------------------------
    def _starved_by_receipts(self) -> bool:
        """Nothing to work on while half the window or more is finished items waiting for their receipt's
        confirm and ack: a window too small for the broker's confirm and delivery latency. Items that take
        long never get here (each one's receipt is confirmed, and the next item delivered, while the next runs)."""
        self.pump(0)
        window = self._subscriptions.window
        return (not self._buffer and self._subscriptions.active and window < self.prefetch
                and self.unsettled >= max(1, window // 2))

    def _widen(self) -> None:
        """Double the window with one more subscription, within ``prefetch`` and the items left."""
        extra = min(self._subscriptions.window, self.prefetch - self._subscriptions.window)
        remaining = self.remaining
        if remaining is not None:
            extra = min(extra, remaining - self._subscriptions.credit(self._outstanding))
        if extra > 0:
            self._subscriptions.add(self._channel, self.queue_name, extra, self._on_message)

    def _subscribe(self) -> None:
        remaining = self.remaining
        prefetch = self.initial_window if remaining is None else min(self.initial_window, remaining)
        self._subscriptions.add(self._channel, self.queue_name, prefetch, self._on_message)

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._outstanding.add(method.delivery_tag)
        self._subscriptions.note(method.consumer_tag, method.delivery_tag)
        self._buffer.append(Delivery(method.delivery_tag, body, properties.message_id, method.redelivered, properties))
        if self._waiting:
            self.wake()

    def _call(self, action: Callable[[], Any], *, ledger: bool = False) -> None:
        """Run a pika call, turning a dropped connection into ConsumerLost and a channel the broker
        closed into ChannelTakenBack (consuming channel) or BrokerError (ledger channel)."""
        try:
            action()
            if self._receipt_returned:
                raise ConsumerLost("a receipt came back unroutable: reconnecting to check the receipts queue")
        except pika.exceptions.ChannelClosedByBroker as e:
            if ledger:
                raise BrokerError(f"The broker refused the receipts of queue {self.queue_name!r}: "
                                  f"{e.reply_code} {e.reply_text}") from e
            raise ChannelTakenBack(f"{e.reply_code} {e.reply_text}") from e
        except LOST as e:
            raise ConsumerLost(repr(e)) from e
        if self.connection is None or self.connection.is_closed:
            raise ConsumerLost("the connection closed")
        if self._ledger is not None and self._ledger.is_closed:
            raise BrokerError(f"The broker closed the ledger channel of queue {self.queue_name!r}: "
                              f"{closing_reason(self._ledger)}")
        if self._channel is not None and self._channel.is_closed:
            raise ChannelTakenBack(closing_reason(self._channel))


def _nothing() -> None:
    """A callback that only wakes the connection's event loop."""
