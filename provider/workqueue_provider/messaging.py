"""The ``amqp``/``amqps`` backend of common-messaging's ``MessageQueueTrigger``.

Registered under the provider-info key ``queues`` (discovered by Airflow >= 3.0.1 with
apache-airflow-providers-common-messaging >= 2.0), so that::

    MessageQueueTrigger(scheme="amqp", queue_name="batches", amqp_conn_id="amqp_default")

is an :class:`~workqueue_provider.triggers.amqp_message.AmqpMessageTrigger`. The older queue-URI
form, ``MessageQueueTrigger(queue="amqp://host/vhost/batches")`` (deprecated by common-messaging),
takes the queue name from the URI's last path segment; where to connect always comes from the
connection ``amqp_conn_id``, never from the URI.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from airflow.providers.common.messaging.providers.base_provider import BaseMessageQueueProvider

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.triggers.amqp_message import AmqpMessageTrigger

SCHEMES = ("amqp", "amqps")


class AmqpMessageQueueProvider(BaseMessageQueueProvider):
    """RabbitMQ (AMQP 0-9-1) queues for event-driven scheduling."""

    scheme = "amqp"

    def scheme_matches(self, scheme: str) -> bool:
        return scheme in SCHEMES

    def queue_matches(self, queue: str) -> bool:
        return urlsplit(queue).scheme in SCHEMES and bool(queue_name_of(queue))

    def trigger_class(self) -> type[AmqpMessageTrigger]:
        return AmqpMessageTrigger

    def trigger_kwargs(self, queue: str, **kwargs: Any) -> dict:
        if "queue_name" in kwargs:
            raise ConfigurationError(f"Give the queue either in the URI ({queue!r}) or as queue_name=, not both.")
        return {"queue_name": queue_name_of(queue)}


def queue_name_of(uri: str) -> str:
    """``amqp://host[:port]/vhost/queue`` or ``amqp://host/queue`` (vhost /) -> the queue name."""
    segments = [unquote(part) for part in urlsplit(uri).path.split("/")[1:]]
    return segments[-1] if segments and segments[-1] else ""
