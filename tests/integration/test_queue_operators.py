"""DeclareQueueOperator and FillQueueOperator on the real broker."""

import pika
import pytest

from tests.conftest import task_context
from tests.reliability.private_broker import PrivateBroker, PrivateBrokerError
from workqueue_provider.exceptions import (
    ConfigurationError,
    ItemSourceError,
    PublishError,
    QueueMismatchError,
    QueueNotFoundError,
)
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.items import Spool
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = pytest.mark.integration


def drain(broker_url, queue):
    """Every body left in the queue, in order (acked)."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    bodies = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        bodies.append(body)
    connection.close()
    return bodies


def fill(queue, **kwargs):
    return FillQueueOperator(task_id="fill", queue_name=queue, **kwargs)


def test_declaring_twice_is_idempotent(amqp_conn, queue_name):
    declare = DeclareQueueOperator(task_id="declare", queue_name=queue_name, dead_letter_queue=f"{queue_name}.dead",
                                   delivery_limit=3)
    assert declare.execute(task_context()) == {"queue": queue_name, "messages": 0, "consumers": 0}
    fill(queue_name, items=["a", "b"]).execute(task_context())
    assert declare.execute(task_context())["messages"] == 2, "the second declare changes nothing"


def test_mismatched_arguments_name_every_difference_and_touch_nothing(amqp_conn, queue_name):
    DeclareQueueOperator(task_id="d", queue_name=queue_name, queue_type="classic", max_length=100).execute(task_context())
    fill(queue_name, items=["keep-me"]).execute(task_context())
    other = DeclareQueueOperator(task_id="d", queue_name=queue_name, queue_type="quorum", message_ttl_ms=5000)
    with pytest.raises(QueueMismatchError) as raised:
        other.execute(task_context())
    message = str(raised.value)
    assert queue_name in message
    # a max_length refuses new items when full (x-overflow), a TTL dead-letters into <queue>.dead
    assert set(raised.value.differences) == {"x-queue-type", "x-max-length", "x-overflow", "x-message-ttl",
                                             "x-dead-letter-exchange", "x-dead-letter-routing-key"}
    assert "x-queue-type: existing 'classic', requested 'quorum'" in message
    assert AmqpHook().queue_depth(queue_name).messages == 1


def test_ten_thousand_items_are_consumed_exactly_once_in_order(amqp_conn, broker_url, queue_name):
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    items = [f"item-{i:05d}" for i in range(10_000)]
    assert fill(queue_name, items=items).execute(task_context()) == 10_000
    assert [body.decode() for body in drain(broker_url, queue_name)] == items


@pytest.mark.parametrize("source", ["generator", "file", "json"])
def test_every_item_source(amqp_conn, broker_url, queue_name, tmp_path, source):
    DeclareQueueOperator(task_id="d", queue_name=queue_name, queue_type="classic").execute(task_context())
    if source == "generator":
        op = fill(queue_name, items=lambda: (f"g{i}" for i in range(5)))
        expected = [b"g0", b"g1", b"g2", b"g3", b"g4"]
    elif source == "file":
        path = tmp_path / "items.txt"
        path.write_text("apple\nbanana\ncherry\n")
        op = fill(queue_name, items_file=str(path))
        expected = [b"apple", b"banana", b"cherry"]
    else:
        op = fill(queue_name, items='[{"n": 1}, {"n": 2}]', encoding="json")
        expected = [b'{"n":1}', b'{"n":2}']
    assert op.execute(task_context()) == len(expected)
    assert drain(broker_url, queue_name) == expected


@pytest.fixture(scope="module")
def own_broker():
    """A private RabbitMQ node: closing all its connections cuts no other client of the shared broker."""
    broker = PrivateBroker()
    try:
        broker.start()
    except PrivateBrokerError as e:
        broker.stop()
        pytest.fail(f"the private RabbitMQ node could not start: {e}")
    yield broker
    broker.stop()


def test_fill_retry_after_half_failure_leaves_exactly_one_message_per_item(own_broker, queue_name, monkeypatch):
    # outage_window=0: the Airflow retry is what is tested here, not the fill riding the cut out by itself
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", own_broker.url + "?outage_window=0")
    broker_url = own_broker.url
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    items = [f"item-{i}" for i in range(20_000)]
    original = Spool.bodies

    def cut_half_way(self):
        for index, body in enumerate(original(self)):
            if index == len(items) // 2:  # the broker drops our connection half-way through the fill
                closed = own_broker.ctl("-q", "close_all_connections", "test: fault injection")
                assert closed.returncode == 0, closed.stderr
            yield body

    monkeypatch.setattr(Spool, "bodies", cut_half_way)
    with pytest.raises(PublishError) as raised:
        fill(queue_name, items=items, window=200).execute(task_context(try_number=1))
    assert raised.value.confirmed < len(items)
    left_behind = AmqpHook().queue_depth(queue_name).messages
    assert 0 < left_behind < len(items)

    monkeypatch.setattr(Spool, "bodies", original)
    assert fill(queue_name, items=items).execute(task_context(try_number=2)) == len(items)
    assert [body.decode() for body in drain(broker_url, queue_name)] == items


def test_foreign_messages_are_refused_or_purged_on_request(amqp_conn, broker_url, queue_name):
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    fill(queue_name, items=["other-run"]).execute(task_context(run_id="another-run"))
    with pytest.raises(ConfigurationError, match="already holds 1 messages that this fill did not publish"):
        fill(queue_name, items=["mine"]).execute(task_context())
    assert fill(queue_name, items=["mine"], on_existing_messages="purge").execute(task_context()) == 1
    assert drain(broker_url, queue_name) == [b"mine"]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        pytest.param({"items": []}, ItemSourceError, "no items to publish", id="empty"),
        pytest.param({"items": [{"a": 1}]}, ItemSourceError, "use encoding='json'", id="unencodable"),
        pytest.param({"items_file": "/no/such/file.txt"}, ItemSourceError, "can't be read", id="missing-file"),
        pytest.param({"items": ["x" * 100], "max_message_bytes": 10}, ItemSourceError, "message limit", id="too-big"),
        pytest.param({"items": ["a"], "encoding": "yaml"}, ConfigurationError, "Unknown encoding", id="encoding"),
        pytest.param({"items": ["a"], "window": 0}, ConfigurationError, "window=0", id="zero-window"),
        pytest.param({"items": ["a"], "on_existing_messages": "keep"}, ConfigurationError, "on_existing_messages", id="mode"),
        pytest.param({"items": "apple banana"}, ConfigurationError, "not a list", id="rendered-string"),
    ],
)
def test_bad_fill_input_publishes_nothing(amqp_conn, queue_name, kwargs, error, fragment):
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    with pytest.raises(error, match=fragment):
        fill(queue_name, **kwargs).execute(task_context())
    assert AmqpHook().queue_depth(queue_name).messages == 0


def test_fill_into_a_missing_queue_is_named(amqp_conn, queue_name):
    with pytest.raises(QueueNotFoundError, match=f"Queue '{queue_name}' does not exist"):
        fill(queue_name, items=["a"]).execute(task_context())


def test_fill_logs_progress_and_pushes_only_the_count(amqp_conn, queue_name, capfd):
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    # A window of 100 means at least 30 confirm frames, and progress_every=0 reports on each: not timing-dependent.
    op = fill(queue_name, items=lambda: (str(i) for i in range(3_000)), window=100, progress_every=0)
    assert op.execute(task_context()) == 3_000
    output = capfd.readouterr()
    progress = [line for line in (output.out + output.err).splitlines() if "/3000 items to" in line]
    assert len(progress) >= 2, "a progress line while publishing and one at the end"
    assert any(f"Published {n}/3000 items" in line for line in progress for n in range(1, 3000)), "a partial count"
    assert "Published 3000/3000 items" in progress[-1]


def test_delete_operator_reports_leftovers(amqp_conn, queue_name):
    DeclareQueueOperator(task_id="d", queue_name=queue_name).execute(task_context())
    fill(queue_name, items=["a", "b"]).execute(task_context())
    delete = DeleteQueueOperator(task_id="delete", queue_name=queue_name, keep_if_not_empty=False)
    assert delete.execute(task_context()) == 2
    assert delete.execute(task_context()) is None
