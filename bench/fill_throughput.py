"""Fill throughput: the four ways of filling a queue, each into a fresh durable queue, each verified.

A  FillQueueOperator.execute(): items -> spool_items -> AmqpHook.publish (pipelined confirms).
B  pika BlockingChannel basic_publish loop, persistent, no confirms: bound by pika's BlockingChannel on the
   client, so a client-side reference, not the broker's ceiling (PerfTest measures that).
C  pika BlockingChannel with confirm_delivery(): one wait per message.
D  the tutorial: one ``amqp-publish`` process per item.

Every function returns a dict with ``items`` and ``seconds`` (and ``rate``); the queue is checked to
hold exactly that many messages before it is deleted. bench/run.py runs each measurement in its own
process (see the bottom of this file) and compares them.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from common import BROKER_URL, fresh_queue, item, setup_airflow_env, task_context, verify_depth

setup_airflow_env()


def _cpu_seconds() -> float:
    """CPU time (user + sys) of this process and its finished children (amqp-publish for D)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _result(n: int, seconds: float, cpu: float, **extra: Any) -> dict[str, Any]:
    """``cpu_us_per_msg``: the publishing side's CPU per message, which load on the machine barely moves."""
    return {"items": n, "seconds": seconds, "rate": n / seconds, "cpu_us_per_msg": cpu / n * 1e6, **extra}


def fill_operator(queue_type: str, n: int) -> dict[str, Any]:
    """A: the operator's own execute() with its defaults, items given as a list (as from an upstream task's XCom).

    ``seconds`` is the whole execute (validate, encode + spool, queue check, publish + confirms);
    ``publish_seconds`` is the AmqpHook.publish call alone (SelectConnection, pipelined confirms)."""
    from workqueue_provider.operators.queue import FillQueueOperator

    items = [item(i) for i in range(n)]
    with fresh_queue("A", queue_type) as queue:
        op = FillQueueOperator(task_id="bench_fill", queue_name=queue, items=items, progress_every=3600.0)
        hook = op.hook
        timed: dict[str, float] = {}
        real_publish = hook.publish

        def publish(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real_publish(*args, **kwargs)
            finally:
                timed["publish"] = time.perf_counter() - started

        hook.publish = publish  # type: ignore[method-assign]
        cpu, started = _cpu_seconds(), time.perf_counter()
        published = op.execute(task_context())
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        assert published == n, f"execute returned {published}, expected {n}"
        verify_depth(queue, n)
    return _result(n, seconds, cpu, publish_seconds=timed["publish"], publish_rate=n / timed["publish"])


def blocking_unconfirmed(queue_type: str, n: int) -> dict[str, Any]:
    """B: BlockingChannel basic_publish loop, delivery_mode 2, no confirms. The clock stops after a
    synchronous round trip on the same channel (the broker has read every publish before it)."""
    import pika

    bodies = [item(i).encode() for i in range(n)]
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    with fresh_queue("B", queue_type) as queue:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        channel = connection.channel()
        publish = channel.basic_publish
        cpu, started = _cpu_seconds(), time.perf_counter()
        for body in bodies:
            publish("", queue, body, properties)
        channel.queue_declare(queue, passive=True)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        connection.close()
        verify_depth(queue, n)
    return _result(n, seconds, cpu)


def blocking_confirm_each(queue_type: str, n: int) -> dict[str, Any]:
    """C: BlockingChannel with confirm_delivery(): every basic_publish waits for its own confirm."""
    import pika

    bodies = [item(i).encode() for i in range(n)]
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    with fresh_queue("C", queue_type) as queue:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        channel = connection.channel()
        channel.confirm_delivery()
        publish = channel.basic_publish
        cpu, started = _cpu_seconds(), time.perf_counter()
        for body in bodies:
            publish("", queue, body, properties)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        connection.close()
        verify_depth(queue, n)
    return _result(n, seconds, cpu)


def tutorial_amqp_publish(queue_type: str, n: int) -> dict[str, Any]:
    """D: the tutorial's loop, one ``amqp-publish -p`` process per item. amqp-tools reads a URL ending in
    a bare '/' as vhost '', so the trailing slash (default vhost) is dropped."""
    url = BROKER_URL[:-1] if urlsplit(BROKER_URL).path == "/" else BROKER_URL
    with fresh_queue("D", queue_type) as queue:
        cpu, started = _cpu_seconds(), time.perf_counter()
        for i in range(n):
            subprocess.run(["amqp-publish", f"--url={url}", "-r", queue, "-p", "-b", item(i)], check=True)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        verify_depth(queue, n)
    return _result(n, seconds, cpu)


METHODS = {"A": fill_operator, "B": blocking_unconfirmed, "C": blocking_confirm_each, "D": tutorial_amqp_publish}

if __name__ == "__main__":
    # python bench/fill_throughput.py {A|B|C|D} {classic|quorum} N  ->  one JSON line on stdout
    logging.basicConfig(level=logging.WARNING)
    kind, queue_type, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(METHODS[kind](queue_type, count)))
