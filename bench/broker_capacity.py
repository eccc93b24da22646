"""Broker capacity for docs/scaling.md: memory per queued message, and one quorum queue's publish and
consume throughput on one node and on a three-node cluster.

    PYTHONPATH=. python bench/broker_capacity.py              # 200,000 messages (~5 minutes)
    PYTHONPATH=. python bench/broker_capacity.py --quick      # 20,000 (a smoke run, not the figures)

Private nodes (tests/reliability/private_broker.py and broker_cluster.py): RabbitMQ 3.10 from the host,
or 4.0 with WORKQUEUE_TEST_RABBITMQ_ROOT/PATH as in ``make test-rabbitmq4``. All nodes share this
machine's cores, so the three-node figures are a floor (each node on its own machine does better).

- publish: the provider's publisher (AmqpHook.publish: persistent messages, pipelined confirms, window
  10,000) with the message ids and fill header FillQueueOperator sends; bodies like a short item.
- consume: one consumer, prefetch 100, one ack per message (the workers ack one by one; their receipt
  publish and the command run per item are not included: this is the broker's side).
- memory: the node's memory (``rabbitmqctl status``: total allocated by the Erlang VM) with the queue
  empty and holding N messages, after the node settles; per message = the difference / N. Classic and
  quorum queues.

Writes bench/results/broker_capacity-<major.minor>.json (3.10 or 4.0). Only a broker's own behaviour is measured; no targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from tests.reliability.broker_cluster import BrokerCluster
from tests.reliability.private_broker import PrivateBroker
from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.connection import BrokerSettings, open_connection, server_properties
from workqueue_provider.amqp.publisher import publish
from workqueue_provider.amqp.queues import FILL_HEADER, QueueSpec, declare, delete, depth

RESULTS = Path(__file__).parent / "results"  # broker_capacity-<RabbitMQ major.minor>.json


def body(index: int) -> bytes:
    return json.dumps(f"item-{index:08d}").encode()  # ~16 bytes, as FillQueueOperator encodes a short string


def fill(url: str, queue: str, count: int) -> float:
    """Messages per second published and confirmed."""
    result = publish(BrokerSettings.from_url(url), queue, (body(i) for i in range(count)), total=count,
                     headers={FILL_HEADER: "benchfill000"}, message_ids=receipts.message_id_for)
    return result.rate


def drain(url: str, queue: str, count: int) -> float:
    """Messages per second consumed and acked one by one, prefetch 100."""
    connection = open_connection(BrokerSettings.from_url(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    started, done = time.monotonic(), 0
    for method, _properties, _body in channel.consume(queue, inactivity_timeout=30):
        if method is None:
            raise RuntimeError(f"consuming {queue!r} stalled after {done} of {count}")
        channel.basic_ack(method.delivery_tag)
        done += 1
        if done == count:
            break
    seconds = time.monotonic() - started
    channel.cancel()
    connection.close()
    return done / seconds


def node_memory(node: PrivateBroker) -> int:
    """Bytes the node's Erlang VM has allocated (settled: read until two readings 2 s apart agree within 1%)."""
    def read() -> int:
        status = json.loads(node.ctl("status", "--formatter", "json").stdout)
        total = status["memory"]["total"]
        return int(total.get("allocated") or total.get("erlang") or total.get("rss"))
    last = read()
    for _ in range(10):
        time.sleep(2)
        now = read()
        if abs(now - last) < 0.01 * last:
            return now
        last = now
    return last


def with_queue(url: str, queue_type: str, run: Any) -> Any:
    name = f"bench-{queue_type}-{time.monotonic_ns()}"
    connection = open_connection(BrokerSettings.from_url(url))
    declare(connection, QueueSpec(name, queue_type=queue_type))  # type: ignore[arg-type]
    connection.close()
    try:
        return run(name)
    finally:
        connection = open_connection(BrokerSettings.from_url(url))
        delete(connection, name)
        connection.close()


def throughput(url: str, count: int) -> dict[str, float]:
    def run(name: str) -> dict[str, float]:
        published = fill(url, name, count)
        consumed = drain(url, name, count)
        return {"publish_per_s": round(published), "consume_per_s": round(consumed)}
    return with_queue(url, "quorum", run)


def memory(node: PrivateBroker, count: int) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for queue_type in ("classic", "quorum"):
        def run(name: str) -> dict[str, float]:
            before = node_memory(node)
            fill(node.url, name, count)
            connection = open_connection(BrokerSettings.from_url(node.url))
            assert depth(connection, name).messages == count
            connection.close()
            after = node_memory(node)
            return {"bytes_per_message": round((after - before) / count, 1), "node_bytes_empty": before,
                    "node_bytes_full": after}
        found[queue_type] = with_queue(node.url, queue_type, run)
    return found


def version(url: str) -> str:
    connection = open_connection(BrokerSettings.from_url(url))
    try:
        return server_properties(connection).get("version", "?")
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 20_000 if args.quick else args.messages
    results: dict[str, Any] = {"messages": count, "machine": f"{platform.machine()}, {platform.processor() or '?'}"}
    single = PrivateBroker().start()
    try:
        results["rabbitmq"] = version(single.url)
        print(f"RabbitMQ {results['rabbitmq']}, {count:,} messages")
        results["memory_one_node"] = memory(single, count)
        print("memory per queued message:", results["memory_one_node"])
        results["quorum_one_node"] = throughput(single.url, count)
        print("one quorum queue, one node:", results["quorum_one_node"])
    finally:
        single.stop()
    cluster = BrokerCluster().start()
    try:
        results["quorum_three_nodes"] = throughput(cluster.url(), count)
        print("one quorum queue, three nodes (one machine):", results["quorum_three_nodes"])
    finally:
        cluster.stop()
    path = RESULTS / f"broker_capacity-{'.'.join(results['rabbitmq'].split('.')[:2])}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
