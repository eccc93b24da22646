"""EnsureBrokerOperator(replicas=3) on the local cluster's real node: three RabbitMQ 4.0 containers that form
one cluster.

What this proves: the operator creates the six objects of a cluster through the real API server (two
Secrets, the headless and the client Service, the ConfigMap, a StatefulSet of 3 in parallel); the
StatefulSet controller creates a PersistentVolumeClaim and a pod per node, the claims bind to volumes
(hostPath PersistentVolumes the test provides: no storage provisioner here), the init container copies the
Erlang cookie into each node's volume, the nodes find each other by their DNS names through cluster DNS
(``rabbitmq-<i>.rabbitmq-nodes.<ns>.svc.cluster.local``) and form one cluster; the task waits until the
controller reports 3 ready replicas and an AMQP login answers (through the client Service's NodePort here);
every node accepts the Secret's credentials; running it again changes nothing (also when its hosts don't
answer: every object, the Erlang cookie Secret too, is kept, and the wait names each pod's state); and a
StatefulSet of another size is refused before anything is created.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pika
import pytest
import structlog.testing

from localkube import free_port
from tests.conftest import RABBITMQ_IMAGE, free_node_port, task_context
from tests.integration import test_broker_start as one_node
from tests.integration.test_broker_start import clients, create_namespace, delete_namespace, objects_in, secret_credentials
from workqueue_provider.exceptions import BrokerUnreachableError, ConfigurationError
from workqueue_provider.kube.broker_manifests import RABBITMQ_UID
from workqueue_provider.operators.broker import EnsureBrokerOperator

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.localkube_only]

kube_env = one_node.kube_env  # the fixture: Airflow's kubernetes_default connection on the local cluster

REPLICAS = 3
CLUSTER_OBJECTS = ["Secret/rabbitmq-credentials", "Secret/rabbitmq-erlang-cookie", "Service/rabbitmq-nodes",
                   "ConfigMap/rabbitmq-cluster", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]


def provide_volumes(cluster, folder, namespace: str) -> list[str]:
    """A hostPath PersistentVolume per node, for the claims the StatefulSet makes (class "", 1Gi, RWO),
    each a folder the broker's user owns; their names."""
    core, _ = clients(cluster)
    names = []
    for i in range(REPLICAS):
        path = folder / f"node-{i}"
        path.mkdir()
        os.chown(path, RABBITMQ_UID, RABBITMQ_UID)
        name = f"{namespace}-data-{i}"
        core.create_persistent_volume({"metadata": {"name": name}, "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": f"rabbitmq-data-rabbitmq-{i}"}}})
        names.append(name)
    return names


def cluster_connection(hosts: str, namespace: str) -> str:
    """The AMQP connection (``hosts``: host:port, comma-separated), credentials from the Secret."""
    return json.dumps({"conn_type": "amqp", "host": hosts, "extra": {
        "credentials_secret": "rabbitmq-credentials", "credentials_namespace": namespace}})


def unreachable(count: int) -> str:
    return ",".join(f"127.0.0.1:{free_port()}" for _ in range(count))


def cluster_objects(cluster, namespace: str) -> dict[str, str]:
    """objects_in plus the ConfigMaps: kind/name -> resourceVersion."""
    core, _ = clients(cluster)
    found = objects_in(cluster, namespace)
    found |= {f"ConfigMap/{c.metadata.name}": c.metadata.resource_version
              for c in core.list_namespaced_config_map(namespace).items if c.metadata.name != "kube-root-ca.crt"}
    return found


def run_operator(**kwargs) -> tuple[dict, list[str]]:
    """The task's result and its log lines."""
    with structlog.testing.capture_logs() as task_log:
        result = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_cluster", image=RABBITMQ_IMAGE,
                                      replicas=REPLICAS, **kwargs).execute(task_context())
    return result, [f"{entry['log_level']}: {entry['event']}" for entry in task_log]


@pytest.fixture(scope="module")
def started_cluster(kube_env, tmp_path_factory):
    """Three nodes started by the operator for the module: namespace, address, result, log lines, seconds."""
    cluster = kube_env
    ns = create_namespace(cluster)
    volumes = provide_volumes(cluster, tmp_path_factory.mktemp(f"rabbitmq-{uuid.uuid4().hex[:6]}"), ns)
    node_port = free_node_port()
    address = f"{cluster.node_ip}:{node_port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(address, ns))
        try:
            started = time.monotonic()
            result, lines = run_operator(node_port=node_port, startup_timeout=600)
            seconds = time.monotonic() - started
            yield {"namespace": ns, "address": address, "node_port": node_port, "result": result, "log_lines": lines,
                   "seconds": seconds}
        finally:
            delete_namespace(cluster, ns, wait=120)
            for name in volumes:
                clients(cluster)[0].delete_persistent_volume(name)


def nodes(namespace: str) -> list[str]:
    return [f"rabbitmq-{i}.rabbitmq-nodes.{namespace}.svc.cluster.local" for i in range(REPLICAS)]


def test_three_nodes_start_from_a_clusters_objects(started_cluster, kube_env):
    cluster, ns, address = kube_env, started_cluster["namespace"], started_cluster["address"]
    assert started_cluster["result"] == {"started": True, "address": address, "namespace": ns,
                                         "created": CLUSTER_OBJECTS, "nodes": nodes(ns)}
    assert set(cluster_objects(cluster, ns)) == set(CLUSTER_OBJECTS)

    core, apps = clients(cluster)
    sts = apps.read_namespaced_stateful_set("rabbitmq", ns)
    assert (sts.spec.replicas, sts.spec.service_name, sts.spec.pod_management_policy) == (3, "rabbitmq-nodes", "Parallel")
    assert sts.status.ready_replicas == 3
    headless = core.read_namespaced_service("rabbitmq-nodes", ns)
    assert headless.spec.cluster_ip == "None" and headless.spec.publish_not_ready_addresses
    conf = core.read_namespaced_config_map("rabbitmq-cluster", ns).data["cluster.conf"]
    assert all(f"rabbit@{node}" in conf for node in nodes(ns))
    assert set(core.read_namespaced_secret("rabbitmq-erlang-cookie", ns).data) == {".erlang.cookie"}
    for i in range(REPLICAS):
        pod = core.read_namespaced_pod(f"rabbitmq-{i}", ns)
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions), pod.status
    claims = {c.metadata.name: c.status.phase for c in core.list_namespaced_persistent_volume_claim(ns).items}
    assert claims == {f"rabbitmq-data-rabbitmq-{i}": "Bound" for i in range(REPLICAS)}

    # every node takes the Secret's credentials (at its pod IP: the host routes to the pod network)
    username, password = secret_credentials(cluster, ns)
    for i in range(REPLICAS):
        pod_ip = core.read_namespaced_pod(f"rabbitmq-{i}", ns).status.pod_ip
        pika.BlockingConnection(pika.ConnectionParameters(
            pod_ip, 5672, credentials=pika.PlainCredentials(username, password))).close()

    # and they are one cluster: each node lists all three as running (rabbitmqctl in the pod, through the API)
    expected = sorted(f"rabbit@{node}" for node in nodes(ns))
    for i in range(REPLICAS):
        status = cluster.kubectl("exec", "-n", ns, f"rabbitmq-{i}", "-c", "rabbitmq", "--",
                                 "rabbitmqctl", "cluster_status", "--formatter", "json", timeout=120)
        assert sorted(json.loads(status.stdout)["running_nodes"]) == expected, status.stdout

    lines = started_cluster["log_lines"]
    assert f"info: The cluster's nodes: set AMQP connection 'amqp_cluster''s Host to {','.join(nodes(ns))} " \
           "(clients try them in order)." in lines
    # the one warning: the connection names one address (the client Service's NodePort here) for three nodes
    warnings = [line for line in lines if line.startswith("warning:") and "Task Runner" not in line]
    assert len(warnings) == 1 and f"names one host ({address}) for a 3-node cluster" in warnings[0], warnings
    assert password not in "\n".join(lines)
    print(f"three nodes started in {started_cluster['seconds']:.1f} s")


def test_running_again_changes_nothing(started_cluster, kube_env, monkeypatch):
    ns, address = started_cluster["namespace"], started_cluster["address"]
    before = cluster_objects(kube_env, ns)
    core, _ = clients(kube_env)
    uids = [core.read_namespaced_pod(f"rabbitmq-{i}", ns).metadata.uid for i in range(REPLICAS)]
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(address, ns))
    result, _ = run_operator(node_port=started_cluster["node_port"])
    assert result == {"started": False, "address": address, "namespace": ns, "created": [], "nodes": nodes(ns)}
    assert cluster_objects(kube_env, ns) == before
    assert [core.read_namespaced_pod(f"rabbitmq-{i}", ns).metadata.uid for i in range(REPLICAS)] == uids


def test_existing_objects_are_kept_and_a_timeout_names_each_pod(started_cluster, kube_env, monkeypatch):
    """A connection whose hosts don't reach the (running) nodes: every object is found and kept (the Erlang
    cookie Secret too), and the wait ends naming each pod's state and the nodes to reach."""
    ns = started_cluster["namespace"]
    before = cluster_objects(kube_env, ns)
    core, _ = clients(kube_env)
    cookie = core.read_namespaced_secret("rabbitmq-erlang-cookie", ns).data
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(unreachable(REPLICAS), ns))
    with pytest.raises(BrokerUnreachableError) as raised:
        run_operator(node_port=started_cluster["node_port"], startup_timeout=2, poll_interval=0.5)
    message = str(raised.value)
    assert "StatefulSet 'rabbitmq' 3/3 ready (pod 'rabbitmq-0' phase Running, ready;" in message
    assert "pod 'rabbitmq-2' phase Running, ready)" in message and ",".join(nodes(ns)) in message
    assert cluster_objects(kube_env, ns) == before
    assert core.read_namespaced_secret("rabbitmq-erlang-cookie", ns).data == cookie


def test_another_size_is_refused_before_anything_is_created(started_cluster, kube_env, monkeypatch):
    """A one-node task pointed at the cluster's namespace while nothing answers at its address."""
    ns = started_cluster["namespace"]
    before = cluster_objects(kube_env, ns)
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(unreachable(1), ns))
    with pytest.raises(ConfigurationError, match="StatefulSet 'rabbitmq' in namespace .* already runs 3 replica.*asks for 1"):
        EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_cluster", image=RABBITMQ_IMAGE, replicas=1,
                             startup_timeout=5).execute(task_context())
    assert cluster_objects(kube_env, ns) == before
