"""The tutorial on the real node: the worker image built from worker/Dockerfile
(buildah, on a Debian python base), run by QueueJobOperator as its numeric non-root user: every item
processed once, and proved; with the host's broker, and with the tutorial's own broker, which
EnsureBrokerOperator starts as a StatefulSet in a container (RabbitMQ 4.0) that pods reach by name."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from scripts.real_node_images import (
    RABBITMQ_IMAGE,
    TUTORIAL_WORKER_IMAGE,
    WORKER_IMAGE,
)
from tests.conftest import free_node_port, task_context, worker_output
from workqueue_provider.exceptions import JobError
from workqueue_provider.kube.job_manifest import WORKER_UID
from workqueue_provider.operators.broker import EnsureBrokerOperator
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator

TUTORIAL = Path(__file__).resolve().parents[1] / "data" / "tutorial"
pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(900), pytest.mark.localkube_only]


@pytest.fixture
def real_node(real_cluster):
    """The session's real node, with the example's images."""
    return real_cluster


@pytest.fixture
def pod_user(pod_broker_url):
    """(user, password) of the session's broker user for pods (RabbitMQ's guest is loopback-only); here
    Airflow reaches the broker at 127.0.0.1 and the pods at the host's address (``pod_broker_host``)."""
    url = urlsplit(pod_broker_url)
    return url.username, url.password


def test_the_worker_image_from_the_dockerfile_processes_every_item_on_a_real_node(real_node, pod_user, queue_name,
                                                                                   monkeypatch):
    user, password = pod_user
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_NODE", f"amqp://{user}:{password}@127.0.0.1:5672/")
    monkeypatch.setenv("AIRFLOW_CONN_KUBE_NODE", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(real_node.kubeconfig)}}))
    items = [f"item-{i}" for i in range(6)]
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, amqp_conn_id="amqp_node").execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=items, amqp_conn_id="amqp_node").execute(task_context())

    summary = QueueJobOperator(
        task_id="run", image=WORKER_IMAGE, image_pull_policy="IfNotPresent", queue_name=queue_name, parallelism=2,
        pod_broker_host=real_node.kubelet_node.host_ip, deferrable=False, poll_interval=1, timeout=600,
        image_pull_grace_seconds=120, kubernetes_conn_id="kube_node", amqp_conn_id="amqp_node",
    ).execute(task_context())

    account = summary["account"]
    assert (account["filled"], account["processed"], account["left"], account["lost"]) == (6, 6, 0, 0)
    core = client.CoreV1Api(real_node.api_client())
    lines = worker_output(real_node, core, "default", summary["job_name"])
    assert sorted(line for line in lines if line.startswith("Processing")) == sorted(f"Processing {i}" for i in items)
    pods = core.list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={summary['job_name']}").items
    assert pods and all(p.spec.containers[0].image == WORKER_IMAGE and p.status.phase == "Succeeded" for p in pods)
    assert all(p.spec.security_context.run_as_user == WORKER_UID for p in pods)  # the image's numeric non-root user


def test_a_latest_tag_is_pulled_unless_image_pull_policy_says_otherwise(real_node, pod_user, queue_name, monkeypatch):
    """``:latest`` means "always pull": with no registry the pods wait on ErrImagePull/ImagePullBackOff, and
    the run fails naming the image (and deletes its Job); image_pull_policy="IfNotPresent" runs the image
    already on the node."""
    latest = "127.0.0.1:9/job-wq-1:latest"  # a registry that refuses at once, on this machine
    real_node.kubelet_node.tag_image(WORKER_IMAGE, latest)
    user, password = pod_user
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_NODE", f"amqp://{user}:{password}@127.0.0.1:5672/")
    monkeypatch.setenv("AIRFLOW_CONN_KUBE_NODE", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(real_node.kubeconfig)}}))
    DeclareQueueOperator(task_id="declare", queue_name=queue_name, amqp_conn_id="amqp_node").execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue_name, items=["a", "b"], amqp_conn_id="amqp_node").execute(task_context())

    def job(task_id: str, policy: str | None) -> QueueJobOperator:
        return QueueJobOperator(
            task_id=task_id, image=latest, image_pull_policy=policy, queue_name=queue_name, parallelism=2,
            pod_broker_host=real_node.kubelet_node.host_ip, deferrable=False, poll_interval=1, timeout=300,
            image_pull_grace_seconds=15, kubernetes_conn_id="kube_node", amqp_conn_id="amqp_node")

    pulls = job("pulls", None)
    with pytest.raises(JobError, match="(?s)can't start its pods.*(ErrImagePull|ImagePullBackOff).*job-wq-1:latest"):
        pulls.execute(task_context(task_id="pulls"))
    with pytest.raises(ApiException) as gone:
        client.BatchV1Api(real_node.api_client()).read_namespaced_job(
            pulls.resolve_job_name(task_context(task_id="pulls")), "default")
    assert gone.value.status == 404, "the stuck Job was not deleted"
    summary = job("loaded", "IfNotPresent").execute(task_context(task_id="loaded"))
    assert (summary["account"]["processed"], summary["account"]["lost"]) == (2, 0)


def test_the_tutorials_broker_runs_in_a_container_and_pods_reach_it_by_service_name(real_node, monkeypatch):
    """EnsureBrokerOperator starts RabbitMQ (the StatefulSet and rabbitmq-service) in a container; Airflow on the
    host reaches it through a NodePort, the Job's pods as ``rabbitmq-service:5672`` through cluster DNS."""
    node_port = free_node_port()
    password = "p" + secrets.token_urlsafe(18)
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_INCLUSTER",
                       f"amqp://workqueue:{password}@{real_node.kubelet_node.node_ip}:{node_port}/")
    monkeypatch.setenv("AIRFLOW_CONN_KUBE_NODE", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(real_node.kubeconfig)}}))
    started = EnsureBrokerOperator(task_id="broker", amqp_conn_id="amqp_incluster", kubernetes_conn_id="kube_node",
                                   image=RABBITMQ_IMAGE, node_port=node_port, startup_timeout=300,
                                   poll_interval=1).execute(task_context(task_id="broker"))
    assert started["started"] and "StatefulSet/rabbitmq" in started["created"], started

    queue, items = "tutorial-job1", ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
    connection = {"amqp_conn_id": "amqp_incluster"}
    DeclareQueueOperator(task_id="declare", queue_name=queue, **connection).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue, items=items, **connection).execute(task_context())
    summary = QueueJobOperator(
        task_id="run-incluster", image=WORKER_IMAGE, image_pull_policy="IfNotPresent", queue_name=queue, parallelism=2,
        pod_broker_host="rabbitmq-service", pod_broker_port=5672, deferrable=False, poll_interval=1, timeout=600,
        image_pull_grace_seconds=120, kubernetes_conn_id="kube_node", **connection,
    ).execute(task_context(task_id="run-incluster"))

    account = summary["account"]
    assert (account["filled"], account["processed"], account["left"], account["lost"]) == (8, 8, 0, 0)
    core = client.CoreV1Api(real_node.api_client())
    lines = worker_output(real_node, core, "default", summary["job_name"])
    assert sorted(line for line in lines if line.startswith("Processing")) == sorted(f"Processing {i}" for i in items)
    broker = core.read_namespaced_pod("rabbitmq-0", "default")
    assert broker.spec.containers[0].image == RABBITMQ_IMAGE and broker.status.container_statuses[0].ready


def test_the_tutorials_own_commands_run_literally(real_node, tmp_path):
    """The tutorial's steps with kubectl, in a namespace of their own: its Service and StatefulSet (RabbitMQ in
    a container, guest/guest), the queue filled from a pod with amqp-tools, its job.yaml (amqp-consume -c 1 in
    the image from worker/Dockerfile.amqp-consume), ``kubectl wait --for=condition=complete``."""
    images = {"rabbitmq-statefulset.yaml": ("image: rabbitmq", f"image: {RABBITMQ_IMAGE}"),
              "job.yaml": ("image: gcr.io/<project>/job-wq-1", f"image: {TUTORIAL_WORKER_IMAGE}")}
    for name in ("rabbitmq-service.yaml", "rabbitmq-statefulset.yaml", "job.yaml"):
        text = (TUTORIAL / name).read_text()
        if name in images:
            assert images[name][0] in text
            text = text.replace(*images[name])
        (tmp_path / name).write_text(text)
    real_node.kubectl("create", "namespace", "tutorial")

    def kubectl(*args: str, timeout: float = 60) -> str:
        done = real_node.kubectl("-n", "tutorial", *args, timeout=timeout, check=False)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}{done.stdout}"
        return done.stdout

    kubectl("create", "-f", str(tmp_path / "rabbitmq-service.yaml"))
    kubectl("create", "-f", str(tmp_path / "rabbitmq-statefulset.yaml"))
    items = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
    fill = ("until /usr/bin/amqp-declare-queue --url=$BROKER_URL -q job1 -d; do sleep 2; done; "  # the broker's boot
            f"for f in {' '.join(items)}; do /usr/bin/amqp-publish --url=$BROKER_URL -r job1 -p -b $f; done")
    kubectl("run", "temp", f"--image={TUTORIAL_WORKER_IMAGE}", "--restart=Never",
            "--env=BROKER_URL=amqp://guest:guest@rabbitmq-service:5672", "--command", "--", "bash", "-c", fill)
    kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "--timeout=300s", "pod/temp", timeout=310)
    kubectl("create", "-f", str(tmp_path / "job.yaml"))
    kubectl("wait", "--for=condition=complete", "--timeout=300s", "job/job-wq-1", timeout=310)

    core = client.CoreV1Api(real_node.api_client())
    pods = core.list_namespaced_pod("tutorial", label_selector="batch.kubernetes.io/job-name=job-wq-1").items
    lines = [line for p in pods for line in real_node.read_pod_log("tutorial", p.metadata.name).splitlines()]
    assert sorted(line for line in lines if line.startswith("Processing")) == sorted(f"Processing {i}" for i in items)
