"""The Airflow side rides out a broker outage (issue 16 item 3), on a private RabbitMQ node stopped
for a few seconds (``rabbitmqctl stop_app``, then ``start_app``: a restart, an upgrade, a reboot):
declare, depth and delete wait for the broker and succeed; a fill cut off mid-publish retries itself
exactly (one message per item); an outage longer than the connection's ``outage_window`` fails
naming the broker and how long it was unreachable, without the password."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from tests.conftest import task_context
from tests.reliability.test_broker_faults import drain_bodies
from workqueue_provider.amqp.queues import QueueSpec
from workqueue_provider.exceptions import BrokerUnreachableError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = [pytest.mark.integration]
OUTAGE_SECONDS = 6


@pytest.fixture
def outage_conn(private_broker, monkeypatch):
    """``amqp_outage``: the private node, riding out outages for ``window`` seconds (default 60)."""
    def connect(window: float = 60) -> str:
        monkeypatch.setenv("AIRFLOW_CONN_AMQP_OUTAGE", json.dumps({
            "conn_type": "amqp", "host": "127.0.0.1", "port": private_broker.port, "login": private_broker.user,
            "password": private_broker.password, "extra": {"outage_window": window, "connection_attempts": 1}}))
        return "amqp_outage"
    return connect


@pytest.fixture
def outage(private_broker):
    """``outage()`` stops the node's app now and starts it again OUTAGE_SECONDS later, in the background."""
    threads = []

    def start(seconds: float = OUTAGE_SECONDS) -> None:
        private_broker.stop_app()
        thread = threading.Thread(target=lambda: (time.sleep(seconds), private_broker.start_app()))
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(120)


def in_background(call):
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as e:  # noqa: BLE001 - asserted by the caller
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_declare_depth_and_delete_wait_for_the_broker_to_come_back(outage_conn, outage, capfd):
    conn = outage_conn(60)
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    outage()
    started = time.monotonic()
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id=conn).execute(task_context())
    assert time.monotonic() - started >= OUTAGE_SECONDS - 1, "the declare waited for the broker"
    assert AmqpHook(amqp_conn_id=conn).queue_depth(queue).messages == 0
    logs = capfd.readouterr()
    assert "is unreachable while declaring queue" in logs.out + logs.err and "outage window used" in logs.out + logs.err

    outage()
    assert AmqpHook(amqp_conn_id=conn).queue_depth(queue).messages == 0
    outage()
    assert DeleteQueueOperator(task_id="delete", queue_name=queue, amqp_conn_id=conn).execute(task_context()) == 0


def test_a_fill_cut_off_by_an_outage_retries_itself_exactly(private_broker, outage_conn, outage):
    conn = outage_conn(60)
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    items = [f"item-{i:06d}" for i in range(10_000)]
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id=conn).execute(task_context())
    # one message in flight at a time: the broker surely stops in the middle of the fill
    fill = FillQueueOperator(task_id="fill", queue_name=queue, items=items, window=1, amqp_conn_id=conn)
    thread, outcome = in_background(lambda: fill.execute(task_context()))
    hook = AmqpHook(amqp_conn_id=conn)
    deadline = time.monotonic() + 60
    while hook.queue_depth(queue).messages < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    outage()
    thread.join(180)
    assert not thread.is_alive(), "the fill hung"
    assert outcome.get("result") == len(items), outcome
    bodies = drain_bodies(private_broker.url, queue)
    assert sorted(body.decode() for body in bodies) == items, "exactly one message per item"
    hook.delete_queue(queue)
    hook.delete_queue(f"{queue}.receipts")


def test_an_outage_longer_than_the_window_fails_naming_the_broker_and_how_long(private_broker, outage_conn, outage):
    conn = outage_conn(3)
    outage(OUTAGE_SECONDS + 4)
    started = time.monotonic()
    with pytest.raises(BrokerUnreachableError) as raised:
        AmqpHook(amqp_conn_id=conn).declare_queue(QueueSpec(f"outage-{uuid.uuid4().hex[:8]}"))
    waited = time.monotonic() - started
    message = str(raised.value)
    assert f"The broker at 127.0.0.1:{private_broker.port} was unreachable for" in message, message
    assert "longer than the outage window (3 s" in message and "while declaring queue" in message, message
    assert private_broker.password not in message
    assert 3 <= waited < OUTAGE_SECONDS + 4, "gave up after the window, not after the outage"
