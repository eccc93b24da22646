"""Shared fixtures: an isolated AIRFLOW_HOME, the real RabbitMQ broker, per-test queues."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from localkube import LocalCluster
from scripts.real_node_images import (  # noqa: F401  (tests import the image names from here)
    RABBITMQ_IMAGE,
    TUTORIAL_WORKER_IMAGE,
    WORKER_IMAGE,
    rabbitmq_image,
    tutorial_worker_image,
    worker_image,
)
from tests.airflow_context import task_context  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
BROKER_URL = os.environ.get("WORKQUEUE_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmqctl(*args: str, capture: bool = False) -> str:
    """rabbitmqctl against the test broker: the host's (3.10 on 5672), or the 4.0 node's on 5673."""
    from workqueue_provider.amqp.connection import BrokerSettings

    if BrokerSettings.from_url(BROKER_URL).effective_port == int(os.environ.get("RABBITMQ4_PORT", "5673")):
        command = [str(REPO / "scripts/ensure-rabbitmq4.sh"), "ctl", "-q", *args]
    else:
        command = ["rabbitmqctl", "-q", *args]
    return subprocess.run(command, check=True, capture_output=capture, text=True).stdout or ""

# Airflow reads its home at import time: isolate it before any test imports airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="workqueue-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))

# the session-scoped `local_cluster` fixture comes from localkube's pytest plugin (installed with it)


@pytest.fixture(scope="session")
def broker_url() -> str:
    """A RabbitMQ server that answers; started (and installed) if needed. Fails, never skips."""
    from workqueue_provider.amqp.connection import BrokerSettings, open_connection
    from workqueue_provider.exceptions import BrokerError

    settings = BrokerSettings.from_url(BROKER_URL)
    # 127.0.0.1:5673 is RabbitMQ 4.0 from the trixie rootfs (scripts/ensure-rabbitmq4.sh), anything else the host's.
    script = "ensure-rabbitmq4.sh" if settings.effective_port == int(os.environ.get("RABBITMQ4_PORT", "5673")) \
        else "ensure-rabbitmq.sh"
    try:
        open_connection(settings).close()
    except BrokerError:
        result = subprocess.run([str(REPO / "scripts" / script)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"RabbitMQ could not be started for the tests:\n{result.stderr}")
        open_connection(settings).close()
    return BROKER_URL


@pytest.fixture
def amqp_conn(request: pytest.FixtureRequest, broker_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default Airflow AMQP connection, pointing at the test broker: for tests that run pods (marked
    ``cluster``) where the pods reach it too, for the others at 127.0.0.1 as guest."""
    url = request.getfixturevalue("pod_broker_url") if request.node.get_closest_marker("cluster") else broker_url
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", url)
    return "amqp_default"


@pytest.fixture(scope="session")
def pod_broker_url(broker_url: str, real_cluster) -> Iterator[str]:
    """The test broker as Airflow and the real node's pods both reach it: at the host's address on the pod
    network, as a user of its own (RabbitMQ's guest may log in from 127.0.0.1 only)."""
    from workqueue_provider.amqp.connection import BrokerSettings

    port = BrokerSettings.from_url(broker_url).effective_port
    user, password = f"wq-pods-{uuid.uuid4().hex[:6]}", "p" + uuid.uuid4().hex
    try:
        socket.create_connection((real_cluster.host_ip, port), timeout=5).close()
    except OSError as e:
        pytest.fail(f"the test broker does not listen on {real_cluster.host_ip}:{port}, where pods reach the host "
                    f"({e}): it must listen on all interfaces")
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield f"amqp://{user}:{password}@{real_cluster.host_ip}:{port}/"
    rabbitmqctl("delete_user", user)


@pytest.fixture
def queue_name(broker_url: str) -> Iterator[str]:
    """A fresh queue name; the queue (and its dead-letter and receipts queues) are deleted after the test."""
    from workqueue_provider.amqp.connection import BrokerSettings, open_connection
    from workqueue_provider.amqp.queues import delete

    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    connection = open_connection(BrokerSettings.from_url(broker_url))
    for leftover in (name, f"{name}.dead", f"{name}.receipts"):
        delete(connection, leftover)
    connection.close()


@pytest.fixture(scope="session")
def real_cluster(local_cluster):
    """The cluster the tests' pods run on, with the example's images: the worker built from worker/Dockerfile
    (WORKER_IMAGE), the tutorial's amqp-consume variant and RabbitMQ 4.0. The local cluster (images loaded
    here), or the one in KUBECONFIG (images loaded beforehand: docs/testing-on-another-cluster.md)."""
    if isinstance(local_cluster, LocalCluster):
        for build in (worker_image, tutorial_worker_image, rabbitmq_image):
            local_cluster.load_image(build()[1])
    return local_cluster


_node_ports = iter(random.Random().sample(range(30000, 32768), 2768))


def free_node_port() -> int:
    """A NodePort (30000-32767) no other Service of this test session was given."""
    return next(_node_ports)


@pytest.fixture
def cluster(real_cluster):
    """The cluster the test's pods run on (function-scoped; module fixtures use ``real_cluster``)."""
    return real_cluster


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
    """Every line the Job's pods printed, as the kubelet keeps it: each pod's last run and, if it restarted
    and is still running, the run before it (once a pod has ended, only its last run)."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    lines = []
    for pod in pods:
        if any(s.restart_count for s in pod.status.container_statuses or []):
            previous = core.read_namespaced_pod_log(pod.metadata.name, namespace, previous=True, _preload_content=False)
            lines += previous.data.decode(errors="replace").splitlines()  # raw: the client would parse JSON-like lines
        lines += cluster.read_pod_log(namespace, pod.metadata.name).splitlines()
    return lines
