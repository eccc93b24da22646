"""JobsHook: the Kubernetes calls the Job side needs, through the cncf provider's KubernetesHook.

Objects travel as plain dicts in the API's camelCase JSON form, the same shape a watch delivers,
so :func:`workqueue_provider.kube.job_status.assess` reads both. ``ApiException`` never leaks out:
:func:`~workqueue_provider.hooks.kube_errors.api_error` says what was refused and what to do.
"""

from __future__ import annotations

import contextlib
import logging
from functools import cached_property
from typing import Any

import urllib3
from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from kubernetes.client import ApiException, BatchV1Api, CoreV1Api
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from workqueue_provider.exceptions import ConfigurationError, WorkQueueError
from workqueue_provider.hooks.connections import connection_error, malformed_error
from workqueue_provider.hooks.kube_errors import api_error, transport_error
from workqueue_provider.kube.job_manifest import owner_reference
from workqueue_provider.kube.job_status import pods_of, stuck_containers

log = logging.getLogger(__name__)

OUTAGE_SECONDS = 120.0  # how long a waiting read rides out an API outage (a restart, a control-plane upgrade)
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)


READ_TIMEOUT = (10, 30)  # seconds to connect, to read: a read against a silent address can't hang the wait
NOT_TRANSIENT = (urllib3.exceptions.SSLError, urllib3.exceptions.LocationParseError, urllib3.exceptions.ProxyError)


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


class JobsHook:
    """Sync Job, Secret and pod calls for one kubernetes connection. Nothing connects in ``__init__``."""

    def __init__(self, kubernetes_conn_id: str = KubernetesHook.default_conn_name) -> None:
        self.kubernetes_conn_id = kubernetes_conn_id

    @cached_property
    def kube(self) -> KubernetesHook:
        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    @cached_property
    def api_client(self) -> Any:
        """The connection's API client; a missing, malformed or unusable connection is a ConfigurationError."""
        from workqueue_provider.compat import AirflowNotFoundException

        about = {"kind": "Kubernetes", "example": '{"conn_type": "kubernetes", "extra": {"kube_config_path": "~/.kube/config"}}'}
        malformed = malformed_error(self.kubernetes_conn_id, **about)
        if malformed is not None:
            raise malformed
        try:
            return self.kube.api_client
        except AirflowNotFoundException as e:
            raise connection_error(self.kubernetes_conn_id, **about) from e
        except Exception as e:  # kubernetes ConfigException, a kubeconfig that isn't there or can't be read
            raise ConfigurationError(
                f"The Kubernetes connection {self.kubernetes_conn_id!r} can't be used ({type(e).__name__}: "
                f"{str(e)[:200]}): fix its kube_config_path / in_cluster settings."
            ) from e

    @cached_property
    def batch(self) -> BatchV1Api:
        return BatchV1Api(self.api_client)

    @cached_property
    def core(self) -> CoreV1Api:
        return CoreV1Api(self.api_client)

    def as_dict(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)

    def _api_error(self, error: ApiException, action: str, namespace: str) -> WorkQueueError:
        return api_error(error, action, kubernetes_conn_id=self.kubernetes_conn_id, namespace=namespace)

    def _read(self, call: Any, *args: Any, ride_out_outages: bool = False) -> Any:
        """``call(*args)``; with ``ride_out_outages`` (while waiting), unreachable, restarting or throttling
        API servers are retried with backoff for up to :data:`OUTAGE_SECONDS`. An unreachable API is a
        clear error; ``ApiException`` is the caller's to word."""
        retrying = Retrying(retry=retry_if_exception(_transient), reraise=True, before_sleep=_log_retry,
                            stop=stop_after_delay(OUTAGE_SECONDS if ride_out_outages else 0),
                            wait=wait_exponential(multiplier=0.5, max=10))
        try:
            return retrying(call, *args, _request_timeout=READ_TIMEOUT)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise transport_error(e, self.kubernetes_conn_id) from e

    def get_job(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> dict[str, Any] | None:
        """The Job, or None when it doesn't exist. Waiting loops pass ``ride_out_outages``."""
        try:
            return self.as_dict(self._read(self.batch.read_namespaced_job, name, namespace,
                                           ride_out_outages=ride_out_outages))
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._api_error(e, f"read Job {name!r}", namespace) from e

    def create_job(self, job: dict[str, Any]) -> dict[str, Any]:
        namespace = job["metadata"]["namespace"]
        try:
            return self.as_dict(self.batch.create_namespaced_job(namespace, job))
        except ApiException as e:
            raise self._api_error(e, f"create Job {job['metadata']['name']!r}", namespace) from e

    def delete_job(self, name: str, namespace: str) -> bool:
        """Delete with Background propagation, so the garbage collector removes its pods (and Secret)."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise self._api_error(e, f"delete Job {name!r}", namespace) from e

    def apply_secret(self, secret: dict[str, Any]) -> None:
        """Create the Secret, or replace the data of an existing one with the same name."""
        name, namespace = secret["metadata"]["name"], secret["metadata"]["namespace"]
        try:
            self.core.create_namespaced_secret(namespace, secret)
        except ApiException as e:
            if e.status != 409:
                raise self._api_error(e, f"create Secret {name!r}", namespace) from e
            try:
                self.core.patch_namespaced_secret(name, namespace, {"stringData": secret["stringData"]})
            except ApiException as e2:
                raise self._api_error(e2, f"update Secret {name!r}", namespace) from e2

    def adopt_secret(self, secret_name: str, job: dict[str, Any]) -> None:
        """Make the Job own the Secret, so deleting the Job deletes it too."""
        namespace = job["metadata"]["namespace"]
        body = {"metadata": {"ownerReferences": [owner_reference(job)]}}
        try:
            self.core.patch_namespaced_secret(secret_name, namespace, body)
        except ApiException as e:
            raise self._api_error(e, f"set the owner of Secret {secret_name!r}", namespace) from e

    def delete_secret(self, name: str, namespace: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_secret(name, namespace)

    def job_pods(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> list[dict[str, Any]]:
        try:
            pods = self._read(lambda **kw: self.core.list_namespaced_pod(namespace, label_selector=pods_of(name), **kw),
                              ride_out_outages=ride_out_outages)
        except ApiException as e:
            raise self._api_error(e, f"list the pods of Job {name!r}", namespace) from e
        return [self.as_dict(pod) for pod in pods.items]

    def stuck_containers(self, name: str, namespace: str, grace_seconds: float,
                         first_seen: dict[str, float] | None = None) -> list[str]:
        """Containers of the Job's pods stuck on a missing image or bad config (see :func:`stuck_containers`;
        ``first_seen`` is its state across calls). Called while waiting, so it rides out API outages."""
        import time

        return stuck_containers(self.job_pods(name, namespace, ride_out_outages=True), now=time.time(),
                                grace_seconds=grace_seconds, first_seen=first_seen)

    def pod_log_tail(self, pod: str, namespace: str, lines: int = 10) -> str:
        """The last lines a pod printed, or "" when the logs are unavailable."""
        try:
            response = self.core.read_namespaced_pod_log(pod, namespace, tail_lines=lines, _preload_content=False)
            return response.data.decode(errors="replace").strip()
        except (ApiException, OSError, ValueError):
            return ""

    def failed_pod_details(self, name: str, namespace: str, *, limit: int = 3) -> list[str]:
        """One line per failed pod: exit code, restarts, and the tail of its log."""
        details = []
        for pod in self.job_pods(name, namespace):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (status.get("state") or {}).get("terminated") or \
                    (status.get("lastState") or {}).get("terminated")
                if not terminated or terminated.get("exitCode") == 0:
                    continue
                pod_name = pod["metadata"]["name"]
                tail = self.pod_log_tail(pod_name, namespace)
                details.append(
                    f"pod {pod_name} exited {terminated.get('exitCode')} ({terminated.get('reason', 'Error')}, "
                    f"{status.get('restartCount', 0)} restarts)" + (f"; last output: {tail[-500:]!r}" if tail else "")
                )
                break
            if len(details) >= limit:
                break
        return details
