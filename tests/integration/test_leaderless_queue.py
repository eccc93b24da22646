"""A quorum queue whose leader doesn't answer is never read as empty, by a worker (once, one in the
paused-leader cluster test exited 0 with five items left in the queue) or on the Airflow side.

RabbitMQ answers a passive declare on such a queue with "0 messages, 0 consumers" (3.10 and 4.0:
``rabbit_quorum_queue:stat`` maps an error or timeout to ``{ok, 0, 0}``). Here the queue's Ra server is
stopped on the real broker while a consumer holds an item, and restarted a few seconds later.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import rabbitmqctl, task_context
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.consumer import QueueConsumer
from workqueue_provider.amqp.queues import checked_depth, depth
from workqueue_provider.exceptions import QueueUnavailableError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = pytest.mark.integration
LEADER_AWAY_SECONDS = 3.0


def ra_server(queue: str, action: str) -> None:
    """``stop_server`` or ``restart_server`` the queue's Ra member (its only one: a single-node broker)."""
    command = (f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
               f"{{Name, _}} = amqqueue:get_pid(Q), ok = ra:{action}(quorum_queues, {{Name, node()}}).")
    rabbitmqctl("eval", command, capture=True)


def test_an_empty_reading_from_a_queue_whose_leader_is_away_is_not_believed(amqp_conn, broker_url, queue_name):
    items = ["item-0", "item-1", "item-2"]
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, queue_type="quorum").execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=items).execute(task_context())
    consumer = QueueConsumer(BrokerSettings.from_url(broker_url), queue_name, prefetch=1)
    consumer.connect(keep_receipts=False)
    try:
        held = consumer.take(10)
        assert held is not None and held.body == b"item-0"
        assert consumer.queue_is_empty() is False, "two items are ready"

        ra_server(queue_name, "stop_server")
        assert AmqpHook().queue_depth(queue_name).messages == 0, "the broker's own answer while the leader is away"
        restart = threading.Timer(LEADER_AWAY_SECONDS, ra_server, (queue_name, "restart_server"))
        restart.start()
        started = time.monotonic()
        try:
            assert consumer.queue_is_empty() is False, "two items are still in the queue"
        finally:
            restart.join()
        assert time.monotonic() - started >= LEADER_AWAY_SECONDS - 0.5, "the answer waited for the leader"

        taken = [held]
        consumer.finish(held)
        while (delivery := consumer.take(10)) is not None:
            taken.append(delivery)
            consumer.finish(delivery)
        consumer.flush()
        assert [delivery.body.decode() for delivery in taken] == items
        assert consumer.queue_is_empty() is True
    finally:
        consumer.close()
    assert AmqpHook().queue_depth(queue_name).messages == 0


def test_a_checked_empty_reading_raises_while_the_leader_is_away(amqp_conn, broker_url, queue_name):
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, queue_type="quorum").execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["a", "b"]).execute(task_context())
    ra_server(queue_name, "stop_server")
    try:
        connection = open_connection(BrokerSettings.from_url(broker_url))
        assert depth(connection, queue_name).messages == 0, "the broker's own answer while the leader is away"
        with pytest.raises(QueueUnavailableError, match="leader is unavailable"):
            checked_depth(connection, queue_name)
    finally:
        ra_server(queue_name, "restart_server")
    connection = open_connection(BrokerSettings.from_url(broker_url))
    assert checked_depth(connection, queue_name).messages == 2
    connection.close()


def test_the_airflow_side_rides_out_a_leaderless_queue_and_never_reads_it_as_empty(amqp_conn, broker_url, queue_name):
    """The item account and the checks that decide (launch a Job? delete the queue? is the work done?)
    wait for the leader instead of taking "0 messages" for an empty queue."""
    items = ["a", "b", "c"]
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, queue_type="quorum").execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=items).execute(task_context())
    hook = AmqpHook()
    for read in (lambda: hook.item_account(queue_name).left, lambda: hook.queue_depth(queue_name, checked=True).messages):
        ra_server(queue_name, "stop_server")
        restart = threading.Timer(LEADER_AWAY_SECONDS, ra_server, (queue_name, "restart_server"))
        restart.start()
        try:
            assert read() == 3
        finally:
            restart.join()
    ra_server(queue_name, "stop_server")
    restart = threading.Timer(LEADER_AWAY_SECONDS, ra_server, (queue_name, "restart_server"))
    restart.start()
    try:
        assert DeleteQueueOperator(task_id="delete", queue_name=queue_name, keep_if_not_empty=True).execute(
            task_context()) == 3
    finally:
        restart.join()
    assert AmqpHook().queue_depth(queue_name).messages == 3, "the queue and its items were kept"
