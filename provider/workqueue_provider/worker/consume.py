"""Take items from a queue and run a command per item: ``amqp-consume -c 1``'s contract, without its flaws.

- the message body goes to the command's stdin;
- after the command exits 0 a receipt goes to the queue's ledger (``Q.receipts``, confirmed), then
  the item is acked: the run's item account (amqp/receipts.py) counts it as processed;
- on failure it is rejected (requeued, or dead-lettered with ``dead_letter=True``, which is refused
  at start when the queue has no dead-letter exchange) and the consumer exits non-zero, so
  Kubernetes sees the failure;
- an empty queue ends the consumer at once with exit 0 instead of blocking forever;
- ``max_items`` takes up to N items; ``max_items=None`` drains the queue in one process;
- a broker outage (restart, upgrade, node reboot) is ridden out: the consumer reconnects with
  backoff for up to ``outage_window`` seconds; the item held when the connection dropped is back in
  the queue (the broker requeues unacked items), so its command is stopped and the item is taken
  again later. Only when the window is spent does it exit ``EXIT_BROKER``;
- SIGTERM/SIGINT are passed to the command; if it still exits 0 the item is acked (with its
  receipt), otherwise requeued; then the consumer exits ``128 + signal``;
- an item whose command runs past the broker's ``consumer_timeout`` has already been requeued by
  the broker (it closes the channel): the command is stopped at once and the consumer exits
  ``EXIT_REQUEUED``, so the item is never completed twice (raise ``consumer_timeout`` for long items).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import BrokerSettings, is_transient, open_connection
from workqueue_provider.exceptions import BrokerError, BrokerUnreachableError, ConfigurationError
from workqueue_provider.worker.queue_arguments import dead_letter_exchange

log = logging.getLogger("workqueue-consume")

EXIT_OK = 0
EXIT_BROKER = 69  # EX_UNAVAILABLE: broker unreachable past the outage window, refused, or queue missing
EXIT_REQUEUED = 75  # EX_TEMPFAIL: the broker took the item back (consumer_timeout) while the command ran
EXIT_CONFIG = 78  # EX_CONFIG: the queue does not fit the options (--dead-letter without a dead-letter exchange)
DEFAULT_OUTAGE_WINDOW = 300.0
STOP_GRACE_SECONDS = 25.0  # how long a signalled command may finish its item (pods get 30 s by default)


@dataclass(frozen=True)
class ConsumeOptions:
    queue: str
    command: Sequence[str]
    max_items: int | None = 1
    dead_letter: bool = False
    outage_window: float = DEFAULT_OUTAGE_WINDOW

    def __post_init__(self) -> None:
        if not self.queue:
            raise ConfigurationError("No queue given: set QUEUE or pass --queue.")
        if not self.command:
            raise ConfigurationError("No command given: pass the worker command after the options.")
        if self.max_items is not None and self.max_items <= 0:
            raise ConfigurationError(f"max_items={self.max_items} must be positive (or None to drain).")
        if not self.outage_window >= 0:
            raise ConfigurationError(f"outage_window={self.outage_window} must be zero or more seconds.")


@dataclass
class ConsumeResult:
    processed: int = 0
    failed: int = 0
    reconnects: int = 0
    exit_code: int = EXIT_OK


class _BrokerLost(Exception):
    """The connection dropped; any item held is back in the queue."""


class _Requeued(Exception):
    """The broker closed the channel while the command ran: the item went back to the queue."""

    def __init__(self, reason: BaseException | None):
        self.reason = reason


class _Signals:
    """Remembers SIGTERM/SIGINT instead of raising, and passes them on to the running command."""

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
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class _Session:
    """A connection and channel that come back after a broker outage, within the outage window."""

    def __init__(self, settings: BrokerSettings, options: ConsumeOptions, signals: _Signals):
        self.settings = settings
        self.options = options
        self.signals = signals
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.ledger = True  # False once we know the queue has no receipts queue
        self.reconnects = 0

    def open(self, *, after_loss: bool) -> None:
        """Connect, retrying transient failures with backoff until the window is spent."""
        self.close()
        started = time.monotonic()
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            try:
                self.connection = open_connection(self.settings)
                break
            except BrokerError as e:
                waited = time.monotonic() - started
                if not is_transient(e) or waited + delay > self.options.outage_window or self.signals.received:
                    if is_transient(e) and self.options.outage_window:
                        raise BrokerUnreachableError(
                            f"The broker at {self.settings.address} was unreachable for {waited:.0f} s, longer than "
                            f"the outage window ({self.options.outage_window:g} s; --outage-window or "
                            f"WORKQUEUE_OUTAGE_WINDOW): {e}") from e
                    raise
                log.warning("Broker %s unreachable (attempt %d, %.0f s of the %g s outage window used): %s; "
                            "retrying in %.0f s.", self.settings.describe(), attempt, waited,
                            self.options.outage_window, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
        if after_loss:
            self.reconnects += 1
            log.warning("Reconnected to the broker %s after %.1f s.", self.settings.describe(),
                        time.monotonic() - started)
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=1)
        self.channel.confirm_delivery()  # receipts are confirmed before the item is acked
        if self.ledger and not after_loss:
            try:
                receipts.record_consumer(self.channel, self.options.queue)
            except receipts.NoLedger:
                self.ledger = False
                log.warning("Queue %r has no receipts queue %r (it wasn't filled by FillQueueOperator): items are "
                            "acked without receipts, and the run can only check that the queue is empty.",
                            self.options.queue, receipts.receipts_queue(self.options.queue))

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
        self.connection = self.channel = None

    def lost(self, error: BaseException) -> bool:
        """Whether ``error`` means the connection is gone (rather than a refusal on a live one)."""
        return isinstance(error, (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed,
                                  pika.exceptions.StreamLostError, ConnectionError, OSError)) or (
            self.connection is not None and self.connection.is_closed)


def consume(settings: BrokerSettings, options: ConsumeOptions) -> ConsumeResult:
    """Process items until the limit, an empty queue, the first failure, a signal, or a spent outage window."""
    result = ConsumeResult()
    signals = _Signals()
    restore_signals = signals.install()
    session = _Session(settings, options, signals)
    try:
        session.open(after_loss=False)
        if options.dead_letter:
            _check_dead_letter_exchange(session, options.queue)
        while options.max_items is None or result.processed < options.max_items:
            if signals.received:
                log.warning("Stopped by signal %d before taking another item.", signals.received)
                result.exit_code = 128 + signals.received
                break
            try:
                outcome = _take_one(session, options, signals)
            except _BrokerLost as e:
                log.warning("Lost the broker %s (%s); any item held is back in the queue. Reconnecting.",
                            settings.describe(), e)
                session.open(after_loss=True)
                continue
            if outcome is None:
                log.info("Queue %r is empty; %d item(s) processed.", options.queue, result.processed)
                break
            if outcome == 0:
                result.processed += 1
                if signals.received:
                    log.warning("Stopped by signal %d; the item being worked on finished and was acked.",
                                signals.received)
                    result.exit_code = 128 + signals.received
                    break
                continue
            result.failed += 1
            result.exit_code = 128 + signals.received if signals.received else outcome
            break
    except _Requeued as requeued:
        reason = requeued.reason
        detail = f"{reason.reply_code} {reason.reply_text}" if isinstance(reason, pika.exceptions.ChannelClosedByBroker) \
            else repr(reason)
        log.error("The broker took the item back while the command was still running (%s): usually RabbitMQ's "
                  "consumer_timeout (default 30 min) is shorter than the item's run time. The command was stopped, so "
                  "the item is not completed twice; it is back in queue %r. Raise consumer_timeout above the longest "
                  "item (rabbitmq.conf consumer_timeout, or x-consumer-timeout per queue on RabbitMQ >= 3.12).",
                  detail, options.queue)
        result.failed += 1
        result.exit_code = EXIT_REQUEUED
    except ConfigurationError as e:
        log.error("%s", e)
        result.exit_code = EXIT_CONFIG
    except BrokerError as e:
        log.error("%s", e)
        result.exit_code = EXIT_BROKER
    except pika.exceptions.ChannelClosedByBroker as e:
        log.error("The broker closed the channel on queue %r: %s %s", options.queue, e.reply_code, e.reply_text)
        result.exit_code = EXIT_BROKER
    finally:
        session.close()
        restore_signals()
    result.reconnects = session.reconnects
    return result


def _check_dead_letter_exchange(session: _Session, queue: str) -> None:
    """``dead_letter=True`` on a queue without a dead-letter exchange would drop failed items: refuse."""
    if dead_letter_exchange(session.connection, queue) is None:  # probes on channels of their own
        raise ConfigurationError(
            f"--dead-letter (WORKQUEUE_DEAD_LETTER) was given, but queue {queue!r} has no dead-letter exchange: "
            "a failed item would be dropped. Declare the queue with a dead-letter queue "
            "(DeclareQueueOperator(dead_letter_queue=...)) or drop --dead-letter so failed items are requeued.")


def _take_one(session: _Session, options: ConsumeOptions, signals: _Signals) -> int | None:
    """Take one item and run the command on it; returns its exit code, or None when the queue is empty.
    Raises :class:`_BrokerLost` when the connection drops (the item, if any, is back in the queue)."""
    channel = session.channel
    assert channel is not None and session.connection is not None
    try:
        method, properties, body = channel.basic_get(options.queue, auto_ack=False)
    except pika.exceptions.ChannelClosedByBroker:
        raise
    except Exception as e:
        if session.lost(e):
            raise _BrokerLost(repr(e)) from e
        raise
    if method is None:
        return None
    try:
        code = _run(session.connection, channel, options.command, body, signals)
    except _BrokerLost:
        raise
    if code == 0:
        try:
            if session.ledger:
                try:
                    receipts.record_processed(channel, options.queue, properties)
                except receipts.NoLedger:  # deleted while we worked
                    session.ledger = False
                    log.warning("The receipts queue of %r is gone: acking without receipts.", options.queue)
            channel.basic_ack(method.delivery_tag)
        except Exception as e:
            if session.lost(e):
                raise _BrokerLost(f"{e!r}; the item's command had finished, so it may be processed twice") from e
            raise
        return 0
    requeue = not options.dead_letter or bool(signals.received)
    try:
        channel.basic_reject(method.delivery_tag, requeue=requeue)
    except Exception as e:
        if session.lost(e):
            raise _BrokerLost(repr(e)) from e
        raise
    if signals.received:
        log.warning("Stopped by signal %d; the command exited %d, so the item goes back to the queue.", signals.received, code)
    else:
        log.error("Command exited %d on an item of %r; the item was %s.", code, options.queue,
                  "requeued" if requeue else "dead-lettered")
    return code


def _run(connection: pika.BlockingConnection, channel: BlockingChannel, command: Sequence[str], body: bytes,
         signals: _Signals) -> int:
    """Run the command with ``body`` on stdin, keeping the connection's heartbeats going meanwhile.

    Raises :class:`_Requeued` (after stopping the command) if the broker closes the channel meanwhile,
    and :class:`_BrokerLost` (likewise) if the connection drops.
    """
    with tempfile.TemporaryFile() as stdin:
        stdin.write(body)
        stdin.seek(0)
        process = subprocess.Popen(list(command), stdin=stdin)
    signals.process = process
    signalled_at: float | None = None
    try:
        wait = 0.002
        while True:
            try:
                code = process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                pass
            if signals.received and signalled_at is None:
                signalled_at = time.monotonic()
            if signalled_at is not None and time.monotonic() - signalled_at > STOP_GRACE_SECONDS:
                _stop(process)
            try:
                connection.process_data_events(time_limit=0)
            except Exception as e:
                _stop(process)
                raise _BrokerLost(repr(e)) from e
            if connection.is_closed:
                _stop(process)
                raise _BrokerLost("the connection closed")
            if channel.is_closed:  # consumer_timeout: the item is already back in the queue
                _stop(process)
                raise _Requeued(getattr(channel, "_closing_reason", None))
            wait = min(wait * 2, 1.0)
    finally:
        signals.process = None
        if process.poll() is None:
            process.kill()
            process.wait()
    return code if code >= 0 else 128 - code


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
