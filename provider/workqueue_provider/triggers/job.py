"""JobCompleteTrigger: waits for a Job by watching it, not by polling.

The watch (list once, then one long-lived watch, re-opened as needed) is
:meth:`AsyncKubernetesApi.watch_job <workqueue_provider.hooks.kubernetes_async.AsyncKubernetesApi.watch_job>`;
each change goes through :class:`~workqueue_provider.kube.job_wait.JobProgress`, as in the sensor's poke
and the in-worker wait. The single event the trigger fires is a
:class:`~workqueue_provider.kube.job_wait.WaitEvent` as a dict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from airflow.triggers.base import BaseTrigger, TriggerEvent

from workqueue_provider.exceptions import KubernetesAuthError, KubernetesError, WorkQueueError
from workqueue_provider.hooks.kubernetes_async import AsyncKubernetesApi
from workqueue_provider.kube.job_wait import JobProgress, WaitEvent, WaitStatus


class JobCompleteTrigger(BaseTrigger):
    """Fires once the Job is Complete, Failed (or FailureTarget), gone, stuck on an image, refused its
    pods (a PodSecurity violation, an exceeded quota, a missing ServiceAccount...), or past ``deadline``.

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
        self.progress = JobProgress(job_name, namespace, grace_seconds=image_pull_grace_seconds)
        self._fired = False

    @property
    def api(self) -> AsyncKubernetesApi:
        return AsyncKubernetesApi(self.kubernetes_conn_id, log=self.log)

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

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watch = asyncio.ensure_future(self._watch())
        pending: set[asyncio.Future[Any]] = {watch}
        pending.add(asyncio.ensure_future(self._side_checks()))
        if self.progress_every:
            pending.add(asyncio.ensure_future(self._heartbeat()))
        try:
            event = None
            while event is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # side checks that gave up return None: wait for the watch
                event = watch.result() if watch in done else next(filter(None, (t.result() for t in done)), None)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)  # let the API clients close
        self._fired = True
        yield TriggerEvent(event.as_dict())

    async def _watch(self) -> WaitEvent:
        """The wait's end as the watch sees it (its generator is closed before this returns)."""
        name, namespace = self.job_name, self.namespace
        events = self.api.watch_job(name, namespace, deadline=self.deadline)
        try:
            async for change in events:
                if change["type"] == "DELETED":
                    return WaitEvent(WaitStatus.ERROR, name, namespace,
                                     message=f"Job {namespace}/{name} was deleted while waiting.")
                if self.progress.observe(change["object"]):
                    self.log.info("Job %s/%s: %s", namespace, name, self.progress.last_line)
                ending = self.progress.ending(change["object"])
                if ending is not None:
                    return ending
        except KubernetesError as e:
            return WaitEvent(WaitStatus.ERROR, name, namespace, message=str(e))
        finally:
            await events.aclose()
        return WaitEvent(WaitStatus.TIMEOUT, name, namespace,
                         message=f"Job {namespace}/{name} did not finish before the timeout.")

    async def _side_checks(self) -> WaitEvent | None:
        """Pods waiting on an image past the grace period (``stuck``), pod creations refused (``refused``);
        each noticed in the log at once. Reads happen only while the Job looks unwell (see JobProgress),
        and a check the API refuses (RBAC) is dropped: the watch alone decides then. None if none fires."""
        checks: dict[str, tuple[Any, Any, Any]] = {"events": (self.progress.events_worth_listing, self.progress.look_at_events,
                             lambda: self.api.job_events(self.job_name, self.namespace, self.progress.uid))}
        if self.image_pull_grace_seconds is not None:
            checks["pods"] = (self.progress.pods_worth_listing, self.progress.look_at_pods,
                              lambda: self.api.job_pods(self.job_name, self.namespace))
        try:
            while checks:
                await asyncio.sleep(1.0)
                for what, (due, judge, read) in list(checks.items()):
                    if not due():
                        continue
                    try:
                        notice, ending = judge(await read())
                    except KubernetesAuthError as e:
                        self.log.warning("Not checking the %s of Job %s (deploy/rbac.yaml grants it): %s",
                                         what, self.job_name, e)
                        del checks[what]
                        continue
                    except (WorkQueueError, TimeoutError, OSError, aiohttp.ClientError):
                        continue  # the watch reports outages
                    if notice:
                        self.log.warning("Job %s/%s: %s", self.namespace, self.job_name, notice)
                    if ending is not None:
                        self.log.error("Job %s/%s: %s %s", self.namespace, self.job_name, ending.message,
                                       "; ".join(ending.reasons))
                        return ending
            return None
        except asyncio.CancelledError:
            raise
        except Exception:  # a side check: never fail the wait over it
            self.log.warning("The checks of the Job's pods and events failed; waiting on the Job alone.", exc_info=True)
            return None

    async def _heartbeat(self) -> None:
        """Log progress every ``progress_every`` seconds (progress only: never fails the wait)."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.progress_every)
            try:
                self.log.info("Job %s/%s still running after %.0f s: %s%s", self.namespace, self.job_name,
                              time.monotonic() - started, self.progress.last_line or "not seen yet",
                              await self._items_left())
            except Exception as e:
                self.log.debug("Progress line failed: %r", e)

    async def _items_left(self) -> str:
        """", 5,210 items left in queue 'q'", or "" when no queue was given or it can't be read."""
        if not (self.queue_name and self.amqp_conn_id):
            return ""
        from asgiref.sync import sync_to_async

        from workqueue_provider.hooks.amqp import AmqpHook

        hook = AmqpHook(amqp_conn_id=self.amqp_conn_id)
        try:  # sync_to_async, not asyncio.to_thread: Airflow 3.1's trigger runner can't read a connection from a thread
            depth = await sync_to_async(hook.queue_depth)(self.queue_name)
        except Exception as e:  # progress only: never fail the wait over it
            self.log.debug("Could not read the depth of queue %r: %s", self.queue_name, e)
            return ""
        return f", {depth.messages:,} items left in queue {self.queue_name!r}"

    async def _delete_job(self) -> None:
        try:
            if await self.api.delete_job(self.job_name, self.namespace):
                self.log.info("Deleted Job %s/%s and its pods (the task was killed).", self.namespace, self.job_name)
        except WorkQueueError as e:
            self.log.error("Could not delete Job %s/%s: %s", self.namespace, self.job_name, e)

    async def on_kill(self) -> None:
        """Airflow >= 3.3 calls this when a user kills the deferred task (mark failed, clear...)."""
        if self.delete_on_kill and not self._fired:
            await self._delete_job()

    async def cleanup(self) -> None:
        """Before Airflow 3.3 only cleanup() runs on a kill, and also on a triggerer restart: delete the
        Job only once the task instance is no longer DEFERRED."""
        from workqueue_provider.compat import airflow_3_3_plus

        if airflow_3_3_plus() or not self.delete_on_kill or self._fired or self.task_instance is None:
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
