"""The tutorial's RabbitMQ Service and StatefulSet, plus the Secret holding the broker's credentials.

Mirrors ``rabbitmq-service.yaml`` and ``rabbitmq-statefulset.yaml`` of Kubernetes' "Coarse Parallel
Processing Using a Work Queue" (labels, ``serviceName``, port 5672, an ``emptyDir`` data volume), with
two changes: the container reads ``RABBITMQ_DEFAULT_USER`` / ``RABBITMQ_DEFAULT_PASS`` from a Secret
(``secretKeyRef``; never guest/guest), and it has a readiness probe. Pure functions returning dicts
the API server accepts; nothing here talks to a cluster.

With ``replicas`` > 1 the StatefulSet is a RabbitMQ cluster: a headless Service gives each pod a
stable name (``rabbitmq-0.rabbitmq-nodes.<ns>.svc.cluster.local``), a ConfigMap lists those nodes
for peer discovery (``classic_config``), every node reads one Erlang cookie from a Secret, pods
start in parallel (a clustered node waits for its peers on boot) and keep their data on a
PersistentVolumeClaim (a node back with an empty data dir can't rejoin under its old name).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workqueue_provider.amqp.connection import AMQP_PORT
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.kube.names import MANAGED_BY, validate_name, validate_subdomain

DEFAULT_IMAGE = "rabbitmq:3.13-management"
DEFAULT_SECRET_NAME = "rabbitmq-credentials"
DEFAULT_SERVICE_NAME = "rabbitmq-service"
DEFAULT_STATEFULSET_NAME = "rabbitmq"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
NODE_PORTS = range(30000, 32768)  # Kubernetes' default --service-node-port-range
DEFAULT_DATA_SIZE = "1Gi"  # a cluster's per-node volume (the tutorial's single node keeps its emptyDir)
COOKIE_KEY = ".erlang.cookie"
PARTITION_HANDLING = "autoheal"  # a node paused past net_ticktime comes back inconsistent; autoheal restarts it
RABBITMQ_UID = 999  # the rabbitmq user of the official image
#: The broker meets the "restricted" Pod Security Standard: it runs as the image's rabbitmq user (the
#: image's entrypoint runs as it directly when not root), its data directory writable through fsGroup.
RESTRICTED_POD: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RABBITMQ_UID, "runAsGroup": RABBITMQ_UID,
                                  "fsGroup": RABBITMQ_UID, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
EPMD_PORT, DIST_PORT = 4369, 25672  # Erlang's port mapper and RabbitMQ's inter-node port (AMQP + 20000)
USERNAME_KEY = "username"
PASSWORD_KEY = "password"
#: the tutorial's requests and limits
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {"requests": {"memory": "16M"}, "limits": {"cpu": "250m", "memory": "512M"}}
#: labels of the tutorial's pods (the Service selects them)
TUTORIAL_POD_LABELS = {"app.kubernetes.io/name": "task-queue", "app.kubernetes.io/component": "rabbitmq"}

@dataclass(frozen=True)
class BrokerManifestSpec:
    """What the broker's manifests are built from (validated on creation)."""

    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    secret_name: str = DEFAULT_SECRET_NAME
    service_name: str = DEFAULT_SERVICE_NAME
    statefulset_name: str = DEFAULT_STATEFULSET_NAME
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    labels: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    data_size: str = DEFAULT_DATA_SIZE
    storage_class: str | None = None
    node_port: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1 \
                or (self.replicas > 1 and self.replicas % 2 == 0):
            raise ConfigurationError(
                f"replicas={self.replicas!r}: use 1 (one node) or an odd cluster size (3, 5, 7): quorum queues "
                "need a majority, so an even size survives no more node losses than one node fewer.")
        if self.node_port is not None and (isinstance(self.node_port, bool) or self.node_port not in NODE_PORTS):
            raise ConfigurationError(
                f"node_port={self.node_port!r}: give a port in Kubernetes' NodePort range "
                f"{NODE_PORTS.start}-{NODE_PORTS.stop - 1} (e.g. 30672), or None to keep the Service in the cluster.")
        validate_name(self.namespace, "Namespace name")
        validate_subdomain(self.secret_name, "Secret name")
        validate_name(self.service_name, "Service name")
        # the pod is named <statefulset>-0 and the controller-revision-hash label adds ~11 characters
        validate_name(self.statefulset_name, "StatefulSet name", max_length=52)
        if not isinstance(self.image, str) or not self.image.strip():
            raise ConfigurationError(f"The broker image {self.image!r} is empty: give an image such as {DEFAULT_IMAGE!r}.")
        if not isinstance(self.resources, Mapping) or set(self.resources) - {"requests", "limits"}:
            raise ConfigurationError(
                f"resources={self.resources!r} must be a mapping with 'requests' and/or 'limits', "
                "e.g. {'limits': {'cpu': '250m', 'memory': '512M'}}."
            )

    @property
    def pod_name(self) -> str:
        """The StatefulSet's first (with one replica, only) pod."""
        return f"{self.statefulset_name}-0"

    @property
    def clustered(self) -> bool:
        return self.replicas > 1

    @property
    def nodes_service_name(self) -> str:
        """The headless Service naming each pod (a cluster only)."""
        return f"{self.statefulset_name}-nodes"

    @property
    def cookie_secret_name(self) -> str:
        return f"{self.statefulset_name}-erlang-cookie"

    @property
    def config_map_name(self) -> str:
        return f"{self.statefulset_name}-cluster"

    def host(self) -> str:
        """The in-cluster DNS name of the Service."""
        return f"{self.service_name}.{self.namespace}.svc"

    def node_hosts(self) -> list[str]:
        """Each pod's stable DNS name, in order (the connection's Host list for a cluster)."""
        if not self.clustered:
            return [self.host()]
        return [f"{self.statefulset_name}-{i}.{self.nodes_service_name}.{self.namespace}.svc.{self.cluster_domain}"
                for i in range(self.replicas)]


def generate_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def credentials_secret(spec: BrokerManifestSpec, username: str, password: str) -> dict[str, Any]:
    """The Secret holding the broker's credentials (keys ``username``, ``password``). Never log it."""
    if not username or not password:
        raise ConfigurationError("The broker's credentials Secret needs a non-empty username and password.")
    encode = lambda value: base64.b64encode(value.encode()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": spec.secret_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "type": "Opaque",
        "data": {USERNAME_KEY: encode(username), PASSWORD_KEY: encode(password)},
    }


def rabbitmq_service(spec: BrokerManifestSpec) -> dict[str, Any]:
    """The tutorial's ``rabbitmq-service``: port 5672 to the pods labelled task-queue / rabbitmq; with
    ``node_port``, also that port on every node (type NodePort), for clients outside the cluster."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.service_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "spec": {
            "ports": [{"name": "amqp", "port": AMQP_PORT, "targetPort": AMQP_PORT, "protocol": "TCP",
                       **({"nodePort": spec.node_port} if spec.node_port else {})}],
            "selector": dict(TUTORIAL_POD_LABELS),
            **({"type": "NodePort"} if spec.node_port else {}),
        },
    }


def rabbitmq_statefulset(spec: BrokerManifestSpec) -> dict[str, Any]:
    """The tutorial's ``rabbitmq`` StatefulSet, credentials from the Secret, ready once the node runs."""
    secret_env = [
        {"name": env_name, "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": key}}}
        for env_name, key in (("RABBITMQ_DEFAULT_USER", USERNAME_KEY), ("RABBITMQ_DEFAULT_PASS", PASSWORD_KEY))
    ]
    container = {
        "name": "rabbitmq",
        "image": spec.image,
        "ports": [{"name": "amqp", "containerPort": AMQP_PORT, "protocol": "TCP"}],
        "env": secret_env + (_node_env(spec) if spec.clustered else []),
        "resources": {kind: dict(values) for kind, values in spec.resources.items()},
        # rabbitmq-diagnostics ships in the image; it asks the node itself (whatever port it listens on)
        "readinessProbe": {
            "exec": {"command": ["rabbitmq-diagnostics", "-q", "check_running"]},
            "initialDelaySeconds": 5,
            "periodSeconds": 5,
            "timeoutSeconds": 15,
            "failureThreshold": 3,
        },
        "volumeMounts": [{"name": "rabbitmq-data", "mountPath": "/var/lib/rabbitmq"}],
        "securityContext": dict(RESTRICTED_CONTAINER),
    }
    statefulset: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": spec.statefulset_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "spec": {
            "replicas": spec.replicas,
            "serviceName": spec.service_name,
            "selector": {"matchLabels": dict(TUTORIAL_POD_LABELS)},
            "template": {
                "metadata": {"labels": {**TUTORIAL_POD_LABELS, **spec.labels}},
                "spec": {
                    "securityContext": dict(RESTRICTED_POD),
                    "containers": [container],
                    "volumes": [{"name": "rabbitmq-data", "emptyDir": {}}],
                },
            },
        },
    }
    if spec.clustered:
        _make_cluster(spec, statefulset["spec"], container)
    return statefulset


def _node_env(spec: BrokerManifestSpec) -> list[dict[str, Any]]:
    """Each node named after its pod's stable DNS name (long names), so the others can reach it."""
    return [
        {"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RABBITMQ_USE_LONGNAME", "value": "true"},
        {"name": "RABBITMQ_NODENAME", "value": f"rabbit@$(MY_POD_NAME).{spec.nodes_service_name}.{spec.namespace}"
                                               f".svc.{spec.cluster_domain}"},
    ]


def _make_cluster(spec: BrokerManifestSpec, sts: dict[str, Any], container: dict[str, Any]) -> None:
    """Turn the tutorial's one-node StatefulSet spec into a cluster's (see the module docstring)."""
    sts["serviceName"] = spec.nodes_service_name
    sts["podManagementPolicy"] = "Parallel"  # all nodes boot together: each waits for its peers
    pod = sts["template"]["spec"]
    pod["volumes"] = [
        {"name": "erlang-cookie", "secret": {"secretName": spec.cookie_secret_name, "defaultMode": 0o400}},
        {"name": "cluster-config", "configMap": {"name": spec.config_map_name}},
    ]
    # Erlang wants the cookie file owned by its user and readable by no one else: copied, not mounted
    pod["initContainers"] = [{
        "name": "erlang-cookie",
        "image": spec.image,
        "command": ["sh", "-c", f"cp /cookie/{COOKIE_KEY} /var/lib/rabbitmq/{COOKIE_KEY} && "
                                f"chown {RABBITMQ_UID}:{RABBITMQ_UID} /var/lib/rabbitmq/{COOKIE_KEY} && "
                                f"chmod 600 /var/lib/rabbitmq/{COOKIE_KEY}"],
        "volumeMounts": [{"name": "erlang-cookie", "mountPath": "/cookie", "readOnly": True},
                         {"name": "rabbitmq-data", "mountPath": "/var/lib/rabbitmq"}],
        "securityContext": dict(RESTRICTED_CONTAINER),
    }]
    container["ports"] += [{"name": "epmd", "containerPort": EPMD_PORT, "protocol": "TCP"},
                           {"name": "cluster", "containerPort": DIST_PORT, "protocol": "TCP"}]
    container["volumeMounts"].append({"name": "cluster-config", "mountPath": "/etc/rabbitmq/conf.d/20-cluster.conf",
                                      "subPath": "cluster.conf", "readOnly": True})
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.data_size}}}
    if spec.storage_class:
        claim["storageClassName"] = spec.storage_class
    sts["volumeClaimTemplates"] = [{"metadata": {"name": "rabbitmq-data"}, "spec": claim}]


def generate_cookie() -> str:
    """A random Erlang cookie (the cluster's shared secret: whoever has it controls every node)."""
    return secrets.token_hex(24)


def cookie_secret(spec: BrokerManifestSpec, cookie: str) -> dict[str, Any]:
    """The Secret every node's Erlang cookie comes from. Never log it."""
    if not cookie:
        raise ConfigurationError("The cluster's Erlang cookie Secret needs a non-empty cookie.")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": spec.cookie_secret_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "type": "Opaque",
        "data": {COOKIE_KEY: base64.b64encode(cookie.encode()).decode()},
    }


def nodes_service(spec: BrokerManifestSpec) -> dict[str, Any]:
    """The headless Service that gives each node a stable DNS name, ready or not (peers must find a
    booting node)."""
    ports = [("amqp", AMQP_PORT), ("epmd", EPMD_PORT), ("cluster", DIST_PORT)]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.nodes_service_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "ports": [{"name": name, "port": port, "targetPort": port, "protocol": "TCP"} for name, port in ports],
            "selector": dict(TUTORIAL_POD_LABELS),
        },
    }


def cluster_config_map(spec: BrokerManifestSpec) -> dict[str, Any]:
    """rabbitmq.conf lines for a cluster: peers by classic_config, quorum queues spread over the nodes,
    and the partition handling the node-loss tests run with (tests/reliability/broker_cluster.py)."""
    nodes = [f"rabbit@{host}" for host in spec.node_hosts()]
    lines = ["cluster_formation.peer_discovery_backend = classic_config",
             *(f"cluster_formation.classic_config.nodes.{i} = {node}" for i, node in enumerate(nodes, start=1)),
             f"cluster_partition_handling = {PARTITION_HANDLING}",
             "queue_leader_locator = balanced"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": spec.config_map_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "data": {"cluster.conf": "\n".join(lines) + "\n"},
    }


def differences(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Fields of ``wanted`` (a manifest from this module) that an existing object (API dict, camelCase)
    has otherwise; only what this module sets and the server doesn't default is compared."""
    diffs: list[str] = []
    kind = wanted.get("kind")
    spec, current = wanted.get("spec", {}), existing.get("spec") or {}
    if kind == "Service":
        want_ports = sorted((p["port"], p.get("targetPort", p["port"])) for p in spec["ports"])
        have_ports = sorted((p.get("port"), p.get("targetPort", p.get("port"))) for p in current.get("ports") or [])
        if want_ports != have_ports:
            diffs.append(f"ports {have_ports} (wanted {want_ports})")
        want_node_ports = [p["nodePort"] for p in spec["ports"] if "nodePort" in p]
        have_node_ports = [p.get("nodePort") for p in current.get("ports") or [] if p.get("nodePort")]
        if want_node_ports and want_node_ports != have_node_ports:
            diffs.append(f"nodePort {have_node_ports or None} (wanted {want_node_ports})")
        if (current.get("selector") or {}) != spec["selector"]:
            diffs.append(f"selector {current.get('selector')} (wanted {spec['selector']})")
    elif kind == "StatefulSet":
        for name in ("replicas", "serviceName"):
            if current.get(name) != spec[name]:
                diffs.append(f"{name} {current.get(name)!r} (wanted {spec[name]!r})")
        have = ((current.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        want = spec["template"]["spec"]["containers"][0]
        if have[0].get("image") != want["image"]:
            diffs.append(f"image {have[0].get('image')!r} (wanted {want['image']!r})")
        wanted_secret = want["env"][0]["valueFrom"]["secretKeyRef"]["name"]
        refs = {((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") for e in have[0].get("env") or []}
        if wanted_secret not in refs:
            diffs.append(f"credentials not read from Secret {wanted_secret!r} (env RABBITMQ_DEFAULT_USER/PASS)")
    elif kind == "Secret":  # the keys only: their values are secret (and an existing cookie is the cluster's)
        missing = [key for key in wanted.get("data") or {} if key not in (existing.get("data") or {})]
        if missing:
            diffs.append(f"no key(s) {', '.join(missing)}")
    elif kind == "ConfigMap":
        changed = [key for key, value in (wanted.get("data") or {}).items() if (existing.get("data") or {}).get(key) != value]
        if changed:
            diffs.append(f"other {', '.join(changed)}")
    return diffs
