"""The tutorial's ``job.yaml`` as a function: one options object in, Job and Secret manifests out.

Everything here is validated before any API call, so bad input creates nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from workqueue_provider.amqp.queues import validate_queue_name
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.kube.failure_policy import validate_replacement_policy
from workqueue_provider.kube.names import MANAGED_BY, MAX_NAME, validate_name, validate_subdomain

ANNOTATION_PREFIX = "workqueue.airflow.apache.org"
SPEC_HASH_ANNOTATION = f"{ANNOTATION_PREFIX}/spec-hash"
SECRET_KEY = "BROKER_URL"
CONTAINER_NAME = "worker"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
RESTART_POLICIES = ("OnFailure", "Never")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


MAX_PREFIX = MAX_NAME - 11  # room for "-" and a 10-character digest


def job_name_for(dag_id: str, task_id: str, run_id: str, map_index: int = -1, prefix: str | None = None) -> str:
    """A deterministic Job name for one task of one run: the same on every retry, unique across runs.

    ``<prefix or task_id slug>-<digest of dag, task, run, map index>``, at most 63 characters.
    """
    if prefix is not None:
        validate_name(prefix, "job_name prefix")
        if len(prefix) > MAX_PREFIX:
            raise ConfigurationError(
                f"job_name prefix {prefix!r} is {len(prefix)} characters; at most {MAX_PREFIX} leave room for the "
                "run's digest within Kubernetes' 63: shorten it."
            )
    digest = hashlib.sha256(f"{dag_id}\0{task_id}\0{run_id}\0{map_index}".encode()).hexdigest()[:10]
    base = prefix if prefix is not None else task_id
    slug = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[: MAX_NAME - len(digest) - 1].strip("-")
    return validate_name(f"{slug}-{digest}" if slug else f"job-{digest}", "Job name")


def next_generation(name: str) -> str:
    """The name of the Job that follows ``name`` when a retry finds ``name`` finished with items left:
    ``<name>-g2``, then ``-g3``...; shortened from the left of the suffix to stay within 63 characters."""
    match = re.fullmatch(r"(?P<base>.+)-g(?P<n>\d+)", name)
    base, number = (match["base"], int(match["n"]) + 1) if match else (name, 2)
    suffix = f"-g{number}"
    return validate_name(f"{base[: MAX_NAME - len(suffix)].rstrip('-')}{suffix}", "Job name")


def _positive(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigurationError(f"{name}={value!r} must be {kind}.")


def _mapping(value: Any, name: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise ConfigurationError(f"{name} must be a mapping (dict), got {type(value).__name__}: {value!r:.60}.")


@dataclass(frozen=True)
class JobOptions:
    """What the user asks for. Completions derived from the queue are not part of it (see ``fingerprint``)."""

    image: str
    queue_name: str
    namespace: str = "default"
    command: list[str] | None = None
    args: list[str] | None = None
    parallelism: int = 2
    completions: int | None = None
    items_per_pod: int | None = 1
    restart_policy: str = "OnFailure"
    backoff_limit: int | None = None
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    pod_failure_policy: dict[str, Any] | None = None
    pod_replacement_policy: str | None = "Failed"
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    service_account_name: str | None = None
    image_pull_secrets: list[str] | None = None
    image_pull_policy: str | None = None
    env: dict[str, str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    pod_template: dict[str, Any] | None = None
    job_template: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image.strip():
            raise ConfigurationError("image is empty: give the worker image, e.g. 'registry.example/job-wq-1:1.0'.")
        validate_queue_name(self.queue_name)
        validate_name(self.namespace, "namespace")
        _positive(self.parallelism, "parallelism")
        _positive(self.completions, "completions", allow_none=True)
        _positive(self.items_per_pod, "items_per_pod", allow_none=True)
        _positive(self.backoff_limit, "backoff_limit", allow_none=True, minimum=0)
        _positive(self.active_deadline_seconds, "active_deadline_seconds", allow_none=True)
        _positive(self.ttl_seconds_after_finished, "ttl_seconds_after_finished", allow_none=True, minimum=0)
        if self.image_pull_policy is not None and self.image_pull_policy not in PULL_POLICIES:
            raise ConfigurationError(f"image_pull_policy={self.image_pull_policy!r}: use one of {PULL_POLICIES} (or None: "
                                     "Kubernetes then pulls ':latest' and untagged images every time, others if missing).")
        if self.restart_policy not in RESTART_POLICIES:
            raise ConfigurationError(f"restart_policy={self.restart_policy!r}: a Job's pods use one of {RESTART_POLICIES}.")
        for name in ("pod_failure_policy", "resources", "node_selector", "env", "labels", "annotations",
                     "pod_template", "job_template"):
            _mapping(getattr(self, name), name)
        for name in ("command", "args", "tolerations", "image_pull_secrets"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                raise ConfigurationError(f"{name} must be a list, got {type(value).__name__}: {value!r:.60}.")
        if self.pod_failure_policy and self.restart_policy != "Never":
            raise ConfigurationError(f"pod_failure_policy needs restart_policy='Never' (a Kubernetes rule), not "
                                     f"{self.restart_policy!r}: pass restart_policy='Never' with it.")
        validate_replacement_policy(self.pod_replacement_policy, with_failure_policy=bool(self.pod_failure_policy))
        if self.service_account_name is not None:
            validate_subdomain(self.service_account_name, "service account name")
        for key, value in self.labels.items():
            if not isinstance(value, str) or len(value) > MAX_NAME or not _LABEL_VALUE.match(value):
                raise ConfigurationError(f"Label {key}={value!r} is not a valid label value (at most 63 of [A-Za-z0-9-_.]).")

    def fingerprint(self) -> str:
        """A hash of the options, stored on the Job so a retry can tell its own Job from another one."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


def completions_for(options: JobOptions, queue_depth: int) -> int | None:
    """Completions for a queue holding ``queue_depth`` items: explicit, one per item, one per
    ``items_per_pod`` items, or None in drain mode (pods take items until the queue is empty)."""
    if options.completions is not None:
        return options.completions
    if options.items_per_pod is None:
        return None
    return -(-queue_depth // options.items_per_pod)


def build_secret(name: str, namespace: str, broker_url: str) -> dict[str, Any]:
    """The Secret holding the pods' BROKER_URL (its ownerReference to the Job is added once the Job exists)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "type": "Opaque",
        "stringData": {SECRET_KEY: broker_url},
    }


#: The user the worker runs as (worker/Dockerfile creates it): numeric, so the kubelet can check runAsNonRoot.
WORKER_UID = 10001
#: The pods meet the "restricted" Pod Security Standard unless ``pod_template`` says otherwise (its values
#: win, key by key): no root, no privilege escalation, no capabilities, the runtime's seccomp profile.
RESTRICTED_POD_TEMPLATE: dict[str, Any] = {"spec": {
    "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": CONTAINER_NAME, "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
}}


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}


def build_job(name: str, options: JobOptions, *, completions: int | None, secret_name: str) -> dict[str, Any]:
    """The batch/v1 Job: the tutorial's job.yaml plus everything the options ask for."""
    env: list[dict[str, Any]] = [
        {"name": "BROKER_URL", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": SECRET_KEY}}},
        {"name": "QUEUE", "value": options.queue_name},
        {"name": "WORKQUEUE_MAX_ITEMS", "value": str(options.items_per_pod or 0)},
    ]
    env += [{"name": k, "value": str(v)} for k, v in (options.env or {}).items()]
    container: dict[str, Any] = {"name": CONTAINER_NAME, "image": options.image, "env": env}
    if options.command is not None:
        container["command"] = options.command
    if options.args is not None:
        container["args"] = options.args
    if options.resources:
        container["resources"] = options.resources
    if options.image_pull_policy:
        container["imagePullPolicy"] = options.image_pull_policy
    labels = {**MANAGED_BY, **options.labels}
    pod_spec: dict[str, Any] = {"restartPolicy": options.restart_policy, "containers": [container]}
    optional_pod = {
        "nodeSelector": options.node_selector,
        "tolerations": options.tolerations,
        "serviceAccountName": options.service_account_name,
        "imagePullSecrets": [{"name": n} for n in options.image_pull_secrets] if options.image_pull_secrets else None,
    }
    pod_spec.update({k: v for k, v in optional_pod.items() if v})
    job_spec: dict[str, Any] = {
        "parallelism": options.parallelism,
        "template": {"metadata": {"labels": labels, "annotations": dict(options.annotations)}, "spec": pod_spec},
    }
    optional_job = {
        "completions": completions,
        "backoffLimit": options.backoff_limit,
        "activeDeadlineSeconds": options.active_deadline_seconds,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        "podFailurePolicy": options.pod_failure_policy,
        "podReplacementPolicy": options.pod_replacement_policy,
    }
    job_spec.update({k: v for k, v in optional_job.items() if v is not None})
    ours = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": labels,
            "annotations": {**options.annotations, SPEC_HASH_ANNOTATION: options.fingerprint()},
        },
        "spec": job_spec,
    }
    base = copy.deepcopy(options.job_template or {})
    template = merge(RESTRICTED_POD_TEMPLATE, base.get("spec", {}).get("template", {}))
    base.setdefault("spec", {})["template"] = merge(template, options.pod_template or {})
    return merge(base, ours)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; containers merge by name, other lists are replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        elif key in ("containers", "initContainers") and isinstance(result.get(key), list):
            by_name = {c.get("name"): c for c in result[key]}
            merged = [merge(by_name.pop(c.get("name"), {}), c) for c in value]
            result[key] = merged + list(by_name.values())
        else:
            result[key] = copy.deepcopy(value)
    return result
