"""EnsureBrokerOperator with ``replicas`` > 1 (a RabbitMQ cluster), on a fake Kubernetes client.

The fake stands in for the kubernetes client classes, so KubernetesApi's own code (create/read per
kind, 404/409 handling) runs for real; the AMQP login is a scripted probe that answers as soon as one
node is ready (as a real first node does).
"""

from __future__ import annotations

import base64
import copy
import json
import socket
from typing import Any

import pytest
import structlog.testing
from kubernetes.client import ApiException

from tests.conftest import task_context
from workqueue_provider.exceptions import BrokerUnreachableError, ConfigurationError, KubernetesError
from workqueue_provider.hooks.kubernetes import KubernetesApi
from workqueue_provider.kube import broker_manifests as manifests
from workqueue_provider.operators import broker
from workqueue_provider.operators.broker import EnsureBrokerOperator

PROBE_PATH = "workqueue_provider.operators.broker._probe"
TCP_OPEN_PATH = "workqueue_provider.operators.broker._tcp_open"
NS = "brokers"
NODES = [f"rabbitmq-{i}.rabbitmq-nodes.{NS}.svc.cluster.local" for i in range(3)]
CLUSTER_OBJECTS = ["Secret/rabbitmq-credentials", "Secret/rabbitmq-erlang-cookie", "Service/rabbitmq-nodes",
                   "ConfigMap/rabbitmq-cluster", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]
KINDS = {"secret": "Secret", "service": "Service", "config_map": "ConfigMap", "stateful_set": "StatefulSet"}


class FakeClient:
    """CoreV1Api and AppsV1Api over one in-memory namespace. ``ready_steps``: readyReplicas of successive
    StatefulSet reads (the last one repeats; none: every replica); pod ``<sts>-i`` is Ready while i < readyReplicas.
    Records every call that writes, in order."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[str] = []
        self.reads: list[str] = []
        self.ready_steps: list[int] = []
        self.ready = 0

    def __getattr__(self, attr: str) -> Any:
        verb, _, resource = attr.partition("_namespaced_")
        if resource not in KINDS or verb not in ("create", "read", "delete", "patch"):
            raise AttributeError(attr)
        kind = KINDS[resource]
        return lambda *args, **_request_options: getattr(self, verb)(kind, *args)

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.writes.append(f"create {kind}/{name}")
        if (kind, name) in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[kind, name] = copy.deepcopy(body)
        return body

    def read(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        self.reads.append(f"{kind}/{name}")
        if (kind, name) not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        found = self.objects[kind, name]
        if kind == "StatefulSet":
            steps = self.ready_steps or [found["spec"]["replicas"]]
            self.ready = steps.pop(0) if len(steps) > 1 else steps[0]
            found["status"] = {"replicas": found["spec"]["replicas"], "readyReplicas": self.ready}
        return copy.deepcopy(found)

    def delete(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        self.writes.append(f"delete {kind}/{name}")
        return self.objects.pop((kind, name))

    def patch(self, kind: str, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(f"patch {kind}/{name}")
        self.objects[kind, name]["data"] = {k: base64.b64encode(v.encode()).decode()
                                            for k, v in body.get("stringData", {}).items()}
        return self.objects[kind, name]

    def read_namespaced_pod(self, name: str, namespace: str, **_request_options: Any) -> dict[str, Any]:
        sts, _, ordinal = name.rpartition("-")
        if ("StatefulSet", sts) not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        if "status" not in self.objects["StatefulSet", sts]:  # a single node's wait reads its pod only
            self.read("StatefulSet", sts, namespace)
        ready = int(ordinal) < self.ready
        waiting = [] if ready else [{"name": "rabbitmq", "restartCount": 0,
                                     "state": {"waiting": {"reason": "ContainerCreating"}}}]
        return {"metadata": {"name": name}, "status": {
            "phase": "Running" if ready else "Pending", "containerStatuses": waiting,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    def add(self, body: dict[str, Any]) -> None:
        """An object that exists before the task runs."""
        self.objects[body["kind"], body["metadata"]["name"]] = copy.deepcopy(body)


class Serializer:
    @staticmethod
    def sanitize_for_serialization(obj: Any) -> Any:
        return obj


@pytest.fixture
def cluster(monkeypatch) -> FakeClient:
    """The Kubernetes API every KubernetesApi of the test reaches; the broker answers AMQP once a node is ready."""
    fake = FakeClient()
    real_init = KubernetesApi.__init__

    def init(self, conn_id="kubernetes_default"):
        real_init(self, conn_id)
        self.__dict__.update(core=fake, apps=fake, api_client=Serializer())

    monkeypatch.setattr(KubernetesApi, "__init__", init)
    fake.probes = []  # type: ignore[attr-defined]

    def probe(settings):
        fake.probes.append((settings.address, fake.ready))  # type: ignore[attr-defined]
        return None if fake.ready >= 1 else BrokerUnreachableError(f"nothing answers at {settings.address}")

    monkeypatch.setattr(PROBE_PATH, probe)
    monkeypatch.setattr(TCP_OPEN_PATH, lambda settings: False)
    return fake


def set_connection(monkeypatch, host: str = ",".join(NODES)) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", json.dumps(
        {"conn_type": "amqp", "host": host, "port": 5672, "login": "app", "password": "app-password"}))


def run(replicas: int = 3, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    """The task's result and its log lines (level: message)."""
    kwargs = {"startup_timeout": 10.0, "poll_interval": 0.01, **kwargs}
    op = EnsureBrokerOperator(task_id="ensure_broker", namespace=NS, replicas=replicas, **kwargs)
    with structlog.testing.capture_logs() as logs:
        result = op.execute(task_context())
    return result, [f"{entry['log_level']}: {entry['event']}" for entry in logs if "Task Runner" not in entry["event"]]


def single_node_statefulset(replicas: int = 1) -> dict[str, Any]:
    return manifests.rabbitmq_statefulset(manifests.BrokerManifestSpec(namespace=NS, replicas=replicas))


def test_a_cluster_is_created_in_the_order_its_pods_need_and_names_its_nodes(cluster, monkeypatch):
    set_connection(monkeypatch)
    result, _ = run()
    assert cluster.writes == [f"create {name}" for name in CLUSTER_OBJECTS]
    assert result == {"started": True, "address": ",".join(f"{node}:5672" for node in NODES), "namespace": NS,
                      "created": CLUSTER_OBJECTS, "nodes": NODES}
    sts = cluster.objects["StatefulSet", "rabbitmq"]["spec"]
    assert (sts["replicas"], sts["serviceName"]) == (3, "rabbitmq-nodes")
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == manifests.DEFAULT_DATA_SIZE


def test_cluster_options_reach_the_manifests(cluster, monkeypatch):
    set_connection(monkeypatch, "rabbit.example")
    result, _ = run(replicas=5, cluster_domain="corp.internal", data_size="20Gi", storage_class="fast-ssd")
    assert result["nodes"] == [f"rabbitmq-{i}.rabbitmq-nodes.{NS}.svc.corp.internal" for i in range(5)]
    claim = cluster.objects["StatefulSet", "rabbitmq"]["spec"]["volumeClaimTemplates"][0]["spec"]
    assert (claim["resources"]["requests"]["storage"], claim["storageClassName"]) == ("20Gi", "fast-ssd")
    assert "rabbit@rabbitmq-4.rabbitmq-nodes.brokers.svc.corp.internal" in \
        cluster.objects["ConfigMap", "rabbitmq-cluster"]["data"]["cluster.conf"]


def test_an_existing_erlang_cookie_is_kept_never_replaced(cluster, monkeypatch):
    set_connection(monkeypatch)
    spec = manifests.BrokerManifestSpec(namespace=NS, replicas=3)
    cluster.add(manifests.cookie_secret(spec, "the-running-clusters-cookie"))
    result, lines = run()
    stored = cluster.objects["Secret", "rabbitmq-erlang-cookie"]["data"][manifests.COOKIE_KEY]
    assert base64.b64decode(stored).decode() == "the-running-clusters-cookie"
    assert not [write for write in cluster.writes if write.startswith(("delete", "patch"))]
    assert "Secret/rabbitmq-erlang-cookie" not in result["created"]
    assert "info: Secret 'rabbitmq-erlang-cookie' already exists in namespace 'brokers': kept as is." in lines
    assert "the-running-clusters-cookie" not in "\n".join(lines)


@pytest.mark.parametrize(("existing", "wanted"), [pytest.param(1, 3, id="single-node-to-cluster"),
                                                  pytest.param(3, 1, id="cluster-to-single-node"),
                                                  pytest.param(3, 5, id="cluster-to-bigger-cluster")])
def test_an_existing_broker_of_another_size_is_refused_before_anything_is_created(cluster, monkeypatch, existing,
                                                                                  wanted):
    set_connection(monkeypatch)
    cluster.add(single_node_statefulset(existing))
    with pytest.raises(ConfigurationError) as raised:
        run(replicas=wanted)
    message = str(raised.value)
    assert f"StatefulSet 'rabbitmq' in namespace 'brokers' already runs {existing} replica(s)" in message
    assert f"asks for {wanted}" in message and "a single node can't join a cluster with its data" in message
    assert "kubectl -n brokers delete statefulset rabbitmq" in message and "statefulset_name" in message
    assert cluster.writes == []


def test_the_credentials_secret_is_read_first_and_the_size_checked_before_any_create(cluster, monkeypatch):
    """The first call stays the Secret's read (an RBAC refusal names it, as for one node)."""
    set_connection(monkeypatch)
    cluster.add(manifests.credentials_secret(manifests.BrokerManifestSpec(namespace=NS), "app", "app-password"))
    cluster.add(single_node_statefulset(1))
    with pytest.raises(ConfigurationError, match="already runs 1 replica"):
        run()
    assert cluster.reads == ["Secret/rabbitmq-credentials", "StatefulSet/rabbitmq"] and cluster.writes == []


@pytest.mark.parametrize("replicas", [2, 4, 0])
def test_a_cluster_size_without_a_majority_to_spare_is_refused_before_anything(cluster, monkeypatch, replicas):
    set_connection(monkeypatch)
    with pytest.raises(ConfigurationError, match=f"replicas={replicas}: use 1 .* or an odd cluster size"):
        run(replicas=replicas)
    assert cluster.writes == [] and cluster.probes == []


def test_the_wait_lasts_until_every_replica_is_ready(cluster, monkeypatch):
    set_connection(monkeypatch)
    cluster.ready_steps = [0, 1, 1, 2, 3]
    _, lines = run()
    # the first node would answer AMQP at once, yet the task waits for all three before its login
    assert [ready for _, ready in cluster.probes] == [0, 3]
    assert cluster.ready_steps == [3]
    waiting = [line for line in lines if "Waiting for the broker" in line]
    assert any("StatefulSet 'rabbitmq' 1/3 ready (pod 'rabbitmq-0' phase Running, ready; pod 'rabbitmq-1' phase "
               "Pending, not ready, waiting (ContainerCreating); pod 'rabbitmq-2' phase Pending" in line
               for line in waiting), waiting
    assert any("The broker answers at" in line and "3/3 ready" in line for line in lines)


def test_a_cluster_that_never_gets_ready_names_each_pod_and_the_nodes(cluster, monkeypatch):
    set_connection(monkeypatch)
    cluster.ready_steps = [2]
    with pytest.raises(BrokerUnreachableError) as raised:
        run(startup_timeout=0.05)
    message = str(raised.value)
    assert "StatefulSet 'rabbitmq' 2/3 ready" in message and "pod 'rabbitmq-2' phase Pending, not ready" in message
    assert "kubectl -n brokers describe statefulset rabbitmq" in message and ",".join(NODES) in message


def test_the_connection_is_told_its_node_list(cluster, monkeypatch):
    set_connection(monkeypatch, "rabbitmq-service.brokers.svc")
    _, lines = run()
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert "names one host (rabbitmq-service.brokers.svc:5672) for a 3-node cluster" in warning
    assert f"Set its Host to {','.join(NODES)}." in warning
    assert f"info: The cluster's nodes: set AMQP connection 'amqp_default''s Host to {','.join(NODES)}" \
        " (clients try them in order)." in lines


def test_a_connection_naming_every_node_gets_no_warning(cluster, monkeypatch):
    set_connection(monkeypatch)
    _, lines = run()
    assert not [line for line in lines if line.startswith("warning:")]


def test_a_single_node_keeps_its_objects_and_result(cluster, monkeypatch):
    set_connection(monkeypatch, "rabbitmq-service.brokers.svc")
    result, lines = run(replicas=1)
    assert result == {"started": True, "address": "rabbitmq-service.brokers.svc:5672", "namespace": NS,
                      "created": ["Secret/rabbitmq-credentials", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]}
    assert not [line for line in lines if line.startswith("warning:")]


def test_running_again_creates_nothing(cluster, monkeypatch):
    set_connection(monkeypatch)
    run()
    before = copy.deepcopy(cluster.objects)
    cluster.writes.clear()
    cluster.ready = 0  # the broker doesn't answer at first, again: every object exists already
    result, lines = run()
    assert result["created"] == [] and result["nodes"] == NODES
    assert all(write.startswith("create ") for write in cluster.writes)
    assert {key: value.get("data") for key, value in cluster.objects.items()} == \
        {key: value.get("data") for key, value in before.items()}
    assert not [line for line in lines if line.startswith("warning:")], lines


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_something_listening_at_any_of_the_hosts_counts(listener):
    from workqueue_provider.amqp.connection import BrokerSettings

    dead = free_port()
    assert broker._tcp_open(BrokerSettings(host=f"127.0.0.1:{dead},127.0.0.1:{listener}"))
    assert not broker._tcp_open(BrokerSettings(host=f"127.0.0.1:{dead}"))


def test_a_kind_without_a_client_call_is_named():
    api = KubernetesApi("k8s")
    api.__dict__.update(core=FakeClient(), apps=FakeClient(), api_client=Serializer())
    with pytest.raises(ValueError, match="no create call for kind 'Deployment'"):
        api.create_object({"kind": "Deployment", "metadata": {"name": "d", "namespace": NS}})


class NodePortAllocatingClient(FakeClient):
    """As the API server does for a Service whose fixed nodePort is taken: 422 (invalid) before the name's 409."""

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "Service" and any(port.get("nodePort") for port in body["spec"].get("ports", [])):
            self.writes.append(f"create {kind}/{body['metadata']['name']}")
            raise ApiException(status=422, reason="Invalid: spec.ports[0].nodePort: provided port is already allocated")
        return super().create(kind, namespace, body)


def test_an_existing_service_refused_for_its_taken_node_port_counts_as_existing():
    api = KubernetesApi("k8s")
    client = NodePortAllocatingClient()
    api.__dict__.update(core=client, apps=client, api_client=Serializer())
    service = {"kind": "Service", "metadata": {"name": "rabbitmq-service", "namespace": NS},
               "spec": {"type": "NodePort", "ports": [{"port": 5672, "nodePort": 30672}]}}
    with pytest.raises(KubernetesError, match="refused the object as invalid"):  # not there: the refusal stands
        api.create_object(service)
    client.add(service)
    assert api.create_object(service) is False  # there: kept, as a 409 would say
