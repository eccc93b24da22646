"""Locked-down namespaces: the pods meet the "restricted" Pod Security Standard by default, and a Job
whose pod creations are refused (PodSecurity, a ResourceQuota, a missing ServiceAccount) ends every
kind of wait (in the worker, the deferred trigger, the poking sensor) within a minute, quoting the API
server's reason and naming the fix. The API server enforces all of this itself (PodSecurity and
ResourceQuota admission are built in)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from scripts.demo import dag_run_succeeded, run_example_dag
from tests.conftest import WORKER_IMAGE, task_context
from workqueue_provider.exceptions import JobError
from workqueue_provider.kube.job_wait import WaitEvent
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor
from workqueue_provider.triggers.job import JobCompleteTrigger

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


def restricted(core, namespace: str) -> None:
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})


def test_the_example_dag_runs_unchanged_in_a_restricted_namespace(pod_broker_url, cluster, core, namespace, tmp_path):
    restricted(core, namespace)
    result = run_example_dag(str(cluster.kubeconfig), str(tmp_path), {"items": ["a", "b", "c"], "namespace": namespace},
                             amqp_url=pod_broker_url, extra_env={"WORKQUEUE_WORKER_IMAGE": WORKER_IMAGE}, echo=False)
    assert dag_run_succeeded(result), result.stdout[-4000:]
    assert "3 filled = 3 processed" in result.stdout
    assert "pod creation refused" not in result.stdout


def quota(core, namespace: str) -> None:
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-pods-left"}, "spec": {"hard": {"pods": "0"}}})


CASES = {
    "pod-security": (lambda core, ns: restricted(core, ns),
                     {"pod_template": {"spec": {"securityContext": {"runAsNonRoot": False, "runAsUser": 0}}}},
                     "violates PodSecurity", "Pod Security Standard"),
    "resource-quota": (quota, {}, "exceeded quota: no-pods-left", "ResourceQuota has no room"),
    "missing-service-account": (lambda core, ns: None, {"service_account_name": "no-such-account"},
                                'serviceaccount "no-such-account" not found', "ServiceAccount doesn't exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_pod_creations_end_every_wait_within_a_minute_naming_the_reason(
        case, amqp_conn, kube_conn, cluster, core, batch, namespace, queue_name):
    prepare, options, reason, fix = CASES[case]
    prepare(core, namespace)
    DeclareQueueOperator(task_id="declare", queue_name=queue_name).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["a", "b"]).execute(task_context())
    common = {"task_id": "run_job", "image": WORKER_IMAGE, "queue_name": queue_name, "namespace": namespace, **options}
    launched = QueueJobOperator(wait_for_completion=False, **common).execute(task_context())
    started = time.monotonic()

    def in_worker() -> Any:  # a retry re-attaches to the Job and waits in the worker (and leaves it: delete_on_kill=False)
        return QueueJobOperator(deferrable=False, poll_interval=1, delete_on_kill=False, **common).execute(task_context())

    def poking_sensor() -> Any:
        return JobCompleteSensor(task_id="wait", job_name=launched["job_name"], namespace=namespace, deferrable=False,
                                 poke_interval=1, timeout=120).execute(task_context())

    def deferred() -> Any:
        async def first():
            async for event in JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 120,
                                                  **launched).run():
                return event.payload
        event = WaitEvent.from_dict(asyncio.run(first()))
        # as execute_complete would (deletes the Job at the end)
        return QueueJobOperator(**common).finish_wait(event, task_context())

    outcomes: dict[str, Any] = {}

    def run(name, wait):
        try:
            outcomes[name] = wait()
        except Exception as e:  # the expected outcome: a JobError naming the refusal
            outcomes[name] = e
        outcomes[f"{name} seconds"] = time.monotonic() - started

    waits = [threading.Thread(target=run, args=(name, wait)) for name, wait in
             (("in the worker", in_worker), ("poking sensor", poking_sensor))]
    for thread in waits:
        thread.start()
    run("deferred trigger", deferred)  # ends by deleting the Job: the others have seen the refusal by then
    for thread in waits:
        thread.join(timeout=90)
    for name in ("in the worker", "poking sensor", "deferred trigger"):
        error = outcomes[name]
        assert isinstance(error, JobError), f"{name}: {error!r}"
        assert "can't create its pods" in str(error) and reason in str(error) and fix in str(error), f"{name}: {error}"
        assert outcomes[f"{name} seconds"] < 60, f"{name} took {outcomes[f'{name} seconds']:.0f} s"
    assert "The Job was deleted." in str(outcomes["deferred trigger"])
    assert not batch.list_namespaced_job(namespace).items, "the operator deletes a Job that can't create its pods"
