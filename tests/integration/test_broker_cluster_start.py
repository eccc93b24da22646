"""EnsureBrokerOperator(replicas=3) on the real control plane: a cluster's objects, three Ready pods, AMQP.

What this proves: the operator creates the six objects of a cluster through the real API server (two
Secrets, the headless and the client Service, the ConfigMap, a StatefulSet of 3 in parallel); the
StatefulSet controller creates a PersistentVolumeClaim and a pod per node; the task waits until the
controller reports 3 ready replicas and an AMQP login answers through the connection's host list;
every node accepts the Secret's credentials; running it again changes nothing (also when its hosts
don't answer: every object, the Erlang cookie Secret too, is kept, and the wait names each pod's state);
and a StatefulSet of another size is refused before anything is created.

What it does NOT prove, and why (the local node agent, localkube, runs each pod as a host process):

* that the nodes form one cluster. Peer discovery needs each node's DNS name
  (``rabbitmq-0.rabbitmq-nodes.<ns>.svc.cluster.local``), and this node has no cluster DNS; all pods
  share one host, one epmd and the host's Erlang cookie. Each pod here is a standalone node: its name
  is ``<namespace>-<pod>@localhost`` and its AMQP and distribution ports the test's i-th pair (the
  image shim below, keyed by the pod's ordinal), instead of the manifest's ``rabbit@<DNS name>``
  (three nodes named ``rabbit`` would collide in the host's epmd). Joining needs a real node.
* the cookie copy and the data volumes: the agent ignores volumes, so the init container, which
  copies the cookie from its Secret volume into /var/lib/rabbitmq, would run on the host against the
  host's own RabbitMQ directory. The test replaces its command with ``true`` (only that field). The
  claims stay Pending (no storage provisioner here) and the pods run without them; their
  ``kubernetes.io/pvc-protection`` finalizer is removed at teardown (no controller here does it), so
  the namespace can go.
* the readiness probe asks the pod's local node: ``rabbitmq-diagnostics`` is found first in a shim
  directory put on the image's PATH, which runs the real one against the local node name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pika
import pytest
import structlog.testing

from localkube import free_port
from tests.conftest import task_context
from tests.integration import test_broker_start as one_node
from tests.integration.test_broker_start import clients, create_namespace, delete_namespace, objects_in, secret_credentials
from workqueue_provider.exceptions import BrokerUnreachableError, ConfigurationError
from workqueue_provider.kube import broker_manifests as manifests
from workqueue_provider.operators.broker import EnsureBrokerOperator

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


@pytest.fixture(scope="module")
def kube_env(agent_cluster):
    """Airflow's kubernetes_default connection on the local control plane, whose node agent runs the three
    RabbitMQ nodes as local rabbitmq-server processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", one_node.kubernetes_connection(agent_cluster))
        yield agent_cluster


REPLICAS = 3
IMAGE = "rabbitmq-three-local-nodes"  # its own image-table entry: test_broker_start's rabbitmq image runs on the real node
CLUSTER_OBJECTS = ["Secret/rabbitmq-credentials", "Secret/rabbitmq-erlang-cookie", "Service/rabbitmq-nodes",
                   "ConfigMap/rabbitmq-cluster", "Service/rabbitmq-service", "StatefulSet/rabbitmq"]

NODE_SHIM = """#!/bin/sh
# Pod <statefulset>-<i> on the local node: the i-th AMQP/distribution port pair, and a node name this
# host's epmd can tell apart (the manifest's rabbit@<cluster DNS name> can't be used here).
set -eu
i="${HOSTNAME##*-}"
eval "RABBITMQ_NODE_PORT=\\${RABBITMQ_NODE_PORT_$i:?no AMQP port for pod $HOSTNAME}"
eval "RABBITMQ_DIST_PORT=\\${RABBITMQ_DIST_PORT_$i:?no distribution port for pod $HOSTNAME}"
export RABBITMQ_NODE_PORT RABBITMQ_DIST_PORT RABBITMQ_NODENAME="$RABBITMQ_LOCAL_NODENAME"
unset RABBITMQ_USE_LONGNAME
exec "$RABBITMQ_LOCAL_SCRIPT"
"""
PROBE_SHIM = """#!/bin/sh
# The readiness probe's rabbitmq-diagnostics, aimed at the pod's local node (see the node shim).
export RABBITMQ_NODENAME="$RABBITMQ_LOCAL_NODENAME"
unset RABBITMQ_USE_LONGNAME
exec /usr/sbin/rabbitmq-diagnostics "$@"
"""


def register_local_nodes(cluster, shims: Path) -> list[int]:
    """Image IMAGE runs pod ``<sts>-i`` as a private rabbitmq-server node on the i-th AMQP port; those ports."""
    for name, text in (("rabbitmq-node.sh", NODE_SHIM), ("rabbitmq-diagnostics", PROBE_SHIM)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    amqp_ports = [free_port() for _ in range(REPLICAS)]
    env = {"RABBITMQ_LOCAL_NODENAME": "{namespace}-{pod}@localhost", "RABBITMQ_POD_DIR": "{pod_dir}",
           "RABBITMQ_LOCAL_SCRIPT": "{repo}/localkube/src/localkube/images/rabbitmq-local.sh",
           "PATH": f"{shims}{os.pathsep}{{venv_bin}}{os.pathsep}{os.environ['PATH']}"}  # as the agent's, shims first
    for i, port in enumerate(amqp_ports):
        env |= {f"RABBITMQ_NODE_PORT_{i}": str(port), f"RABBITMQ_DIST_PORT_{i}": str(free_port())}
    cluster.register_image(IMAGE, entrypoint=[str(shims / "rabbitmq-node.sh")], env=env)
    return amqp_ports


def without_cookie_copy(build):
    """The StatefulSet builder, its init container's command replaced by ``true`` (see the module docstring)."""
    def build_locally(spec):
        sts = build(spec)
        for init in sts["spec"]["template"]["spec"].get("initContainers", []):
            init["command"] = ["true"]
        return sts
    return build_locally


def host_list(ports: list[int]) -> str:
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def cluster_connection(ports: list[int], namespace: str) -> str:
    """The AMQP connection naming every node (comma-separated Host), credentials from the Secret."""
    return json.dumps({"conn_type": "amqp", "host": host_list(ports), "extra": {
        "credentials_secret": "rabbitmq-credentials", "credentials_namespace": namespace}})


def cluster_objects(cluster, namespace: str) -> dict[str, str]:
    """objects_in plus the ConfigMaps: kind/name -> resourceVersion."""
    core, _ = clients(cluster)
    found = objects_in(cluster, namespace)
    found |= {f"ConfigMap/{c.metadata.name}": c.metadata.resource_version
              for c in core.list_namespaced_config_map(namespace).items if c.metadata.name != "kube-root-ca.crt"}
    return found


def release_claims(cluster, namespace: str) -> None:
    """Drop the claims' pvc-protection finalizer (no controller here removes it), so the namespace can go."""
    core, _ = clients(cluster)
    for claim in core.list_namespaced_persistent_volume_claim(namespace).items:
        core.patch_namespaced_persistent_volume_claim(claim.metadata.name, namespace, {"metadata": {"finalizers": None}})


def run_operator(**kwargs) -> tuple[dict, list[str]]:
    """The task's result and its log lines."""
    with structlog.testing.capture_logs() as task_log:
        result = EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_cluster", image=IMAGE,
                                      replicas=REPLICAS, **kwargs).execute(task_context())
    return result, [f"{entry['log_level']}: {entry['event']}" for entry in task_log]


@pytest.fixture(scope="module")
def started_cluster(kube_env, broker_url, tmp_path_factory):
    """Three nodes started by the operator for the module: namespace, ports, result, log lines, seconds."""
    cluster = kube_env
    ports = register_local_nodes(cluster, tmp_path_factory.mktemp("rabbitmq-shims"))
    ns = create_namespace(cluster)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifests, "rabbitmq_statefulset", without_cookie_copy(manifests.rabbitmq_statefulset))
        mp.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(ports, ns))
        try:
            started = time.monotonic()
            result, lines = run_operator(startup_timeout=240)
            seconds = time.monotonic() - started
            yield {"namespace": ns, "ports": ports, "result": result, "log_lines": lines, "seconds": seconds}
        finally:
            release_claims(cluster, ns)
            delete_namespace(cluster, ns, wait=60)


def nodes(namespace: str) -> list[str]:
    return [f"rabbitmq-{i}.rabbitmq-nodes.{namespace}.svc.cluster.local" for i in range(REPLICAS)]


def test_three_nodes_start_from_a_clusters_objects(started_cluster, kube_env):
    cluster, ns, ports = kube_env, started_cluster["namespace"], started_cluster["ports"]
    assert started_cluster["result"] == {"started": True, "address": host_list(ports), "namespace": ns,
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
    claims = {c.metadata.name for c in core.list_namespaced_persistent_volume_claim(ns).items}
    assert claims == {f"rabbitmq-data-rabbitmq-{i}" for i in range(REPLICAS)}

    # every node (a standalone one here) takes the Secret's credentials
    username, password = secret_credentials(cluster, ns)
    for port in ports:
        pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", port, credentials=pika.PlainCredentials(username, password))).close()

    lines = started_cluster["log_lines"]
    assert f"info: The cluster's nodes: set AMQP connection 'amqp_cluster''s Host to {','.join(nodes(ns))} " \
           "(clients try them in order)." in lines
    assert not [line for line in lines if line.startswith("warning:") and "Task Runner" not in line], lines
    assert password not in "\n".join(lines)
    print(f"three nodes started in {started_cluster['seconds']:.1f} s")


def test_running_again_changes_nothing(started_cluster, kube_env, monkeypatch):
    ns, ports = started_cluster["namespace"], started_cluster["ports"]
    before = cluster_objects(kube_env, ns)
    core, _ = clients(kube_env)
    uids = [core.read_namespaced_pod(f"rabbitmq-{i}", ns).metadata.uid for i in range(REPLICAS)]
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection(ports, ns))
    result, _ = run_operator()
    assert result == {"started": False, "address": host_list(ports), "namespace": ns, "created": [], "nodes": nodes(ns)}
    assert cluster_objects(kube_env, ns) == before
    assert [core.read_namespaced_pod(f"rabbitmq-{i}", ns).metadata.uid for i in range(REPLICAS)] == uids


def test_existing_objects_are_kept_and_a_timeout_names_each_pod(started_cluster, kube_env, monkeypatch):
    """A connection whose hosts don't reach the (running) nodes: every object is found and kept (the Erlang
    cookie Secret too), and the wait ends naming each pod's state and the nodes to reach."""
    ns = started_cluster["namespace"]
    before = cluster_objects(kube_env, ns)
    core, _ = clients(kube_env)
    cookie = core.read_namespaced_secret("rabbitmq-erlang-cookie", ns).data
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection([free_port() for _ in range(REPLICAS)], ns))
    with pytest.raises(BrokerUnreachableError) as raised:
        run_operator(startup_timeout=2, poll_interval=0.5)
    message = str(raised.value)
    assert "StatefulSet 'rabbitmq' 3/3 ready (pod 'rabbitmq-0' phase Running, ready;" in message
    assert "pod 'rabbitmq-2' phase Running, ready)" in message and ",".join(nodes(ns)) in message
    assert cluster_objects(kube_env, ns) == before
    assert core.read_namespaced_secret("rabbitmq-erlang-cookie", ns).data == cookie


def test_another_size_is_refused_before_anything_is_created(started_cluster, kube_env, monkeypatch):
    """A one-node task pointed at the cluster's namespace while nothing answers at its address."""
    ns = started_cluster["namespace"]
    before = cluster_objects(kube_env, ns)
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_CLUSTER", cluster_connection([free_port()], ns))
    with pytest.raises(ConfigurationError, match="StatefulSet 'rabbitmq' in namespace .* already runs 3 replica.*asks for 1"):
        EnsureBrokerOperator(task_id="ensure_broker", amqp_conn_id="amqp_cluster", image=IMAGE, replicas=1,
                             startup_timeout=5).execute(task_context())
    assert cluster_objects(kube_env, ns) == before
