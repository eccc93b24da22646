"""Faults on the broker side, on a private RabbitMQ node: a restart in the middle of a fill, and a
work item that runs past the broker's consumer_timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import pytest

from tests.conftest import task_context
from tests.reliability.conftest import CONSUMER_TIMEOUT_MS
from workqueue_provider.exceptions import BrokerError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.worker.consume import EXIT_REQUEUED

pytestmark = [pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
# workqueue-consume from this checkout (the venv's console script may point at another install)
WORKQUEUE_CONSUME = [sys.executable, "-m", "workqueue_provider.worker.cli"]
CONSUME_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "provider"),
                                                                          os.environ.get("PYTHONPATH")]))}


def drain_bodies(url: str, queue: str) -> list[bytes]:
    """Take every ready message, in order."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=5000)
    bodies: list[bytes] = []
    for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=2):
        if method is None:
            break
        bodies.append(body)
    channel.cancel()
    connection.close()
    return bodies


def test_a_broker_restart_mid_fill_then_the_retry_leaves_one_message_per_item(private_broker, private_conn,
                                                                             monkeypatch):
    """The Airflow retry path: with ``outage_window=0`` the fill fails at once instead of riding the outage
    out (tests/reliability/test_broker_outage_airflow.py covers riding it out)."""
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_PRIVATE", json.dumps({
        "conn_type": "amqp", "host": "127.0.0.1", "port": private_broker.port, "login": private_broker.user,
        "password": private_broker.password, "extra": {"outage_window": 0}}))
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    items = [f"item-{i:06d}" for i in range(10_000)]
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id=private_conn).execute(task_context())
    # one message in flight at a time (~2,000/s): the broker is surely stopped in the middle of this attempt
    fill = FillQueueOperator(task_id="fill", queue_name=queue, items=items, window=1, amqp_conn_id=private_conn)
    outcome: dict[str, object] = {}

    def first_attempt():
        try:
            outcome["published"] = fill.execute(task_context(try_number=1))
        except BaseException as e:  # noqa: BLE001 - recorded and asserted below
            outcome["error"] = e

    thread = threading.Thread(target=first_attempt)
    thread.start()
    hook = AmqpHook(amqp_conn_id=private_conn)
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:  # stop the broker once the fill is under way
        try:
            if hook.queue_depth(queue).messages >= 200:
                break
        except BrokerError:
            pass
        time.sleep(0.05)
    depth_at_stop = hook.queue_depth(queue).messages
    private_broker.stop_app()
    thread.join(120)
    assert not thread.is_alive(), "the fill hung after the broker stopped"
    private_broker.start_app()

    error = outcome.get("error")
    assert isinstance(error, BrokerError), f"the fill should have been cut off: {outcome}"
    message = str(error)
    assert f"127.0.0.1:{private_broker.port}" in message and repr(queue) in message, message
    assert "items were confirmed before the failure" in message and "retrying the fill" in message, message
    left_by_first = hook.queue_depth(queue).messages
    print(f"\nbroker stopped at depth {depth_at_stop}; first attempt: {outcome.get('error') or outcome.get('published')}; "
          f"{left_by_first} messages survived the restart")
    assert 0 < left_by_first < len(items)

    retry = FillQueueOperator(task_id="fill", queue_name=queue, items=items, amqp_conn_id=private_conn)
    assert retry.execute(task_context(try_number=2)) == len(items)
    assert hook.queue_depth(queue).messages == len(items)
    bodies = drain_bodies(private_broker.url, queue)
    assert len(bodies) == len(items) and sorted(b.decode() for b in bodies) == items, "exactly one message per item"
    assert hook.queue_depth(queue).messages == 0
    hook.delete_queue(queue)


def consume(url: str, queue: str, script: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WORKQUEUE_CONSUME, "--url", url, "-q", queue, *extra, "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, env=CONSUME_ENV)


def test_an_item_running_past_the_consumer_timeout_is_not_completed_twice(private_broker, private_conn, tmp_path):
    queue = f"slow-{uuid.uuid4().hex[:8]}"
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id=private_conn).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue, items=["slow", "quick"],
                      amqp_conn_id=private_conn).execute(task_context())
    log = tmp_path / "work.log"
    seconds = CONSUMER_TIMEOUT_MS / 1000 * 6  # far past the timeout
    slow_worker = f'item=$(cat); echo "start $item" >> {log}; sleep {seconds}; echo "done $item" >> {log}'

    run = consume(private_broker.url, queue, slow_worker)
    assert run.returncode == EXIT_REQUEUED, run.stderr
    assert "consumer_timeout" in run.stderr and "406" in run.stderr and "not completed twice" in run.stderr, run.stderr
    assert log.read_text().splitlines() == ["start slow"], "the worker was stopped before it finished"
    hook = AmqpHook(amqp_conn_id=private_conn)
    assert hook.queue_depth(queue).messages == 2, "the broker requeued the slow item"

    fast_worker = f'item=$(cat); echo "start $item" >> {log}; echo "done $item" >> {log}'
    run = consume(private_broker.url, queue, fast_worker, "--drain")
    assert run.returncode == 0, run.stderr
    done = [line for line in log.read_text().splitlines() if line.startswith("done")]
    assert sorted(done) == ["done quick", "done slow"], "every item completed exactly once"
    assert hook.queue_depth(queue).messages == 0
    hook.delete_queue(queue)
