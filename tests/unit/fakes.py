"""Fakes for the Job side's unit tests: a scripted Kubernetes API (sync and asyncio) and AMQP hook.

They stand in at the access layer's edges (the kubernetes client classes, the cncf hooks), so the
provider's own code, from the access layer up, runs for real. Jobs are plain dicts, as the API serves them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from workqueue_provider.amqp.queues import QueueDepth
from workqueue_provider.amqp.receipts import Account


def job(name: str = "j", namespace: str = "ns", *, active: int = 0, ready: int = 0, succeeded: int = 0,
        failed: int = 0, completions: int | None = 1, conditions: tuple[str, ...] = (), version: str = "1",
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Job dict; ``conditions`` are types whose status is "True" (e.g. "Complete", "Failed")."""
    return {
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": version, "uid": f"uid-{name}",
                     "annotations": annotations or {}},
        "spec": {"completions": completions},
        "status": {"active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
                   "conditions": [{"type": c, "status": "True", "reason": f"{c}Reason", "message": f"{c} message"}
                                  for c in conditions]},
    }


def pod_waiting_on_image(name: str = "j-abc", reason: str = "ErrImagePull",
                         created: str = "2020-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "status": {"containerStatuses": [{"name": "worker", "image": "missing:1", "restartCount": 0,
                                              "state": {"waiting": {"reason": reason, "message": "not found"}}}]}}


def api_exception(status: int, reason: str = "") -> ApiException:
    return ApiException(status=status, reason=reason)


# -- asyncio: what AsyncKubernetesApi reaches through the cncf AsyncKubernetesHook


@dataclass
class AsyncCluster:
    """Scripted answers for the trigger's watch. ``lists``: one entry per list call (a Job dict, None for
    "no such Job", or an exception); ``streams``: one entry per watch call (a list of events, each a
    ``(type, job)`` pair or an exception raised at that point). Records every request."""

    lists: list[Any] = field(default_factory=list)
    streams: list[list[Any]] = field(default_factory=list)
    pods: list[Any] = field(default_factory=list)  # per pod list call: a list of pods, or an exception
    events: list[Any] = field(default_factory=list)  # per event list call: a list of events, or an exception
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    clients_built: int = 0
    clients_closed: int = 0
    deleted: list[str] = field(default_factory=list)

    def install(self, monkeypatch: Any) -> AsyncCluster:
        from workqueue_provider.hooks import kubernetes_async

        cluster = self

        class Hook:
            @contextlib.asynccontextmanager
            async def get_conn(self) -> Any:
                cluster.clients_built += 1
                try:
                    yield SimpleNamespace(sanitize_for_serialization=lambda obj: obj)
                finally:
                    cluster.clients_closed += 1

        class Batch:
            def __init__(self, api: Any) -> None:
                pass

            async def list_namespaced_job(self, namespace: str, **kwargs: Any) -> Any:
                cluster.requests.append(("list", kwargs))
                answer = cluster.lists.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                items = [] if answer is None else [answer]
                version = answer["metadata"]["resourceVersion"] if answer else "0"
                return SimpleNamespace(items=items, metadata=SimpleNamespace(resource_version=version))

            async def delete_namespaced_job(self, name: str, namespace: str, **kwargs: Any) -> None:
                cluster.requests.append(("delete", kwargs))
                cluster.deleted.append(name)

        class Core:
            def __init__(self, api: Any) -> None:
                pass

            async def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
                cluster.requests.append(("pods", kwargs))
                answer = cluster.pods.pop(0) if len(cluster.pods) > 1 else cluster.pods[0]
                if isinstance(answer, Exception):
                    raise answer
                return SimpleNamespace(items=answer)

            async def list_namespaced_event(self, namespace: str, **kwargs: Any) -> Any:
                cluster.requests.append(("events", kwargs))
                answer = (cluster.events.pop(0) if len(cluster.events) > 1 else cluster.events[0]) if cluster.events else []
                if isinstance(answer, Exception):
                    raise answer
                return SimpleNamespace(items=answer)

        class Watch:
            async def __aenter__(self) -> Watch:
                return self

            async def __aexit__(self, *exc: Any) -> bool:
                return False

            async def stream(self, func: Any, *args: Any, **kwargs: Any) -> Any:
                cluster.requests.append(("watch", kwargs))
                for event in cluster.streams.pop(0):
                    if isinstance(event, Exception):
                        raise event
                    kind, obj = event
                    yield {"type": kind, "raw_object": obj}

        monkeypatch.setattr(kubernetes_async.AsyncKubernetesApi, "_hook", lambda self: Hook())
        monkeypatch.setattr(kubernetes_async.async_client, "BatchV1Api", Batch)
        monkeypatch.setattr(kubernetes_async.async_client, "CoreV1Api", Core)
        monkeypatch.setattr(kubernetes_async.async_watch, "Watch", Watch)
        return self

    def count(self, kind: str) -> int:
        return sum(1 for request, _ in self.requests if request == kind)


# -- sync: a KubernetesApi stand-in with the same methods, over dicts


class FakeKubernetesApi:
    """The methods of :class:`~workqueue_provider.hooks.kubernetes.KubernetesApi` the Job side calls,
    over an in-memory namespace. ``job_reads``: scripted answers for successive get_job calls of one name."""

    kubernetes_conn_id = "kubernetes_default"

    def __init__(self, jobs: dict[str, dict[str, Any]] | None = None, pods: list[dict[str, Any]] | None = None) -> None:
        self.jobs = dict(jobs or {})
        self.pods = list(pods or [])
        self.job_reads: dict[str, list[dict[str, Any] | None]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.adopted: list[str] = []
        self.logs: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []

    def job_events(self, name: str, namespace: str, uid: str | None = None, *,
                   ride_out_outages: bool = False) -> list[dict[str, Any]]:
        return self.events

    def get_job(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> dict[str, Any] | None:
        if self.job_reads.get(name):
            return self.job_reads[name].pop(0)
        return self.jobs.get(name)

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.created.append(name)
        self.jobs[name] = {**body, "metadata": {**body["metadata"], "uid": f"uid-{name}"}}
        return self.jobs[name]

    def delete_job(self, name: str, namespace: str) -> bool:
        self.deleted.append(name)
        return self.jobs.pop(name, None) is not None

    def job_pods(self, name: str, namespace: str, *, ride_out_outages: bool = False) -> list[dict[str, Any]]:
        return self.pods

    def pod_log_tail(self, pod: str, namespace: str, lines: int = 10) -> str:
        return self.logs.get(pod, "")

    def apply_secret(self, secret: dict[str, Any]) -> None:
        self.secrets[secret["metadata"]["name"]] = secret

    def adopt_secret(self, secret_name: str, job: dict[str, Any]) -> None:
        self.adopted.append(secret_name)

    def delete_secret(self, name: str, namespace: str) -> None:
        self.secrets.pop(name, None)


class FakeAmqpHook:
    """Queue depth and item account as a test sets them; the pods' broker URL."""

    def __init__(self, *, ready: int = 0, consumers: int = 0, account: Account | None = None,
                 accounts: list[Account | None] | None = None) -> None:
        self.depth = QueueDepth("q", ready, consumers)
        self.accounts = list(accounts or [account])  # successive reads; the last one stays
        self.reads = 0
        self.settings = SimpleNamespace(url=lambda host=None, port=None: "amqp://user:secret@broker:5672/%2F",
                                        address_for=lambda host=None, port=None: f"{host or 'broker'}:{port or 5672}")

    def queue_depth(self, queue_name: str, *, checked: bool = False) -> QueueDepth:
        return self.depth

    def item_account(self, queue_name: str, dead_letter_queue: str | None = None) -> Account | None:
        self.reads += 1
        return self.accounts.pop(0) if len(self.accounts) > 1 else self.accounts[0]


class ListLog:
    """A logger that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: Any) -> None:
        self.lines.append((level, msg % args if args else msg))

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("error", msg, *args)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)
