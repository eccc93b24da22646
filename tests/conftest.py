"""Shared fixtures: an isolated AIRFLOW_HOME, the real RabbitMQ broker, per-test queues."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

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
def amqp_conn(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default Airflow AMQP connection, pointing at the test broker."""
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", broker_url)
    return "amqp_default"


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


# The seed's worker image, run by the node agent as local processes: with workqueue-consume (ours)
# and with amqp-consume (the seed's own command, from Debian's amqp-tools).
WORKER_IMAGES = {
    "job-wq-1": ["sh", "-c", "exec {venv_bin}/workqueue-consume {python} {repo}/worker/worker.py"],
    "job-wq-1-amqp-consume": ["sh", "-c",
                              "exec amqp-consume --url=$BROKER_URL -q $QUEUE -c 1 -- {python} {repo}/worker/worker.py"],
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
