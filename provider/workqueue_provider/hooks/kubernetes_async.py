"""AsyncKubernetesApi: the asyncio twin of :class:`~workqueue_provider.hooks.kubernetes.KubernetesApi`,
for the triggerer.

Built on the cncf provider's ``AsyncKubernetesHook``. :meth:`AsyncKubernetesApi.watch_job` lists the
Job once, then watches it from that resourceVersion over one connection; a watch that ends (server
timeout, dropped stream) is re-opened from the last resourceVersion seen, a ``410 Gone`` (too old)
starts over with a fresh list, and a ``401`` rebuilds the client once (exec-credential tokens of
EKS or GKE expire). Failures that waiting can't fix are raised as
:class:`~workqueue_provider.exceptions.KubernetesError`, worded by
:mod:`~workqueue_provider.hooks.kube_errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
from kubernetes_asyncio import client as async_client
from kubernetes_asyncio import watch as async_watch
from kubernetes_asyncio.client.exceptions import ApiException

from workqueue_provider.exceptions import KubernetesNotFoundError
from workqueue_provider.hooks.kube_errors import api_error
from workqueue_provider.kube.job_status import failed_create_selector, pods_of

WATCH_SECONDS = 290  # below the API server's default --min-request-timeout range, so reconnects are rare
WATCH_CLIENT_GRACE = 10  # client-side timeout of a watch = its server-side timeout + this
RECONNECT_DELAYS = (0.5, 1, 2, 5, 10)
LISTED = "LISTED"  # the event type of the Job as first listed (a watch then sends ADDED/MODIFIED/DELETED)


class AsyncKubernetesApi:
    """Watch a Job, list its pods, delete it: asyncio calls for one Kubernetes connection."""

    def __init__(self, kubernetes_conn_id: str, log: Any = None) -> None:
        self.kubernetes_conn_id = kubernetes_conn_id
        self.log = log or logging.getLogger(__name__)  # the trigger passes its own, so lines reach the task log

    def _hook(self) -> AsyncKubernetesHook:
        return AsyncKubernetesHook(conn_id=self.kubernetes_conn_id)

    def _error(self, error: ApiException, action: str, namespace: str) -> Exception:
        return api_error(error, action, kubernetes_conn_id=self.kubernetes_conn_id, namespace=namespace)

    async def watch_job(self, name: str, namespace: str, *, deadline: float | None = None
                        ) -> AsyncGenerator[dict[str, Any], None]:
        """The Job's changes as ``{"type": LISTED|ADDED|MODIFIED|DELETED, "object": job dict}``, until the
        caller stops or ``deadline`` (Unix time) passes. API outages are ridden out (reconnect with
        backoff); a Job that doesn't exist, or refused credentials, raise a ``KubernetesError``."""
        resource_version: str | None = None
        failures = 0
        rebuilt = False
        selector = f"metadata.name={name}"
        while True:
            async with self._hook().get_conn() as api:
                batch = async_client.BatchV1Api(api)
                while True:
                    remaining = None if deadline is None else deadline - time.time()
                    if remaining is not None and remaining <= 0:
                        return
                    try:
                        first: list[dict[str, Any]] = []
                        if resource_version is None:
                            listed = await batch.list_namespaced_job(namespace, field_selector=selector)
                            if not listed.items:
                                raise KubernetesNotFoundError(f"Job {namespace}/{name} does not exist (deleted?).")
                            resource_version = listed.metadata.resource_version
                            first = [{"type": LISTED, "object": api.sanitize_for_serialization(listed.items[0])}]
                        timeout = int(min(WATCH_SECONDS, remaining)) + 1 if remaining is not None else WATCH_SECONDS
                        async with async_watch.Watch() as watch:
                            stream = watch.stream(batch.list_namespaced_job, namespace, field_selector=selector,
                                                  resource_version=resource_version, timeout_seconds=timeout,
                                                  allow_watch_bookmarks=True,
                                                  # the cncf hook's client otherwise cuts every request (this watch
                                                  # too) at 60 s client-side: a reconnect a minute
                                                  _request_timeout=timeout + WATCH_CLIENT_GRACE)
                            async for event in _chain(first, stream):
                                failures, rebuilt = 0, False  # these credentials work: a later expiry may rebuild
                                job = event.get("raw_object") or event.get("object") or {}
                                resource_version = (job.get("metadata") or {}).get("resourceVersion") or resource_version
                                if event["type"] != "BOOKMARK":
                                    yield {"type": event["type"], "object": job}
                    except ApiException as e:
                        if e.status == 410:
                            self.log.info("Watch of Job %s expired (410 Gone); listing it again.", name)
                            resource_version = None
                            continue
                        if e.status == 401 and not rebuilt:
                            self.log.warning("The Kubernetes API refused the credentials (401) while watching Job %s: "
                                             "building a new client (fresh credentials) and watching again.", name)
                            rebuilt = True
                            break
                        if e.status in (401, 403, 404):
                            raise self._error(e, f"watch Job {name!r}", namespace) from e
                        failures += 1
                        self.log.warning("Watch of Job %s failed (%s %s); reconnecting.", name, e.status, e.reason)
                    except (TimeoutError, OSError, aiohttp.ClientError) as e:  # e.g. the API server restarted
                        failures += 1
                        self.log.warning("Watch of Job %s dropped (%r); reconnecting.", name, e)
                    if failures:
                        await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1])

    async def job_pods(self, name: str, namespace: str) -> list[dict[str, Any]]:
        """The Job's pods as dicts. Refused rights raise a ``KubernetesError``; an outage raises the
        transport error (the caller decides whether to try again)."""
        async with self._hook().get_conn() as api:
            try:
                pods = await async_client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=pods_of(name))
            except ApiException as e:
                raise self._error(e, f"list the pods of Job {name!r}", namespace) from e
            return [api.sanitize_for_serialization(pod) for pod in pods.items]

    async def job_events(self, name: str, namespace: str, uid: str | None = None) -> list[dict[str, Any]]:
        """The Job's ``FailedCreate`` events, as dicts (see :meth:`job_pods` for failures)."""
        async with self._hook().get_conn() as api:
            try:
                events = await async_client.CoreV1Api(api).list_namespaced_event(
                    namespace, field_selector=failed_create_selector(name, uid))
            except ApiException as e:
                raise self._error(e, f"list the events of Job {name!r}", namespace) from e
            return [api.sanitize_for_serialization(event) for event in events.items]

    async def delete_job(self, name: str, namespace: str) -> bool:
        """Delete with Background propagation; False when it was already gone."""
        async with self._hook().get_conn() as api:
            try:
                await async_client.BatchV1Api(api).delete_namespaced_job(name, namespace, propagation_policy="Background")
            except ApiException as e:
                if e.status == 404:
                    return False
                raise self._error(e, f"delete Job {name!r}", namespace) from e
            return True


async def _chain(first: list[dict[str, Any]], rest: Any) -> AsyncIterator[dict[str, Any]]:
    for item in first:
        yield item
    async for item in rest:
        yield item
