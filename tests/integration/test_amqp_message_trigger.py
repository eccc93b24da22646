"""AmqpMessageTrigger against the real broker: one event per message, ack only after the event was
handed over, undecodable messages dead-lettered, reconnection after the broker goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pika
import pytest

from tests.unit.test_amqp_message_trigger import assert_plain_json
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.queues import QueueSpec, declare, depth
from workqueue_provider.triggers.amqp_message import AmqpMessageTrigger

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
WAIT = 60  # a hang guard, not a speed check


@pytest.fixture
def batches(broker_url, queue_name):
    """``queue_name`` declared as a quorum queue dead-lettering to ``queue_name.dead``."""
    connection = open_connection(BrokerSettings.from_url(broker_url))
    declare(connection, QueueSpec(f"{queue_name}.dead"))
    declare(connection, QueueSpec(queue_name, dead_letter_exchange="", dead_letter_routing_key=f"{queue_name}.dead"))
    connection.close()
    return queue_name


def publish(broker_url: str, queue: str, body: bytes, **properties) -> None:
    connection = open_connection(BrokerSettings.from_url(broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, **properties), mandatory=True)
    connection.close()


def counts(broker_url: str, queue: str) -> int:
    connection = open_connection(BrokerSettings.from_url(broker_url))
    try:
        return depth(connection, queue).messages
    finally:
        connection.close()


def logged(caplog, capsys) -> list[str]:
    """The trigger's log lines, wherever Airflow's logging sends them (stdlib at 3.1, structlog to stdout at 3.3)."""
    captured = capsys.readouterr()
    return [r.getMessage() for r in caplog.records] + (captured.out + captured.err).splitlines()


async def next_event(events: AsyncIterator) -> dict:
    return (await asyncio.wait_for(events.__anext__(), WAIT)).payload


async def until(probe, what: str) -> None:
    for _ in range(WAIT * 10):
        if await asyncio.to_thread(probe):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_message_becomes_one_event_with_its_body_and_properties(amqp_conn, batches, broker_url):
    publish(broker_url, batches, json.dumps(["a", "b"]).encode(), content_type="application/json", message_id="m-1",
            headers={"source": b"test"})
    publish(broker_url, batches, b"plain words", content_type="text/plain")

    async def scenario():
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=0).run()
        first, second = await next_event(events), await next_event(events)
        await asyncio.sleep(0.5)  # the acks (ack_delay=0) go out
        await events.aclose()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == {"status": "message", "queue": batches, "body": ["a", "b"], "redelivered": False,
                     "properties": {"content_type": "application/json", "message_id": "m-1",
                                    "headers": {"source": "test"}, "delivery_mode": 2}}
    assert second["body"] == "plain words"
    # The first was acknowledged once the trigger resumed after its yield; the second never was
    # (the trigger was closed at its yield), so the broker has it again.
    assert counts(broker_url, batches) == 1


def test_a_message_is_not_acknowledged_before_its_event_was_handed_over(amqp_conn, batches, broker_url):
    """The trigger stops (a triggerer killed) while Airflow holds the event but before the ``yield``
    returned, and again inside the ack delay: the message is delivered again, marked redelivered."""
    publish(broker_url, batches, b'["x"]')

    async def scenario():
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=0).run()
        assert (await next_event(events))["redelivered"] is False
        await events.aclose()  # stopped at the yield: never resumed
        await until(lambda: counts(broker_url, batches) == 1, "the message back in the queue")
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=30).run()
        again = await next_event(events)
        # Resume past the yield (the event is handed over), then stop within the 30 s ack delay.
        pending = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.5)
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await pending
        await events.aclose()
        return again

    again = asyncio.run(scenario())
    assert again["body"] == ["x"] and again["redelivered"] is True
    assert again["properties"]["headers"] == {"x-delivery-count": 1}  # the quorum queue's count, a pika long
    assert_plain_json(again)  # what Airflow's event encoder accepts
    assert counts(broker_url, batches) == 1, "not acknowledged within the ack delay: the broker still has it"


@pytest.mark.parametrize(("body", "properties", "reason"), [
    pytest.param(b"{not json", {"content_type": "application/json"}, "not valid JSON", id="bad-json"),
    pytest.param(b"\xff\xfe\x00", {}, "not valid utf-8", id="bad-charset"),
    pytest.param(b"\x89PNG", {"content_type": "image/png"}, "neither JSON nor text", id="binary"),
])
def test_an_undecodable_message_is_dead_lettered_with_a_clear_log_line(amqp_conn, batches, broker_url, caplog,
                                                                        capsys, body, properties, reason):
    publish(broker_url, batches, body, message_id="bad-1", **properties)
    publish(broker_url, batches, b'["after"]')

    async def scenario():
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=0).run()
        event = await next_event(events)  # the bad one yields nothing: the next event is the good one
        await asyncio.sleep(0.5)
        await events.aclose()
        return event

    with caplog.at_level(logging.ERROR):
        event = asyncio.run(scenario())
    assert event["body"] == ["after"]
    assert counts(broker_url, f"{batches}.dead") == 1, "the bad message was dead-lettered"
    line = next(line for line in logged(caplog, capsys) if "Rejected a message" in line)
    assert f"queue {batches!r}" in line and "message_id bad-1" in line and reason in line and "dead-letter" in line


def test_a_json_only_trigger_rejects_text(amqp_conn, batches, broker_url):
    publish(broker_url, batches, b"hello")
    publish(broker_url, batches, b'{"items": [1]}')

    async def scenario():
        events = AmqpMessageTrigger(queue_name=batches, body_format="json", ack_delay=0).run()
        event = await next_event(events)
        await events.aclose()
        return event

    assert asyncio.run(scenario())["body"] == {"items": [1]}
    assert counts(broker_url, f"{batches}.dead") == 1


class CuttableProxy:
    """A TCP proxy to the broker whose connections the test can cut, as a broker restart or a network
    failure would."""

    def __init__(self, target: BrokerSettings) -> None:
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(self.target.host, self.target.effective_port)
        self.writers += [writer, upstream_writer]

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


def test_the_trigger_reconnects_after_the_connection_is_lost(batches, broker_url, monkeypatch, caplog, capsys):
    publish(broker_url, batches, b'["one"]')

    async def scenario():
        proxy = CuttableProxy(BrokerSettings.from_url(broker_url))
        port = await proxy.start()
        monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", f"amqp://guest:guest@127.0.0.1:{port}/")
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=60, max_reconnect_wait=1).run()
        first = await next_event(events)
        proxy.cut()  # before the ack: the message must come back
        again = await next_event(events)
        await asyncio.sleep(0.2)
        await events.aclose()
        proxy.server.close()
        return first, again, proxy.connections

    with caplog.at_level(logging.WARNING):
        first, again, connections = asyncio.run(scenario())
    assert first["body"] == again["body"] == ["one"]
    assert again["redelivered"] is True and connections >= 2
    lines = logged(caplog, capsys)
    assert any("Reconnecting" in line for line in lines), lines
    assert not any("guest:guest" in line for line in lines)


def test_a_missing_queue_is_retried_with_backoff_until_it_exists(amqp_conn, broker_url, queue_name, caplog, capsys):
    async def scenario():
        events = AmqpMessageTrigger(queue_name=queue_name, ack_delay=0, max_reconnect_wait=1).run()
        pending = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(2)
        assert not pending.done()
        connection = await asyncio.to_thread(open_connection, BrokerSettings.from_url(broker_url))
        await asyncio.to_thread(declare, connection, QueueSpec(queue_name, dead_letter_exchange=""))
        await asyncio.to_thread(connection.close)
        await asyncio.to_thread(publish, broker_url, queue_name, b'["late"]')
        event = (await asyncio.wait_for(pending, WAIT)).payload
        await events.aclose()
        return event

    with caplog.at_level(logging.WARNING):
        event = asyncio.run(scenario())
    assert event["body"] == ["late"]
    retries = [line for line in logged(caplog, capsys) if "Can't consume queue" in line]
    assert retries and "does not exist" in retries[0] and "declare it first" in retries[0]


def test_the_trigger_takes_the_next_node_of_a_cluster_when_the_first_refuses(batches, broker_url, monkeypatch):
    broker = BrokerSettings.from_url(broker_url)
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", json.dumps({
        "conn_type": "amqp", "host": f"127.0.0.1:1,{broker.host}:{broker.effective_port}", "login": broker.login,
        "password": broker.password, "extra": {"connection_attempts": 1}}))
    publish(broker_url, batches, b'["via the second node"]')

    async def scenario():
        events = AmqpMessageTrigger(queue_name=batches, ack_delay=0).run()
        event = await next_event(events)
        await events.aclose()
        return event

    assert asyncio.run(scenario())["body"] == ["via the second node"]
