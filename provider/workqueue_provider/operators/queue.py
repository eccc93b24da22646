"""Broker-side operators: declare a work queue, fill it with one message per item, delete it."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, XComArg

from workqueue_provider.amqp.publisher import DEFAULT_WINDOW
from workqueue_provider.amqp.queues import FILL_HEADER, QueueSpec, validate_queue_name
from workqueue_provider.exceptions import ConfigurationError, ItemSourceError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.items import DEFAULT_MAX_MESSAGE_BYTES, ItemEncoder, iter_items, spool_items

if TYPE_CHECKING:
    from airflow.sdk import Context

ON_EXISTING_MESSAGES = ("fail", "purge")


class DeclareQueueOperator(BaseOperator):
    """Declare a durable work queue (quorum by default). Idempotent: declaring the same queue again
    changes nothing; an existing queue with other arguments fails with every difference named.

    :param queue_name: queue to declare (at most 255 bytes). Templated.
    :param queue_type: ``quorum`` (default: replicated, delivery limits for poison items) or ``classic``.
    :param dead_letter_queue: also declare this queue and dead-letter rejected or expired items into it.
    :param delivery_limit: quorum queues: deliveries before an item is dropped or dead-lettered.
    :param message_ttl_ms: drop (or dead-letter) items older than this.
    :param max_length: most ready messages the queue holds.
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
        specs = []
        dlx: dict[str, Any] = {}
        if self.dead_letter_queue:
            specs.append(QueueSpec(name=self.dead_letter_queue, queue_type=self.queue_type))  # type: ignore[arg-type]
            dlx = {"dead_letter_exchange": "", "dead_letter_routing_key": self.dead_letter_queue}
        specs.append(QueueSpec(
            name=self.queue_name, queue_type=self.queue_type,  # type: ignore[arg-type]
            delivery_limit=self.delivery_limit, message_ttl_ms=self.message_ttl_ms, max_length=self.max_length,
            extra_arguments=dict(self.arguments or {}), **dlx,
        ))
        return specs

    def execute(self, context: Context) -> dict[str, Any]:
        specs = self.queue_specs()
        for spec in specs:
            declared = self.hook.declare_queue(spec)
            self.log.info("Queue %r (%s) is declared: %d ready messages, %d consumers.",
                          spec.name, spec.queue_type, declared.messages, declared.consumers)
        return {"queue": declared.name, "messages": declared.messages, "consumers": declared.consumers}


class FillQueueOperator(BaseOperator):
    """Publish one persistent, confirmed message per item into an existing queue.

    Items come from exactly one of ``items`` (a list, an upstream task's output, or a callable
    returning an iterable such as a generator) or ``items_file`` (one item per line). They are
    encoded into a spool file first, so a bad item fails the task with nothing published, and
    memory stays flat however many items there are.

    Retries are exact: each message carries the fill's id (DAG, task, run). When a retry finds
    messages from an earlier attempt of the same fill at the head of the queue, it purges them
    and publishes everything again, so the queue holds exactly one message per item.

    :param queue_name: existing queue to fill. Templated.
    :param items: list / XComArg / callable. Templated (a template must render to a list).
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
            fill_id = _fill_id(context)
            self._make_room(fill_id)
            if spool.count == 0:
                return 0
            result = self.hook.publish(
                self.queue_name, spool.bodies(), total=spool.count, window=self.window,
                content_type=encoder.content_type, headers={FILL_HEADER: fill_id},
                on_progress=lambda done, secs: self.log.info(
                    "Published %d/%d items to %r (%.0f items/s).", done, spool.count, self.queue_name,
                    done / secs if secs else 0.0),
                progress_every=self.progress_every,
            )
        self.log.info("Published and confirmed %d items to queue %r in %.2f s (%.0f items/s).",
                      result.confirmed, self.queue_name, result.seconds, result.rate)
        return result.confirmed

    def _make_room(self, fill_id: str) -> None:
        """Empty the queue of an earlier attempt's messages (retry), or refuse/purge foreign ones."""
        depth = self.hook.queue_depth(self.queue_name)
        if depth.messages == 0:
            return
        owner = self.hook.first_message_fill(self.queue_name)
        if owner == fill_id:
            removed = self.hook.purge_queue(self.queue_name)
            self.log.warning("Retry: purged %d messages an earlier attempt of this fill left in %r; "
                             "publishing all items again.", removed, self.queue_name)
        elif self.on_existing_messages == "purge":
            removed = self.hook.purge_queue(self.queue_name)
            self.log.warning("Purged %d messages already in %r (on_existing_messages='purge').", removed,
                             self.queue_name)
        else:
            raise ConfigurationError(
                f"Queue {self.queue_name!r} already holds {depth.messages} messages that this fill did not publish: "
                "use a fresh queue per run, or set on_existing_messages='purge' to drop them."
            )


class DeleteQueueOperator(BaseOperator):
    """Delete a queue (no error if it is already gone); logs how many messages it still held.

    Meant as the DAG's teardown (``.as_teardown(setups=declare)``) so it runs whatever happened upstream.

    :param queue_name: queue to delete. Templated.
    :param amqp_conn_id: the AMQP connection.
    """

    template_fields: Sequence[str] = ("queue_name",)
    ui_color = "#f0e68c"

    def __init__(self, *, queue_name: str, amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_name = queue_name
        self.amqp_conn_id = amqp_conn_id

    def execute(self, context: Context) -> int | None:
        left = AmqpHook(amqp_conn_id=self.amqp_conn_id).delete_queue(validate_queue_name(self.queue_name))
        if left is None:
            self.log.info("Queue %r did not exist; nothing to delete.", self.queue_name)
        elif left:
            self.log.warning("Deleted queue %r with %d unprocessed messages still in it.", self.queue_name, left)
        else:
            self.log.info("Deleted queue %r (it was empty).", self.queue_name)
        return left


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
