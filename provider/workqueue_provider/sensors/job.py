"""JobCompleteSensor: wait for a Job launched elsewhere (e.g. ``QueueJobOperator(wait_for_completion=False)``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.sdk import BaseSensorOperator, PokeReturnValue

from workqueue_provider.completion import Verification, check_seconds, conclude, finish_from_event, stuck_error
from workqueue_provider.exceptions import JobError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.jobs import JobsHook
from workqueue_provider.kube.job_manifest import validate_name
from workqueue_provider.kube.job_status import assess
from workqueue_provider.links import RabbitMQQueueLink
from workqueue_provider.triggers.job import JobCompleteTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class JobCompleteSensor(BaseSensorOperator):
    """Succeeds when the Job is Complete *and* its queue is empty; fails on ``Failed``/``FailureTarget``
    with the reason, the failed pods' exit codes and their last log lines.

    Deferrable by default: the triggerer watches the Job and no worker slot is held meanwhile.
    Either way an API-server outage of up to 120 s doesn't fail the wait (the watch reconnects; a
    poke retries its read with backoff).

    :param job_name: Job to wait for. Templated (e.g. from the launching task's XCom).
    :param namespace: its namespace. Templated.
    :param queue_name: queue to verify after completion (None: don't verify). Templated.
    :param dead_letter_queue: also report (and by default fail on) items dead-lettered there.
    :param fail_on_dead_letters: fail when the dead-letter queue holds items.
    :param delete_on_kill: delete the Job when the deferred task is killed.
    :param deferrable: wait in the triggerer (a watch); False pokes from the worker.
    :param kubernetes_conn_id: the cncf provider's Kubernetes connection.
    :param amqp_conn_id: the AMQP connection used for verification.
    :param image_pull_grace_seconds: fail (naming the image) once a pod has waited this long on an image
        that can't be pulled or a config that can't be created; checked on each poke, or by the trigger
        while deferred. The sensor leaves the Job alone (it didn't create it). None: never.
    :return: summary dict (job_name, namespace, succeeded, failed, duration_seconds, items_left, dead_lettered).
    """

    template_fields: Sequence[str] = ("job_name", "namespace", "queue_name", "dead_letter_queue")
    operator_extra_links = (RabbitMQQueueLink(),)

    def __init__(self, *, job_name: str, namespace: str = "default", queue_name: str | None = None,
                 dead_letter_queue: str | None = None, fail_on_dead_letters: bool = True,
                 delete_on_kill: bool = True, deferrable: bool = True, image_pull_grace_seconds: float | None = 300.0,
                 kubernetes_conn_id: str = KubernetesHook.default_conn_name,
                 amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 24 * 3600)
        super().__init__(**kwargs)
        self.job_name = job_name
        self.namespace = namespace
        self.queue_name = queue_name
        self.dead_letter_queue = dead_letter_queue
        self.fail_on_dead_letters = fail_on_dead_letters
        self.delete_on_kill = delete_on_kill
        self.image_pull_grace_seconds = image_pull_grace_seconds
        self.deferrable = deferrable
        self.kubernetes_conn_id = kubernetes_conn_id
        self.amqp_conn_id = amqp_conn_id
        self._last_progress: str | None = None
        self._waiting_since: dict[str, float] = {}  # stuck-check state across pokes

    @cached_property
    def jobs(self) -> JobsHook:
        return JobsHook(self.kubernetes_conn_id)

    @property
    def verification(self) -> Verification:
        return Verification(self.amqp_conn_id, self.queue_name, self.dead_letter_queue, self.fail_on_dead_letters)

    def execute(self, context: Context) -> Any:
        if self.image_pull_grace_seconds is not None:
            check_seconds(self.image_pull_grace_seconds, "image_pull_grace_seconds")
        if self.queue_name:
            RabbitMQQueueLink.persist(context, amqp_conn_id=self.amqp_conn_id, queue_name=self.queue_name, log=self.log)
        if not self.deferrable:
            return super().execute(context)
        result = self.poke(context)
        if result:
            return result.xcom_value if isinstance(result, PokeReturnValue) else None
        self.defer(
            trigger=JobCompleteTrigger(job_name=self.job_name, namespace=self.namespace,
                                       kubernetes_conn_id=self.kubernetes_conn_id,
                                       deadline=time.time() + float(self.timeout), delete_on_kill=self.delete_on_kill,
                                       queue_name=self.queue_name, amqp_conn_id=self.amqp_conn_id,
                                       image_pull_grace_seconds=self.image_pull_grace_seconds),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        validate_name(self.job_name, "job_name")
        validate_name(self.namespace, "namespace")
        job = self.jobs.get_job(self.job_name, self.namespace, ride_out_outages=True)
        if job is None:
            raise JobError(f"Job {self.namespace}/{self.job_name} does not exist: was it deleted, or never created?")
        verdict = assess(job)
        if verdict.progress() != self._last_progress:
            self._last_progress = verdict.progress()
            self.log.info("Job %s/%s: %s", self.namespace, self.job_name, self._last_progress)
        if not verdict.done:
            if verdict.active > int((job.get("status") or {}).get("ready") or 0):
                stuck = stuck_error(self.job_name, self.namespace, self.jobs, self.image_pull_grace_seconds,
                                    self._waiting_since)
                if stuck is not None:
                    raise stuck
            return False
        return PokeReturnValue(is_done=True, xcom_value=conclude(job, self.jobs, self.verification, self.log))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        return finish_from_event(event, self.jobs, self.verification, self.log)

