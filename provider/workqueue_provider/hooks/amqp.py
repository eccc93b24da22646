"""AmqpHook: an Airflow connection to RabbitMQ (``amqp://`` or ``amqps://``), one pika connection per use."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import Any, TypeVar

from airflow.sdk import BaseHook
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from workqueue_provider.amqp import queues, receipts
from workqueue_provider.amqp.addresses import Address
from workqueue_provider.amqp.connection import (
    BrokerSettings,
    connected_address,
    is_transient,
    open_connection,
    server_properties,
    translate_connect_error,
)
from workqueue_provider.amqp.publisher import DEFAULT_WINDOW, ProgressCallback, PublishResult, publish
from workqueue_provider.amqp.queues import QueueDepth, QueueSpec
from workqueue_provider.connection_form import EXTRA_FIELDS, UI_BEHAVIOUR
from workqueue_provider.exceptions import BrokerUnreachableError, PublishError, WorkQueueError
from workqueue_provider.hooks.broker_credentials import SecretRef, pop_secret_ref

T = TypeVar("T")
_SETTLE_READS, _SETTLE_SECONDS = 20, 0.25  # a failed fill's depth: read until two readings agree (<= 5 s)
# pika logs every connection step at INFO, each node that didn't answer (before the next one did) and
# each broker channel close at ERROR/WARNING, flooding task logs; the hook's own lines say what happened.
_PIKA_LOG_LEVELS = {"pika": logging.WARNING, "pika.channel": logging.ERROR,
                    **dict.fromkeys(("pika.adapters.utils.connection_workflow", "pika.adapters.utils.io_services_utils",
                                     "pika.adapters.base_connection", "pika.adapters.blocking_connection"),
                                    logging.CRITICAL)}


def quiet_pika_logs() -> None:
    """Quiet pika's loggers (those not configured otherwise) for the Airflow side; the worker CLI does its own."""
    for name, level in _PIKA_LOG_LEVELS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def amqp_connection(conn_id: str) -> Any:
    """The Airflow connection; a missing or malformed one raises ConfigurationError naming the fix."""
    from workqueue_provider.compat import AirflowNotFoundException
    from workqueue_provider.hooks.connections import connection_error

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as e:
        raise connection_error(conn_id, kind="AMQP", example="amqp://user:password@rabbitmq-service:5672/%2F") from e


def connection_settings(conn: Any) -> tuple[BrokerSettings, SecretRef | None]:
    """An Airflow AMQP connection as broker settings (login and password as the connection has them)
    and the Secret its extras name for the credentials, if any. The one place a connection is read.

    Host is one host or a cluster's nodes, comma-separated (``rabbit-0,rabbit-1:5673,rabbit-2``; Port is
    the port of those that name none); as a URI: ``amqp://user:password@rabbit-0,rabbit-1,rabbit-2:5672/%2F``."""
    extras = {k.split("__")[-1]: v for k, v in conn.extra_dejson.items() if v not in (None, "")}
    secret = pop_secret_ref(extras)
    settings = BrokerSettings(
        host=conn.host or "",
        port=conn.port,
        login=conn.login or "guest",
        password=conn.password or "guest",
        vhost=conn.schema or "/",
        tls=conn.conn_type == "amqps",
    ).with_options(extras)
    if conn.conn_type == "amqps" and not settings.tls:  # the type wins over an unticked "Use TLS" in the form
        settings = dataclasses.replace(settings, tls=True)
    return settings, secret


class AmqpHook(BaseHook):
    """Talks to RabbitMQ through pika. Nothing connects until a method is called; each call opens
    one connection and always closes it.

    Broker outages are ridden out: declare, depth, purge and delete (and a fill, through
    :meth:`ride_out`) retry a broker that doesn't answer or drops the connection (a restart, an
    upgrade, a node reboot) with exponential backoff for up to ``outage_window`` seconds, logging
    each retry, then fail naming the broker and how long it was unreachable. Wrong credentials, an
    unknown host, TLS failures, a missing queue and bad input fail at once.

    Every call tries the connection's nodes in order (Host ``h1,h2,h3``) and uses the first that answers.

    :param amqp_conn_id: Airflow connection: host (or several, comma-separated), port, login, password,
        schema = vhost, extras
        for TLS (``ssl``, ``ca_certs``, ``certfile``, ``keyfile``, ``verify``, ``server_hostname``),
        timeouts (``heartbeat``, ``blocked_connection_timeout``, ``connection_attempts``,
        ``retry_delay``, ``socket_timeout``) and ``outage_window`` (seconds to ride out a broker
        outage, default 300; 0 fails at the first error).
    """

    conn_name_attr = "amqp_conn_id"
    default_conn_name = "amqp_default"
    conn_type = "amqp"
    hook_name = "AMQP (RabbitMQ)"

    def __init__(self, amqp_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.amqp_conn_id = amqp_conn_id
        self._riding_out = False
        quiet_pika_logs()

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

        settings, secret = connection_settings(amqp_connection(self.amqp_conn_id))
        return broker_credentials.with_secret_credentials(settings, secret)

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
                props = server_properties(connection)
                node = f" (node {connected_address(connection)})" if len(self.settings.addresses) > 1 else ""
                return True, (f"Connected to {props.get('product', 'broker')} {props.get('version', '?')} at "
                              f"{self.settings.describe()}{node}")
        except WorkQueueError as e:
            return False, str(e)

    # -- broker outages ---------------------------------------------------------------------------
    def ride_out(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried while the broker is unreachable, for up to the connection's
        ``outage_window``. ``what`` ("declaring queue 'q'") goes into the log and the final error.
        Nested calls (a ridden-out call using other hook methods) are ridden out once, by the outermost."""
        if self._riding_out:
            return call()
        window = self.settings.outage_window
        started = time.monotonic()
        retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_delay(window),
                            wait=wait_exponential(multiplier=0.5, max=15), reraise=True,
                            before_sleep=lambda state: self._log_outage(state, what, started))
        self._riding_out = True
        try:
            return retrying(call)
        except Exception as e:
            if window and is_transient(e):
                raise self._outage_error(e, what, time.monotonic() - started) from e
            raise
        finally:
            self._riding_out = False

    def _log_outage(self, state: RetryCallState, what: str, started: float) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.log.warning("The broker %s is unreachable while %s (%s); retrying in %.1f s (%.0f s of the %g s "
                         "outage window used).", self.settings.describe(), what, str(error)[:300],
                         state.upcoming_sleep, time.monotonic() - started, self.settings.outage_window)

    def _outage_error(self, error: BaseException, what: str, seconds: float) -> Exception:
        message = (f"The broker at {self.settings.address} was unreachable for {seconds:.0f} s while {what}, longer "
                   f"than the outage window ({self.settings.outage_window:g} s; the connection's outage_window "
                   "extra)")
        if isinstance(error, PublishError):
            counts = f" ({error.confirmed} of {error.total} items were confirmed before the failure)"
            return PublishError(f"{message}: {str(error).removesuffix(counts)}", confirmed=error.confirmed,
                                total=error.total)
        return BrokerUnreachableError(f"{message}: {error}")

    def _with_connection(self, what: str, call: Callable[[Any], T]) -> T:
        """``call(connection)`` on a fresh connection, riding out outages."""
        def attempt() -> T:
            with self.connection() as connection:
                return call(connection)
        return self.ride_out(what, attempt)

    # -- queues ------------------------------------------------------------------------------------
    def declare_queue(self, spec: QueueSpec) -> QueueDepth:
        return self._with_connection(f"declaring queue {spec.name!r}",
                                     lambda c: queues.declare(c, spec, vhost=self.settings.vhost))

    def queue_depth(self, queue_name: str, *, checked: bool = False) -> QueueDepth:
        """Ready messages and consumers; ``checked``: "0 messages" only from a queue that answers
        (:func:`~workqueue_provider.amqp.queues.checked_depth`; a leaderless quorum queue is ridden out)."""
        read = queues.checked_depth if checked else queues.depth
        return self._with_connection(f"reading the depth of queue {queue_name!r}",
                                     lambda c: read(c, queue_name, vhost=self.settings.vhost))

    def purge_queue(self, queue_name: str) -> int:
        return self._with_connection(f"purging queue {queue_name!r}", lambda c: queues.purge(c, queue_name))

    def delete_queue(self, queue_name: str) -> int | None:
        return self._with_connection(f"deleting queue {queue_name!r}", lambda c: queues.delete(c, queue_name))

    def publish(self, queue_name: str, bodies: Iterable[bytes], *, total: int, window: int = DEFAULT_WINDOW,
                content_type: str | None = None, headers: dict[str, str] | None = None,
                on_progress: ProgressCallback | None = None,
                progress_every: float = 5.0, message_ids: Callable[[int], str] | None = None) -> PublishResult:
        """Publish persistent messages with pipelined confirms; see :func:`~workqueue_provider.amqp.publisher.publish`.

        Not retried on its own (publishing again after a lost connection would duplicate the messages
        already stored): :class:`~workqueue_provider.operators.queue.FillQueueOperator` rides out an
        outage by retrying the whole fill, which is exact. A node that doesn't let us connect (nothing
        published yet) passes the fill to the next node of the connection."""
        routing_key = queues.validate_queue_name(queue_name)

        def through(node: Address) -> PublishResult:
            return publish(self.settings.for_address(node), routing_key, bodies, total=total, window=window,
                           content_type=content_type, headers=headers, on_progress=on_progress,
                           progress_every=progress_every, message_ids=message_ids)

        *others, last = self.settings.addresses
        for node in others:
            try:
                return through(node)
            except BrokerUnreachableError as e:  # the connection did not open (after it, failures are PublishError)
                if not is_transient(e):
                    raise
                self.log.warning("Broker node %s did not answer (%s); publishing through the next node.", node, e)
        try:
            return through(last)
        except BrokerUnreachableError as e:
            if others and is_transient(e):  # name every node, not just the last
                raise translate_connect_error(self.settings, e.__cause__ or e) from e
            raise

    # -- the item account's ledger (amqp/receipts.py) ----------------------------------------------
    def start_ledger(self, queue_name: str, fill_id: str, count: int) -> int:
        """A new fill of ``queue_name``: declare ``Q.receipts``, drop earlier records, and record that
        ``fill_id`` sets out to publish ``count`` items. Returns how many earlier records were dropped."""
        def start(connection: Any) -> int:
            receipts.declare_receipts(connection, queue_name)
            dropped = receipts.reset(connection, queue_name)
            receipts.record_fill_started(connection, queue_name, fill_id, count)
            return dropped
        return self._with_connection(f"starting the receipts of queue {queue_name!r}", start)

    def record_fill(self, queue_name: str, fill_id: str, count: int) -> None:
        """Record that ``count`` items of ``fill_id`` were published and confirmed."""
        self._with_connection(f"recording the fill of queue {queue_name!r}",
                              lambda c: receipts.record_fill(c, queue_name, fill_id, count))

    def record_fill_stopped(self, queue_name: str, fill_id: str, confirmed: int) -> int:
        """Record a failed attempt and the depth it left (once the depth stops changing: a lost
        connection's last messages may still be being stored). Not ridden out: called while failing.
        Returns that depth."""
        with self.connection() as connection:
            depth = queues.depth(connection, queue_name).messages
            for _ in range(_SETTLE_READS):
                time.sleep(_SETTLE_SECONDS)
                again = queues.depth(connection, queue_name).messages
                if again == depth:
                    break
                depth = again
            receipts.record_fill_stopped(connection, queue_name, fill_id, confirmed, depth)
            return depth

    def last_fill(self, queue_name: str) -> receipts.FillTrace | None:
        """What the ledger of ``queue_name`` says of its last fill (None without a ledger)."""
        return self._with_connection(f"reading the receipts of queue {queue_name!r}",
                                     lambda c: receipts.last_fill(c, queue_name))

    def item_account(self, queue_name: str, dead_letter_queue: str | None = None) -> receipts.Account | None:
        """Where every item of the last fill went (None without a ledger); see :func:`receipts.read_account`."""
        return self._with_connection(f"reading the item account of queue {queue_name!r}",
                                     lambda c: receipts.read_account(c, queue_name, dead_letter_queue))


class AmqpsHook(AmqpHook):
    """The same hook for ``amqps://`` connections (TLS on, port 5671 by default)."""

    conn_type = "amqps"
    hook_name = "AMQP over TLS (RabbitMQ)"
