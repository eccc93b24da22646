"""A broker outage while the Job's pods consume (a RabbitMQ upgrade, a node reboot, a rolling restart):
on a private node stopped with ``stop_app`` and started again with its data, the run only gets slower;
an outage longer than the pods' window fails the run clearly and keeps every unprocessed item."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from tests.conftest import task_context, worker_output
from tests.reliability.test_job_faults import job_op, shared_folder, worker_script
from workqueue_provider.exceptions import JobError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.verification import settled_account

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.both_brokers, pytest.mark.localkube_only]
ITEMS = [f"item-{i:02d}" for i in range(20)]
SLOW = 'echo "Processing $item"\nsleep 1\n'
RECONNECTED = re.compile(r"Reconnected to the broker .* after (?P<seconds>[\d.]+) s")


def fill(conn_id: str, queue: str) -> None:
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id=conn_id).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue, items=ITEMS, amqp_conn_id=conn_id).execute(task_context())


def run_in_background(operator) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = operator.execute(task_context())
        except BaseException as e:  # noqa: BLE001 - asserted by the test
            outcome["error"] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until_processed(conn_id: str, queue: str, count: int, timeout: float = 180) -> None:
    hook = AmqpHook(amqp_conn_id=conn_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = hook.item_account(queue)
        if found is not None and found.processed >= count:
            return
        time.sleep(0.3)
    raise AssertionError(f"{count} items were not processed within {timeout} s")


def wait_for_files(folder, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < count:
        assert time.monotonic() < deadline, f"{count} items were not started within {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("outage_seconds", [30, 120])
def test_the_run_rides_out_a_broker_outage_while_the_pods_consume(private_broker, private_conn, kube_conn, cluster,
                                                                  core, namespace, tmp_path, outage_seconds):
    queue = f"outage-{outage_seconds}"
    started, hold = tmp_path / "started", tmp_path / "hold"
    shared_folder(started)
    # each item: print it, note it started, and (while ``hold`` exists) keep working on it
    worker = f'echo "Processing $item"\ntouch "{started}/$item"\nwhile [ -e {hold} ]; do sleep 0.2; done\n'
    fill(private_conn, queue)
    operator = job_op(queue, namespace, worker_script(tmp_path, worker), amqp_conn_id=private_conn, parallelism=2,
                      timeout=900)
    thread, outcome = run_in_background(operator)
    wait_until_processed(private_conn, queue, 4)
    hold.touch()
    wait_for_files(started, AmqpHook(amqp_conn_id=private_conn).item_account(queue).processed + 2)
    private_broker.stop_app()  # both pods hold an item now; the drop stops their commands
    time.sleep(outage_seconds)
    # Released before the broker is back: a pod may reconnect and take an item before ``start_app``
    # returns (RabbitMQ 4.0 opens its listener well before its boot ends), and an item held longer
    # than the private broker's 4 s consumer_timeout is taken back from the pod (exit 75).
    hold.unlink()
    private_broker.start_app()
    thread.join(timeout=900)

    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    found = summary["account"]
    assert (found["filled"], found["processed"], found["left"], found["lost"], found["dead_lettered"]) == (20, 20, 0, 0, 0)
    assert found["duplicated"] == 0  # the held items' commands were stopped, not completed, at the drop
    assert summary["failed"] == 0, "a pod failed: the outage counted against the backoff limit"
    lines = worker_output(cluster, core, namespace, summary["job_name"])
    assert sum("Lost the broker" in line for line in lines) >= 2
    recoveries = [float(m["seconds"]) for line in lines if (m := RECONNECTED.search(line))]
    assert len(recoveries) >= 2, "the pods holding items did not reconnect"
    print(f"\noutage {outage_seconds} s: pods reconnected after {recoveries} s")


def test_an_outage_longer_than_the_window_fails_clearly_and_keeps_the_items(private_broker, private_conn, kube_conn,
                                                                           cluster, namespace, tmp_path):
    queue = "outage-too-long"
    fill(private_conn, queue)
    operator = job_op(queue, namespace, worker_script(tmp_path, SLOW), amqp_conn_id=private_conn, parallelism=2,
                      backoff_limit=1, env={"WORKQUEUE_OUTAGE_WINDOW": "5"}, timeout=600)
    thread, outcome = run_in_background(operator)
    wait_until_processed(private_conn, queue, 2)
    private_broker.stop_app()
    thread.join(timeout=600)  # the pods give up after 5 s, twice: the Job fails while the broker is away
    private_broker.start_app()

    error = outcome.get("error")
    assert isinstance(error, JobError), outcome
    assert "BackoffLimitExceeded" in str(error) and "exited 69" in str(error)
    # taken as QueueJobOperator takes it: the restarted broker may count an item its old consumers held
    # as neither processed nor left for a few seconds
    found = settled_account(AmqpHook(amqp_conn_id=private_conn), queue, None, logging.getLogger(__name__))
    assert found is not None and found.lost == 0 and found.left > 0, found
    assert found.processed + found.left == len(ITEMS)
