"""Queue declarations that never drop an item silently (issue 10 section 2), on the real broker:
a full queue refuses new items (the fill fails naming how many), a delivery limit or a TTL
dead-letters into ``<queue>.dead`` by default, and on RabbitMQ >= 4.0 a quorum queue without an
asked-for limit is unlimited instead of 4.0's default of 20. Run against RabbitMQ 4.0 with
``WORKQUEUE_TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5673/``."""

from __future__ import annotations

import time

import pika
import pytest

from tests.conftest import task_context
from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import broker_version
from workqueue_provider.exceptions import ConfigurationError, PublishError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(broker_url):
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    yield connection.channel()
    connection.close()


@pytest.fixture
def cleanup(amqp_conn, queue_name):
    yield
    AmqpHook().delete_queue(receipts.receipts_queue(queue_name))


def declare(queue_name, **kwargs):
    return DeclareQueueOperator(task_id="declare", queue_name=queue_name, **kwargs).execute(task_context())


def get(channel, queue, timeout=5.0):
    """One message (quorum queues may take a moment to hand out a requeued one), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            return method, properties, body
        time.sleep(0.02)
    return None


def depth(queue):
    return AmqpHook().queue_depth(queue).messages


def test_a_full_queue_refuses_the_rest_of_a_fill_and_the_fill_names_how_many(amqp_conn, queue_name, cleanup):
    declare(queue_name, queue_type="classic", max_length=3)
    items = [f"item-{i}" for i in range(5)]
    with pytest.raises(PublishError, match=r"refused 2 of the 5 messages") as raised:
        FillQueueOperator(task_id="fill", queue_name=queue_name, items=items).execute(task_context())
    assert "x-max-length" in str(raised.value) and "3 of 5 items were confirmed" in str(raised.value)
    assert raised.value.confirmed == 3
    assert depth(queue_name) == 3


def test_a_full_quorum_queue_drops_nothing(amqp_conn, queue_name, cleanup):
    """Quorum queues apply the limit a little late (a fill may overshoot it) but never drop the head."""
    declare(queue_name, max_length=50)
    items = [f"item-{i}" for i in range(2000)]
    with pytest.raises(PublishError, match="refused") as raised:
        FillQueueOperator(task_id="fill", queue_name=queue_name, items=items, window=10).execute(task_context())
    assert depth(queue_name) == raised.value.confirmed >= 50, "every confirmed item is in the queue"


def test_a_delivery_limit_dead_letters_into_a_dead_letter_queue_by_default(amqp_conn, channel, queue_name, cleanup):
    declare(queue_name, delivery_limit=1)
    dead = f"{queue_name}.dead"
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["poison"]).execute(task_context())
    for _ in range(2):  # delivered twice (the limit is 1 redelivery), then dead-lettered, not dropped
        method, _props, _body = get(channel, queue_name)
        channel.basic_nack(method.delivery_tag, requeue=True)
    deadline = time.monotonic() + 5
    while depth(dead) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (depth(queue_name), depth(dead)) == (0, 1)


def test_a_ttl_dead_letters_expired_items_by_default(amqp_conn, queue_name, cleanup):
    declare(queue_name, message_ttl_ms=200)
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["late"]).execute(task_context())
    deadline = time.monotonic() + 10
    while depth(f"{queue_name}.dead") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (depth(queue_name), depth(f"{queue_name}.dead")) == (0, 1), "the expired item was dead-lettered"


def test_declaring_with_the_default_dead_letter_queue_is_idempotent(amqp_conn, queue_name, cleanup):
    for _ in range(2):
        declare(queue_name, delivery_limit=3, message_ttl_ms=60_000, max_length=100)
    assert depth(f"{queue_name}.dead") == 0


def test_dropping_settings_are_refused_before_anything_is_declared(amqp_conn, queue_name):
    with pytest.raises(ConfigurationError, match="drops the oldest items silently"):
        declare(queue_name, max_length=3, arguments={"x-overflow": "drop-head"})
    with pytest.raises(ConfigurationError, match="not a valid|at most 255"):
        declare("q" * 251, delivery_limit=2)  # '<queue>.dead' would be over 255 bytes
    for name in (queue_name, f"{queue_name}.dead"):
        with pytest.raises(Exception, match="does not exist"):
            AmqpHook().queue_depth(name)


def test_a_quorum_queue_without_a_limit_never_drops_a_requeued_item(amqp_conn, channel, queue_name, cleanup):
    """RabbitMQ 4.0 gives quorum queues a delivery limit of 20: declared here as unlimited (-1)."""
    declare(queue_name)
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["retried"]).execute(task_context())
    for attempt in range(25):
        got = get(channel, queue_name)
        assert got is not None, f"the item vanished after {attempt} deliveries"
        channel.basic_nack(got[0].delivery_tag, requeue=True)
    assert get(channel, queue_name) is not None


def test_the_broker_version_is_read(broker_url):
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        assert broker_version(connection)[0] in (3, 4)
    finally:
        connection.close()
