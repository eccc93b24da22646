"""Broker-side operators: declare a work queue, fill it with one message per item, delete it."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, XComArg

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.publisher import DEFAULT_WINDOW
from workqueue_provider.amqp.queues import DEAD_LETTER_SUFFIX, QueueSpec, validate_queue_name
from workqueue_provider.exceptions import (
    ConfigurationError,
    ItemSourceError,
    QueueNotFoundError,
)
from workqueue_provider.filling import QueueFill
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.items import DEFAULT_MAX_MESSAGE_BYTES, ItemEncoder, iter_items, spool_items
from workqueue_provider.lineage import QueueWriterLineageMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

ON_EXISTING_MESSAGES = ("fail", "purge")


class DeclareQueueOperator(BaseOperator):
    """Declare a durable work queue (quorum by default). Idempotent: declaring the same queue again
    changes nothing; an existing queue with other arguments fails with every difference named.

    Nothing is dropped silently: whenever the broker could remove an item no worker processed (a
    ``delivery_limit``, a ``message_ttl_ms``, or the same ``x-`` arguments), items go to a
    dead-letter queue, ``<queue_name>.dead`` unless ``dead_letter_queue`` names another; a
    ``max_length`` queue refuses new items when full (``x-overflow: reject-publish``) instead of
    dropping its oldest, so an over-full fill fails naming how many were refused. On RabbitMQ >= 4.0
    quorum queues are declared with an explicit delivery limit: the one asked for, or unlimited
    (``x-delivery-limit: -1``) instead of 4.0's default of 20.

    :param queue_name: queue to declare (at most 255 bytes). Templated.
    :param queue_type: ``quorum`` (default: replicated, delivery limits for poison items) or ``classic``.
    :param dead_letter_queue: also declare this queue and dead-letter rejected or expired items into
        it. Templated. Default: none, or ``<queue_name>.dead`` when a delivery limit or TTL applies.
    :param delivery_limit: quorum queues: deliveries before an item is dead-lettered (default: unlimited).
    :param message_ttl_ms: dead-letter items older than this.
    :param max_length: most ready messages the queue holds; a fill beyond it fails (reject-publish).
    :param arguments: any other ``x-`` queue arguments.
    :param amqp_conn_id: the AMQP connection.
    :return: ``{"queue": name, "messages": ready, "consumers": n}`` after the declare.
    """

    template_fields: Sequence[str] = ("queue_name", "queue_type", "dead_letter_queue", "arguments")
    ui_color = "#ffefd5"

    def __init__(self, *, queue_name: str, queue_type: str = "quorum", dead_letter_queue: str | None = None,
                 delivery_limit: int | None = None, message_ttl_ms: int | None = None,
                 max_length: int | None = None, arguments: dict[str, Any] | None = None,
                 amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_name = queue_name
        self.queue_type = queue_type
        self.dead_letter_queue = dead_letter_queue
        self.delivery_limit = delivery_limit
        self.message_ttl_ms = message_ttl_ms
        self.max_length = max_length
        self.arguments = arguments
        self.amqp_conn_id = amqp_conn_id

    @cached_property
    def hook(self) -> AmqpHook:
        return AmqpHook(amqp_conn_id=self.amqp_conn_id)

    def queue_specs(self) -> list[QueueSpec]:
        """The dead-letter queue (if any) first, then the work queue; validated, nothing declared."""
        if self.arguments is not None and not isinstance(self.arguments, dict):
            raise ConfigurationError(
                f"arguments rendered to {self.arguments!r:.60} ({type(self.arguments).__name__}), not a mapping: "
                "give a dict of x- queue arguments, e.g. {'x-max-length': 1000}."
            )
        dead_letter_queue = self.dead_letter_queue or self._default_dead_letter_queue()
        specs = []
        dlx: dict[str, Any] = {}
        if dead_letter_queue:
            specs.append(QueueSpec(name=dead_letter_queue, queue_type=self.queue_type))  # type: ignore[arg-type]
            dlx = {"dead_letter_exchange": "", "dead_letter_routing_key": dead_letter_queue}
        specs.append(self._work_queue_spec(**dlx))
        return specs

    def _work_queue_spec(self, **dlx: Any) -> QueueSpec:
        return QueueSpec(
            name=self.queue_name, queue_type=self.queue_type,  # type: ignore[arg-type]
            delivery_limit=self.delivery_limit, message_ttl_ms=self.message_ttl_ms, max_length=self.max_length,
            extra_arguments=dict(self.arguments or {}), **dlx,
        )

    def _default_dead_letter_queue(self) -> str | None:
        """``<queue>.dead`` when the queue can drop items and has no dead-letter exchange of its own."""
        spec = self._work_queue_spec(dead_letter_exchange="")  # validates everything but the missing DLX
        if not spec.drops_items or "x-dead-letter-exchange" in (self.arguments or {}):
            return None
        name = validate_queue_name(f"{self.queue_name}{DEAD_LETTER_SUFFIX}")
        self.log.info("Queue %r can drop items (%s): dead-lettering them into %r (set dead_letter_queue= to "
                      "choose another).", self.queue_name, spec.drops_items, name)
        return name

    def execute(self, context: Context) -> dict[str, Any]:
        specs = self.queue_specs()
        for spec in specs:
            declared = self.hook.declare_queue(spec)
            self.log.info("Queue %r (%s) is declared: %d ready messages, %d consumers.",
                          spec.name, spec.queue_type, declared.messages, declared.consumers)
        return {"queue": declared.name, "messages": declared.messages, "consumers": declared.consumers}


class FillQueueOperator(QueueWriterLineageMixin, BaseOperator):
    """Publish one persistent, confirmed message per item into an existing queue.

    Items come from exactly one of ``items`` (a list, an upstream task's output, or a callable
    returning an iterable such as a generator) or ``items_file`` (one item per line). They are
    encoded into a spool file first, so a bad item fails the task with nothing published, and
    memory stays flat however many items there are.

    Every message carries the fill's id (DAG, task, run) in a header and its index as message id;
    the fill keeps a ledger in ``<queue_name>.receipts`` (what it set out to publish, then what was
    confirmed), from which workers' receipts add up the item account.

    Retries are exact: when a retry (an Airflow retry, or the fill's own retry after losing the
    broker) finds messages in the queue, it purges them only if every one is this fill's own: the
    ledger says this fill published last and the queue holds no more messages than the earlier
    attempt can have stored. Anything else fails (or is purged with ``on_existing_messages="purge"``).
    The queue's messages are never peeked at. A broker outage during the fill is ridden out for the
    connection's ``outage_window`` (default 300 s), then the fill fails naming the broker.

    :param queue_name: existing queue to fill. Templated.
    :param items: list / XComArg / callable / template string. Items are data, delivered byte for
        byte: a literal list or a callable is never rendered (nor called by the templater); only a
        string (``"{{ params.items }}"``, which must render to a list) or an XComArg is. Templated.
    :param items_file: path of a UTF-8 file with one item per line (blank lines skipped). Templated.
    :param encoding: ``text`` (str or number), ``json`` (any JSON value) or ``bytes``.
    :param charset: codec for text and JSON items.
    :param max_message_bytes: largest message body allowed (checked before publishing).
    :param on_existing_messages: the queue already holds messages from elsewhere: ``fail`` (default)
        or ``purge`` them first.
    :param allow_empty: publish nothing instead of failing when there are no items.
    :param window: most messages unconfirmed at once.
    :param progress_every: seconds between progress lines in the task log.
    :param amqp_conn_id: the AMQP connection.
    :return: the number of items published (never the items).
    """

    template_fields: Sequence[str] = ("queue_name", "items", "items_file", "encoding")
    ui_color = "#ffe4b5"

    def __init__(self, *, queue_name: str, items: Any = None, items_file: str | None = None,
                 encoding: str = "text", charset: str = "utf-8",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, on_existing_messages: str = "fail",
                 allow_empty: bool = False, window: int = DEFAULT_WINDOW, progress_every: float = 10.0,
                 amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_name = queue_name
        self.items = items
        self.items_file = items_file
        self.encoding = encoding
        self.charset = charset
        self.max_message_bytes = max_message_bytes
        self.on_existing_messages = on_existing_messages
        self.allow_empty = allow_empty
        self.window = window
        self.progress_every = progress_every
        self.amqp_conn_id = amqp_conn_id

    @cached_property
    def hook(self) -> AmqpHook:
        return AmqpHook(amqp_conn_id=self.amqp_conn_id)

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Render the template fields, except ``items`` when it is data (a literal list, a callable):
        Airflow would render every string inside a list as Jinja and call a callable with
        ``context=``/``jinja_env=``. ``items`` stays a template field, so an XComArg still sets the
        upstream dependency and is resolved, and a string template is rendered."""
        items = self.items
        literal = items is not None and not isinstance(items, (str, XComArg))
        if literal:
            self.items = None
        try:
            super().render_template_fields(context, jinja_env)
        finally:
            if literal:
                self.items = items

    def _resolved_items(self, context: Context) -> Any:
        items = self.items
        if isinstance(items, XComArg):
            items = items.resolve(context)
        if isinstance(items, str):
            items = _parse_rendered_list(items)
        return items

    def execute(self, context: Context) -> int:
        validate_queue_name(self.queue_name)
        if self.on_existing_messages not in ON_EXISTING_MESSAGES:
            raise ConfigurationError(
                f"on_existing_messages={self.on_existing_messages!r}: use one of {', '.join(ON_EXISTING_MESSAGES)}."
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0:
            raise ConfigurationError(f"window={self.window!r} must be a positive number of messages in flight.")
        encoder = ItemEncoder(self.encoding, self.charset, self.max_message_bytes)  # type: ignore[arg-type]
        source = iter_items(self._resolved_items(context), self.items_file)
        with spool_items(source, encoder) as spool:
            if spool.count == 0 and not self.allow_empty:
                raise ItemSourceError(
                    "There are no items to publish: give a non-empty items/items_file, or set allow_empty=True."
                )
            self.log.info("Encoded %d items (%d bytes) for queue %r.", spool.count, spool.total_bytes, self.queue_name)
            fill = QueueFill(self.hook, self.queue_name, self.log, on_existing_messages=self.on_existing_messages,
                             window=self.window, progress_every=self.progress_every)
            return fill.run(spool, encoder, _fill_id(context))


class DeleteQueueOperator(BaseOperator):
    """Delete a work queue and its receipts (``<queue_name>.receipts``), and on request its
    dead-letter queue; no error for a queue that is already gone.

    Meant as the DAG's teardown (``.as_teardown(setups=declare)``) so it runs whatever happened
    upstream. Nothing unprocessed is deleted unless told: a queue still holding messages (or with
    consumers still attached) is kept, with its receipts, and the log says how many items are left
    and how to finish them (clear the run's failed tasks); ``keep_if_not_empty=False`` deletes it
    anyway, logging how many messages went with it.

    :param queue_name: queue to delete. Templated.
    :param dead_letter_queue: also delete this dead-letter queue (kept likewise while it holds
        dead-lettered items, unless ``keep_if_not_empty=False``). Templated.
    :param keep_if_not_empty: keep a queue that still holds messages or has consumers (default True).
    :param amqp_conn_id: the AMQP connection.
    :return: the messages the work queue held (deleted or kept), or None if it didn't exist.
    """

    template_fields: Sequence[str] = ("queue_name", "dead_letter_queue")
    ui_color = "#f0e68c"

    def __init__(self, *, queue_name: str, dead_letter_queue: str | None = None, keep_if_not_empty: bool = True,
                 amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_name = queue_name
        self.dead_letter_queue = dead_letter_queue
        self.keep_if_not_empty = keep_if_not_empty
        self.amqp_conn_id = amqp_conn_id

    def execute(self, context: Context) -> int | None:
        queue = validate_queue_name(self.queue_name)
        dead_letter_queue = validate_queue_name(self.dead_letter_queue) if self.dead_letter_queue else None
        if not isinstance(self.keep_if_not_empty, bool):
            raise ConfigurationError(f"keep_if_not_empty={self.keep_if_not_empty!r} must be True or False.")
        hook = AmqpHook(amqp_conn_id=self.amqp_conn_id)
        left, kept = self._delete(hook, queue, "items")
        if not kept:
            hook.delete_queue(receipts.receipts_queue(queue))  # the ledger goes with its queue
        if dead_letter_queue:
            self._delete(hook, dead_letter_queue, "dead-lettered items")
        return left

    def _delete(self, hook: AmqpHook, name: str, what: str) -> tuple[int | None, bool]:
        """Delete ``name`` unless it must be kept; returns (the messages it held or None if absent, kept)."""
        try:
            found = hook.queue_depth(name, checked=True)  # never deletes items a leaderless queue hides
        except QueueNotFoundError:
            self.log.info("Queue %r did not exist; nothing to delete.", name)
            return None, False
        if self.keep_if_not_empty and (found.messages or found.consumers):
            self.log.warning(
                "Kept queue %r: it still holds %d %s (%d consumers attached). To process them, clear this run "
                "(in the UI: the run > Clear; or from the task that runs the Job on): the fill publishes nothing "
                "again and a new Job takes only what is left. To discard them, delete the queue "
                "(DeleteQueueOperator(keep_if_not_empty=False), or rabbitmqctl delete_queue %s).",
                name, found.messages, what, found.consumers, name)
            return found.messages, True
        left = hook.delete_queue(name)
        if left:
            self.log.warning("Deleted queue %r with %d %s still in it (keep_if_not_empty=False).", name, left, what)
        elif left is not None:
            self.log.info("Deleted queue %r (it was empty).", name)
        return (found.messages if left is None else left), False


def _fill_id(context: Context) -> str:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    suffix = f"[{map_index}]" if map_index is not None and map_index >= 0 else ""
    return f"{ti.dag_id}/{ti.task_id}{suffix}/{context['run_id']}"


def _parse_rendered_list(text: str) -> list[Any]:
    """A template rendered without native objects yields a string; read it back as a list."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigurationError(
        f"items rendered to the string {text[:60]!r}, not a list: give a list, or render a JSON list "
        "(e.g. '{{ params.items | tojson }}'), or set render_template_as_native_obj=True on the DAG."
    )
