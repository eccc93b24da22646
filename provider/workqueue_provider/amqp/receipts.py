"""The item account: broker-side records that prove every item was processed, or say which were not.

A queue ``Q`` filled by :class:`FillQueueOperator` has a ledger, the quorum queue ``Q.receipts``
(:func:`receipts_queue`; replicated, so a broker node lost or cut off keeps no receipt from the
account), holding:

- one *fill* record per fill: how many items were published (``x-workqueue-count``) and the fill id;
  a new fill of ``Q`` (or a retry of the same fill) resets the ledger first;
- one *processed* record per item a worker finished: ``workqueue-consume`` publishes it, confirmed,
  after the worker command exits 0 and *before* acking the item, carrying the item's message id
  (an in-process worker writes one record for a batch of items, their ids in its body);
  An item processed twice (a pod killed between the receipt and the ack) leaves two receipts: a
  duplicate, counted, never a loss.

:func:`read_account` reads the ledger without consuming it and adds it up against the queue and
its dead-letter queue: ``processed + dead_lettered + left + lost = filled``. Items that vanish
(dropped by ``x-max-length``, a delivery limit or a TTL without dead-lettering, a reject without a
dead-letter exchange) show up as ``lost``. Without a fill record (the queue was filled by other
tools, or the workers run plain ``amqp-consume``) there is no account: callers fall back to
"the queue is empty" and say so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from workqueue_provider.amqp.connection import broker_version
from workqueue_provider.amqp.queues import DEAD_LETTER_SUFFIX, FILL_HEADER, UNLIMITED_DELIVERIES, checked_depth, fill_key
from workqueue_provider.exceptions import BrokerError, QueueNotFoundError

RECEIPTS_SUFFIX = ".receipts"
RECORD_HEADER = "x-workqueue-record"  # "fill" or "processed"
FILL_NAME_HEADER = "x-workqueue-fill-id"  # on the ledger's fill records: the full fill id (DAG/task/run)
COUNT_HEADER = "x-workqueue-count"  # on a fill record: items published
FILL_RECORD = "fill"
PROCESSED_RECORD = "processed"
CONSUMER_RECORD = "consumer"  # a workqueue-consume process started on the queue (receipts are being kept)
STARTED_RECORD = "filling"  # written before a fill publishes: COUNT_HEADER = items it sets out to publish
STOPPED_RECORD = "stopped"  # an attempt that failed: CONFIRMED_HEADER confirmed, COUNT_HEADER = the depth it left
CONFIRMED_HEADER = "x-workqueue-confirmed"
_PERSISTENT = pika.DeliveryMode.Persistent
MAX_UNACKED = 65535  # basic.qos prefetch_count is 16 bits: the most one channel can hold while reading the ledger


def receipts_queue(queue_name: str) -> str:
    """The ledger queue of ``queue_name``."""
    return f"{queue_name}{RECEIPTS_SUFFIX}"


def message_id_for(index: int) -> str:
    """The message id of the fill's ``index``-th item (0-based); with the fill id it names one item."""
    return str(index)


@dataclass(frozen=True)
class Account:
    """Where every item of a fill went. ``lost`` is what no record explains."""

    fill_id: str
    filled: int
    processed: int  # distinct items with a receipt
    duplicated: int  # receipts beyond the first for an item: processed more than once
    dead_lettered: int
    left: int  # still ready in the queue
    consumers: int = 0  # receipt-keeping consumers that started on the queue

    @property
    def kept(self) -> bool:
        """Whether the workers keep receipts (workqueue-consume). If not (plain amqp-consume), ``processed``
        is always 0 and the account can't tell processed items from lost ones."""
        return self.consumers > 0 or self.processed > 0

    @property
    def lost(self) -> int:
        return max(0, self.filled - self.processed - self.dead_lettered - self.left)

    @property
    def complete(self) -> bool:
        """Every item processed or dead-lettered: nothing left, nothing lost."""
        return self.left == 0 and self.lost == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost}

    def describe(self) -> str:
        return (f"{self.filled} filled = {self.processed} processed + {self.dead_lettered} dead-lettered + "
                f"{self.left} left + {self.lost} lost; {self.duplicated} processed more than once")


# -- the fill side ---------------------------------------------------------------------------------
def declare_receipts(connection: Any, queue_name: str) -> None:
    """Declare ``Q.receipts``: a quorum queue (receipts are read back, never consumed by workers), with no
    delivery limit on RabbitMQ 4 (each read hands every record back, counting as a delivery). A classic
    ledger left by an earlier version is deleted and declared again: a new fill resets the ledger anyway."""
    name = receipts_queue(queue_name)
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if broker_version(connection) >= (4,):
        arguments["x-delivery-limit"] = UNLIMITED_DELIVERIES
    channel = connection.channel()
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 406:
            raise BrokerError(f"Declaring the receipts queue {name!r} failed: {e.reply_code} {e.reply_text}") from e
        channel = connection.channel()
        channel.queue_delete(name)
        channel.queue_declare(name, durable=True, arguments=arguments)
    channel.close()


def reset(connection: Any, queue_name: str) -> int:
    """Drop every record of earlier fills; returns how many there were."""
    channel = connection.channel()
    try:
        ok = channel.queue_purge(receipts_queue(queue_name))
    except pika.exceptions.ChannelClosedByBroker as e:
        raise BrokerError(f"Resetting the receipts of queue {queue_name!r} failed: {e.reply_code} {e.reply_text}") from e
    channel.close()
    return int(ok.method.message_count)


def record_fill(connection: Any, queue_name: str, fill_id: str, count: int) -> None:
    """Write the fill record (confirmed): ``count`` items of ``fill_id`` were published to the queue."""
    _publish_record(connection, queue_name, {RECORD_HEADER: FILL_RECORD, **_fill_headers(fill_id), COUNT_HEADER: count})


# -- telling a retry's own messages from others', without touching the work queue ------------------
def record_fill_started(connection: Any, queue_name: str, fill_id: str, count: int) -> None:
    """Write that ``fill_id`` sets out to publish ``count`` items (after :func:`reset`, before publishing)."""
    _publish_record(connection, queue_name, {RECORD_HEADER: STARTED_RECORD, **_fill_headers(fill_id),
                                             COUNT_HEADER: count})


def record_fill_stopped(connection: Any, queue_name: str, fill_id: str, confirmed: int, depth: int) -> None:
    """Write that an attempt of ``fill_id`` failed with ``confirmed`` items confirmed, leaving the queue
    ``depth`` deep (its confirmed messages plus those whose confirm never came but were stored)."""
    _publish_record(connection, queue_name, {RECORD_HEADER: STOPPED_RECORD, **_fill_headers(fill_id),
                                             COUNT_HEADER: depth, CONFIRMED_HEADER: confirmed})


@dataclass(frozen=True)
class FillTrace:
    """What the ledger says of the last fill of a queue."""

    fill_id: str
    count: int  # items it set out to publish
    complete: bool  # all of them confirmed (a fill record)
    depth_at_stop: int | None  # a failed attempt's depth right after it stopped (a stopped record)
    processed: int  # distinct items a worker finished (each took one of its messages out)

    def explains(self, depth: int) -> bool:
        """Whether a queue ``depth`` deep holds nothing but this fill's messages, as far as counts tell:
        all its items less those processed (a complete fill), or the depth its failed attempt left; with
        neither recorded (the attempt died unrecorded), no more than the items it set out to publish
        into the empty queue it started on."""
        if self.complete:
            return depth == self.count - self.processed
        if self.depth_at_stop is not None:
            return depth == self.depth_at_stop
        return depth <= self.count


def last_fill(connection: Any, queue_name: str) -> FillTrace | None:
    """The ledger's account of the last fill of ``queue_name`` (read without consuming), or None."""
    try:
        records = list(_read_all(connection, receipts_queue(queue_name)))
    except QueueNotFoundError:
        return None
    # a fill starts by emptying the ledger, so it holds one start record; the rest is matched to it by fill
    # key, never by order (a quorum queue hands records back from a read in no guaranteed order)
    started = next((h for h, _ids in records if _text(h.get(RECORD_HEADER)) == STARTED_RECORD), None)
    if started is None:
        return None
    mine = [h for h, _ids in records if _text(h.get(FILL_HEADER)) == _text(started.get(FILL_HEADER))]
    finished = next((h for h in mine if _text(h.get(RECORD_HEADER)) == FILL_RECORD), None)
    stopped = [h for h in mine if _text(h.get(RECORD_HEADER)) == STOPPED_RECORD]
    key, fill_id = _text(started.get(FILL_HEADER)), _text(started.get(FILL_NAME_HEADER)) or ""
    processed = {message_id for headers, ids in records for message_id in ids
                 if _text(headers.get(RECORD_HEADER)) == PROCESSED_RECORD and _text(headers.get(FILL_HEADER)) == key}
    return FillTrace(fill_id=fill_id, count=int(started.get(COUNT_HEADER) or 0), complete=finished is not None,
                     depth_at_stop=int(stopped[-1].get(COUNT_HEADER) or 0) if stopped else None,
                     processed=len(processed))


def _fill_headers(fill_id: str) -> dict[str, str]:
    """A record names its fill by key (as the items and receipts do) and in full (for people)."""
    return {FILL_HEADER: fill_key(fill_id), FILL_NAME_HEADER: fill_id}


def _publish_record(connection: Any, queue_name: str, headers: dict[str, Any]) -> None:
    """Publish one record to the ledger and wait for its confirm."""
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        channel.basic_publish("", receipts_queue(queue_name), b"",
                              pika.BasicProperties(delivery_mode=_PERSISTENT, headers=headers), mandatory=True)
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
        raise BrokerError(f"The broker refused a record of queue {queue_name!r} ({e!r}): "
                          f"does {receipts_queue(queue_name)!r} exist?") from e
    channel.close()


# -- the worker side -------------------------------------------------------------------------------
class NoLedger(Exception):
    """The queue has no receipts queue: it wasn't filled by FillQueueOperator."""


def record_consumer(channel: BlockingChannel, queue_name: str) -> None:
    """Write that a receipt-keeping consumer started on the queue, so that a run whose items all vanished
    before any worker took one is told from a run whose workers keep no receipts (plain amqp-consume).
    The channel must be in confirm mode. Raises :class:`NoLedger` if ``Q.receipts`` is missing."""
    try:
        channel.basic_publish("", receipts_queue(queue_name), b"",
                              pika.BasicProperties(delivery_mode=_PERSISTENT,
                                                   headers={RECORD_HEADER: CONSUMER_RECORD}),
                              mandatory=True)
    except pika.exceptions.UnroutableError as e:
        raise NoLedger(receipts_queue(queue_name)) from e


def record_processed(channel: BlockingChannel, queue_name: str, properties: pika.BasicProperties) -> None:
    """Publish the receipt of one processed item, and wait for its confirm. The channel must be in
    confirm mode (``channel.confirm_delivery()``). Raises :class:`NoLedger` if ``Q.receipts`` is missing."""
    headers = properties.headers or {}
    receipt_headers = {RECORD_HEADER: PROCESSED_RECORD, FILL_HEADER: _text(headers.get(FILL_HEADER))}
    try:
        channel.basic_publish("", receipts_queue(queue_name), b"",
                              pika.BasicProperties(delivery_mode=_PERSISTENT, headers=receipt_headers,
                                                   message_id=properties.message_id),
                              mandatory=True)
    except pika.exceptions.UnroutableError as e:
        raise NoLedger(receipts_queue(queue_name)) from e


def record_processed_batch(channel: Any, queue_name: str, items: Sequence[pika.BasicProperties]) -> None:
    """Publish one receipt for several processed items of one fill: their message ids in the body, one a
    line, and their number in ``COUNT_HEADER`` (an in-process worker finishes thousands a second; a
    receipt each would cost more than the items). Confirm it like :func:`record_processed` before acking
    any of them. The items must all carry the same fill key."""
    keys = {_text((properties.headers or {}).get(FILL_HEADER)) for properties in items}
    if len(keys) != 1:
        raise ValueError(f"a batch receipt names items of one fill, not {len(keys)}")
    body = "\n".join(str(properties.message_id) for properties in items).encode()
    headers = {RECORD_HEADER: PROCESSED_RECORD, FILL_HEADER: keys.pop(), COUNT_HEADER: len(items)}
    channel.basic_publish("", receipts_queue(queue_name), body,
                          pika.BasicProperties(delivery_mode=_PERSISTENT, headers=headers), mandatory=True)


# -- verification ----------------------------------------------------------------------------------
def read_account(connection: Any, queue_name: str, dead_letter_queue: str | None = None) -> Account | None:
    """Add up the ledger of ``queue_name`` (read without consuming it), or None when there is none."""
    fill: dict[str, Any] | None = None
    consumers = 0
    receipts: dict[str | None, int] = {}  # per fill id: receipts
    seen: dict[str | None, set[str | None]] = {}  # per fill id: distinct message ids
    try:  # one pass, keeping only counts and ids: a ledger of 100,000 receipts stays small in memory
        for headers, ids in _read_all(connection, receipts_queue(queue_name)):
            kind = _text(headers.get(RECORD_HEADER))
            if kind == FILL_RECORD:
                fill = headers
            elif kind == CONSUMER_RECORD:
                consumers += 1
            elif kind == PROCESSED_RECORD:
                owner = _text(headers.get(FILL_HEADER))
                receipts[owner] = receipts.get(owner, 0) + len(ids)
                seen.setdefault(owner, set()).update(ids)
    except QueueNotFoundError:
        return None
    if fill is None:
        return None
    key, fill_id = _text(fill.get(FILL_HEADER)), _text(fill.get(FILL_NAME_HEADER))
    processed = len(seen.get(key, ()))
    left = checked_depth(connection, queue_name).messages
    dead = _dead_letters(connection, queue_name, dead_letter_queue)
    return Account(fill_id=fill_id or "", filled=int(fill.get(COUNT_HEADER) or 0), processed=processed,
                   duplicated=receipts.get(key, 0) - processed, dead_lettered=dead, left=left,
                   consumers=consumers)


def _dead_letters(connection: Any, queue_name: str, dead_letter_queue: str | None) -> int:
    """Messages in the dead-letter queue: the one named, else ``<queue>.dead`` (the one DeclareQueueOperator
    wires by default) if it exists."""
    if dead_letter_queue:
        return checked_depth(connection, dead_letter_queue).messages
    try:
        return checked_depth(connection, f"{queue_name}{DEAD_LETTER_SUFFIX}").messages
    except QueueNotFoundError:
        return 0


def _read_all(connection: Any, name: str) -> Iterator[tuple[dict[str, Any], list[str | None]]]:
    """Every message of ``name`` as (headers, the item message ids it names), left in the queue: read unacked,
    then the channels close and the broker puts them all back (the ledger has no delivery limit; see
    :func:`declare_receipts`). A channel holds at most :data:`MAX_UNACKED` (and RabbitMQ 4 gives a quorum
    queue's consumer with prefetch 0 only 2,000), so a long ledger is read on several channels, each
    with an explicit prefetch. Raises QueueNotFoundError on first use (QueueUnavailableError while the
    ledger's leader doesn't answer: an empty reading is checked, see :func:`checked_depth`)."""
    expected = checked_depth(connection, name).messages
    channel: BlockingChannel = connection.channel()
    opened, read = [channel], 0
    try:
        while read < expected:
            quota = min(MAX_UNACKED, expected - read)
            channel.basic_qos(prefetch_count=quota)
            taken = 0
            for method, properties, body in channel.consume(name, auto_ack=False, inactivity_timeout=10):
                if method is None:
                    raise BrokerError(f"Reading the receipts in {name!r} stalled after {read} of {expected} "
                                      "(is another reader holding some?).")
                read, taken = read + 1, taken + 1
                yield properties.headers or {}, _message_ids(properties, body)
                if taken >= quota:
                    break
            if read < expected:  # this channel's consumer is out of credit: the rest comes on another
                channel = connection.channel()
                opened.append(channel)
    finally:
        for each in opened:
            with contextlib.suppress(Exception):
                each.close()  # unacked messages go back to the queue


def _message_ids(properties: Any, body: bytes) -> list[str | None]:
    """The items a record names: a batch receipt lists them in its body, one a line; any other record
    names at most its own message id."""
    headers = properties.headers or {}
    if _text(headers.get(RECORD_HEADER)) == PROCESSED_RECORD and COUNT_HEADER in headers:
        return [line.decode() for line in body.split(b"\n")] if body else []
    return [properties.message_id]


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
