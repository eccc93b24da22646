"""What every worker shares: signals remembered (not raised), and a consumer that rides out broker outages."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from types import FrameType

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import BrokerSettings, is_transient
from workqueue_provider.amqp.consumer import ConsumerLost, QueueConsumer
from workqueue_provider.exceptions import BrokerError, BrokerUnreachableError

log = logging.getLogger("workqueue-consume")

DEFAULT_OUTAGE_WINDOW = 300.0


class Signals:
    """Remembers SIGTERM/SIGINT instead of raising, and passes them on to a running command (whose exit
    then wakes the consumer). Waits are at most a second long, so a signal is noticed within one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.process: subprocess.Popen | None = None

    def install(self) -> Callable[[], None]:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, self._handle)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return restore

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class Session:
    """A :class:`QueueConsumer` that comes back after a broker outage, within the outage window. The
    consumer record (the run keeps receipts) is written once, on the first connection."""

    def __init__(self, settings: BrokerSettings, queue: str, prefetch: int, max_items: int | None,
                 outage_window: float, signals: Signals, initial_prefetch: int | None = None,
                 batch_receipts: bool = False):
        self.settings = settings
        self.queue = queue
        self.outage_window = outage_window
        self.signals = signals
        self.consumer = QueueConsumer(settings, queue, prefetch, max_items, initial_prefetch, batch_receipts)
        self.ledger = True  # False once we know the queue has no receipts queue
        self.reconnects = 0
        self._started = False

    def open(self) -> None:
        """Connect (again), retrying transient failures with backoff until the window is spent."""
        after_loss = self._started
        started = time.monotonic()
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            try:
                self._connect()
                break
            except (BrokerError, ConsumerLost) as e:
                waited = time.monotonic() - started
                transient = isinstance(e, ConsumerLost) or is_transient(e)
                if not transient or waited + delay > self.outage_window or self.signals.received:
                    if transient and self.outage_window:
                        raise BrokerUnreachableError(
                            f"The broker at {self.settings.address} was unreachable for {waited:.0f} s, longer than "
                            f"the outage window ({self.outage_window:g} s; --outage-window or "
                            f"WORKQUEUE_OUTAGE_WINDOW): {e}") from e
                    if isinstance(e, ConsumerLost):
                        raise BrokerUnreachableError(f"Lost the broker at {self.settings.address}: {e}") from e
                    raise
                log.warning("Broker %s unreachable (attempt %d, %.0f s of the %g s outage window used): %s; "
                            "retrying in %.0f s.", self.settings.describe(), attempt, waited, self.outage_window, e,
                            delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
        if after_loss:
            self.reconnects += 1
            log.warning("Reconnected to the broker %s after %.1f s.", self.settings.describe(),
                        time.monotonic() - started)

    def _connect(self) -> None:
        self.consumer.connect(keep_receipts=self.ledger)
        if not self._started:
            kept = self.consumer.record_start()
            self._started = True
            if not kept:
                self.ledger = False
                self.consumer.drop_ledger()
                log.warning("Queue %r has no receipts queue %r (it wasn't filled by FillQueueOperator): items are "
                            "acked without receipts, and the run can only check that the queue is empty.",
                            self.queue, receipts.receipts_queue(self.queue))

    def note_ledger(self) -> None:
        """Say once that the ledger vanished while we worked (receipts came back unroutable)."""
        if self.ledger and self.consumer.ledger_gone:
            self.ledger = False
            log.warning("The receipts queue of %r is gone: acking without receipts.", self.queue)

    def close(self) -> None:
        self.consumer.close()
