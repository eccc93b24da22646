"""workqueue-consume rides out a broker outage while it works: on a private node stopped and started
again (``stop_app``/``start_app``: connections dropped, durable queues and persistent messages kept)."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pika
import pytest

from tests.reliability.test_broker_faults import CONSUME_ENV, WORKQUEUE_CONSUME
from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.queues import QueueSpec, declare, fill_key
from workqueue_provider.worker.consume import EXIT_BROKER

pytestmark = [pytest.mark.integration]
ITEMS = [f"item-{i:02d}" for i in range(12)]


def fill(url: str, queue: str, items: list[str]) -> None:
    """A fill as FillQueueOperator leaves it: the items with their ids, and the ledger's fill record."""
    connection = open_connection(BrokerSettings.from_url(url))
    declare(connection, QueueSpec(queue))
    receipts.declare_receipts(connection, queue)
    receipts.reset(connection, queue)
    channel = connection.channel()
    channel.confirm_delivery()
    for index, item in enumerate(items):
        channel.basic_publish("", queue, item.encode(), pika.BasicProperties(
            delivery_mode=2, message_id=receipts.message_id_for(index), headers={receipts.FILL_HEADER: fill_key("outage")}))
    receipts.record_fill(connection, queue, "outage", len(items))
    connection.close()


def account(url: str, queue: str) -> receipts.Account:
    connection = open_connection(BrokerSettings.from_url(url))
    try:
        found = receipts.read_account(connection, queue)
    finally:
        connection.close()
    assert found is not None
    return found


def start_consumer(url: str, queue: str, out: Path, window: float) -> subprocess.Popen:
    """Each item is written to ``out``; from the third item on, the worker waits for ``out``.gate, so the
    outage surely hits while an item is held."""
    gate = f"{out}.gate"
    worker = (f"cat >> {out}; echo >> {out}; "
              f"if [ $(wc -l < {out}) -ge 3 ]; then while [ ! -e {gate} ]; do sleep 0.1; done; fi")
    return subprocess.Popen([*WORKQUEUE_CONSUME, "--url", url, "-q", queue, "--drain", "--outage-window", str(window),
                             "sh", "-c", worker], env=CONSUME_ENV, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().split()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the worker did not process {count} items in {timeout} s")


def outage(broker, seconds: float) -> threading.Thread:
    def run():
        broker.stop_app()
        time.sleep(seconds)
        broker.start_app()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_consumer_rides_out_an_outage_and_every_item_is_accounted_for(private_broker, tmp_path):
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "processed.txt"
    fill(private_broker.url, queue, ITEMS)
    consumer = start_consumer(private_broker.url, queue, out, window=120)
    wait_for_lines(out, 3)
    outage(private_broker, 8).join()
    Path(f"{out}.gate").touch()
    _, stderr = consumer.communicate(timeout=180)

    assert consumer.returncode == 0, stderr
    assert "Reconnected to the broker" in stderr and "unreachable (attempt" in stderr
    assert private_broker.password not in stderr
    assert set(out.read_text().split()) == set(ITEMS)  # the item held at the outage may show twice
    found = account(private_broker.url, queue)
    assert (found.filled, found.processed, found.left, found.lost, found.dead_lettered) == (12, 12, 0, 0, 0)
    assert found.duplicated <= 1


def test_an_outage_longer_than_the_window_exits_naming_the_broker_and_keeps_the_items(private_broker, tmp_path):
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "processed.txt"
    fill(private_broker.url, queue, ITEMS)
    consumer = start_consumer(private_broker.url, queue, out, window=4)
    wait_for_lines(out, 2)
    down = outage(private_broker, 20)
    _, stderr = consumer.communicate(timeout=120)
    down.join()

    assert consumer.returncode == EXIT_BROKER, stderr
    assert f"127.0.0.1:{private_broker.port} was unreachable" in stderr and "outage window (4 s" in stderr
    assert private_broker.password not in stderr
    found = account(private_broker.url, queue)
    assert found.lost == 0 and found.dead_lettered == 0
    assert found.processed + found.left == len(ITEMS) and found.left > 0
