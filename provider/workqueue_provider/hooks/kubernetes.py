"""KubernetesApi: the provider's one synchronous way to the Kubernetes API.

Built on the cncf provider's ``KubernetesHook`` (its connection, kubeconfig and in-cluster
settings, exec-credential plugins). This class owns the rest: a clear error for a missing or
malformed connection, retries while an API server restarts (tenacity), and the translation of
every failure into a :class:`~workqueue_provider.exceptions.KubernetesError`
(:mod:`~workqueue_provider.hooks.kube_errors`). Objects travel as plain dicts in the API's camelCase
JSON form, the shape a watch delivers, so :mod:`workqueue_provider.kube` reads both.
The asyncio twin used by the trigger is :mod:`workqueue_provider.hooks.kubernetes_async`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from typing import Any

import urllib3
from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from kubernetes.client import ApiException, AppsV1Api, BatchV1Api, CoreV1Api
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from workqueue_provider.exceptions import ConfigurationError, KubernetesError
from workqueue_provider.hooks.connections import connection_error, malformed_error
from workqueue_provider.hooks.kube_errors import TRANSIENT_STATUSES, api_error, transport_error
from workqueue_provider.kube.job_manifest import owner_reference
from workqueue_provider.kube.job_status import failed_create_selector, pods_of

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = KubernetesHook.default_conn_name
OUTAGE_SECONDS = 120.0  # how long a waiting read rides out an API outage (a restart, a control-plane upgrade)
READ_TIMEOUT = (10, 30)  # seconds to connect, to read: a read against a silent address can't hang the wait
NOT_TRANSIENT = (urllib3.exceptions.SSLError, urllib3.exceptions.LocationParseError, urllib3.exceptions.ProxyError)
#: kind -> (client attribute, resource) of the objects create_object/get_object handle
OBJECT_APIS = {"Service": ("core", "service"), "ConfigMap": ("core", "config_map"), "StatefulSet": ("apps", "stateful_set")}
CONNECTION_EXAMPLE = '{"conn_type": "kubernetes", "extra": {"kube_config_path": "~/.kube/config"}}'


def _transient(error: BaseException) -> bool:
    """Worth reading again: the API server unreachable, restarting or throttling (not a TLS or address
    error, which waiting doesn't fix)."""
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUSES
    if isinstance(error, urllib3.exceptions.MaxRetryError):
        error = error.reason or error
    return isinstance(error, urllib3.exceptions.HTTPError | OSError) and not isinstance(error, NOT_TRANSIENT)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("The Kubernetes API is unavailable (%s); reading again in %.1f s (giving up %.0f s after the "
                "first failure).", f"{type(error).__name__}: {str(error)[:200]}", state.upcoming_sleep, OUTAGE_SECONDS)


class KubernetesApi:
    """Job, pod, Secret, Service, StatefulSet and ConfigMap calls for one Kubernetes connection. Nothing connects
    in ``__init__``; a missing, malformed or unusable connection fails at the first call."""

    def __init__(self, kubernetes_conn_id: str = DEFAULT_CONN_ID) -> None:
        self.kubernetes_conn_id = kubernetes_conn_id

    @cached_property
    def api_client(self) -> Any:
        """The connection's API client; a missing, malformed or unusable connection is a ConfigurationError."""
        from workqueue_provider.compat import AirflowNotFoundException

        about = {"kind": "Kubernetes", "example": CONNECTION_EXAMPLE}
        malformed = malformed_error(self.kubernetes_conn_id, **about)
        if malformed is not None:
            raise malformed
        try:
            return KubernetesHook(conn_id=self.kubernetes_conn_id).api_client
        except AirflowNotFoundException as e:
            raise connection_error(self.kubernetes_conn_id, **about) from e
        except Exception as e:  # kubernetes ConfigException, a kubeconfig that isn't there or can't be read
            raise self._unusable(e) from e

    def _unusable(self, error: Exception) -> ConfigurationError:
        """Why the connection gives no client. Without the connection, the cncf hook falls back to the
        default kubeconfig ($KUBECONFIG, ~/.kube/config): name both ways to fix it."""
        from airflow.sdk import BaseHook

        from workqueue_provider.compat import AirflowNotFoundException

        reason = f"{type(error).__name__}: {str(error)[:200]}"
        try:
            BaseHook.get_connection(self.kubernetes_conn_id)
        except AirflowNotFoundException:
            return ConfigurationError(
                f"No Kubernetes connection {self.kubernetes_conn_id!r} is defined and no kubeconfig was found "
                f"({reason}): set KUBECONFIG to your cluster's kubeconfig, or create the connection, e.g. "
                f"AIRFLOW_CONN_{self.kubernetes_conn_id.upper()}='kubernetes://?kube_config_path=/path/to/kubeconfig'."
            )
        return ConfigurationError(
            f"The Kubernetes connection {self.kubernetes_conn_id!r} can't be used ({reason}): fix its "
            "kube_config_path / in_cluster settings."
        )

    @cached_property
    def batch(self) -> BatchV1Api:
        return BatchV1Api(self.api_client)

    @cached_property
    def core(self) -> CoreV1Api:
        return CoreV1Api(self.api_client)

    @cached_property
    def apps(self) -> AppsV1Api:
        return AppsV1Api(self.api_client)

    def call(self, action: str, fn: Callable[..., Any], *args: Any, namespace: str | None = None,
             missing_ok: bool = False, exists_ok: bool = False, ride_out_outages: bool = False, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as a dict (the API's JSON form). ``missing_ok``: a 404 returns None;
        ``exists_ok``: a 409 returns None; ``ride_out_outages`` (while waiting): an unreachable, restarting
        or throttling API server is retried with backoff for up to :data:`OUTAGE_SECONDS`. Every other
        failure is a :class:`~workqueue_provider.exceptions.KubernetesError` naming ``action``."""
        retrying = Retrying(retry=retry_if_exception(_transient), reraise=True, before_sleep=_log_retry,
                            stop=stop_after_delay(OUTAGE_SECONDS if ride_out_outages else 0),
                            wait=wait_exponential(multiplier=0.5, max=10))
        try:
            result = retrying(fn, *args, _request_timeout=READ_TIMEOUT, **kwargs)
        except ApiException as e:
            if (e.status == 404 and missing_ok) or (e.status == 409 and exists_ok):
                return None
            raise api_error(e, action, kubernetes_conn_id=self.kubernetes_conn_id, namespace=namespace) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise transport_error(e, self.kubernetes_conn_id) from e
        return self.api_client.sanitize_for_serialization(result)

    # -- Jobs and their pods

    def get_job(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> dict[str, Any] | None:
        """The Job, or None when it doesn't exist. Waiting loops pass ``ride_out_outages``."""
        return self.call(f"read Job {name!r}", self.batch.read_namespaced_job, name, namespace, namespace=namespace,
                         missing_ok=True, ride_out_outages=ride_out_outages)

    def create_job(self, job: dict[str, Any]) -> dict[str, Any]:
        namespace = job["metadata"]["namespace"]
        return self.call(f"create Job {job['metadata']['name']!r}", self.batch.create_namespaced_job, namespace, job,
                         namespace=namespace)

    def delete_job(self, name: str, namespace: str) -> bool:
        """Delete with Background propagation, so the garbage collector removes its pods (and Secret);
        False when it was already gone."""
        deleted = self.call(f"delete Job {name!r}", self.batch.delete_namespaced_job, name, namespace,
                            namespace=namespace, missing_ok=True, propagation_policy="Background")
        return deleted is not None

    def job_pods(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> list[dict[str, Any]]:
        pods = self.call(f"list the pods of Job {name!r}", self.core.list_namespaced_pod, namespace,
                         namespace=namespace, ride_out_outages=ride_out_outages, label_selector=pods_of(name))
        return list(pods.get("items") or [])

    def job_events(self, name: str, namespace: str, uid: str | None = None, *,
                   ride_out_outages: bool = False) -> list[dict[str, Any]]:
        """The Job's ``FailedCreate`` events (why the Job controller could not create its pods)."""
        events = self.call(f"list the events of Job {name!r}", self.core.list_namespaced_event, namespace,
                           namespace=namespace, ride_out_outages=ride_out_outages,
                           field_selector=failed_create_selector(name, uid))
        return list(events.get("items") or [])

    def pod_log_tail(self, pod: str, namespace: str, lines: int = 10) -> str:
        """The last lines a pod printed, or "" when the logs are unavailable."""
        try:
            response = self.core.read_namespaced_pod_log(pod, namespace, tail_lines=lines, _preload_content=False,
                                                         _request_timeout=READ_TIMEOUT)
            return response.data.decode(errors="replace").strip()
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
            return ""

    def get_pod(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self.call(f"read pod {name!r}", self.core.read_namespaced_pod, name, namespace, namespace=namespace,
                         missing_ok=True)

    # -- Secrets

    def get_secret(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self.call(f"read Secret {name!r}", self.core.read_namespaced_secret, name, namespace,
                         namespace=namespace, missing_ok=True)

    def create_secret(self, secret: dict[str, Any]) -> bool:
        """Create the Secret; False when one of that name exists already."""
        name, namespace = secret["metadata"]["name"], secret["metadata"]["namespace"]
        created = self.call(f"create Secret {name!r}", self.core.create_namespaced_secret, namespace, secret,
                            namespace=namespace, exists_ok=True)
        return created is not None

    def apply_secret(self, secret: dict[str, Any]) -> None:
        """Create the Secret, or replace the data of an existing one with the same name."""
        if not self.create_secret(secret):
            name, namespace = secret["metadata"]["name"], secret["metadata"]["namespace"]
            self.call(f"update Secret {name!r}", self.core.patch_namespaced_secret, name, namespace,
                      {"stringData": secret["stringData"]}, namespace=namespace)

    def adopt_secret(self, secret_name: str, job: dict[str, Any]) -> None:
        """Make the Job own the Secret, so deleting the Job deletes it too."""
        namespace = job["metadata"]["namespace"]
        self.call(f"set the owner of Secret {secret_name!r}", self.core.patch_namespaced_secret, secret_name, namespace,
                  {"metadata": {"ownerReferences": [owner_reference(job)]}}, namespace=namespace)

    def delete_secret(self, name: str, namespace: str) -> None:
        self.call(f"delete Secret {name!r}", self.core.delete_namespaced_secret, name, namespace, namespace=namespace,
                  missing_ok=True)

    # -- the broker's Service, StatefulSet and (a cluster's) ConfigMap

    def create_object(self, body: dict[str, Any]) -> bool:
        """Create a Service, StatefulSet or ConfigMap; False when one of that name exists already. (A Service
        with a fixed nodePort that exists already is refused as invalid, "port is already allocated", before
        the name is checked: that too counts as existing once a read finds it.)"""
        kind, name, namespace = body["kind"], body["metadata"]["name"], body["metadata"]["namespace"]
        create = self._object_call("create", kind)
        try:
            created = self.call(f"create {kind} {name!r}", create, namespace, body, namespace=namespace, exists_ok=True)
        except KubernetesError:
            if self.get_object(kind, name, namespace) is not None:
                return False
            raise
        return created is not None

    def get_object(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        read = self._object_call("read", kind)
        return self.call(f"read {kind} {name!r}", read, name, namespace, namespace=namespace, missing_ok=True)

    def _object_call(self, verb: str, kind: str) -> Callable[..., Any]:
        """The client method ``<verb>_namespaced_<resource>`` of ``kind``."""
        if kind not in OBJECT_APIS:
            raise ValueError(f"KubernetesApi has no {verb} call for kind {kind!r}: use one of {', '.join(OBJECT_APIS)}.")
        group, resource = OBJECT_APIS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{resource}")
