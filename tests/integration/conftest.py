"""Fixtures for tests that need the local control plane as well as the broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.conftest import REPO

# The seed's worker image, run by the node agent as local processes: with workqueue-consume (ours)
# and with amqp-consume (the seed's own command, from Debian's amqp-tools).
WORKER_IMAGES = {
    "job-wq-1": ["sh", "-c", "exec {venv_bin}/workqueue-consume {python} {repo}/worker/worker.py"],
    "job-wq-1-amqp-consume": ["sh", "-c", "exec amqp-consume --url=$BROKER_URL -q $QUEUE -c 1 -- {python} {repo}/worker/worker.py"],
}


@pytest.fixture(scope="session")
def cluster(local_cluster):
    """The local control plane with the worker images registered."""
    for image, entrypoint in WORKER_IMAGES.items():
        local_cluster.register_image(image, entrypoint=entrypoint)
    return local_cluster


@pytest.fixture
def kube_conn(cluster, monkeypatch) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(cluster.kubeconfig), "namespace": "default"}}))
    return "kubernetes_default"


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    name = f"wq-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def batch(cluster) -> client.BatchV1Api:
    return client.BatchV1Api(cluster.api_client())


@pytest.fixture
def core(cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


def worker_output(cluster, core, namespace: str, job_name: str) -> list[str]:
    """Every line the Job's pods printed (all pods, all restarts)."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    lines = []
    for pod in pods:
        lines += cluster.read_pod_log(namespace, pod.metadata.name).splitlines()
    return lines
