"""Waiting for a Job, in the worker or in the triggerer, the same way.

:class:`JobWait` is the synchronous wait (a sensor's poke is one :meth:`JobWait.step`, the
operator's ``deferrable=False`` wait is :meth:`JobWait.until_done`); :meth:`WaitsForJob.defer_until_done`
hands the wait to :class:`~workqueue_provider.triggers.job.JobCompleteTrigger`. Both follow the Job
through :class:`~workqueue_provider.kube.job_wait.JobProgress` and end with a
:class:`~workqueue_provider.kube.job_wait.WaitEvent`, which ``completion.finish`` turns into the result.
"""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from workqueue_provider.asset_events import emit_account_events
from workqueue_provider.completion import finish
from workqueue_provider.exceptions import KubernetesAuthError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.kubernetes import KubernetesApi
from workqueue_provider.kube.job_wait import JobProgress, WaitEvent, WaitStatus
from workqueue_provider.triggers.job import JobCompleteTrigger
from workqueue_provider.verification import Log, Verification


class JobWait:
    """A synchronous wait for one Job; reads ride out API-server outages of up to two minutes."""

    def __init__(self, api: KubernetesApi, name: str, namespace: str, *, grace_seconds: float | None, log: Log,
                 list_pods_early: bool = False) -> None:
        self.api, self.log = api, log
        self._refused: set[str] = set()  # side checks the API refused (no RBAC right)
        self.progress = JobProgress(name, namespace, grace_seconds=grace_seconds, list_pods_early=list_pods_early)

    def step(self) -> WaitEvent | None:
        """Read the Job once (and, when it looks unwell, its pods or events): the wait's end, or None."""
        progress, name, namespace = self.progress, self.progress.name, self.progress.namespace
        job = self.api.get_job(name, namespace, ride_out_outages=True)
        if job is None:
            return WaitEvent(WaitStatus.ERROR, name, namespace,
                             message=f"Job {namespace}/{name} does not exist: was it deleted, or never created?")
        if progress.observe(job):
            self.log.info("Job %s/%s: %s", namespace, name, progress.last_line)
        ending = progress.ending(job)
        if ending is None and "pods" not in self._refused and progress.pods_worth_listing():
            ending = self._look("pods", progress.look_at_pods,
                                lambda: self.api.job_pods(name, namespace, ride_out_outages=True))
        if ending is None and "events" not in self._refused and progress.events_worth_listing():
            ending = self._look("events", progress.look_at_events,
                                lambda: self.api.job_events(name, namespace, progress.uid, ride_out_outages=True))
        return ending

    def _look(self, what: str, judge: Any, read: Any) -> WaitEvent | None:
        """Read the Job's pods or events and judge them; a side check never fails the wait: without the
        RBAC right to read them, it is logged once and skipped from then on."""
        try:
            notice, ending = judge(read())
        except KubernetesAuthError as e:
            self._refused.add(what)
            self.log.warning("Not checking the %s of Job %s (deploy/rbac.yaml grants it): %s", what,
                             self.progress.name, e)
            return None
        if notice:
            self.log.warning("Job %s/%s: %s", self.progress.namespace, self.progress.name, notice)
        return ending

    def until_done(self, *, timeout: float, poll_interval: float) -> WaitEvent:
        """Step every ``poll_interval`` seconds until the wait ends or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while (event := self.step()) is None:
            if time.monotonic() > deadline:
                return WaitEvent(WaitStatus.TIMEOUT, self.progress.name, self.progress.namespace,
                                 message=f"Job {self.progress.namespace}/{self.progress.name} timed out.")
            time.sleep(poll_interval)
        return event


class WaitsForJob:
    """What QueueJobOperator and JobCompleteSensor share: their hooks, the deferral to the trigger, and
    how the end of a wait becomes the task's result. Subclasses say which queue to verify, and after which
    endings the Job is theirs to delete."""

    timeout: Any
    delete_on_kill: bool
    kubernetes_conn_id: str
    amqp_conn_id: str
    image_pull_grace_seconds: float | None
    log: Any
    outlets: Any

    if TYPE_CHECKING:  # BaseOperator's, which comes after this mixin
        def defer(self, *, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None,
                  timeout: timedelta | int | float | None = None) -> NoReturn: ...

    @cached_property
    def kubernetes(self) -> KubernetesApi:
        return KubernetesApi(self.kubernetes_conn_id)

    @cached_property
    def amqp(self) -> AmqpHook:
        return AmqpHook(amqp_conn_id=self.amqp_conn_id)

    @property
    def verification(self) -> Verification:
        raise NotImplementedError

    def deletes_job_after(self) -> frozenset[WaitStatus]:
        """The endings of the wait after which this task deletes the Job."""
        raise NotImplementedError

    def defer_until_done(self, *, job_name: str, namespace: str, queue_name: str | None) -> NoReturn:
        """Hand the wait to the trigger; Airflow then calls :meth:`execute_complete`."""
        self.defer(
            trigger=JobCompleteTrigger(job_name=job_name, namespace=namespace, kubernetes_conn_id=self.kubernetes_conn_id,
                                       deadline=time.time() + float(self.timeout), delete_on_kill=self.delete_on_kill,
                                       queue_name=queue_name, amqp_conn_id=self.amqp_conn_id,
                                       image_pull_grace_seconds=self.image_pull_grace_seconds),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        return self.finish_wait(WaitEvent.from_dict(event), context)

    def finish_wait(self, event: WaitEvent, context: Any) -> dict[str, Any]:
        """The run's summary (or the error); the account goes on the events of the task's outlet Assets."""
        verification = self.verification
        summary = finish(event, self.kubernetes, verification, self.log, delete_when=self.deletes_job_after())
        emit_account_events(context, self.outlets, summary, verification.queue_name)
        return summary
