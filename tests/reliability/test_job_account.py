"""The item account on the real broker and control plane: what the run reports adds up to what was
filled; items the broker drops fail the run as lost; retries and cleared runs redo the work instead
of adopting a finished Job; a Job deleted by its TTL still reports its result."""

from __future__ import annotations

import time

import pika
import pytest

from tests.conftest import task_context
from tests.integration.test_job_side import run_trigger
from tests.reliability.test_job_faults import job_op, processed, shared_folder, worker_script
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import JobError
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.both_brokers, pytest.mark.localkube_only]
FRUIT = ["apple", "banana", "cherry", "date", "fig", "grape"]
PRINT = 'echo "Processing $item"\n'


def filled(queue, items, try_number=1):
    DeclareQueueOperator(task_id="declare", queue_name=queue).execute(task_context(try_number=try_number))
    FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context(try_number=try_number))


def account(summary: dict) -> tuple[int, int, int, int, int, int]:
    found = summary["account"]
    return (found["filled"], found["processed"], found["dead_lettered"], found["left"], found["lost"],
            found["duplicated"])


def test_the_summary_carries_an_account_that_adds_up(amqp_conn, kube_conn, cluster, core, namespace, queue_name,
                                                      tmp_path):
    filled(queue_name, FRUIT)
    summary = job_op(queue_name, namespace, worker_script(tmp_path, PRINT)).execute(task_context())
    assert account(summary) == (6, 6, 0, 0, 0, 0)
    assert processed(tmp_path, summary["job_name"]) == sorted(f"Processing {f}" for f in FRUIT)


def test_items_the_broker_drops_fail_the_run_as_lost(amqp_conn, kube_conn, cluster, namespace, queue_name, broker_url,
                                                    tmp_path):
    # a queue declared elsewhere with x-max-length and RabbitMQ's default overflow (drop-head): every
    # publish is confirmed, but the broker drops the oldest items once 2 are queued
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    connection.channel().queue_declare(queue_name, durable=True, arguments={"x-max-length": 2})
    connection.close()
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=FRUIT).execute(task_context())
    with pytest.raises(JobError, match=r"6 filled = 2 processed \+ 0 dead-lettered \+ 0 left \+ 4 lost") as failed:
        job_op(queue_name, namespace, worker_script(tmp_path, PRINT)).execute(task_context())
    assert "vanished from the queue" in str(failed.value)


def test_a_retry_after_a_failed_job_runs_a_new_job_on_the_items_left(amqp_conn, kube_conn, cluster, core, namespace,
                                                                    queue_name, tmp_path):
    gate = tmp_path / "fixed"
    command = worker_script(tmp_path, f'test -e {gate} || exit 3\n{PRINT}')
    filled(queue_name, FRUIT)
    with pytest.raises(JobError, match="BackoffLimitExceeded"):
        job_op(queue_name, namespace, command, backoff_limit=0, parallelism=1).execute(task_context(try_number=1))
    gate.touch()  # the worker is fixed; Airflow retries the task
    summary = job_op(queue_name, namespace, command, backoff_limit=0, parallelism=1).execute(task_context(try_number=2))
    assert summary["job_name"].endswith("-g2")
    assert account(summary) == (6, 6, 0, 0, 0, 0)
    assert processed(tmp_path, summary["job_name"]) == sorted(f"Processing {f}" for f in FRUIT)


def test_a_cleared_run_after_a_failure_finishes_only_the_items_left(amqp_conn, kube_conn, cluster, core, namespace,
                                                                    queue_name, tmp_path):
    """The run failed (the Job hit its backoff limit after some items); the teardown kept the queue; the
    user clears the run: declare and fill run again (the fill sees it already published everything and
    publishes nothing), and the Job task launches a new Job that finishes the items left, each once."""
    gate = tmp_path / "fixed"
    command = worker_script(tmp_path, f'test -e {gate} || case $item in fig|grape) exit 3;; esac\n{PRINT}')
    filled(queue_name, FRUIT)
    with pytest.raises(JobError, match="BackoffLimitExceeded"):
        job_op(queue_name, namespace, command, backoff_limit=0, parallelism=1).execute(task_context())
    assert DeleteQueueOperator(task_id="delete", queue_name=queue_name).execute(task_context()) > 0  # kept
    gate.touch()
    filled(queue_name, FRUIT, try_number=2)  # the clear re-runs declare and fill
    summary = job_op(queue_name, namespace, command, backoff_limit=0, parallelism=1).execute(task_context(try_number=2))
    assert summary["job_name"].endswith("-g2")
    assert account(summary) == (6, 6, 0, 0, 0, 0)
    first = processed(tmp_path, summary["job_name"].removesuffix("-g2"))
    second = processed(tmp_path, summary["job_name"])
    assert sorted(first + second) == sorted(f"Processing {f}" for f in FRUIT)  # none twice, none missing


def test_a_cleared_successful_run_processes_again_only_what_was_refilled(amqp_conn, kube_conn, cluster, core,
                                                                          namespace, queue_name, tmp_path):
    command = worker_script(tmp_path, PRINT)
    filled(queue_name, FRUIT)
    first = job_op(queue_name, namespace, command).execute(task_context())
    # cleared within the Job's TTL after the teardown deleted the emptied queue: declare and fill start anew,
    # and the Job task finds the Complete Job of the first try
    DeleteQueueOperator(task_id="delete", queue_name=queue_name).execute(task_context())
    filled(queue_name, FRUIT, try_number=2)
    second = job_op(queue_name, namespace, command).execute(task_context(try_number=2))
    assert second["job_name"] == f"{first['job_name']}-g2"
    assert account(second) == (6, 6, 0, 0, 0, 0)
    assert processed(tmp_path, second["job_name"]) == sorted(f"Processing {f}" for f in FRUIT)
    # cleared again, the queue kept: the fill publishes nothing, the finished Job counts as done, no third Job
    filled(queue_name, FRUIT, try_number=3)
    third = job_op(queue_name, namespace, command).execute(task_context(try_number=3))
    assert third["job_name"] == second["job_name"] and account(third) == (6, 6, 0, 0, 0, 0)


def test_a_job_deleted_by_its_ttl_at_once_still_reports_success(amqp_conn, kube_conn, cluster, batch, namespace,
                                                               queue_name, tmp_path):
    filled(queue_name, FRUIT[:3])
    operator = job_op(queue_name, namespace, worker_script(tmp_path, PRINT), deferrable=True,
                      ttl_seconds_after_finished=0)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(task_context())
    event = run_trigger(deferred.value.trigger)
    assert event["status"] == "succeeded"
    deadline = time.monotonic() + 60
    while batch.list_namespaced_job(namespace).items:  # the TTL controller deletes it
        assert time.monotonic() < deadline, "the TTL controller did not delete the finished Job"
        time.sleep(0.2)
    summary = operator.execute_complete(task_context(), event)
    assert summary["succeeded"] == 3 and account(summary) == (3, 3, 0, 0, 0, 0)


def test_a_relaunch_while_killed_pods_still_hold_items_counts_those_items(amqp_conn, kube_conn, cluster, core, batch,
                                                                         namespace, queue_name, tmp_path):
    """The waiting task is killed (its Job deleted) while two pods hold an item each; the retry launches at
    once, before those pods have let go. Completions must count the held (unacked) items too, not just the
    ready ones, or the new Job ends with items left."""
    started, gate = tmp_path / "started", tmp_path / "go"
    shared_folder(started)
    # the worker notes its item, waits for the gate, and on SIGTERM gives up its item only after 3 s
    command = worker_script(tmp_path, f'trap "sleep 3; exit 143" TERM\ntouch "{started}/$item"\n'
                                      f'while [ ! -e {gate} ]; do sleep 0.2; done\n{PRINT}')
    filled(queue_name, FRUIT[:4])
    launched = job_op(queue_name, namespace, command, wait_for_completion=False).execute(task_context())
    deadline = time.monotonic() + 120
    while len(list(started.iterdir())) < 2:
        assert time.monotonic() < deadline, "two pods did not take an item each"
        time.sleep(0.1)
    batch.delete_namespaced_job(launched["job_name"], namespace, propagation_policy="Background")  # the kill
    retry = job_op(queue_name, namespace, command, wait_for_completion=False).execute(task_context(try_number=2))
    gate.touch()
    assert batch.read_namespaced_job(retry["job_name"], namespace).spec.completions == 4, \
        "the two items still held by the deleted Job's pods were not counted"
    summary = job_op(queue_name, namespace, command).execute(task_context(try_number=2))  # re-attaches, waits
    assert account(summary)[:5] == (4, 4, 0, 0, 0)


def test_a_secret_left_unowned_by_a_dead_attempt_is_adopted_on_reattach(amqp_conn, kube_conn, cluster, core,
                                                                       namespace, queue_name, tmp_path, monkeypatch):
    """The first attempt died between creating the Job and making it own its Secret: the retry re-attaches
    and adopts it, so deleting the Job (its TTL, a kill) deletes the Secret with the broker password too."""
    from workqueue_provider.hooks.kubernetes import KubernetesApi as JobsHook

    filled(queue_name, FRUIT[:1])
    command = worker_script(tmp_path, PRINT)
    with monkeypatch.context() as patch:
        patch.setattr(JobsHook, "adopt_secret", lambda *a: (_ for _ in ()).throw(SystemExit("worker died")))
        with pytest.raises(SystemExit):
            job_op(queue_name, namespace, command, wait_for_completion=False).execute(task_context())
    name = job_op(queue_name, namespace, command, wait_for_completion=False).execute(task_context(try_number=2))["job_name"]
    job = __import__("kubernetes").client.BatchV1Api(cluster.api_client()).read_namespaced_job(name, namespace)
    secret = core.read_namespaced_secret(f"{name}-broker", namespace)
    assert [ref.uid for ref in secret.metadata.owner_references or []] == [job.metadata.uid]


def test_a_concurrent_attempt_that_created_the_job_first_keeps_its_secret(amqp_conn, kube_conn, cluster, core,
                                                                         namespace, queue_name, tmp_path, monkeypatch):
    from workqueue_provider.hooks.kubernetes import KubernetesApi as JobsHook

    filled(queue_name, FRUIT[:1])
    command = worker_script(tmp_path, PRINT)
    real_create = JobsHook.create_job

    def raced(self, job):  # another attempt creates the same Job just before this one does
        real_create(self, job)
        return real_create(self, job)  # 409 Conflict
    monkeypatch.setattr(JobsHook, "create_job", raced)
    name = job_op(queue_name, namespace, command, wait_for_completion=False).execute(task_context())["job_name"]
    monkeypatch.setattr(JobsHook, "create_job", real_create)
    secret = core.read_namespaced_secret(f"{name}-broker", namespace)  # not deleted by the losing attempt
    assert secret.metadata.owner_references, "the Job owns its Secret"
    summary = job_op(queue_name, namespace, command).execute(task_context())
    assert account(summary)[:5] == (1, 1, 0, 0, 0)
