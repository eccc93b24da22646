"""The fill side of the item account, exact fill retries that never touch other producers' messages,
and a teardown that deletes nothing unprocessed: FillQueueOperator and DeleteQueueOperator on the
real broker (issue 10 sections 1, 4 and 7; issue 16 item 4)."""

from __future__ import annotations

import pika
import pytest

from tests.conftest import rabbitmqctl, task_context
from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.queues import FILL_HEADER, fill_key
from workqueue_provider.exceptions import ConfigurationError, PublishError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.items import Spool
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(amqp_conn, broker_url, queue_name):
    """A declared quorum work queue; its receipts queue is deleted afterwards too."""
    DeclareQueueOperator(task_id="declare", queue_name=queue_name).execute(task_context())
    yield queue_name
    AmqpHook().delete_queue(receipts.receipts_queue(queue_name))


@pytest.fixture
def no_outage_window(broker_url, monkeypatch):
    """The connection fails at the first broker error (outage_window=0): an Airflow retry's path."""
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", f"{broker_url}?outage_window=0")


def channel_on(broker_url):
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    return connection, connection.channel()


def take_all(broker_url, queue) -> list[tuple[bytes, pika.BasicProperties, bool]]:
    """Every message in the queue as (body, properties, redelivered), acked."""
    connection, channel = channel_on(broker_url)
    expected = channel.queue_declare(queue, passive=True).method.message_count
    channel.basic_qos(prefetch_count=1000)
    taken = []
    for method, properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=3):
        if method is None:
            break
        taken.append((body, properties, method.redelivered))
        if len(taken) == expected:
            break
    connection.close()
    assert len(taken) == expected, f"{queue} held {expected} messages, {len(taken)} were taken"
    return taken


def publish_foreign(broker_url, queue, body=b"someone else's item"):
    connection, channel = channel_on(broker_url)
    channel.confirm_delivery()
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, headers={"producer": "other"}))
    connection.close()


def account(queue):
    with AmqpHook().connection() as connection:
        return receipts.read_account(connection, queue)


def cut_after(monkeypatch, count, times=1):
    """The broker drops the fill's connection after ``count`` bodies, on the first ``times`` passes."""
    original = Spool.bodies
    passes = []

    def bodies(self):
        passes.append(1)
        for index, body in enumerate(original(self)):
            if index == count and len(passes) <= times:
                rabbitmqctl("close_all_connections", "test: fault injection")
            yield body

    monkeypatch.setattr(Spool, "bodies", bodies)
    return passes


# -- A: every message names its item; the ledger records the fill ----------------------------------
def test_every_message_carries_its_index_and_the_fill_id_and_the_ledger_adds_up(broker_url, queue):
    items = [f"item-{i}" for i in range(5)]
    assert FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context()) == 5

    found = account(queue)
    assert found is not None and (found.fill_id, found.filled, found.left, found.lost) == ("dag/task/manual__1", 5, 5, 0)
    taken = take_all(broker_url, queue)
    assert [body.decode() for body, _, _ in taken] == items
    assert [props.message_id for _, props, _ in taken] == [receipts.message_id_for(i) for i in range(5)]
    assert {props.headers[FILL_HEADER] for _, props, _ in taken} == {fill_key("dag/task/manual__1")}


def test_a_new_fill_starts_a_new_ledger(broker_url, queue):
    FillQueueOperator(task_id="fill", queue_name=queue, items=["a", "b", "c"]).execute(task_context(run_id="run-1"))
    take_all(broker_url, queue)  # the first run's items were taken
    FillQueueOperator(task_id="fill", queue_name=queue, items=["d"]).execute(task_context(run_id="run-2"))
    found = account(queue)
    assert found is not None and (found.fill_id, found.filled, found.left, found.lost) == ("dag/task/run-2", 1, 1, 0)
    assert AmqpHook().queue_depth(receipts.receipts_queue(queue)).messages == 2, "run-2's start and fill records only"


def queue_type_of(name) -> str:
    """The queue's type as the broker lists it ('quorum', 'classic')."""
    listed = rabbitmqctl("list_queues", "name", "type", "--no-table-headers", capture=True)
    types = dict(line.split("\t")[:2] for line in listed.splitlines() if "\t" in line)
    return types[name]


def test_the_ledger_is_a_quorum_queue_and_a_classic_one_from_an_earlier_version_is_replaced(broker_url, queue):
    """Replicated, so a node lost or cut off takes no receipt with it (issue 14); reads hand every record
    back, so the 4.x default delivery limit (20) must not apply: read it more than 20 times."""
    ledger = receipts.receipts_queue(queue)
    connection, channel = channel_on(broker_url)
    channel.queue_declare(ledger, durable=True, arguments={"x-queue-type": "classic"})
    channel.basic_publish("", ledger, b"", pika.BasicProperties(headers={receipts.RECORD_HEADER: "fill"}))
    connection.close()

    FillQueueOperator(task_id="fill", queue_name=queue, items=["a", "b", "c"]).execute(task_context())
    assert queue_type_of(ledger) == "quorum"
    for _ in range(25):
        found = account(queue)
    assert found is not None and (found.fill_id, found.filled, found.left, found.lost) == ("dag/task/manual__1", 3, 3, 0)
    assert AmqpHook().queue_depth(ledger).messages == 2, "the start and fill records, each read 25 times, all kept"


# -- C: a retry purges only when every message is its own, and never peeks ---------------------------
def test_a_retry_after_a_lost_connection_is_exact_within_the_same_attempt(broker_url, queue, monkeypatch, capfd):
    items = [f"item-{i:05d}" for i in range(5000)]
    passes = cut_after(monkeypatch, 2500)
    fill = FillQueueOperator(task_id="fill", queue_name=queue, items=items, window=100)
    assert fill.execute(task_context()) == len(items)
    assert len(passes) == 2, "the fill retried itself once after the lost connection"
    output = capfd.readouterr()
    assert "Retry: purged the" in output.out + output.err
    assert [body.decode() for body, _, _ in take_all(broker_url, queue)] == items, "exactly one message per item"


def test_an_airflow_retry_purges_its_own_messages_only_when_all_are_its_own(broker_url, queue, monkeypatch,
                                                                             no_outage_window):
    items = [f"item-{i:05d}" for i in range(5000)]
    cut_after(monkeypatch, 2500)
    with pytest.raises(PublishError):
        FillQueueOperator(task_id="fill", queue_name=queue, items=items, window=100).execute(task_context(try_number=1))
    left_behind = AmqpHook().queue_depth(queue).messages
    assert 0 < left_behind < len(items)

    publish_foreign(broker_url, queue)  # someone else's message behind the first attempt's
    with pytest.raises(ConfigurationError, match="other producers published to it too, so it is not purged"):
        FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context(try_number=2))
    taken = take_all(broker_url, queue)
    assert len(taken) == left_behind + 1, "nothing was purged"
    foreign = [(props, redelivered) for body, props, redelivered in taken if body == b"someone else's item"]
    assert len(foreign) == 1
    props, redelivered = foreign[0]
    assert not redelivered and (props.headers or {}).get("x-delivery-count", 0) == 0, "the foreign message was never delivered"


def test_a_foreign_message_at_the_head_is_never_delivered_by_the_fill(broker_url, queue):
    publish_foreign(broker_url, queue)
    with pytest.raises(ConfigurationError, match="already holds 1 messages that this fill did not publish"):
        FillQueueOperator(task_id="fill", queue_name=queue, items=["mine"]).execute(task_context())
    [(body, props, redelivered)] = take_all(broker_url, queue)
    assert body == b"someone else's item"
    assert not redelivered and (props.headers or {}).get("x-delivery-count", 0) == 0, "peeked at: delivered and requeued"


def test_a_retry_of_a_finished_fill_purges_what_is_left_of_it(broker_url, queue):
    items = ["a", "b", "c", "d"]
    FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context(try_number=1))
    assert FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context(try_number=2)) == 4
    assert [body for body, _, _ in take_all(broker_url, queue)] == [b"a", b"b", b"c", b"d"]


# -- G and E: the teardown deletes nothing unprocessed unless told ------------------------------------
def test_the_teardown_keeps_a_queue_with_items_left_and_says_how_to_finish_them(broker_url, queue, capfd):
    FillQueueOperator(task_id="fill", queue_name=queue, items=["a", "b"]).execute(task_context())
    assert DeleteQueueOperator(task_id="delete", queue_name=queue).execute(task_context()) == 2
    output = capfd.readouterr()
    assert f"Kept queue '{queue}': it still holds 2 items" in output.out + output.err
    assert "clear this run" in output.out + output.err and "a new Job takes only what is left" in output.out + output.err
    hook = AmqpHook()
    assert hook.queue_depth(queue).messages == 2
    assert account(queue) is not None, "the ledger is kept with its queue"

    assert DeleteQueueOperator(task_id="delete", queue_name=queue, keep_if_not_empty=False).execute(task_context()) == 2
    assert hook.delete_queue(queue) is None and hook.delete_queue(receipts.receipts_queue(queue)) is None


def test_the_teardown_deletes_an_emptied_queue_its_ledger_and_on_request_its_dead_letter_queue(broker_url, queue_name,
                                                                                                amqp_conn):
    dead = f"{queue_name}.dead"
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, delivery_limit=2).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["a"]).execute(task_context())
    take_all(broker_url, queue_name)
    publish_foreign(broker_url, dead, b"a dead letter")
    delete = DeleteQueueOperator(task_id="delete", queue_name="{{ params.q }}", dead_letter_queue="{{ params.q }}.dead")
    assert set(DeleteQueueOperator.template_fields) >= {"queue_name", "dead_letter_queue"}
    delete.queue_name, delete.dead_letter_queue = queue_name, dead  # as rendered
    assert delete.execute(task_context()) == 0
    hook = AmqpHook()
    assert hook.delete_queue(queue_name) is None and hook.delete_queue(receipts.receipts_queue(queue_name)) is None
    assert hook.queue_depth(dead).messages == 1, "a dead-letter queue holding dead letters is kept too"

    DeleteQueueOperator(task_id="delete", queue_name=queue_name, dead_letter_queue=dead,
                        keep_if_not_empty=False).execute(task_context())
    assert hook.delete_queue(dead) is None
