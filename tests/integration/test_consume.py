"""workqueue-consume on a real queue, and the seed's amqp-consume beside it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from tests.conftest import REPO, task_context
from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.amqp.consumer import QueueConsumer
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.worker.consume import MAX_PREFETCH, PREFETCH

pytestmark = pytest.mark.integration
CONSUME = str(Path(sys.executable).parent / "workqueue-consume")
WORKER = [sys.executable, str(REPO / "worker/worker.py")]
FAIL = ["sh", "-c", "cat >/dev/null; exit 3"]


def prepare(queue, items, **declare):
    DeclareQueueOperator(task_id="d", queue_name=queue, **declare).execute(task_context())
    FillQueueOperator(task_id="f", queue_name=queue, items=items, allow_empty=True).execute(task_context())


def run_consume(broker_url, queue, *args, **env):
    return subprocess.run([CONSUME, *args], env={**os.environ, "BROKER_URL": broker_url, "QUEUE": queue, **env},
                          capture_output=True, text=True, timeout=120)


def depth(queue):
    return AmqpHook().queue_depth(queue).messages


def test_success_acks_one_item_and_prints_it(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["apple", "banana", "cherry"])
    result = run_consume(broker_url, queue_name, *WORKER)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Processing apple\n"
    assert depth(queue_name) == 2


def test_failure_requeues_the_item_and_exits_non_zero(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["poison"])
    result = run_consume(broker_url, queue_name, *FAIL)
    assert result.returncode == 3
    assert "requeued" in result.stderr
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    method, _props, body = connection.channel().basic_get(queue_name, auto_ack=True)
    connection.close()
    assert body == b"poison" and method.redelivered


def test_failure_with_dead_letter_moves_the_item(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["poison", "fine"], queue_type="classic", dead_letter_queue=f"{queue_name}.dead")
    result = run_consume(broker_url, queue_name, "--dead-letter", *FAIL)
    assert result.returncode == 3 and "dead-lettered" in result.stderr
    assert depth(queue_name) == 1
    assert depth(f"{queue_name}.dead") == 1


def test_quorum_delivery_limit_dead_letters_a_poison_item(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["poison"], delivery_limit=2, dead_letter_queue=f"{queue_name}.dead")
    codes = [run_consume(broker_url, queue_name, *FAIL).returncode for _ in range(4)]
    assert codes[:3] == [3, 3, 3], "each attempt fails visibly"
    assert codes[3] == 0, "after the limit the item is gone from the work queue"
    assert depth(queue_name) == 0
    assert depth(f"{queue_name}.dead") == 1


def test_empty_queue_exits_zero_without_waiting(amqp_conn, broker_url, queue_name):
    prepare(queue_name, [])
    result = run_consume(broker_url, queue_name, *WORKER)
    assert result.returncode == 0
    assert result.stdout == "" and "is empty" in result.stderr


def test_drain_takes_every_item_in_one_process(amqp_conn, broker_url, queue_name):
    items = [f"item-{i}" for i in range(25)]
    prepare(queue_name, items)
    result = run_consume(broker_url, queue_name, "--drain", *WORKER)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"Processing {item}" for item in items]
    assert depth(queue_name) == 0


def test_max_items_from_the_environment(amqp_conn, broker_url, queue_name):
    prepare(queue_name, [str(i) for i in range(10)])
    result = run_consume(broker_url, queue_name, *WORKER, WORKQUEUE_MAX_ITEMS="4")
    assert len(result.stdout.splitlines()) == 4
    assert depth(queue_name) == 6


def test_missing_queue_fails_clearly(broker_url, queue_name):
    result = run_consume(broker_url, queue_name, *WORKER)
    assert result.returncode == 69
    assert "404" in result.stderr and queue_name in result.stderr


def test_sigterm_while_working_puts_the_item_back(amqp_conn, broker_url, queue_name, tmp_path):
    prepare(queue_name, ["slow"])
    started = tmp_path / "worker-started"  # the worker command writes the item it got here, then works
    process = subprocess.Popen([CONSUME, "sh", "-c", 'cat > "$MARKER.tmp" && mv "$MARKER.tmp" "$MARKER"; exec sleep 30'],
                               env={**os.environ, "BROKER_URL": broker_url, "QUEUE": queue_name,
                                    "MARKER": str(started)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), f"the worker command never started (consume exit {process.poll()})"
    assert started.read_text() == "slow"
    assert depth(queue_name) == 0, "the item is taken while the worker works"
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "goes back to the queue" in err
    deadline = time.monotonic() + 30
    while depth(queue_name) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert depth(queue_name) == 1


def test_seed_amqp_consume_exits_zero_when_the_worker_fails(amqp_conn, broker_url, queue_name):
    """The flaw workqueue-consume fixes (REFERENCE section 2): the pod would succeed, the item stays."""
    prepare(queue_name, ["poison"], queue_type="classic")
    url = BrokerSettings.from_url(broker_url).url()  # amqp-tools reads a bare trailing '/' as vhost ''
    result = subprocess.run(["amqp-consume", f"--url={url}", "-q", queue_name, "-c", "1", "--", *FAIL],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    time.sleep(0.5)
    assert depth(queue_name) == 1


def test_max_items_never_hands_back_an_item_it_did_not_take(amqp_conn, broker_url, queue_name):
    """-c N with a prefetch above 1: the broker never sends more than N items, so none comes back
    redelivered (a quorum queue would count it against the item's delivery limit)."""
    prepare(queue_name, [str(i) for i in range(10)])
    result = run_consume(broker_url, queue_name, "-c", "4", *WORKER)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 4
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    left = [channel.basic_get(queue_name, auto_ack=True) for _ in range(6)]
    connection.close()
    assert [body for _m, _p, body in left] == [str(i).encode() for i in range(4, 10)]
    assert not any(method.redelivered for method, _p, _b in left)


def _consumer(broker_url, queue_name):
    """A consumer as ``workqueue-consume`` builds it: a window of 2, widened up to 32, receipts batched."""
    return QueueConsumer(BrokerSettings.from_url(broker_url), queue_name, prefetch=MAX_PREFETCH,
                         initial_prefetch=PREFETCH, batch_receipts=True)


def test_items_shorter_than_the_round_trip_share_receipts(amqp_conn, broker_url, queue_name):
    """Items finished faster than a receipt is confirmed widen the window, and the items finished
    meanwhile share one receipt (and one ack): fewer ledger records than items, every item accounted."""
    prepare(queue_name, [str(i) for i in range(300)])
    consumer = _consumer(broker_url, queue_name)
    consumer.connect(keep_receipts=True)
    try:
        while (delivery := consumer.take(0) or consumer.take(0.05)) is not None:
            consumer.service()  # as workqueue-consume does once the item's command has started
            consumer.finish(delivery)  # no work: the broker's round trip is the whole cost of an item
        consumer.flush()
    finally:
        consumer.close()
    found = AmqpHook().item_account(queue_name)
    assert found is not None and (found.processed, found.duplicated, found.left, found.lost) == (300, 0, 0, 0)
    records = AmqpHook().queue_depth(f"{queue_name}.receipts").messages
    assert records < 150, f"{records} ledger records for 300 items: receipts were not shared"


def test_an_item_that_takes_long_is_acked_while_the_next_one_runs(amqp_conn, broker_url, queue_name, monkeypatch):
    """With a window of 2 (items that take long) a finished item's receipt goes out at once, when the next
    item starts: it is acked while the next one runs, not held back for others to share its receipt."""
    from workqueue_provider.amqp import settling

    monkeypatch.setattr(settling, "RECEIPT_DELAY", 3600.0)  # only "half the window is finished" sends it
    prepare(queue_name, ["first", "second", "third"])
    consumer = _consumer(broker_url, queue_name)
    consumer.connect(keep_receipts=True)
    try:
        first = consumer.take(5)
        assert first is not None and first.body == b"first"
        consumer.finish(first)
        second = consumer.take(0)
        assert second is not None and second.body == b"second"
        consumer.service()  # the second item's command has started
        deadline = time.monotonic() + 10
        while consumer.acked == 0 and time.monotonic() < deadline:
            consumer.pump(0)
        assert consumer.acked == 1, "the first item's receipt was held back while the second ran"
        consumer.finish(second)
        consumer.flush()
    finally:
        consumer.close()
    found = AmqpHook().item_account(queue_name)
    assert found is not None and (found.processed, found.left, found.lost) == (2, 1, 0)


def test_max_items_holds_when_the_window_widens_for_short_items(amqp_conn, broker_url, queue_name):
    """Items finished faster than their receipts are confirmed widen the window (up to the prefetch), with
    -c N too; the broker still sends no more than N items, so none of the rest comes back redelivered."""
    prepare(queue_name, [str(i) for i in range(200)])
    consumer = QueueConsumer(BrokerSettings.from_url(broker_url), queue_name, prefetch=16, max_items=150,
                             initial_prefetch=2)
    consumer.connect(keep_receipts=True)
    widest = 0
    try:
        while not consumer.exhausted and (delivery := consumer.take(5)) is not None:
            consumer.finish(delivery)  # no work: the receipt's confirm is the whole cost of an item
            widest = max(widest, consumer.window)
        consumer.flush()
    finally:
        consumer.close()
    assert consumer.acked == 150
    assert widest > 2, "the window never widened: this test proves nothing"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    left = [channel.basic_get(queue_name, auto_ack=True) for _ in range(50)]
    assert channel.queue_declare(queue_name, passive=True).method.message_count == 0
    connection.close()
    assert [body for _m, _p, body in left] == [str(i).encode() for i in range(150, 200)]
    assert not any(method.redelivered for method, _p, _b in left)
