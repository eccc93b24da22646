"""JobCompleteTrigger: waits for a Job by watching it, not by polling.

It lists the Job once, then watches from that resourceVersion over one connection; a watch that
ends (server timeout, dropped stream) is re-opened from the last resourceVersion seen, and a
``410 Gone`` (too old) starts over with a fresh list. Each change goes through
:func:`~workqueue_provider.kube.job_status.assess`, the same function the sensor's ``poke`` uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
from airflow.triggers.base import BaseTrigger, TriggerEvent
from kubernetes_asyncio import client as async_client
from kubernetes_asyncio import watch as async_watch
from kubernetes_asyncio.client.exceptions import ApiException

from workqueue_provider.kube.job_status import JobAssessment, assess, pods_of, stuck_containers

WATCH_SECONDS = 290  # below the API server's default --min-request-timeout range, so reconnects are rare
RECONNECT_DELAYS = (0.5, 1, 2, 5, 10)
WATCH_CLIENT_GRACE = 10  # client-side timeout of a watch = its server-side timeout + this
STUCK_CHECK_SECONDS = 15  # how often pods are checked for an image that can't be pulled, while some aren't ready


def _airflow_3_3_plus() -> bool:
    from airflow import __version__
    from packaging.version import Version

    return Version(__version__) >= Version("3.3.0")


class JobCompleteTrigger(BaseTrigger):
    """Fires once the Job is Complete, Failed (or FailureTarget), gone, or past ``deadline``.

    :param job_name: Job to wait for.
    :param namespace: its namespace.
    :param kubernetes_conn_id: the cncf provider's Kubernetes connection.
    :param deadline: Unix time after which it gives up with a ``timeout`` event (None: never).
    :param delete_on_kill: delete the Job (Background propagation) when the deferred task is killed.
    :param progress_every: also log the Job's progress every this many seconds while it runs (0: only on
        changes). In drain mode a Job shows "active P" until the queue is empty, so without it the log
        would say nothing between the start and the end.
    :param queue_name: with ``amqp_conn_id``, those periodic lines also say how many items are left in
        the queue (a passive declare, off the event loop).
    :param image_pull_grace_seconds: fire a ``stuck`` event once a pod has waited this long on an image
        that can't be pulled or a config that can't be created (such a Job never ends by itself). Pods
        are listed only once the Job has had active pods that aren't ready for that long. None: never.
    """

    def __init__(self, *, job_name: str, namespace: str, kubernetes_conn_id: str, deadline: float | None = None,
                 delete_on_kill: bool = True, progress_every: float = 60.0, queue_name: str | None = None,
                 amqp_conn_id: str | None = None, image_pull_grace_seconds: float | None = None) -> None:
        super().__init__()
        self.job_name = job_name
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.deadline = deadline
        self.delete_on_kill = delete_on_kill
        self.progress_every = progress_every
        self.queue_name = queue_name
        self.amqp_conn_id = amqp_conn_id
        self.image_pull_grace_seconds = image_pull_grace_seconds
        self._fired = False
        self._watch_decided = False
        self._unready_since: float | None = None  # monotonic time since when some active pods aren't ready
        self._progress: str | None = None
        self._waiting_since: dict[str, float] = {}  # stuck-check state: container -> first seen waiting

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_name": self.job_name,
                "namespace": self.namespace,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "deadline": self.deadline,
                "delete_on_kill": self.delete_on_kill,
                "progress_every": self.progress_every,
                "queue_name": self.queue_name,
                "amqp_conn_id": self.amqp_conn_id,
                "image_pull_grace_seconds": self.image_pull_grace_seconds,
            },
        )

    def _hook(self) -> AsyncKubernetesHook:
        return AsyncKubernetesHook(conn_id=self.kubernetes_conn_id)

    def _event(self, status: str, assessment: JobAssessment | None = None, message: str | None = None,
               **extra: Any) -> TriggerEvent:
        return TriggerEvent({
            "status": status,
            "job_name": self.job_name,
            "namespace": self.namespace,
            "assessment": assessment.to_dict() if assessment else None,
            "message": message,
            **extra,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watch = asyncio.ensure_future(self._watch_verdict())
        pending: set[asyncio.Future[Any]] = {watch}
        if self.image_pull_grace_seconds is not None:
            pending.add(asyncio.ensure_future(self._watch_for_stuck_pods(self.image_pull_grace_seconds)))
        if self.progress_every:
            pending.add(asyncio.ensure_future(self._heartbeat()))
        try:
            event = None
            while event is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # a stuck check that gave up, or found the watch had decided, returns None: wait for the watch
                event = watch.result() if watch in done else next(filter(None, (t.result() for t in done)), None)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)  # let the API clients close
        self._fired = True
        yield event

    async def _watch_verdict(self) -> TriggerEvent:
        """The watch's event; its generator is closed before this returns, so is its API client."""
        events = self._watch()
        try:
            async for event in events:
                self._watch_decided = True  # from here on a stuck check defers to this event
                return event
            raise RuntimeError("the watch ended without an event")
        finally:
            await events.aclose()

    async def _heartbeat(self) -> None:
        """Log progress every ``progress_every`` seconds (progress only: never fails the wait)."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.progress_every)
            try:
                self.log.info("Job %s/%s still running after %.0f s: %s%s", self.namespace, self.job_name,
                              time.monotonic() - started, self._progress or "not seen yet", await self._items_left())
            except Exception as e:
                self.log.debug("Progress line failed: %r", e)

    async def _items_left(self) -> str:
        """", 5,210 items left in queue 'q'", or "" when no queue was given or it can't be read."""
        if not (self.queue_name and self.amqp_conn_id):
            return ""
        from workqueue_provider.hooks.amqp import AmqpHook

        hook = AmqpHook(amqp_conn_id=self.amqp_conn_id)
        try:
            depth = await asyncio.to_thread(hook.queue_depth, self.queue_name)
        except Exception as e:  # progress only: never fail the wait over it
            self.log.debug("Could not read the depth of queue %r: %s", self.queue_name, e)
            return ""
        return f", {depth.messages:,} items left in queue {self.queue_name!r}"

    async def _watch_for_stuck_pods(self, grace_seconds: float) -> TriggerEvent | None:
        """The ``stuck`` event, once a pod has waited ``grace_seconds`` on an image that can't be pulled;
        None if the check can't be done (the watch alone decides then)."""
        try:
            async with self._hook().get_conn() as api:
                core = async_client.CoreV1Api(api)
                while True:
                    await asyncio.sleep(max(1.0, min(STUCK_CHECK_SECONDS, grace_seconds)))
                    if self._unready_since is None or time.monotonic() - self._unready_since < grace_seconds:
                        continue
                    try:
                        pods = await core.list_namespaced_pod(self.namespace, label_selector=pods_of(self.job_name))
                    except ApiException as e:
                        if e.status in (401, 403):
                            self.log.warning("Can't list the pods of Job %s (%s %s): not checking them for images "
                                             "that can't be pulled (deploy/rbac.yaml grants it).", self.job_name,
                                             e.status, e.reason)
                            return None
                        continue  # the watch reports outages
                    except (TimeoutError, OSError, aiohttp.ClientError):
                        continue
                    stuck = stuck_containers([api.sanitize_for_serialization(pod) for pod in pods.items],
                                             now=time.time(), grace_seconds=grace_seconds,
                                             first_seen=self._waiting_since)
                    if stuck and not self._watch_decided:
                        self.log.error("Job %s/%s can't start its pods: %s", self.namespace, self.job_name,
                                       "; ".join(stuck))
                        return self._event("stuck", message=f"Job {self.namespace}/{self.job_name} can't start its pods.",
                                           grace_seconds=grace_seconds, stuck=stuck)
        except Exception:  # a side check: never fail the wait over it
            self.log.warning("The check for pods that can't start failed; waiting on the Job alone.", exc_info=True)
            return None

    def _track_readiness(self, status: dict[str, Any]) -> None:
        """Pods are listed only once some active pods have stayed not ready for the grace period, so a
        healthy Job costs no extra request."""
        if int(status.get("active") or 0) > int(status.get("ready") or 0):
            self._unready_since = self._unready_since or time.monotonic()
        else:
            self._unready_since = None

    async def _watch(self) -> AsyncGenerator[TriggerEvent, None]:
        last_progress = None
        resource_version: str | None = None
        failures = 0
        rebuilt = False  # a 401 rebuilds the API client once: exec-credential tokens (EKS, GKE) expire
        while True:
            async with self._hook().get_conn() as api:
                batch = async_client.BatchV1Api(api)
                selector = f"metadata.name={self.job_name}"
                while True:
                    remaining = None if self.deadline is None else self.deadline - time.time()
                    if remaining is not None and remaining <= 0:
                        yield self._event("timeout", message=f"Job {self.namespace}/{self.job_name} did not finish before the timeout.")
                        return
                    try:
                        if resource_version is None:
                            listed = await batch.list_namespaced_job(self.namespace, field_selector=selector)
                            if not listed.items:
                                yield self._event("error", message=f"Job {self.namespace}/{self.job_name} does not exist (deleted?).")
                                return
                            resource_version = listed.metadata.resource_version
                            events: list[dict[str, Any]] = [
                                {"type": "LISTED", "raw_object": api.sanitize_for_serialization(listed.items[0])}
                            ]
                        else:
                            events = []
                        timeout = int(min(WATCH_SECONDS, remaining)) + 1 if remaining is not None else WATCH_SECONDS
                        async with async_watch.Watch() as watch:
                            stream = watch.stream(batch.list_namespaced_job, self.namespace, field_selector=selector,
                                                  resource_version=resource_version, timeout_seconds=timeout,
                                                  allow_watch_bookmarks=True,
                                                  # the cncf hook's client otherwise cuts every request (this watch
                                                  # too) at 60 s client-side: a reconnect a minute
                                                  _request_timeout=timeout + WATCH_CLIENT_GRACE)
                            async for event in _chain(events, stream):
                                failures = 0
                                rebuilt = False  # these credentials work: a later expiry may rebuild again
                                job = event["raw_object"]
                                resource_version = job.get("metadata", {}).get("resourceVersion") or resource_version
                                if event["type"] == "BOOKMARK":
                                    continue
                                if event["type"] == "DELETED":
                                    yield self._event("error", message=f"Job {self.namespace}/{self.job_name} was deleted while waiting.")
                                    return
                                self._track_readiness(job.get("status") or {})
                                verdict = assess(job)
                                if verdict.progress() != last_progress:
                                    last_progress = self._progress = verdict.progress()
                                    self.log.info("Job %s/%s: %s", self.namespace, self.job_name, last_progress)
                                if verdict.done:  # the Job as seen: a short TTL may delete it before it's read again
                                    yield self._event(verdict.phase.value, verdict, job=job)
                                    return
                    except ApiException as e:
                        if e.status == 410:
                            self.log.info("Watch of Job %s expired (410 Gone); listing it again.", self.job_name)
                            resource_version = None
                            continue
                        if e.status == 401 and not rebuilt:
                            self.log.warning("The Kubernetes API refused the credentials (401) while watching Job %s: "
                                             "building a new client (fresh credentials) and watching again.",
                                             self.job_name)
                            rebuilt = True
                            break
                        if e.status in (401, 403, 404):
                            yield self._event("error", message=f"Watching Job {self.namespace}/{self.job_name} failed: {e.status} {e.reason}")
                            return
                        failures += 1
                        self.log.warning("Watch of Job %s failed (%s %s); reconnecting.", self.job_name, e.status, e.reason)
                    except (TimeoutError, OSError, aiohttp.ClientError) as e:  # e.g. the API server restarted
                        failures += 1
                        self.log.warning("Watch of Job %s dropped (%r); reconnecting.", self.job_name, e)
                    if failures:
                        await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1])

    async def _delete_job(self) -> None:
        async with self._hook().get_conn() as api:
            try:
                await async_client.BatchV1Api(api).delete_namespaced_job(
                    self.job_name, self.namespace, propagation_policy="Background")
                self.log.info("Deleted Job %s/%s and its pods (the task was killed).", self.namespace, self.job_name)
            except ApiException as e:
                if e.status != 404:
                    self.log.error("Could not delete Job %s/%s: %s %s", self.namespace, self.job_name, e.status, e.reason)

    async def on_kill(self) -> None:
        """Airflow >= 3.3 calls this when a user kills the deferred task (mark failed, clear...)."""
        if self.delete_on_kill and not self._fired:
            await self._delete_job()

    async def cleanup(self) -> None:
        """Before Airflow 3.3 only cleanup() runs on a kill, and also on a triggerer restart: delete the
        Job only once the task instance is no longer DEFERRED."""
        if _airflow_3_3_plus() or not self.delete_on_kill or self._fired or self.task_instance is None:
            return
        try:
            state = await self._task_state()
        except Exception:
            self.log.warning("Could not read the task's state; leaving Job %s running.", self.job_name, exc_info=True)
            return
        if state != "deferred":
            await self._delete_job()

    async def _task_state(self) -> str | None:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        ti = self.task_instance
        assert ti is not None
        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index)
        key = f"{ti.task_id}_{ti.map_index}" if ti.map_index >= 0 else ti.task_id
        return states[ti.run_id][key]


async def _chain(first: list[dict[str, Any]], rest: Any) -> AsyncIterator[dict[str, Any]]:
    for item in first:
        yield item
    async for item in rest:
        yield item
