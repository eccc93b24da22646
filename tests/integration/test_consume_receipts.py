"""workqueue-consume's part of the item account: a receipt per processed item, an item whose command
finishes after SIGTERM is acked (not processed twice), and --dead-letter is refused where it would drop items."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.test_consume import CONSUME, FAIL, WORKER, depth, prepare, run_consume
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.worker.consume import EXIT_CONFIG

pytestmark = pytest.mark.integration


def account(queue):
    found = AmqpHook().item_account(queue)
    assert found is not None, "the fill left no ledger"
    return found


def test_each_processed_item_leaves_one_receipt(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["apple", "banana", "cherry"])
    result = run_consume(broker_url, queue_name, "--drain", *WORKER)
    assert result.returncode == 0, result.stderr
    found = account(queue_name)
    assert (found.filled, found.processed, found.duplicated, found.left, found.lost) == (3, 3, 0, 0, 0)
    assert found.consumers == 1 and found.kept


def test_an_item_finished_after_sigterm_is_acked_once(amqp_conn, broker_url, queue_name, tmp_path):
    """Deleting a Job (or its deadline, or a preemption) SIGTERMs the pods: a command that still finishes
    its item and exits 0 must have it acked, or the item would be processed again."""
    prepare(queue_name, ["slow", "next"])
    started, done = tmp_path / "started", tmp_path / "done"
    worker = (f'trap "finishing=1" TERM; cat > {started}; '
              f'while [ ! -e {done}.go ]; do sleep 0.1; done; echo finished > {done}; exit 0')
    process = subprocess.Popen([CONSUME, "--drain", "sh", "-c", worker],
                               env={**os.environ, "BROKER_URL": broker_url, "QUEUE": queue_name},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the worker command never started"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    (tmp_path / "done.go").touch()  # the command finishes its item after the signal, and exits 0
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "finished and was acked" in err
    found = account(queue_name)
    assert (found.processed, found.left, found.lost) == (1, 1, 0)  # "slow" acked; "next" never taken
    assert depth(queue_name) == 1


def test_dead_letter_on_a_queue_without_a_dead_letter_exchange_is_refused(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["poison"], queue_type="classic")
    result = run_consume(broker_url, queue_name, "--dead-letter", *FAIL)
    assert result.returncode == EXIT_CONFIG
    assert "has no dead-letter exchange" in result.stderr and "DeclareQueueOperator(dead_letter_queue=" in result.stderr
    assert depth(queue_name) == 1  # nothing taken, nothing dropped


@pytest.mark.parametrize("per_channel", [None, 700], ids=["one-channel", "four-channels"])
def test_a_ledger_of_thousands_of_receipts_is_read_whole_and_left_in_place(amqp_conn, broker_url, queue_name,
                                                                          monkeypatch, per_channel):
    """More receipts than RabbitMQ 4 lets a prefetch-0 consumer hold (2,000); with ``per_channel``, more than
    one channel may hold (65,535 in production: a ledger of 10 million is read on 153). Reading twice
    gives the same account (nothing consumed)."""
    import pika

    from workqueue_provider.amqp import receipts
    from workqueue_provider.amqp.queues import fill_key

    if per_channel:
        monkeypatch.setattr(receipts, "MAX_UNACKED", per_channel)

    count = 2500
    prepare(queue_name, ["x"])
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    fill_id = account(queue_name).fill_id
    for index in range(count):
        receipts.record_processed(channel, queue_name, pika.BasicProperties(
            message_id=str(index % 2000), headers={receipts.FILL_HEADER: fill_key(fill_id)}))
    connection.close()
    for _ in range(2):
        found = account(queue_name)
        assert (found.processed, found.duplicated) == (2000, 500)
