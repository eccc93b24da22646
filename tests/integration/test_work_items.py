"""The in-process worker API (worker/items.py) on the real broker, and run by QueueJobOperator in drain mode."""

from __future__ import annotations

import pytest

from tests.conftest import WORKER_IMAGE, task_context
from tests.integration.test_consume import depth, prepare
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.worker.items import process_items, work_items

pytestmark = pytest.mark.integration
FRUIT = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


def account(queue):
    found = AmqpHook().item_account(queue)
    assert found is not None
    return found.filled, found.processed, found.duplicated, found.left, found.lost


def test_work_items_takes_every_item_once_and_keeps_the_account(amqp_conn, broker_url, queue_name):
    items = [f"item-{i}" for i in range(500)]
    prepare(queue_name, items)
    taken = work_items(queue_name, url=broker_url, prefetch=50)
    assert [item.text for item in taken] == items
    assert taken.exit_code == 0 and taken.result.processed == 500
    assert account(queue_name) == (500, 500, 0, 0, 0)


def test_an_exception_requeues_its_item_and_the_rest_held_are_still_handled(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["a", "poison", "b", "c"])
    seen = []

    def handle(item):
        seen.append(item.text)
        if item.text == "poison":
            raise ValueError("bad item")

    assert process_items(handle, queue_name, url=broker_url, prefetch=10) == 1
    assert seen == ["a", "poison", "b", "c"]
    assert account(queue_name) == (4, 3, 0, 1, 0)  # the poison item is back in the queue, nothing lost


def test_an_exception_with_dead_letter_moves_the_item(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["poison", "fine"], dead_letter_queue=f"{queue_name}.dead")

    def handle(item):
        if item.text == "poison":
            raise ValueError("bad item")

    assert process_items(handle, queue_name, url=broker_url, dead_letter=True) == 1
    assert depth(f"{queue_name}.dead") == 1 and depth(queue_name) == 0


def test_leaving_the_loop_early_puts_the_current_item_back(amqp_conn, broker_url, queue_name):
    prepare(queue_name, ["a", "b", "c"])
    for item in work_items(queue_name, url=broker_url, prefetch=3):
        if item.text == "b":
            break
    assert account(queue_name) == (3, 1, 0, 2, 0)


@pytest.mark.cluster
def test_queue_job_operator_drains_with_the_in_process_example(amqp_conn, kube_conn, cluster, namespace, queue_name):
    prepare(queue_name, FRUIT)
    summary = QueueJobOperator(
        task_id="run_job", queue_name=queue_name, namespace=namespace, image=WORKER_IMAGE, items_per_pod=None,
        parallelism=2, command=["inprocess_example.py"],
        deferrable=False, poll_interval=0.5, timeout=300).execute(task_context())
    found = summary["account"]
    assert (found["filled"], found["processed"], found["lost"], found["left"]) == (8, 8, 0, 0)
