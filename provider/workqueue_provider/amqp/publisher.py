"""Persistent messages with publisher confirms pipelined: many in flight, never one wait per message.

pika's BlockingChannel waits for each confirm on its own (10-20x slower); this drives a
``SelectConnection`` with an ack/nack callback and keeps up to ``window`` messages (and at most
:data:`MAX_UNCONFIRMED_BYTES` of bodies) unconfirmed. The messages published in one go (as confirms
free the window) reach the socket as one write: pika sends each frame on its own, three ``send()``
calls per message, which was most of a fill's CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.spec import Basic

from workqueue_provider.amqp.connection import BrokerSettings, translate_connect_error
from workqueue_provider.exceptions import BrokerError, ConfigurationError, PublishError

log = logging.getLogger(__name__)

# Messages in flight (published, not yet confirmed). Classic queues confirm persistent messages in
# batches as the broker flushes them to disk, so a deep window matters: on this project's benchmark
# machine 10,000 published classic-queue fills ~30% faster than 1,000 (bench/results/).
DEFAULT_WINDOW = 10_000
# ... and at most this many bytes of bodies in flight, so large items don't pile up in pika's buffers.
MAX_UNCONFIRMED_BYTES = 16 * 1024 * 1024
PERSISTENT = pika.DeliveryMode.Persistent

ProgressCallback = Callable[[int, float], None]
"""Called with (items confirmed so far, seconds elapsed)."""
MessageIds = Callable[[int], str]
"""The message id of the ``index``-th message (0-based), e.g. :func:`~workqueue_provider.amqp.receipts.message_id_for`."""


WRITE_BYTES = 1024 * 1024  # frames held for one write: at most this many bytes


class _OneWriteConnection(pika.SelectConnection):
    """A SelectConnection whose frames, inside :meth:`one_write`, go to the socket together."""

    def __init__(self, *args, **kwargs) -> None:
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def one_write(self) -> Iterator[None]:
        self._held, self._held_bytes = [], 0
        try:
            yield
        finally:
            self._emit_held()
            self._held = None

    def _output_marshaled_frames(self, marshaled_frames) -> None:  # pika's one place frames leave by
        held = self._held
        if held is None:
            super()._output_marshaled_frames(marshaled_frames)
            return
        for marshaled in marshaled_frames:
            self.bytes_sent += len(marshaled)
            self.frames_sent += 1
            held.append(marshaled)
            self._held_bytes += len(marshaled)
        if self._held_bytes >= WRITE_BYTES:
            self._emit_held()

    def _emit_held(self) -> None:
        if self._held:
            self._adapter_emit_data(b"".join(self._held))
            self._held.clear()
        self._held_bytes = 0


@dataclass
class PublishResult:
    confirmed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.confirmed / self.seconds if self.seconds > 0 else float("inf")


class _ConfirmedPublish:
    """One publishing run on its own SelectConnection; see :func:`publish`."""

    def __init__(self, settings: BrokerSettings, routing_key: str, bodies: Iterator[bytes], total: int,
                 window: int, properties: pika.BasicProperties, on_progress: ProgressCallback | None,
                 progress_every: float, message_ids: MessageIds | None = None):
        self.settings = settings
        self.routing_key = routing_key
        self.bodies = bodies
        self.total = total
        self.window = window
        self.properties = properties  # one object; only message_id changes (pika encodes it at each publish)
        self.message_ids = message_ids
        self.on_progress = on_progress
        self.progress_every = progress_every
        self.published = 0
        self.confirmed = 0
        self.refused = 0  # nacked by the broker (a full queue with x-overflow=reject-publish, ...)
        self.unconfirmed: dict[int, int] = {}  # delivery tag -> body size, of messages not yet acked or nacked
        self.publish_order: deque[int] = deque()  # their tags in publish order (settled ones are skipped)
        self.unconfirmed_bytes = 0
        self.exhausted = False
        self.error: BaseException | None = None
        self.connection: _OneWriteConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.started = 0.0
        self.last_progress = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> PublishResult:
        self.started = self.last_progress = time.monotonic()
        self.connection = _OneWriteConnection(
            self.settings.pika_parameters(),
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        try:
            self.connection.ioloop.start()
        finally:
            if not self.connection.is_closed:  # an exception escaped a callback: don't leak the socket
                self.connection.close()
                self.connection.ioloop.start()
        if self.error is not None:
            raise self.error
        return PublishResult(self.confirmed, time.monotonic() - self.started)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._close()

    def _close(self) -> None:
        assert self.connection is not None
        if self.connection.is_open:
            self.connection.close()
        elif self.connection.is_closed:
            self.connection.ioloop.stop()

    def _on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self.error = translate_connect_error(self.settings, error)
        _connection.ioloop.stop()

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if self.error is None and not self._done():
            self.error = PublishError(
                f"The connection to {self.settings.address} closed while publishing to queue {self.routing_key!r} "
                f"({reason}); retrying the fill republishes every item exactly once",
                confirmed=self.confirmed, total=self.total,
            )
            self.error.__cause__ = reason  # a lost connection: transient (connection.is_transient)
        connection.ioloop.stop()

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: self._pump())

    def _on_channel_closed(self, _channel: pika.channel.Channel, reason: BaseException) -> None:
        if not self._done():
            error = PublishError(f"The broker at {self.settings.address} closed the channel publishing to queue "
                                 f"{self.routing_key!r} ({reason}); retrying the fill republishes every item exactly once",
                                 confirmed=self.confirmed, total=self.total)
            error.__cause__ = reason  # a connection closed under it is transient (connection.is_transient)
            self._fail(error)
        else:
            self._close()

    # -- publishing ------------------------------------------------------------------------------
    def _done(self) -> bool:
        return self.exhausted and not self.unconfirmed

    def _pump(self) -> None:
        assert self.channel is not None and self.connection is not None
        with self.connection.one_write():
            self._publish_what_fits()
        if self._done() and self.error is None:
            if self.refused:
                self._fail(self._refusal())
                return
            self._report(force=True)
            self.channel.close()

    def _publish_what_fits(self) -> None:
        """Publish until the window is full or the items run out."""
        assert self.channel is not None
        while (not self.exhausted and len(self.unconfirmed) < self.window
               and self.unconfirmed_bytes < MAX_UNCONFIRMED_BYTES and self.error is None):
            body = next(self.bodies, None)
            if body is None:
                self.exhausted = True
                break
            if self.message_ids is not None:
                self.properties.message_id = self.message_ids(self.published)
            self.channel.basic_publish("", self.routing_key, body, self.properties, mandatory=True)
            self.published += 1  # = the message's delivery tag: tags count from 1 in publish order
            self.unconfirmed[self.published] = len(body)
            self.publish_order.append(self.published)
            self.unconfirmed_bytes += len(body)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if self.error is not None:
            return
        settled = self._settle(method.delivery_tag, method.multiple)
        if isinstance(method, Basic.Nack):
            self.refused += settled
            self.exhausted = True  # publish no more; wait for the confirms in flight, then fail (_pump)
        else:
            self.confirmed += settled
        self._report()
        self._pump()

    def _settle(self, tag: int, multiple: bool) -> int:
        """Forget the messages a confirm settles (``multiple``: every one up to ``tag``; confirms may
        come out of order: nacks of a full queue before the acks of what it stored); how many."""
        if not multiple:
            size = self.unconfirmed.pop(tag, None)
            if size is None:
                return 0
            self.unconfirmed_bytes -= size
            return 1
        settled = 0
        while self.publish_order and self.publish_order[0] <= tag:  # O(1) each: no scan of settled tags
            size = self.unconfirmed.pop(self.publish_order.popleft(), None)
            if size is not None:
                self.unconfirmed_bytes -= size
                settled += 1
        return settled

    def _refusal(self) -> PublishError:
        return PublishError(
            f"The broker refused {self.refused} of the {self.published} messages published to queue "
            f"{self.routing_key!r} (nack), so {self.total - self.confirmed} items are not in the queue: it is full "
            "(x-max-length with x-overflow=reject-publish: raise max_length above the item count, or fill it "
            "in smaller batches) or the broker is out of resources; retrying the fill republishes every item",
            confirmed=self.confirmed, total=self.total,
        )

    def _on_return(self, _channel: object, _method: object, _properties: object, _body: bytes) -> None:
        self._fail(PublishError(
            f"Queue {self.routing_key!r} does not exist, so the broker returned an unroutable message: "
            "declare the queue first (DeclareQueueOperator)",
            confirmed=self.confirmed, total=self.total,
        ))

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress and (force or now - self.last_progress >= self.progress_every):
            self.last_progress = now
            self.on_progress(self.confirmed, now - self.started)


def publish(settings: BrokerSettings, routing_key: str, bodies: Iterable[bytes], *, total: int,
            window: int = DEFAULT_WINDOW, content_type: str | None = None,
            headers: dict[str, str] | None = None, on_progress: ProgressCallback | None = None, progress_every: float = 5.0,
            message_ids: MessageIds | None = None) -> PublishResult:
    """Publish every body as a persistent message to the default exchange, routed to ``routing_key``.

    Every message carries ``headers``, and with ``message_ids`` the message id ``message_ids(index)``.
    Returns once the broker has confirmed all of them. Raises :class:`PublishError` (saying how many
    were confirmed) on a nack (with how many were refused), an unroutable message, or a lost connection.
    """
    if window <= 0:
        raise ConfigurationError(f"window={window!r} must be a positive number of messages in flight.")
    properties = pika.BasicProperties(delivery_mode=PERSISTENT, content_type=content_type, headers=headers)
    run = _ConfirmedPublish(settings, routing_key, iter(bodies), total, window, properties,
                            on_progress, progress_every, message_ids)
    try:
        result = run.run()
    except (pika.exceptions.AMQPError, OSError) as e:
        raise BrokerError(f"Publishing to {settings.address} failed: {e}") from e
    if result.confirmed != total:
        raise PublishError(f"Expected {total} items but published {result.confirmed}",
                           confirmed=result.confirmed, total=total)
    return result
