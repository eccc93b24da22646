"""Take items from a queue and run a command per item: ``amqp-consume -c 1``'s contract, without its flaws.

- the message body goes to the command's stdin;
- after the command exits 0 a receipt goes to the queue's ledger (``Q.receipts``, committed), then
  the item is acked: the run's item account (amqp/receipts.py) counts it as processed;
- on failure it is rejected (requeued, or dead-lettered with ``dead_letter=True``, which is refused
  at start when the queue has no dead-letter exchange) and the consumer exits non-zero, so
  Kubernetes sees the failure (after finishing the one item it already held, see below);
- an empty queue ends the consumer at once with exit 0 instead of blocking forever; "empty" is only
  believed from a queue that answers (a quorum queue whose leader is paused or lost reads empty:
  amqp/consumer.py asks again, and reconnects after a minute without an answer);
- ``max_items`` takes up to N items; ``max_items=None`` drains the queue in one process;
- a broker outage (restart, upgrade, node reboot) is ridden out: the consumer reconnects with
  backoff for up to ``outage_window`` seconds; the items held when the connection dropped are back in
  the queue (the broker requeues unacked items), so the command is stopped and the items are taken
  again later. Only when the window is spent does it exit ``EXIT_BROKER``;
- SIGTERM/SIGINT are passed to the command; if it still exits 0 the item is acked (with its
  receipt), otherwise requeued; then the consumer exits ``128 + signal``;
- an item whose command runs past the broker's ``consumer_timeout`` has already been requeued by
  the broker (it closes the channel): the command is stopped at once and the consumer exits
  ``EXIT_REQUEUED``, so the item is never completed twice (raise ``consumer_timeout`` for long items).

Per item it costs about what ``amqp-consume`` costs: the next item is already delivered (no round
trip per item), the command's exit wakes the consumer at once (a pidfd, no polling), and an item's
receipt is confirmed and its ack sent while the next commands run (pipelined confirms). Items shorter
than the broker's round trip share a receipt, its confirm and a multiple ack (half the window's worth,
or what finished within 50 ms), which halves the broker's work per item; a pod killed before they are
sent has those items processed again (duplicates, counted, never losses).

The prefetch stays bounded so no pod hoards items at the end of a drain: it starts at 2 (the item
being worked on and the next), and grows (doubling, up to 32) only while the consumer sits idle
with half its window or more taken by finished items waiting for their receipt's confirm, which
happens only when items are shorter than the broker's confirm latency (a few ms: the items held
then are tens of ms of work); items of seconds keep a window
of 2, so a pod holds at most one item it has not started. ``max_items`` is never exceeded, not
even by a held delivery (amqp/consumer.py). An item held and handed back counts as a delivery on
quorum queues (delivery limits), so after a failure the consumer still works the items it holds
before it exits; only a signal or an outage hands them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.amqp.deliveries import ChannelTakenBack, ConsumerLost, Delivery
from workqueue_provider.exceptions import BrokerError, ConfigurationError
from workqueue_provider.worker.queue_arguments import dead_letter_exchange
from workqueue_provider.worker.session import DEFAULT_OUTAGE_WINDOW, Session, Signals

log = logging.getLogger("workqueue-consume")

EXIT_OK = 0
EXIT_BROKER = 69  # EX_UNAVAILABLE: broker unreachable past the outage window, refused, or queue missing
EXIT_REQUEUED = 75  # EX_TEMPFAIL: the broker took the item back (consumer_timeout) while the command ran
EXIT_CONFIG = 78  # EX_CONFIG: the queue does not fit the options (--dead-letter without a dead-letter exchange)
EXIT_CANNOT_RUN = 127  # the command could not be started (as a shell says)
STOP_GRACE_SECONDS = 25.0  # how long a signalled command may finish its item (pods get 30 s by default)
PREFETCH = 2  # the item being worked on and the next one ...
MAX_PREFETCH = 32  # ... plus finished items waiting for their receipt's confirm, when items are that short


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


def consume(settings: BrokerSettings, options: ConsumeOptions) -> ConsumeResult:
    """Process items until the limit, an empty queue, the first failure, a signal, or a spent outage window."""
    result = ConsumeResult()
    signals = Signals()
    restore_signals = signals.install()
    session = Session(settings, options.queue, MAX_PREFETCH, options.max_items, options.outage_window, signals,
                      initial_prefetch=PREFETCH, batch_receipts=True)
    try:
        session.open()
        if options.dead_letter:
            check_dead_letter_exchange(session, options.queue)
        _Worker(session, options, signals, result).run()
    except ChannelTakenBack as e:
        log.error("The broker took the item back while the command was still running (%s): usually RabbitMQ's "
                  "consumer_timeout (default 30 min) is shorter than the item's run time. The command was stopped, so "
                  "the item is not completed twice; it is back in queue %r. Raise consumer_timeout above the longest "
                  "item (rabbitmq.conf consumer_timeout, or x-consumer-timeout per queue on RabbitMQ >= 3.12).",
                  e, options.queue)
        result.failed += 1
        result.exit_code = EXIT_REQUEUED
    except ConfigurationError as e:
        log.error("%s", e)
        result.exit_code = EXIT_CONFIG
    except BrokerError as e:
        log.error("%s", e)
        result.exit_code = EXIT_BROKER
    finally:
        session.close()
        restore_signals()
    result.reconnects = session.reconnects
    return result


def check_dead_letter_exchange(session: Session, queue: str) -> None:
    """``dead_letter=True`` on a queue without a dead-letter exchange would drop failed items: refuse."""
    if dead_letter_exchange(session.consumer.connection, queue) is None:  # probes on channels of their own
        raise ConfigurationError(
            f"--dead-letter (WORKQUEUE_DEAD_LETTER) was given, but queue {queue!r} has no dead-letter exchange: "
            "a failed item would be dropped. Declare the queue with a dead-letter queue "
            "(DeclareQueueOperator(dead_letter_queue=...)) or drop --dead-letter so failed items are requeued.")


class _Worker:
    """The item loop. A finished item's receipt and ack go out while the next item's command runs
    (:meth:`QueueConsumer.finish`); every way out waits until they are done."""

    def __init__(self, session: Session, options: ConsumeOptions, signals: Signals, result: ConsumeResult):
        self.session = session
        self.options = options
        self.signals = signals
        self.result = result
        self.executable = _resolve(options.command[0])

    def run(self) -> None:
        consumer = self.session.consumer
        while True:
            try:
                if self._step():
                    consumer.flush()
                    self.session.note_ledger()
                    if self.signals.received and self.result.exit_code == EXIT_OK:
                        self.result.exit_code = 128 + self.signals.received
                    return
            except ConsumerLost as e:
                log.warning("Lost the broker %s (%s); the items held are back in the queue and will be taken again "
                            "(an item whose command had finished is processed twice). Reconnecting.",
                            self.session.settings.describe(), e)
                if self.result.exit_code != EXIT_OK:
                    return  # a failure already decided the exit; the items held are back in the queue
                self.session.open()
            finally:
                self.result.processed = consumer.acked

    def _step(self) -> bool:
        """Take one item and run its command; True when the consumer should stop."""
        consumer = self.session.consumer
        if self.signals.received:
            log.warning("Stopped by signal %d before taking another item.", self.signals.received)
            return True
        if consumer.exhausted:
            return True
        delivery = consumer.next_delivery()
        if delivery is None:
            if consumer.queue_is_empty():
                log.info("Queue %r is empty; %d item(s) processed.", self.options.queue, consumer.acked)
                return True
            return False  # items ready but not here yet (our prefetch is full of items being acked)
        code = self._work(delivery)
        if code == 0:
            consumer.finish(delivery)
            if self.signals.received:
                consumer.flush()
                log.warning("Stopped by signal %d; the item being worked on finished and was acked.",
                            self.signals.received)
                return True
            return False
        self._failed(delivery, code)
        return True

    def _work(self, delivery: Delivery) -> int:
        """Run the command on ``delivery``; returns its exit code."""
        try:
            process = _start(self.options.command, self.executable, delivery.body)
        except OSError as e:
            log.error("Could not start the command %r: %s", list(self.options.command), e)
            return EXIT_CANNOT_RUN
        self.signals.process = process
        try:
            code = self._wait(process)
        except BaseException:
            _stop(process)
            raise
        finally:
            self.signals.process = None
        return code if code >= 0 else 128 - code

    def _wait(self, process: subprocess.Popen) -> int:
        """Wait for the command; between waits of up to a second, handle the broker's traffic (the
        previous item's commit and ack, deliveries, heartbeats). A signal gives the command
        STOP_GRACE_SECONDS to finish. Raises ConsumerLost / ChannelTakenBack (the caller stops it)."""
        signalled_at: float | None = None
        wait = 0.01
        self.session.consumer.service()  # sends the receipts and acks of the items finished before
        with _exit_watch(process) as exited:
            while process.poll() is None:
                if self.signals.received and signalled_at is None:
                    signalled_at = time.monotonic()
                if signalled_at is not None and time.monotonic() - signalled_at > STOP_GRACE_SECONDS:
                    _stop(process)
                    break
                if exited(wait):
                    break
                self.session.consumer.pump(0)
                wait = min(wait * 4, 1.0)
        return process.wait()

    def _failed(self, delivery: Delivery, code: int) -> None:
        """Reject the failed item, work the ones already held (handing them back would count a delivery
        against each on a quorum queue), then stop with the failure's exit code."""
        consumer = self.session.consumer
        self.result.failed += 1
        signalled = self.signals.received
        requeue = not self.options.dead_letter or bool(signalled)
        consumer.stop_deliveries()
        consumer.reject(delivery, requeue=requeue)
        if signalled:
            log.warning("Stopped by signal %d; the command exited %d, so the item goes back to the queue.",
                        signalled, code)
        else:
            log.error("Command exited %d on an item of %r; the item was %s.", code, self.options.queue,
                      "requeued" if requeue else "dead-lettered")
        self.result.exit_code = 128 + signalled if signalled else code
        while not self.signals.received and (held := consumer.take(0)) is not None:
            held_code = self._work(held)
            if held_code == 0:
                consumer.finish(held)
                continue
            self.result.failed += 1
            consumer.reject(held, requeue=not self.options.dead_letter)
            log.error("Command exited %d on an item of %r held when the previous one failed; the item was %s.",
                      held_code, self.options.queue, "dead-lettered" if self.options.dead_letter else "requeued")


@contextlib.contextmanager
def _exit_watch(process: subprocess.Popen) -> Iterator[Callable[[float], bool]]:
    """``exited(seconds)``: wait up to ``seconds`` for the process to exit, without reaping it. A pidfd
    wakes the wait the moment it exits; without pidfd_open (not Linux), Popen's own polling wait."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(process.pid)

    def exited(seconds: float) -> bool:
        if pidfd is not None:
            return bool(select.select([pidfd], [], [], seconds)[0])
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        yield exited
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _resolve(program: str) -> str:
    """The command's program found on PATH once, as a shell remembers it: a search per item is a third
    of the CPU a short item costs. Unresolved (not found), starting it fails with the usual error."""
    if os.sep in program:
        return program
    return shutil.which(program) or program


def _start(command: Sequence[str], executable: str, body: bytes) -> subprocess.Popen:
    """Start the command with ``body`` on its stdin (a memory file: no pipe to fill, no disk)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("workqueue-item")
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
            return subprocess.Popen(list(command), executable=executable, stdin=fd)
        finally:
            os.close(fd)
    with tempfile.TemporaryFile() as stdin:
        stdin.write(body)
        stdin.seek(0)
        return subprocess.Popen(list(command), executable=executable, stdin=stdin)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
