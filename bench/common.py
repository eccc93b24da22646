"""Shared bench helpers: broker URL, an isolated Airflow environment, fresh ``bench-`` queues, checks."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks run as scripts; tests/airflow_context.py is shared with the tests
    sys.path.insert(0, str(REPO))

from tests import airflow_context  # noqa: E402

BROKER_URL = os.environ.get("WORKQUEUE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


def setup_airflow_env() -> None:
    """An isolated AIRFLOW_HOME and the default AMQP connection, set before anything imports airflow."""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="workqueue-bench-airflow-home-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    os.environ["AIRFLOW_CONN_AMQP_DEFAULT"] = BROKER_URL


def task_context(task_id: str = "fill_queue") -> Any:
    """A context with the ids of a real scheduled run of the example DAG (see tests/airflow_context.py)."""
    return airflow_context.task_context("work_queue_example", task_id, "scheduled__2026-01-01T00:00:00+00:00")


def item(i: int) -> str:
    return f"item-{i:07d}"


def blocking_connection():
    import pika

    return pika.BlockingConnection(pika.URLParameters(BROKER_URL))


def queue_depth(name: str) -> int:
    connection = blocking_connection()
    try:
        return connection.channel().queue_declare(name, passive=True).method.message_count
    finally:
        connection.close()


@contextlib.contextmanager
def fresh_queue(kind: str, queue_type: str) -> Iterator[str]:
    """A new durable queue ``bench-<kind>-<type>-<id>``, deleted afterwards whatever happens."""
    name = f"bench-{kind}-{queue_type}-{uuid.uuid4().hex[:8]}"
    connection = blocking_connection()
    try:
        connection.channel().queue_declare(name, durable=True, arguments={"x-queue-type": queue_type})
    finally:
        connection.close()
    try:
        yield name
    finally:
        delete_queue(name)


def delete_queue(name: str) -> None:
    connection = blocking_connection()
    try:
        connection.channel().queue_delete(name)
    finally:
        connection.close()


def verify_depth(name: str, expected: int, timeout: float = 120.0) -> int:
    """Wait until the queue holds ``expected`` ready messages (unconfirmed publishes may still be in
    flight); raise if it holds another number after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    depth = queue_depth(name)
    while depth != expected and time.monotonic() < deadline:
        if depth > expected:
            break
        time.sleep(0.2)
        depth = queue_depth(name)
    if depth != expected:
        raise AssertionError(f"queue {name} holds {depth} messages, expected exactly {expected}")
    return depth


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
