"""AmqpMessageTrigger: one Airflow event per message on a RabbitMQ queue, for ``AssetWatcher``.

Delivery semantics (at least once; nothing is lost, a duplicate is possible in one narrow case):

* A message is acknowledged only after its event was handed to Airflow: after the ``yield``
  returns, and ``ack_delay`` seconds later still, the time the triggerer takes to write the event
  to its database (the ``yield`` returns once the event is queued in the triggerer's memory).
* Until then it stays unacknowledged: a triggerer killed, restarted or cut off from the broker
  leaves it to RabbitMQ, which delivers it again to the next consumer. If the event had already
  been written (the triggerer died in the ``ack_delay`` window after the write), that second
  delivery starts a second DAG run for the same message; its event says ``redelivered: true``.
* A message whose body can't be decoded (see ``body_format``, ``max_body_bytes``) is rejected
  without requeueing, so it goes to the queue's dead-letter exchange if it has one (dropped if not),
  with an ERROR log line naming the message and the reason; it starts no run.
* A broker that goes away (or a queue that doesn't exist yet) is retried with exponential backoff
  up to ``max_reconnect_wait`` seconds between attempts, forever, logging each attempt; the
  connection is read again at each attempt, so a fixed connection is picked up.
* Only ``amqp_conn_id`` is serialized, never a password; logs name ``user@host:port/vhost``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from asgiref.sync import sync_to_async
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from workqueue_provider.amqp.async_consumer import (
    BODY_FORMATS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PREFETCH,
    AsyncQueueConsumer,
    UndecodableMessageError,
    decode_body,
    open_consumer,
)
from workqueue_provider.amqp.connection import BrokerSettings, is_transient
from workqueue_provider.amqp.queues import validate_queue_name
from workqueue_provider.exceptions import ConfigurationError, WorkQueueError

CLASSPATH = "workqueue_provider.triggers.amqp_message.AmqpMessageTrigger"


class AmqpMessageEvent(TypedDict):
    """The payload of each event: ``triggering_asset_events[asset][i].extra["payload"]`` in the DAG."""

    status: str  # always "message"
    queue: str
    body: Any  # JSON value, or text
    properties: dict[str, Any]  # content_type, headers, message_id, timestamp, ... (those that were set)
    redelivered: bool


class AmqpMessageTrigger(BaseEventTrigger):
    """Fires one event per message of ``queue_name``; see the module docstring for the guarantees.

    :param queue_name: the queue to consume (it must exist; give it a dead-letter exchange).
    :param amqp_conn_id: the provider's AMQP connection (``amqp`` or ``amqps``).
    :param body_format: ``auto`` (JSON if it parses or the content type says JSON, else text),
        ``json`` (anything else is rejected) or ``text``.
    :param prefetch: unacknowledged messages the broker hands this trigger at most.
    :param ack_delay: seconds between handing an event to Airflow and acknowledging its message.
    :param max_body_bytes: larger bodies are rejected (the body is stored in Airflow's database).
    :param max_reconnect_wait: the longest wait between reconnection attempts, in seconds.
    """

    def __init__(self, *, queue_name: str, amqp_conn_id: str = "amqp_default", body_format: str = "auto",
                 prefetch: int = DEFAULT_PREFETCH, ack_delay: float = 5.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_reconnect_wait: float = 60.0) -> None:
        super().__init__()
        self.queue_name = validate_queue_name(queue_name)
        if not isinstance(amqp_conn_id, str) or not amqp_conn_id:
            raise ConfigurationError(f"amqp_conn_id={amqp_conn_id!r}: give the id of an AMQP connection.")
        if body_format not in BODY_FORMATS:
            raise ConfigurationError(f"body_format={body_format!r}: use one of {', '.join(BODY_FORMATS)}.")
        for name, value in (("prefetch", prefetch), ("max_body_bytes", max_body_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name}={value!r} must be a positive integer.")
        for name, number in (("ack_delay", ack_delay), ("max_reconnect_wait", max_reconnect_wait)):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                raise ConfigurationError(f"{name}={number!r} must be a number of seconds >= 0.")
        self.amqp_conn_id = amqp_conn_id
        self.body_format = body_format
        self.prefetch = prefetch
        self.ack_delay = ack_delay
        self.max_body_bytes = max_body_bytes
        self.max_reconnect_wait = max_reconnect_wait

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"queue_name": self.queue_name, "amqp_conn_id": self.amqp_conn_id,
                           "body_format": self.body_format, "prefetch": self.prefetch, "ack_delay": self.ack_delay,
                           "max_body_bytes": self.max_body_bytes, "max_reconnect_wait": self.max_reconnect_wait}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            consumer = await self._connect()
            try:
                async for event in self._events(consumer):
                    yield event
            except WorkQueueError as e:
                self.log.warning("Stopped consuming queue %r: %s Reconnecting.", self.queue_name, e)
            finally:
                await consumer.close()

    async def _events(self, consumer: AsyncQueueConsumer) -> AsyncIterator[TriggerEvent]:
        loop = asyncio.get_running_loop()
        while True:
            delivery = await consumer.get()
            try:
                body = decode_body(delivery.body, delivery.properties, body_format=self.body_format,  # type: ignore[arg-type]
                                   max_bytes=self.max_body_bytes)
            except UndecodableMessageError as e:
                self.log.error(
                    "Rejected a message from queue %r (message_id %s, %d bytes): %s. It starts no DAG run; it goes to "
                    "the queue's dead-letter exchange if the queue has one (otherwise it is dropped).", self.queue_name,
                    delivery.properties.get("message_id", "unset"), len(delivery.body), e)
                consumer.reject(delivery.delivery_tag)
                continue
            payload: AmqpMessageEvent = {"status": "message", "queue": self.queue_name, "body": body,
                                         "properties": delivery.properties, "redelivered": delivery.redelivered}
            yield TriggerEvent(dict(payload))
            # Handed to Airflow; acknowledged once the triggerer has had time to store it.
            loop.call_later(self.ack_delay, consumer.ack, delivery.delivery_tag)

    def _settings(self) -> BrokerSettings:
        from workqueue_provider.hooks.amqp import AmqpHook

        return AmqpHook(amqp_conn_id=self.amqp_conn_id).settings

    async def _connect(self) -> AsyncQueueConsumer:
        """A consuming consumer; retries (reading the connection again each time) until one is."""
        started = time.monotonic()
        retrying = AsyncRetrying(retry=retry_if_exception_type((WorkQueueError, OSError)), reraise=True,
                                 wait=wait_exponential(multiplier=0.5, max=self.max_reconnect_wait),
                                 before_sleep=lambda state: self._log_retry(state, started))
        async for attempt in retrying:
            with attempt:
                # sync_to_async, not asyncio.to_thread: at Airflow 3.1 a connection read from a plain thread
                # talks to the triggerer's supervisor outside its lock and crashes the trigger runner.
                settings = await sync_to_async(self._settings)()
                consumer = await open_consumer(settings, self.queue_name, prefetch=self.prefetch)
                self.log.info("Consuming queue %r on %s (prefetch %d, ack %gs after each event).", self.queue_name,
                              consumer.settings.describe(), self.prefetch, self.ack_delay)
                return consumer
        raise AssertionError("unreachable: tenacity retries forever")  # pragma: no cover

    def _log_retry(self, state: RetryCallState, started: float) -> None:
        error = state.outcome.exception() if state.outcome else None
        log = self.log.warning if error is not None and is_transient(error) else self.log.error
        log("Can't consume queue %r (%s); attempt %d, retrying in %.1f s (%.0f s since the first attempt).",
            self.queue_name, str(error)[:300], state.attempt_number, state.upcoming_sleep, time.monotonic() - started)
