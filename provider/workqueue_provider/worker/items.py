"""In-process workers: items too short to pay for a process each, taken inside your own Python process.

The Kubernetes tutorial's "fine parallel processing" variant, with ``workqueue-consume``'s guarantees::

    from workqueue_provider.worker.items import work_items

    items = work_items()              # BROKER_URL and QUEUE from the environment, like workqueue-consume
    for item in items:
        handle(item.body)             # acked once this returns (when the loop asks for the next item)
    sys.exit(items.exit_code)

or, to have an exception requeue (or, with ``dead_letter=True``, dead-letter) its item::

    sys.exit(process_items(handle))   # handle(item) per item

- items come with a bounded prefetch (``prefetch``, default 200: a fraction of a second of short
  items, so no pod hoards work at the end of a drain while others starve);
- an item is acked only after your code returned, and after its receipt (the item account,
  amqp/receipts.py) is stored: one receipt for the items finished since the last exchange with the
  broker, confirmed in a pipeline, not one wait per item;
- with :func:`process_items`, an exception rejects the item (requeued, or dead-lettered with
  ``dead_letter=True``), the items already held are still handled, and the exit code is 1. Leaving a
  ``for`` loop early (``break``, or an exception escaping the loop) puts its current item back;
- the queue empty (or ``max_items`` taken) ends the loop; SIGTERM/SIGINT end it after the current item
  (acked if your code returns), with ``exit_code`` 128 + signal;
- broker outages are ridden out for ``outage_window`` seconds, like ``workqueue-consume``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.amqp.deliveries import ChannelTakenBack, ConsumerLost, Delivery
from workqueue_provider.exceptions import BrokerError, ConfigurationError
from workqueue_provider.worker.consume import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_REQUEUED,
    ConsumeResult,
    check_dead_letter_exchange,
)
from workqueue_provider.worker.session import DEFAULT_OUTAGE_WINDOW, Session, Signals

log = logging.getLogger("workqueue-items")

DEFAULT_PREFETCH = 200
EXIT_HANDLER_FAILED = 1


@dataclass(frozen=True)
class WorkItem:
    """One item: its message body, as the fill published it."""

    body: bytes
    message_id: str | None
    redelivered: bool

    @property
    def text(self) -> str:
        return self.body.decode()


class WorkItems:
    """Iterate to take items; see the module docstring. ``result`` and ``exit_code`` say how it ended."""

    def __init__(self, queue: str | None = None, *, url: str | None = None, prefetch: int = DEFAULT_PREFETCH,
                 max_items: int | None = None, dead_letter: bool = False,
                 outage_window: float = DEFAULT_OUTAGE_WINDOW, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        url = url or env.get("BROKER_URL")
        queue = queue or env.get("QUEUE")
        if not url:
            raise ConfigurationError("No broker URL: set BROKER_URL or pass url='amqp://user:pass@host:5672/vhost'.")
        if not queue:
            raise ConfigurationError("No queue given: set QUEUE or pass the queue name.")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch={prefetch} must be at least 1.")
        if max_items is not None and max_items < 1:
            raise ConfigurationError(f"max_items={max_items} must be positive (or None to drain).")
        self.settings = BrokerSettings.from_url(url, **({"ca_file": env["BROKER_CA_FILE"]}
                                                        if env.get("BROKER_CA_FILE") else {}))
        self.queue = queue
        self.prefetch = prefetch
        self.max_items = max_items
        self.dead_letter = dead_letter
        self.outage_window = outage_window
        self.result = ConsumeResult()
        self._session: Session | None = None
        self._current: Delivery | None = None
        self._only_held = False  # after a failure: handle the items already held, take no more

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    def __iter__(self) -> Iterator[WorkItem]:
        signals = Signals()
        restore = signals.install() if threading.current_thread() is threading.main_thread() else None
        session = self._session = Session(self.settings, self.queue, self.prefetch, self.max_items,
                                          self.outage_window, signals, batch_receipts=True)
        try:
            session.open()
            if self.dead_letter:
                check_dead_letter_exchange(session, self.queue)
            yield from self._loop(session, signals)
        except GeneratorExit:  # the caller left the loop: its current item goes back
            if self._current is not None:
                self._reject_quietly(self._current)
            self._flush_quietly()
            raise
        except ChannelTakenBack as e:
            log.error("The broker took back the items held (%s): usually consumer_timeout.", e)
            self.result.exit_code = EXIT_REQUEUED
        except ConfigurationError as e:
            log.error("%s", e)
            self.result.exit_code = EXIT_CONFIG
        except BrokerError as e:
            log.error("%s", e)
            self.result.exit_code = EXIT_BROKER
        finally:
            self.result.processed = session.consumer.acked
            self.result.reconnects = session.reconnects
            session.close()
            if restore is not None:
                restore()

    def _loop(self, session: Session, signals: Signals) -> Iterator[WorkItem]:
        consumer = session.consumer
        while True:
            try:
                if self._current is not None:
                    consumer.finish(self._current)  # the caller's code returned
                    self._current = None
                if signals.received:
                    log.warning("Stopped by signal %d; the items finished are acked.", signals.received)
                    self.result.exit_code = 128 + signals.received
                    break
                if self._only_held:
                    delivery = consumer.take(0)
                    if delivery is None:
                        break
                elif consumer.exhausted:
                    break
                else:
                    delivery = consumer.next_delivery()
                    if delivery is None:
                        if consumer.queue_is_empty():
                            log.info("Queue %r is empty.", self.queue)
                            break
                        continue
                self._current = delivery
                yield WorkItem(delivery.body, delivery.message_id, delivery.redelivered)
            except ConsumerLost as e:
                self._current = None
                if self._only_held:
                    break  # the items held are back in the queue; the failure decides the exit
                log.warning("Lost the broker %s (%s); the items held are back in the queue. Reconnecting.",
                            self.settings.describe(), e)
                session.open()
        try:
            consumer.flush()
        except ConsumerLost as e:
            log.warning("Lost the broker before the last items were acked (%s): they are back in the queue.", e)
        session.note_ledger()

    def fail_current(self, error: BaseException) -> None:
        """Reject the item being handled (requeue, or dead-letter with ``dead_letter=True``); the loop then
        hands out only the items already held, and ends with exit code 1."""
        assert self._session is not None and self._current is not None
        consumer = self._session.consumer
        delivery, self._current = self._current, None
        self.result.failed += 1
        self.result.exit_code = EXIT_HANDLER_FAILED
        log.error("The handler raised on an item of %r (%r); the item was %s.", self.queue, error,
                  "dead-lettered" if self.dead_letter else "requeued", exc_info=error)
        try:
            if not self._only_held:
                self._only_held = True
                consumer.stop_deliveries()
            consumer.reject(delivery, requeue=not self.dead_letter)
        except ConsumerLost:
            pass  # the connection is gone: the item is back in the queue anyway

    def _reject_quietly(self, delivery: Delivery) -> None:
        assert self._session is not None
        try:
            self._session.consumer.reject(delivery, requeue=True)
        except (ConsumerLost, ChannelTakenBack, BrokerError):
            pass  # gone with the connection: back in the queue anyway
        self._current = None

    def _flush_quietly(self) -> None:
        assert self._session is not None
        try:
            self._session.consumer.flush()
        except (ConsumerLost, ChannelTakenBack, BrokerError):
            pass


def work_items(queue: str | None = None, **options: object) -> WorkItems:
    """Items of ``queue`` (default: env QUEUE) from the broker at env BROKER_URL; see :class:`WorkItems`."""
    return WorkItems(queue, **options)  # type: ignore[arg-type]


def process_items(handler: Callable[[WorkItem], object], queue: str | None = None, **options: object) -> int:
    """Call ``handler(item)`` for every item; an exception rejects that item and ends the run (after the
    items already held) with exit code 1. Returns the exit code, for ``sys.exit``."""
    items = work_items(queue, **options)
    for item in items:
        try:
            handler(item)
        except Exception as e:
            items.fail_current(e)
    return items.exit_code
