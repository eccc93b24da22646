"""deploy/rbac.yaml is enough for the whole flow, and an identity without it gets a clear 403 before
anything is created. On the local control plane (RBAC on): user-1 bound to the shipped Role, user-2 not."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import RABBITMQ_IMAGE, WORKER_IMAGE, free_node_port, task_context, worker_output
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import JobError, KubernetesAuthError
from workqueue_provider.operators.broker import EnsureBrokerOperator
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.localkube_only]
RBAC = Path(__file__).resolve().parents[2] / "deploy" / "rbac.yaml"


def kube_connection_as(cluster, monkeypatch, user: str) -> str:
    conn_id = f"k8s_{user.replace('-', '_')}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(cluster.kubeconfig_for(user))}}))
    return conn_id


def apply_shipped_rbac(cluster, namespace: str, user: str) -> None:
    """Create deploy/rbac.yaml's Role and RoleBinding in ``namespace``, the binding's subject set to ``user``."""
    role, binding = yaml.safe_load_all(RBAC.read_text())
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(namespace, role)
    binding["subjects"] = [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]
    rbac.create_namespaced_role_binding(namespace, binding)
    cluster.wait_until_allowed(user, "create", "jobs", namespace, group="batch")


def created_objects(core, batch, namespace: str) -> list[str]:
    return ([f"Job/{j.metadata.name}" for j in batch.list_namespaced_job(namespace).items]
            + [f"Secret/{s.metadata.name}" for s in core.list_namespaced_secret(namespace).items
               if s.type != "kubernetes.io/service-account-token"]
            + [f"Pod/{p.metadata.name}" for p in core.list_namespaced_pod(namespace).items])


def test_the_shipped_role_runs_the_whole_flow(amqp_conn, cluster, core, batch, namespace, queue_name, monkeypatch):
    """user-1, bound to deploy/rbac.yaml's Role and nothing else, starts the broker (Secret, Service,
    StatefulSet, its pod read while waiting), reads the broker's credentials from the Secret, runs and waits
    for the Job (jobs, pods), and reads a failed pod's log (pods/log): every rule of the Role is used."""
    apply_shipped_rbac(cluster, namespace, "user-1")
    k8s = kube_connection_as(cluster, monkeypatch, "user-1")
    # no broker answers at this address: EnsureBrokerOperator must start one (RabbitMQ in a container, reached
    # from here through its NodePort, by the pods as rabbitmq-service:5672); everything reads its Secret as user-1
    node_ip, port = cluster.node_ip, free_node_port()
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_RBAC", json.dumps({"conn_type": "amqp", "host": node_ip, "port": port, "extra": {
        "credentials_secret": "rabbitmq-credentials", "credentials_namespace": namespace, "kubernetes_conn_id": k8s}}))
    amqp = {"amqp_conn_id": "amqp_rbac"}
    in_cluster = {"pod_broker_host": "rabbitmq-service", "pod_broker_port": 5672}
    context = task_context()
    items = ["apple", "banana", "cherry"]

    started = EnsureBrokerOperator(task_id="start_broker", kubernetes_conn_id=k8s, startup_timeout=300, image=RABBITMQ_IMAGE,
                                   node_port=port, **amqp).execute(context)
    assert started == {"started": True, "address": f"{node_ip}:{port}", "namespace": namespace,
                       "created": ["Secret/rabbitmq-credentials", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]}
    DeclareQueueOperator(task_id="declare_queue", queue_name=queue_name, **amqp).execute(context)
    FillQueueOperator(task_id="fill_queue", queue_name=queue_name, items=items, **amqp).execute(context)
    launched = QueueJobOperator(task_id="run_job", image=WORKER_IMAGE, queue_name=queue_name, namespace=namespace,
                                wait_for_completion=False, kubernetes_conn_id=k8s, **in_cluster, **amqp).execute(context)
    sensor = JobCompleteSensor(task_id="wait_for_job", queue_name=queue_name, kubernetes_conn_id=k8s, timeout=300,
                               **amqp, **launched)
    with pytest.raises(TaskDeferred) as deferred:  # poke (get), then the trigger (list + watch) as user-1
        sensor.execute(context)

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload
    event = asyncio.run(asyncio.wait_for(first_event(deferred.value.trigger), timeout=180))
    summary = sensor.execute_complete(context, event)
    assert summary["succeeded"] == 3 and summary["items_left"] == 0
    assert sorted(worker_output(cluster, core, namespace, launched["job_name"])) == sorted(f"Processing {i}" for i in items)

    # a Job whose worker fails: the error quotes the failed pod's log, read as user-1 (pods/log)
    FillQueueOperator(task_id="fill_poison", queue_name=queue_name, items=["poison"], **amqp).execute(
        task_context(task_id="fill_poison"))
    failing = QueueJobOperator(task_id="run_failing_job", image=WORKER_IMAGE, queue_name=queue_name, namespace=namespace,
                               command=["sh", "-c", "echo cannot process this item >&2; exit 7"],
                               restart_policy="Never", backoff_limit=0, deferrable=False, poll_interval=0.5,
                               kubernetes_conn_id=k8s, **in_cluster, **amqp)
    with pytest.raises(JobError) as raised:
        failing.execute(task_context(task_id="run_failing_job"))
    message = str(raised.value)
    assert "exited 7" in message and "cannot process this item" in message, message
    assert DeleteQueueOperator(task_id="delete_queue", queue_name=queue_name, **amqp).execute(context) == 1


def test_an_identity_without_the_role_gets_a_clear_403_before_anything_is_created(amqp_conn, cluster, core, batch,
                                                                                  namespace, queue_name, monkeypatch):
    DeclareQueueOperator(task_id="declare_queue", queue_name=queue_name).execute(task_context())
    FillQueueOperator(task_id="fill_queue", queue_name=queue_name, items=["a"]).execute(task_context())
    k8s = kube_connection_as(cluster, monkeypatch, "user-2")
    operator = QueueJobOperator(task_id="run_job", image=WORKER_IMAGE, queue_name=queue_name, namespace=namespace,
                                deferrable=False, kubernetes_conn_id=k8s)
    with pytest.raises(KubernetesAuthError) as raised:
        operator.execute(task_context())
    message = str(raised.value)
    assert "403 Forbidden" in message and "RBAC" in message and "deploy/rbac.yaml" in message, message
    assert repr(namespace) in message
    assert created_objects(core, batch, namespace) == []
    sensor = JobCompleteSensor(task_id="wait_for_job", job_name="any", namespace=namespace, kubernetes_conn_id=k8s)
    with pytest.raises(KubernetesAuthError, match="403 Forbidden"):
        sensor.poke(task_context())
