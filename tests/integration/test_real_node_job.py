"""The tutorial's Job on a real node: the worker image built from worker/Dockerfile (buildah, on a
Debian python base), run by QueueJobOperator on LocalCluster(node="kubelet") as its numeric non-root
user, its pods reaching the broker at the node's address: every item processed once, and proved."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from localkube import LocalCluster
from localkube.image_build import PYTHON_IMAGE, build_image, ensure_python_image
from tests.conftest import task_context, worker_output
from workqueue_provider.exceptions import JobError
from workqueue_provider.kube.job_manifest import WORKER_UID
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
WORKER_IMAGE = "localkube.local/job-wq-1:dev"  # a real tag: no pull attempted with IfNotPresent


@pytest.fixture(scope="module")
def real_node(pytestconfig):
    archive = build_image(REPO / "worker/Dockerfile", context=REPO, ref=WORKER_IMAGE, build_args={"BASE": PYTHON_IMAGE},
                          bases=[ensure_python_image()], inputs=[REPO / "provider", REPO / "worker", REPO / "pyproject.toml"])
    with LocalCluster(node="kubelet", repo=pytestconfig.rootpath) as cluster:
        cluster.load_image(archive)
        yield cluster


@pytest.fixture
def pod_user(broker_url):
    """A broker user the pods can log in as from the pod network (RabbitMQ's guest is loopback-only)."""
    user, password = f"wq-node-{secrets.token_hex(4)}", "p" + secrets.token_urlsafe(18)
    for args in (["add_user", user, password], ["set_permissions", "-p", "/", user, ".*", ".*", ".*"]):
        result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    yield user, password
    subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


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
        pod_broker_host=real_node.kubelet_node.node_ip, deferrable=False, poll_interval=1, timeout=600,
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
            pod_broker_host=real_node.kubelet_node.node_ip, deferrable=False, poll_interval=1, timeout=300,
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
