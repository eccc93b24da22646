"""The seed's RabbitMQ Service and StatefulSet, plus the Secret holding the broker's credentials.

Mirrors ``rabbitmq-service.yaml`` and ``rabbitmq-statefulset.yaml`` of Kubernetes' "Coarse Parallel
Processing Using a Work Queue" (labels, ``serviceName``, port 5672, an ``emptyDir`` data volume), with
two changes: the container reads ``RABBITMQ_DEFAULT_USER`` / ``RABBITMQ_DEFAULT_PASS`` from a Secret
(``secretKeyRef``; never guest/guest), and it has a readiness probe. Pure functions returning dicts
the API server accepts; nothing here talks to a cluster.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workqueue_provider.exceptions import ConfigurationError

AMQP_PORT = 5672
DEFAULT_IMAGE = "rabbitmq:3.13-management"
DEFAULT_SECRET_NAME = "rabbitmq-credentials"
DEFAULT_SERVICE_NAME = "rabbitmq-service"
DEFAULT_STATEFULSET_NAME = "rabbitmq"
USERNAME_KEY = "username"
PASSWORD_KEY = "password"
#: the seed's requests and limits
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {"requests": {"memory": "16M"}, "limits": {"cpu": "250m", "memory": "512M"}}
#: labels of the seed's pods (the Service selects them)
SEED_POD_LABELS = {"app.kubernetes.io/name": "task-queue", "app.kubernetes.io/component": "rabbitmq"}
MANAGED_BY = {"app.kubernetes.io/managed-by": "airflow-provider-workqueue"}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_name(kind: str, name: str, *, max_length: int = 63, subdomain: bool = False) -> str:
    """An RFC 1123 label (or subdomain for Secrets) of at most ``max_length`` characters."""
    pattern = _DNS_SUBDOMAIN if subdomain else _DNS_LABEL
    if not isinstance(name, str) or not name or len(name) > max_length or not pattern.match(name):
        raise ConfigurationError(
            f"{kind} name {name!r} is not a valid Kubernetes name: use at most {max_length} lowercase letters, "
            "digits and '-', starting and ending with a letter or digit."
        )
    return name


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

    def __post_init__(self) -> None:
        validate_name("Namespace", self.namespace)
        validate_name("Secret", self.secret_name, max_length=253, subdomain=True)
        validate_name("Service", self.service_name)
        # the pod is named <statefulset>-0 and the controller-revision-hash label adds ~11 characters
        validate_name("StatefulSet", self.statefulset_name, max_length=52)
        if not isinstance(self.image, str) or not self.image.strip():
            raise ConfigurationError(f"The broker image {self.image!r} is empty: give an image such as {DEFAULT_IMAGE!r}.")
        if not isinstance(self.resources, Mapping) or set(self.resources) - {"requests", "limits"}:
            raise ConfigurationError(
                f"resources={self.resources!r} must be a mapping with 'requests' and/or 'limits', "
                "e.g. {'limits': {'cpu': '250m', 'memory': '512M'}}."
            )

    @property
    def pod_name(self) -> str:
        """The StatefulSet's only pod."""
        return f"{self.statefulset_name}-0"

    def host(self) -> str:
        """The in-cluster DNS name of the Service."""
        return f"{self.service_name}.{self.namespace}.svc"


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
    """The seed's ``rabbitmq-service``: port 5672 to the pods labelled task-queue / rabbitmq."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.service_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "spec": {
            "ports": [{"name": "amqp", "port": AMQP_PORT, "targetPort": AMQP_PORT, "protocol": "TCP"}],
            "selector": dict(SEED_POD_LABELS),
        },
    }


def rabbitmq_statefulset(spec: BrokerManifestSpec) -> dict[str, Any]:
    """The seed's ``rabbitmq`` StatefulSet, credentials from the Secret, ready once the node runs."""
    secret_env = [
        {"name": env_name, "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": key}}}
        for env_name, key in (("RABBITMQ_DEFAULT_USER", USERNAME_KEY), ("RABBITMQ_DEFAULT_PASS", PASSWORD_KEY))
    ]
    container = {
        "name": "rabbitmq",
        "image": spec.image,
        "ports": [{"name": "amqp", "containerPort": AMQP_PORT, "protocol": "TCP"}],
        "env": secret_env,
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
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": spec.statefulset_name, "namespace": spec.namespace,
                     "labels": {"component": "rabbitmq", **MANAGED_BY, **spec.labels}},
        "spec": {
            "replicas": 1,
            "serviceName": spec.service_name,
            "selector": {"matchLabels": dict(SEED_POD_LABELS)},
            "template": {
                "metadata": {"labels": {**SEED_POD_LABELS, **spec.labels}},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "rabbitmq-data", "emptyDir": {}}],
                },
            },
        },
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
    elif kind == "Secret":
        missing = [key for key in (USERNAME_KEY, PASSWORD_KEY) if key not in (existing.get("data") or {})]
        if missing:
            diffs.append(f"no key(s) {', '.join(missing)}")
    return diffs
