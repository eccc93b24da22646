"""AmqpHook: an Airflow connection to RabbitMQ (``amqp://`` or ``amqps://``), one pika connection per use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from workqueue_provider.amqp import queues
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.publisher import DEFAULT_WINDOW, ProgressCallback, PublishResult, publish
from workqueue_provider.amqp.queues import QueueDepth, QueueSpec
from workqueue_provider.connection_form import EXTRA_FIELDS, UI_BEHAVIOUR
from workqueue_provider.exceptions import WorkQueueError


def amqp_connection(conn_id: str) -> Any:
    """The Airflow connection; a missing or malformed one raises ConfigurationError naming the fix."""
    from workqueue_provider.compat import AirflowNotFoundException
    from workqueue_provider.hooks.connections import connection_error

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as e:
        raise connection_error(conn_id, kind="AMQP", example="amqp://user:password@rabbitmq-service:5672/%2F") from e


class AmqpHook(BaseHook):
    """Talks to RabbitMQ through pika. Nothing connects until a method is called; each call opens
    one connection and always closes it.

    :param amqp_conn_id: Airflow connection: host, port, login, password, schema = vhost, extras
        for TLS (``ssl``, ``ca_certs``, ``certfile``, ``keyfile``, ``verify``, ``server_hostname``)
        and timeouts (``heartbeat``, ``blocked_connection_timeout``, ``connection_attempts``,
        ``retry_delay``, ``socket_timeout``).
    """

    conn_name_attr = "amqp_conn_id"
    default_conn_name = "amqp_default"
    conn_type = "amqp"
    hook_name = "AMQP (RabbitMQ)"

    def __init__(self, amqp_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.amqp_conn_id = amqp_conn_id

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Classic (Flask) connection form; Airflow >= 3.2 reads the same fields from provider info."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, StringField

        widgets: dict[str, Any] = {}
        for name, (label, kind, default) in EXTRA_FIELDS.items():
            if kind == "boolean":
                widgets[name] = BooleanField(lazy_gettext(label), default=default)
            else:
                widgets[name] = StringField(lazy_gettext(label), widget=BS3TextFieldWidget())
        return widgets

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return dict(UI_BEHAVIOUR)

    @cached_property
    def settings(self) -> BrokerSettings:
        """Broker settings read from the Airflow connection (the password stays inside). With the
        extra ``credentials_secret``, login and password come from that Kubernetes Secret instead
        (see :mod:`~workqueue_provider.hooks.broker_credentials`)."""
        from workqueue_provider.hooks import broker_credentials

        conn = amqp_connection(self.amqp_conn_id)
        extras = {k.split("__")[-1]: v for k, v in conn.extra_dejson.items() if v not in (None, "")}
        base = BrokerSettings(
            host=conn.host or "",
            port=conn.port,
            login=conn.login or "guest",
            password=conn.password or "guest",
            vhost=conn.schema or "/",
            tls=conn.conn_type == "amqps",
        )
        base, extras = broker_credentials.with_secret_credentials(base, extras)
        return base.with_options(extras)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A pika BlockingConnection that is closed on exit."""
        connection = open_connection(self.settings)
        try:
            yield connection
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def test_connection(self) -> tuple[bool, str]:
        """Read-only probe: connect, read the server's version, disconnect."""
        try:
            with self.connection() as connection:
                props = connection._impl.server_properties
                product = props.get("product", b"broker")
                version = props.get("version", b"?")
                decode = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
                return True, f"Connected to {decode(product)} {decode(version)} at {self.settings.describe()}"
        except WorkQueueError as e:
            return False, str(e)

    def declare_queue(self, spec: QueueSpec) -> QueueDepth:
        with self.connection() as connection:
            return queues.declare(connection, spec, vhost=self.settings.vhost)

    def queue_depth(self, queue_name: str) -> QueueDepth:
        with self.connection() as connection:
            return queues.depth(connection, queue_name, vhost=self.settings.vhost)

    def first_message_fill(self, queue_name: str) -> str | None:
        """Which fill published the queue's first ready message (None if empty or untagged)."""
        with self.connection() as connection:
            return queues.first_message_fill(connection, queue_name)

    def purge_queue(self, queue_name: str) -> int:
        with self.connection() as connection:
            return queues.purge(connection, queue_name)

    def delete_queue(self, queue_name: str) -> int | None:
        with self.connection() as connection:
            return queues.delete(connection, queue_name)

    def publish(self, queue_name: str, bodies: Iterable[bytes], *, total: int, window: int = DEFAULT_WINDOW,
                content_type: str | None = None, headers: dict[str, str] | None = None,
                on_progress: ProgressCallback | None = None,
                progress_every: float = 5.0) -> PublishResult:
        """Publish persistent messages with pipelined confirms; see :func:`~workqueue_provider.amqp.publisher.publish`."""
        return publish(self.settings, queues.validate_queue_name(queue_name), bodies, total=total, window=window,
                       content_type=content_type, headers=headers, on_progress=on_progress, progress_every=progress_every)


class AmqpsHook(AmqpHook):
    """The same hook for ``amqps://`` connections (TLS on, port 5671 by default)."""

    conn_type = "amqps"
    hook_name = "AMQP over TLS (RabbitMQ)"
