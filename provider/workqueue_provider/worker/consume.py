"""Take items from a queue and run a command per item: ``amqp-consume -c 1``'s contract, without its flaws.

- the message body goes to the command's stdin;
- the item is acked only after the command exits 0;
- on failure it is rejected (requeued, or dead-lettered with ``dead_letter=True``) and the
  consumer exits non-zero, so Kubernetes sees the failure;
- an empty queue ends the consumer at once with exit 0 instead of blocking forever;
- ``max_items`` takes up to N items; ``max_items=None`` drains the queue in one process;
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
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.exceptions import BrokerError, ConfigurationError

log = logging.getLogger("workqueue-consume")

EXIT_OK = 0
EXIT_BROKER = 69  # EX_UNAVAILABLE: broker unreachable, refused, or queue missing
EXIT_REQUEUED = 75  # EX_TEMPFAIL: the broker took the item back (consumer_timeout) while the command ran


@dataclass(frozen=True)
class ConsumeOptions:
    queue: str
    command: Sequence[str]
    max_items: int | None = 1
    dead_letter: bool = False

    def __post_init__(self) -> None:
        if not self.queue:
            raise ConfigurationError("No queue given: set QUEUE or pass --queue.")
        if not self.command:
            raise ConfigurationError("No command given: pass the worker command after the options.")
        if self.max_items is not None and self.max_items <= 0:
            raise ConfigurationError(f"max_items={self.max_items} must be positive (or None to drain).")


@dataclass
class ConsumeResult:
    processed: int = 0
    failed: int = 0
    exit_code: int = EXIT_OK


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class _Requeued(Exception):
    """The broker closed the channel while the command ran: the item went back to the queue."""

    def __init__(self, reason: BaseException | None):
        self.reason = reason


def consume(settings: BrokerSettings, options: ConsumeOptions) -> ConsumeResult:
    """Process items until the limit, an empty queue, or the first failure."""
    result = ConsumeResult()
    try:
        connection = open_connection(settings)
    except BrokerError as e:
        log.error("%s", e)
        result.exit_code = EXIT_BROKER
        return result
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        while options.max_items is None or result.processed < options.max_items:
            method, _properties, body = channel.basic_get(options.queue, auto_ack=False)
            if method is None:
                log.info("Queue %r is empty; %d item(s) processed.", options.queue, result.processed)
                break
            code = _run(connection, channel, options.command, body)
            if code == 0:
                channel.basic_ack(method.delivery_tag)
                result.processed += 1
                continue
            channel.basic_reject(method.delivery_tag, requeue=not options.dead_letter)
            result.failed += 1
            result.exit_code = code
            log.error("Command exited %d on an item of %r; the item was %s.", code, options.queue,
                      "dead-lettered" if options.dead_letter else "requeued")
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
    except _Stop as stop:
        log.warning("Stopped by signal %d; the current item goes back to the queue.", stop.signum)
        result.exit_code = 128 + stop.signum
    except pika.exceptions.ChannelClosedByBroker as e:
        log.error("The broker closed the channel on queue %r: %s %s", options.queue, e.reply_code, e.reply_text)
        result.exit_code = EXIT_BROKER
    except pika.exceptions.AMQPError as e:
        log.error("Lost the broker at %s: %r", settings.address, e)
        result.exit_code = EXIT_BROKER
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return result


def _run(connection: pika.BlockingConnection, channel: BlockingChannel, command: Sequence[str], body: bytes) -> int:
    """Run the command with ``body`` on stdin, keeping the connection's heartbeats going meanwhile.

    Raises :class:`_Requeued` (after stopping the command) if the broker closes the channel meanwhile.
    """
    with tempfile.TemporaryFile() as stdin:
        stdin.write(body)
        stdin.seek(0)
        process = subprocess.Popen(list(command), stdin=stdin)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        raise _Stop(signum)

    for sig in previous:
        signal.signal(sig, forward)
    try:
        wait = 0.002
        while True:
            try:
                code = process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                connection.process_data_events(time_limit=0)
                if channel.is_closed:  # consumer_timeout: the item is already back in the queue
                    _stop(process)
                    raise _Requeued(getattr(channel, "_closing_reason", None)) from None
                wait = min(wait * 2, 1.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            process.kill()
    return code if code >= 0 else 128 - code


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
