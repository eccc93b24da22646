"""QueueJobOperator, JobCompleteSensor and JobCompleteTrigger on the real broker and control plane."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from urllib.parse import urlsplit

import pytest
import structlog.testing

from tests.conftest import TUTORIAL_WORKER_IMAGE, WORKER_IMAGE, task_context, worker_output
from workqueue_provider.compat import AirflowSkipException
from workqueue_provider.exceptions import ConfigurationError, JobError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor
from workqueue_provider.triggers.amqp_message import AmqpMessageTrigger
from workqueue_provider.triggers.job import JobCompleteTrigger

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
FRUIT = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


def filled(queue, items=FRUIT, **declare):
    DeclareQueueOperator(task_id="declare", queue_name=queue, **declare).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue, items=items, allow_empty=True).execute(task_context())


def job_op(queue, namespace, **kwargs):
    kwargs.setdefault("image", WORKER_IMAGE)
    kwargs.setdefault("deferrable", False)
    kwargs.setdefault("poll_interval", 0.5)
    return QueueJobOperator(task_id="run_job", queue_name=queue, namespace=namespace, **kwargs)


def run_trigger(trigger):
    async def first_event():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(first_event())


@pytest.mark.parametrize("image", [WORKER_IMAGE, TUTORIAL_WORKER_IMAGE])
def test_the_seed_job_processes_every_item_once(amqp_conn, kube_conn, cluster, core, batch, namespace, queue_name, image):
    filled(queue_name, queue_type="classic")
    summary = job_op(queue_name, namespace, image=image).execute(task_context())
    assert summary["succeeded"] == 8 and summary["completions"] == 8 and summary["items_left"] == 0
    assert sorted(worker_output(cluster, core, namespace, summary["job_name"])) == sorted(f"Processing {f}" for f in FRUIT)
    job = batch.read_namespaced_job(summary["job_name"], namespace)
    assert job.spec.parallelism == 2 and job.spec.template.spec.restart_policy == "OnFailure"


def test_the_password_reaches_pods_only_through_an_owned_secret(amqp_conn, kube_conn, cluster, core, batch, namespace,
                                                               queue_name, broker_url):
    filled(queue_name, items=["one"])
    op = job_op(queue_name, namespace, wait_for_completion=False)
    launched = op.execute(task_context())
    job = batch.read_namespaced_job(launched["job_name"], namespace)
    manifest = json.dumps(batch.api_client.sanitize_for_serialization(job))
    password = urlsplit(os.environ["AIRFLOW_CONN_AMQP_DEFAULT"]).password
    assert password and password not in manifest
    env = {e.name: e for e in job.spec.template.spec.containers[0].env}
    assert env["BROKER_URL"].value is None and env["BROKER_URL"].value_from.secret_key_ref.key == "BROKER_URL"
    secret = core.read_namespaced_secret(env["BROKER_URL"].value_from.secret_key_ref.name, namespace)
    assert [ref.uid for ref in secret.metadata.owner_references] == [job.metadata.uid]
    assert launched == {"job_name": job.metadata.name, "namespace": namespace}


def test_pods_can_use_another_broker_address(amqp_conn, kube_conn, cluster, core, namespace, queue_name):
    filled(queue_name, items=["x"])
    op = job_op(queue_name, namespace, wait_for_completion=False, pod_broker_host="rabbitmq-service", pod_broker_port=5672)
    name = op.execute(task_context())["job_name"]
    secret = core.read_namespaced_secret(f"{name}-broker", namespace)
    import base64
    pod_url = urlsplit(base64.b64decode(secret.data["BROKER_URL"]).decode())
    conn_url = urlsplit(os.environ["AIRFLOW_CONN_AMQP_DEFAULT"])
    assert (pod_url.hostname, pod_url.port) == ("rabbitmq-service", 5672)
    assert (pod_url.username, pod_url.password) == (conn_url.username, conn_url.password)


def test_a_worker_that_fails_every_item_fails_with_the_reason(amqp_conn, kube_conn, cluster, namespace, queue_name):
    filled(queue_name, items=["a", "b"])
    op = job_op(queue_name, namespace, command=["sh", "-c", "echo cannot process >&2; exit 7"],
                restart_policy="Never", backoff_limit=1)
    with pytest.raises(JobError) as raised:
        op.execute(task_context())
    message = str(raised.value)
    assert "BackoffLimitExceeded" in message
    assert "exited 7" in message and "cannot process" in message


def test_amqp_consume_with_a_failing_worker_leaves_items_and_the_sensor_says_how_many(amqp_conn, kube_conn, cluster,
                                                                                     namespace, queue_name):
    filled(queue_name, items=["a", "b", "c"], queue_type="classic")
    op = job_op(queue_name, namespace, image=TUTORIAL_WORKER_IMAGE,
                command=["sh", "-c", "exec amqp-consume --url=$BROKER_URL -q $QUEUE -c 1 -- sh -c 'exit 1'"])
    with pytest.raises(JobError, match=r"is Complete but 3 item\(s\) are still in queue"):
        op.execute(task_context())


def test_a_retry_reattaches_to_the_same_job(amqp_conn, kube_conn, cluster, batch, namespace, queue_name):
    filled(queue_name, items=["a", "b", "c"])
    first = job_op(queue_name, namespace, wait_for_completion=False).execute(task_context(try_number=1))
    second = job_op(queue_name, namespace).execute(task_context(try_number=2))
    assert second["job_name"] == first["job_name"] and second["succeeded"] == 3
    assert len(batch.list_namespaced_job(namespace).items) == 1


def test_an_existing_job_with_another_spec_is_refused(amqp_conn, kube_conn, cluster, batch, namespace, queue_name):
    filled(queue_name, items=["a"])
    job_op(queue_name, namespace, wait_for_completion=False).execute(task_context())
    with pytest.raises(ConfigurationError, match="already exists with a different spec"):
        job_op(queue_name, namespace, wait_for_completion=False, parallelism=5).execute(task_context())


def test_zero_items_skip_without_a_job(amqp_conn, kube_conn, cluster, batch, namespace, queue_name):
    filled(queue_name, items=[])
    with pytest.raises(AirflowSkipException, match="is empty: no Job created"):
        job_op(queue_name, namespace).execute(task_context())
    assert batch.list_namespaced_job(namespace).items == []


def test_explicit_completions_below_the_queue_depth_are_refused(amqp_conn, kube_conn, cluster, batch, namespace, queue_name):
    filled(queue_name, items=["a", "b", "c"])
    with pytest.raises(ConfigurationError, match="lower than the 3 items"):
        job_op(queue_name, namespace, completions=2).execute(task_context())
    assert batch.list_namespaced_job(namespace).items == []


def test_the_trigger_watches_until_complete_and_the_sensor_verifies(amqp_conn, kube_conn, cluster, namespace, queue_name):
    filled(queue_name)
    launched = job_op(queue_name, namespace, wait_for_completion=False).execute(task_context())
    event = run_trigger(JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 120, **launched))
    assert event["status"] == "succeeded" and event["job"]["status"]["succeeded"] == 8
    sensor = JobCompleteSensor(task_id="wait", queue_name=queue_name, **launched)
    summary = sensor.execute_complete(task_context(), event)
    assert summary["succeeded"] == 8 and summary["items_left"] == 0
    assert sensor.poke(task_context()).xcom_value["job_name"] == launched["job_name"]


def every_trigger() -> list[type]:
    """Every BaseTrigger subclass the provider defines (so a new trigger can't be left out below)."""
    import importlib
    import inspect
    import pkgutil

    from airflow.triggers.base import BaseTrigger

    import workqueue_provider.triggers as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        for _name, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
            if issubclass(cls, BaseTrigger) and cls.__module__ == info.name:
                found.add(cls)
    return sorted(found, key=lambda cls: cls.__qualname__)


# Per trigger: constructor arguments that all differ from the defaults (so a dropped key, which the
# restored trigger would fill with its default, is caught), and a second set with other values.
TRIGGER_ARGUMENTS = {
    JobCompleteTrigger: [
        {"job_name": "j", "namespace": "n", "kubernetes_conn_id": "k", "deadline": 1.5, "delete_on_kill": False,
         "progress_every": 5, "queue_name": "q", "amqp_conn_id": "a", "image_pull_grace_seconds": 7.5},
        {"job_name": "j2", "namespace": "n2", "kubernetes_conn_id": "k2", "deadline": None, "delete_on_kill": True,
         "progress_every": 0, "queue_name": None, "amqp_conn_id": None, "image_pull_grace_seconds": None},
    ],
    AmqpMessageTrigger: [
        {"queue_name": "batches", "amqp_conn_id": "a", "body_format": "json", "prefetch": 3, "ack_delay": 1.5,
         "max_body_bytes": 1000, "max_reconnect_wait": 9.0},
        {"queue_name": "b2", "amqp_conn_id": "a2", "body_format": "text", "prefetch": 1, "ack_delay": 0.5,
         "max_body_bytes": 10, "max_reconnect_wait": 1.0},
    ],
}


def test_every_trigger_has_its_serialization_checked():
    assert every_trigger() == sorted(TRIGGER_ARGUMENTS, key=lambda cls: cls.__qualname__)


@pytest.mark.parametrize(("trigger_class", "arguments"),
                         [(cls, args) for cls, sets in TRIGGER_ARGUMENTS.items() for args in sets])
def test_the_trigger_serializes_to_its_constructor_arguments(trigger_class, arguments):
    """serialize() must give back exactly the literal constructor arguments: a key left out would come back
    as its default after a triggerer restart (delete_on_kill=False silently becoming True)."""
    import inspect

    parameters = [name for name in inspect.signature(trigger_class).parameters]
    assert sorted(arguments) == sorted(parameters), "the test's arguments must cover every constructor parameter"
    path, kwargs = trigger_class(**arguments).serialize()
    assert path == f"{trigger_class.__module__}.{trigger_class.__qualname__}"
    assert kwargs == arguments
    restored = trigger_class(**kwargs)
    assert {name: getattr(restored, name) for name in arguments} == arguments
    assert restored.serialize() == (path, arguments)


def test_the_trigger_times_out(amqp_conn, kube_conn, cluster, namespace, queue_name):
    filled(queue_name, items=["slow"])
    launched = job_op(queue_name, namespace, wait_for_completion=False,
                      command=["sh", "-c", "sleep 30"]).execute(task_context())
    event = run_trigger(JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 3, **launched))
    assert event["status"] == "timeout" and "did not finish before the timeout" in event["message"]


def test_killing_the_deferred_task_deletes_the_job_and_its_pods(amqp_conn, kube_conn, cluster, core, batch, namespace,
                                                               queue_name):
    items = ["a", "b"]
    filled(queue_name, items=items)
    # each worker prints the item it holds, then works on it (for 10 minutes)
    holder = 'echo "holding $(cat)"; exec sleep 600'
    launched = job_op(queue_name, namespace, wait_for_completion=False, parallelism=2,
                      command=["workqueue-consume", "sh", "-c", holder]).execute(task_context())

    def holding() -> list[str]:
        return sorted(line.removeprefix("holding ") for pod in core.list_namespaced_pod(namespace).items
                      for line in cluster.read_pod_log(namespace, pod.metadata.name).splitlines()
                      if line.startswith("holding "))

    deadline = time.time() + 90
    while (holding() != items or AmqpHook().queue_depth(queue_name).messages) and time.time() < deadline:
        time.sleep(0.3)
    running = [p.metadata.name for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"]
    assert len(running) == 2, f"two Running pods before the kill, got {running}"
    assert holding() == items, "each worker holds an item before the kill"
    depth = AmqpHook().queue_depth(queue_name)
    assert (depth.messages, depth.consumers) == (0, 2), "both items in flight (taken, not acked) before the kill"

    asyncio.run(JobCompleteTrigger(kubernetes_conn_id=kube_conn, **launched).on_kill())
    deadline = time.time() + 90
    while (batch.list_namespaced_job(namespace).items or core.list_namespaced_pod(namespace).items
           or AmqpHook().queue_depth(queue_name).messages != 2) and time.time() < deadline:
        time.sleep(0.3)
    assert batch.list_namespaced_job(namespace).items == []
    assert core.list_namespaced_pod(namespace).items == []
    depth = AmqpHook().queue_depth(queue_name)
    assert (depth.messages, depth.consumers) == (2, 0), "the killed workers' items are all back in the queue"


def test_periodic_progress_says_how_many_items_are_left(amqp_conn, kube_conn, cluster, namespace, queue_name, capfd):
    filled(queue_name, items=["a", "b", "c"])
    launched = job_op(queue_name, namespace, wait_for_completion=False, parallelism=1, items_per_pod=None,
                      command=["sh", "-c", "sleep 30"]).execute(task_context())
    trigger = JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 4, progress_every=1,
                                 queue_name=queue_name, amqp_conn_id=amqp_conn, **launched)
    assert run_trigger(trigger)["status"] == "timeout"
    output = capfd.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if "still running after" in line]
    # parallelism 1 and a command that never takes an item: all 3 are still in the queue
    assert lines and f", 3 items left in queue {queue_name!r}" in lines[-1], lines


def test_the_stuck_pod_check_leaves_a_slow_starting_job_alone(amqp_conn, kube_conn, cluster, namespace, queue_name,
                                                             monkeypatch, caplog):
    """Pods that are slow to become ready (an 8 s init container; pods are read after 5 s not ready) are
    listed and checked, but not stuck; the check ran cleanly (it swallows its own errors, so "the job was left
    alone" alone would prove nothing)."""
    from workqueue_provider.hooks import kubernetes_async
    from workqueue_provider.kube import job_wait

    real_list = kubernetes_async.async_client.CoreV1Api.list_namespaced_pod
    real_stuck = job_wait.stuck_containers
    listed, checked = [], []

    async def counting_list(self, *args, **kwargs):
        pods = await real_list(self, *args, **kwargs)
        listed.append(len(pods.items))
        return pods

    def recording_stuck(*args, **kwargs):
        found = real_stuck(*args, **kwargs)
        checked.append(found)
        return found

    monkeypatch.setattr(kubernetes_async.async_client.CoreV1Api, "list_namespaced_pod", counting_list)
    monkeypatch.setattr(job_wait, "stuck_containers", recording_stuck)
    filled(queue_name, items=["a", "b"])
    warm_up = {"spec": {"initContainers": [{"name": "warm-up", "image": WORKER_IMAGE, "command": ["sh", "-c", "sleep 8"]}]}}
    launched = job_op(queue_name, namespace, wait_for_completion=False, parallelism=2,
                      pod_template=warm_up).execute(task_context())
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as captured:
        event = run_trigger(JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 120,
                                               image_pull_grace_seconds=1, **launched))
    assert event["status"] == "succeeded" and event["job"]["status"]["succeeded"] == 2, event
    assert listed and any(listed), f"the check listed the pods while they were not ready: {listed}"
    assert checked and not any(checked), f"the listed pods were assessed and none was stuck: {checked}"
    log = [r.getMessage() for r in caplog.records] + [repr(e) for e in captured]
    failures = [m for m in log if "check for pods that can't start failed" in m or "Not checking the pods" in m]
    assert not failures, f"the stuck-pod check did not run cleanly: {failures}"
