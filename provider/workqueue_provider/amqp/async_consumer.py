"""An asyncio consumer of one queue (pika's asyncio adapter) and the decoding of what it receives.

Manual acknowledgements only: a delivery stays unacknowledged until the caller calls :meth:`ack`
or :meth:`reject`, so a consumer that goes away (process killed, connection lost) leaves its
messages to the broker, which delivers them again to the next consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.amqp.errors import translate_connect_error
from workqueue_provider.amqp.queues import validate_queue_name
from workqueue_provider.exceptions import BrokerAuthError, BrokerError, BrokerUnreachableError, QueueNotFoundError

BodyFormat = Literal["auto", "json", "text"]
BODY_FORMATS: tuple[str, ...] = ("auto", "json", "text")
DEFAULT_PREFETCH = 10
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # the body goes into the asset event's extra, in Airflow's database
_PROPERTIES = ("content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
               "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id")


class UndecodableMessageError(ValueError):
    """A message body that can't be turned into an event (wrong charset, not JSON, binary, too big)."""


@dataclass(frozen=True)
class Delivery:
    """One message as delivered: ``properties`` are JSON-safe (bytes and dates become text)."""

    delivery_tag: int
    body: bytes
    properties: dict[str, Any]
    redelivered: bool
    exchange: str
    routing_key: str


def decode_body(body: bytes, properties: dict[str, Any], *, body_format: BodyFormat = "auto",
                max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """The body as JSON or text. ``auto``: JSON if the content type is JSON (then it must parse) or
    unset and the text parses, text otherwise; ``json``: must parse; ``text``: never parsed.
    Raises :class:`UndecodableMessageError` naming what is wrong."""
    if len(body) > max_bytes:
        raise UndecodableMessageError(f"the body is {len(body)} bytes, over the limit of {max_bytes} "
                                      "(send a path to the items instead of the items)")
    if properties.get("content_encoding"):
        raise UndecodableMessageError(f"content encoding {properties['content_encoding']!r} is not supported")
    media, _, params = (properties.get("content_type") or "").partition(";")
    media = media.strip().lower()
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    is_json = media == "application/json" or media.endswith("+json")
    if media and not is_json and not media.startswith("text/"):
        raise UndecodableMessageError(f"content type {media!r} is neither JSON nor text")
    try:
        text = body.decode(charset)
    except (UnicodeDecodeError, LookupError) as e:
        raise UndecodableMessageError(f"the body is not valid {charset} text ({e})") from None
    if body_format == "text" or (body_format == "auto" and media.startswith("text/")):
        return text
    try:
        return json.loads(text)
    except ValueError as e:
        if body_format == "json" or is_json:
            raise UndecodableMessageError(f"the body is not valid JSON ({e}); it starts {text[:80]!r}") from None
        return text


def json_safe(value: Any) -> Any:
    """AMQP field values as plain JSON types (exactly str, int, float, bool, None, list, dict): bytes
    and timestamps become text, and pika's ``long`` (an int subclass, e.g. a quorum queue's
    ``x-delivery-count`` header) a plain int, since Airflow's event encoder refuses subclasses and
    would cancel the trigger."""
    if value is None or type(value) is bool:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k.decode("utf-8", errors="replace") if isinstance(k, bytes) else str(k): json_safe(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)  # Decimal and anything else: its text


def properties_of(properties: Any) -> dict[str, Any]:
    return {name: json_safe(value) for name in _PROPERTIES if (value := getattr(properties, name, None)) is not None}


async def open_consumer(settings: BrokerSettings, queue_name: str, *,
                        prefetch: int = DEFAULT_PREFETCH) -> AsyncQueueConsumer:
    """A consuming :class:`AsyncQueueConsumer` on the first node of ``settings`` that takes it (the
    nodes of a cluster are tried in order). Raises the last node's BrokerError if none does."""
    error: BrokerError | None = None
    for address in settings.addresses:
        consumer = AsyncQueueConsumer(settings.for_address(address), queue_name, prefetch=prefetch)
        try:
            await consumer.open()
            return consumer
        except BrokerError as e:
            error = e
    assert error is not None  # settings always have at least one address
    raise error


class AsyncQueueConsumer:
    """Consumes ``queue_name`` (which must exist) with ``prefetch`` unacknowledged messages at most.

    ``async with AsyncQueueConsumer(settings, "batches") as consumer: delivery = await consumer.get()``.
    :meth:`get` raises :class:`~workqueue_provider.exceptions.BrokerError` once the connection or
    channel is lost (its ``__cause__`` is pika's error, so ``is_transient`` can tell an outage).
    """

    def __init__(self, settings: BrokerSettings, queue_name: str, *, prefetch: int = DEFAULT_PREFETCH) -> None:
        self.settings = settings
        self.queue_name = validate_queue_name(queue_name)
        self.prefetch = prefetch
        self._deliveries: asyncio.Queue[Delivery | BaseException] = asyncio.Queue()
        self._pending: set[asyncio.Future[Any]] = set()
        self._connection: AsyncioConnection | None = None
        self._channel: Any = None
        self._closed: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None

    async def __aenter__(self) -> AsyncQueueConsumer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, open a channel, check the queue exists, start consuming. Raises BrokerError."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        parameters = self.settings.pika_parameters(self.settings.addresses[0])
        try:
            connection = self._connection = await self._call(lambda done: AsyncioConnection(
                parameters, on_open_callback=done, on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_connection_closed, custom_ioloop=loop))
            self._channel = await self._call(lambda done: connection.channel(on_open_callback=done))
            self._channel.add_on_close_callback(self._on_channel_closed)
            self._channel.add_on_cancel_callback(self._on_cancelled)
            await self._call(lambda done: self._channel.queue_declare(self.queue_name, passive=True, callback=done))
            await self._call(lambda done: self._channel.basic_qos(prefetch_count=self.prefetch, callback=done))
            self._channel.basic_consume(self.queue_name, self._on_message, auto_ack=False)
        except BaseException:
            await self.close()
            raise

    async def get(self) -> Delivery:
        """The next delivery; raises BrokerError once the connection or channel is gone."""
        item = await self._deliveries.get()
        if isinstance(item, BaseException):
            self._deliveries.put_nowait(item)  # every later call fails the same way
            raise item
        return item

    def ack(self, delivery_tag: int) -> bool:
        """Acknowledge; False if the channel is gone (the broker then delivers the message again)."""
        if self._channel is None or not self._channel.is_open:
            return False
        self._channel.basic_ack(delivery_tag)
        return True

    def reject(self, delivery_tag: int) -> bool:
        """Reject without requeueing: dead-lettered if the queue has a dead-letter exchange, else dropped."""
        if self._channel is None or not self._channel.is_open:
            return False
        self._channel.basic_reject(delivery_tag, requeue=False)
        return True

    async def close(self) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            with contextlib.suppress(Exception):
                connection.close()
        if connection is not None and self._closed is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._closed), self.settings.socket_timeout)

    # -- pika callbacks ----------------------------------------------------------------------------
    async def _call(self, start: Callable[[Callable[..., None]], Any]) -> Any:
        """Start a pika operation and wait for its callback's first argument, or the loss that ends it."""
        if self._lost is not None:
            raise self._lost
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(future)

        def done(*args: Any) -> None:
            if not future.done():
                future.set_result(args[0] if args else None)
        try:
            start(done)
            return await asyncio.wait_for(future, self.settings.stack_timeout + self.settings.socket_timeout)
        except TimeoutError:
            raise BrokerUnreachableError(f"The broker at {self.settings.address} did not answer within "
                                         f"{self.settings.stack_timeout + self.settings.socket_timeout:g} s.") from None
        finally:
            self._pending.discard(future)

    def _fail(self, error: BaseException) -> None:
        if self._lost is None:
            self._lost = error
            self._deliveries.put_nowait(error)
        for future in list(self._pending):
            if not future.done():
                future.set_exception(error)

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self._fail(translate_connect_error(self.settings, error if isinstance(error, BaseException)
                                           else pika.exceptions.AMQPConnectionError(str(error))))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        lost = BrokerUnreachableError(f"Lost the connection to the broker at {self.settings.address} ({reason!r}).")
        lost.__cause__ = reason
        self._fail(lost)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        code = getattr(reason, "reply_code", None)
        error: BrokerError
        if code == 404:
            error = QueueNotFoundError(
                f"Queue {self.queue_name!r} does not exist on {self.settings.describe()}: declare it first (durable, "
                f"with a dead-letter exchange so rejected messages are kept), e.g. with DeclareQueueOperator.")
        elif code == 403:
            error = BrokerAuthError(f"User {self.settings.login!r} may not consume queue {self.queue_name!r} on "
                                    f"{self.settings.describe()}: grant read permission (rabbitmqctl set_permissions).")
        else:
            error = BrokerUnreachableError(f"The channel consuming queue {self.queue_name!r} on "
                                           f"{self.settings.describe()} closed ({reason!r}).")
        error.__cause__ = reason
        self._fail(error)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_cancelled(self, _frame: Any) -> None:
        self._fail(QueueNotFoundError(f"The broker cancelled the consumer of queue {self.queue_name!r} on "
                                      f"{self.settings.describe()} (the queue was deleted?)."))

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliveries.put_nowait(Delivery(delivery_tag=method.delivery_tag, body=body,
                                             properties=properties_of(properties), redelivered=method.redelivered,
                                             exchange=method.exchange, routing_key=method.routing_key))
