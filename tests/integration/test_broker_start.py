"""EnsureBrokerOperator on the local cluster's real node: the StatefulSet runs RabbitMQ 4.0 in a container
(RABBITMQ_IMAGE), exposed on a NodePort; the Airflow connection points at <node IP>:<that port>. The main
test broker stands for "a broker already answers".
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from urllib.parse import urlsplit

import pika
import pytest
import structlog.testing

from localkube import free_port
from tests.conftest import RABBITMQ_IMAGE, free_node_port, task_context
from workqueue_provider.exceptions import (
    BrokerUnreachableError,
    ConfigurationError,
    CredentialsSecretNotFoundError,
    KubernetesAuthError,
    KubernetesNotFoundError,
)
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.broker import EnsureBrokerOperator

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

def amqp_connection(port: int, host: str = "127.0.0.1", **extra) -> str:
    return json.dumps({"conn_type": "amqp", "host": host, "port": port, "extra": extra})


def kubernetes_connection(cluster) -> str:
    return json.dumps({"conn_type": "kubernetes",
                       "extra": {"kube_config_path": str(cluster.kubeconfig), "namespace": "default"}})


def clients(cluster):
    from kubernetes import client

    api = cluster.api_client()
    return client.CoreV1Api(api), client.AppsV1Api(api)


def create_namespace(cluster) -> str:
    core, _ = clients(cluster)
    name = f"wq-broker-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def delete_namespace(cluster, name: str, *, wait: float = 0) -> None:
    """Delete it; with ``wait``, until its pods are gone."""
    core, _ = clients(cluster)
    core.delete_namespace(name)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and core.list_namespaced_pod(name).items:
        time.sleep(0.5)


def objects_in(cluster, namespace: str) -> dict[str, str]:
    """kind/name -> resourceVersion of the broker-related objects in the namespace."""
    core, apps = clients(cluster)
    found = {}
    for kind, items in (("Secret", core.list_namespaced_secret(namespace).items),
                        ("Service", core.list_namespaced_service(namespace).items),
                        ("StatefulSet", apps.list_namespaced_stateful_set(namespace).items)):
        for item in items:
            found[f"{kind}/{item.metadata.name}"] = item.metadata.resource_version
    return found


@pytest.fixture(scope="module")
def kube_env(real_cluster):
    """Airflow's kubernetes_default connection points at the local cluster (the real node)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", kubernetes_connection(real_cluster))
        yield real_cluster


@pytest.fixture
def namespace(kube_env):
    name = create_namespace(kube_env)
    yield name
    delete_namespace(kube_env, name)


@pytest.fixture(scope="module")
def started_broker(kube_env, broker_url):
    """One broker started by the operator for the module: (namespace, node IP, its NodePort, result, captured output)."""
    cluster = kube_env
    host, port = cluster.node_ip, free_node_port()
    ns = create_namespace(cluster)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AMQP_LOCAL", amqp_connection(port, host, credentials_secret="rabbitmq-credentials",
                                                             credentials_namespace=ns))
        try:
            started = time.monotonic()
            with structlog.testing.capture_logs() as task_log:  # the task logger is structlog's
                result = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_local", image=RABBITMQ_IMAGE,
                                              node_port=port, startup_timeout=300).execute(task_context())
            seconds = time.monotonic() - started
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
        lines = [repr(event) for event in task_log] + [record.getMessage() for record in records]
        yield {"namespace": ns, "host": host, "port": port, "result": result, "log_lines": lines, "seconds": seconds}
    delete_namespace(cluster, ns, wait=40)


def secret_credentials(cluster, namespace: str) -> tuple[str, str]:
    core, _ = clients(cluster)
    data = core.read_namespaced_secret("rabbitmq-credentials", namespace).data
    return base64.b64decode(data["username"]).decode(), base64.b64decode(data["password"]).decode()


def test_missing_broker_is_started_with_a_generated_password(started_broker, kube_env, monkeypatch):
    cluster, ns, host, port = kube_env, started_broker["namespace"], started_broker["host"], started_broker["port"]
    result = started_broker["result"]
    assert result == {"started": True, "address": f"{host}:{port}", "namespace": ns,
                      "created": ["Secret/rabbitmq-credentials", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]}
    username, password = secret_credentials(cluster, ns)
    assert username == "workqueue" and password != "guest" and len(password) >= 32

    core, apps = clients(cluster)
    service = core.read_namespaced_service("rabbitmq-service", ns)
    assert [(p.port, p.target_port, p.node_port) for p in service.spec.ports] == [(5672, 5672, port)]
    sts = apps.read_namespaced_stateful_set("rabbitmq", ns)
    assert (sts.spec.replicas, sts.spec.service_name) == (1, "rabbitmq-service")
    env = {e.name: e.value_from.secret_key_ref.name for e in sts.spec.template.spec.containers[0].env}
    assert env == {"RABBITMQ_DEFAULT_USER": "rabbitmq-credentials", "RABBITMQ_DEFAULT_PASS": "rabbitmq-credentials"}
    pod = core.read_namespaced_pod("rabbitmq-0", ns)
    assert pod.status.phase == "Running"
    assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)

    # Airflow logs in with the Secret's credentials through the connection's credentials_secret
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_LOCAL", amqp_connection(port, host, credentials_secret="rabbitmq-credentials",
                                                                   credentials_namespace=ns))
    hook = AmqpHook(amqp_conn_id="amqp_local")
    ok, message = hook.test_connection()
    assert ok, message
    assert hook.settings.login == "workqueue"
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@{host}:{port}/"))

    # the password is in no log line (task log and library loggers), pod log or the return value
    lines = started_broker["log_lines"]
    assert any("Created Secret 'rabbitmq-credentials' with a generated password" in line for line in lines)
    assert any("The broker answers at" in line for line in lines)
    for text in ("\n".join(lines), cluster.read_pod_log(ns, "rabbitmq-0"), json.dumps(result), message):
        assert password not in text
    print(f"broker started in {started_broker['seconds']:.1f} s")


def test_running_again_changes_nothing(started_broker, kube_env):
    ns, host, port = started_broker["namespace"], started_broker["host"], started_broker["port"]
    before = objects_in(kube_env, ns)
    pod_uid = clients(kube_env)[0].read_namespaced_pod("rabbitmq-0", ns).metadata.uid
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AMQP_LOCAL", amqp_connection(port, host, credentials_secret="rabbitmq-credentials",
                                                             credentials_namespace=ns))
        result = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_local", image=RABBITMQ_IMAGE,
                                      node_port=port).execute(task_context())
    assert result == {"started": False, "address": f"{host}:{port}", "namespace": ns, "created": []}
    assert objects_in(kube_env, ns) == before
    assert clients(kube_env)[0].read_namespaced_pod("rabbitmq-0", ns).metadata.uid == pod_uid


def test_existing_objects_are_kept_and_a_timeout_names_what_is_missing(started_broker, kube_env):
    """A connection whose address doesn't reach the (running) broker: nothing is recreated, and the
    wait ends with an error naming the pod's state and the last AMQP error."""
    ns = started_broker["namespace"]
    before = objects_in(kube_env, ns)
    dead_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AMQP_ELSEWHERE", amqp_connection(dead_port, credentials_secret="rabbitmq-credentials",
                                                                 credentials_namespace=ns))
        op = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_elsewhere", startup_timeout=2,
                                  poll_interval=0.5)
        with pytest.raises(BrokerUnreachableError) as raised:
            op.execute(task_context())
    message = str(raised.value)
    assert "pod 'rabbitmq-0' phase Running, ready" in message
    assert f"127.0.0.1:{dead_port}" in message and "Service 'rabbitmq-service'" in message
    assert objects_in(kube_env, ns) == before


def test_a_broker_that_answers_is_left_alone(amqp_conn, namespace, kube_env):
    result = EnsureBrokerOperator(task_id="ensure_broker", namespace=namespace).execute(task_context())
    answering = urlsplit(os.environ["AIRFLOW_CONN_AMQP_DEFAULT"])
    assert result == {"started": False, "address": f"{answering.hostname}:{answering.port}", "namespace": namespace,
                      "created": []}
    assert objects_in(kube_env, namespace) == {}


@pytest.mark.parametrize("extra", [pytest.param({}, id="own-credentials"),
                                   pytest.param({"credentials_secret": "rabbitmq-credentials"}, id="secret")])
def test_nothing_answering_without_create_if_missing_is_a_clear_error(namespace, kube_env, monkeypatch, extra):
    port = free_port()
    conn = json.loads(amqp_connection(port, **({**extra, "credentials_namespace": namespace} if extra else {})))
    conn.update(login="app", password="app-password")
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_NOWHERE", json.dumps(conn))
    op = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_nowhere", namespace=namespace,
                              create_if_missing=False)
    with pytest.raises(BrokerUnreachableError, match=f"No broker answers at 127.0.0.1:{port}.*create_if_missing=True"):
        op.execute(task_context())
    assert objects_in(kube_env, namespace) == {}


def test_guest_credentials_are_refused_before_anything_is_created(namespace, kube_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_GUEST", f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    op = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_guest", namespace=namespace)
    with pytest.raises(ConfigurationError, match="guest.*credentials_secret"):
        op.execute(task_context())
    assert objects_in(kube_env, namespace) == {}


def test_a_connection_whose_secret_is_missing_says_how_to_create_it(namespace, kube_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_UNSTARTED", amqp_connection(
        free_port(), credentials_secret="rabbitmq-credentials", credentials_namespace=namespace))
    with pytest.raises(CredentialsSecretNotFoundError, match="EnsureBrokerOperator"):
        _ = AmqpHook(amqp_conn_id="amqp_unstarted").settings


def everything_in_the_cluster(cluster) -> set[str]:
    """Every namespace, and every Secret, Service, StatefulSet and pod in any namespace (kind/namespace/name/uid)."""
    core, apps = clients(cluster)
    found = {f"Namespace/{n.metadata.name}/{n.metadata.uid}" for n in core.list_namespace().items}
    for kind, items in (("Secret", core.list_secret_for_all_namespaces().items),
                        ("Service", core.list_service_for_all_namespaces().items),
                        ("StatefulSet", apps.list_stateful_set_for_all_namespaces().items),
                        ("Pod", core.list_pod_for_all_namespaces().items)):
        found |= {f"{kind}/{i.metadata.namespace}/{i.metadata.name}/{i.metadata.uid}" for i in items}
    return found


def test_a_missing_namespace_is_named_and_nothing_is_created(kube_env, monkeypatch):
    missing = f"no-such-namespace-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_NEW", amqp_connection(
        free_port(), credentials_secret="rabbitmq-credentials", credentials_namespace=missing))
    op = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_new")
    before = everything_in_the_cluster(kube_env)
    with pytest.raises(KubernetesNotFoundError, match=f"namespace '{missing}' does not exist"):
        op.execute(task_context())
    # other tests' objects may go away meanwhile (namespaces being deleted); nothing may appear
    assert everything_in_the_cluster(kube_env) - before == set()
    assert missing not in {n.metadata.name for n in clients(kube_env)[0].list_namespace().items}


@pytest.mark.localkube_only  # its user-1
def test_an_rbac_refusal_is_named_and_nothing_is_created(namespace, kube_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_K8S_NOBODY", json.dumps({"conn_type": "kubernetes", "extra": {
        "kube_config_path": str(kube_env.kubeconfig_for("user-1"))}}))
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_APP", f"amqp://app:app-password@127.0.0.1:{free_port()}/")
    op = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_app", kubernetes_conn_id="k8s_nobody",
                              namespace=namespace)
    refused = "403 Forbidden.: .*cannot get resource .secrets.*connection 'k8s_nobody' lacks RBAC rights"
    with pytest.raises(KubernetesAuthError, match=refused):
        op.execute(task_context())
    assert objects_in(kube_env, namespace) == {}
