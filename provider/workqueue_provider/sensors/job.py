"""JobCompleteSensor: wait for a Job launched elsewhere (e.g. ``QueueJobOperator(wait_for_completion=False)``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from workqueue_provider.completion import NEVER_ENDING, check_seconds
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.kubernetes import DEFAULT_CONN_ID
from workqueue_provider.kube.job_wait import WaitStatus
from workqueue_provider.kube.names import validate_name
from workqueue_provider.lineage import QueueReaderLineageMixin
from workqueue_provider.links import RabbitMQQueueLink
from workqueue_provider.verification import Verification
from workqueue_provider.waiting import JobWait, WaitsForJob

if TYPE_CHECKING:
    from airflow.sdk import Context


class JobCompleteSensor(QueueReaderLineageMixin, WaitsForJob, BaseSensorOperator):
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
    :param delete_job_on_failure: delete the Job (with its pods and broker Secret) when the wait fails
        with the Job still there and never finishing by itself: its pods can't start or can't be created,
        or the wait timed out. A Failed Job is kept (its ``ttl_seconds_after_finished`` removes it).
    :param deferrable: wait in the triggerer (a watch); False pokes from the worker.
    :param kubernetes_conn_id: the cncf provider's Kubernetes connection.
    :param amqp_conn_id: the AMQP connection used for verification.
    :param image_pull_grace_seconds: fail (naming the image) once a pod has waited this long on an image
        that can't be pulled or a config that can't be created; checked on each poke, or by the trigger
        while deferred. The Job is deleted only with ``delete_job_on_failure``. None: never.
    :return: summary dict (job_name, namespace, succeeded, failed, duration_seconds, items_left, dead_lettered).
    """

    template_fields: Sequence[str] = ("job_name", "namespace", "queue_name", "dead_letter_queue")
    operator_extra_links = (RabbitMQQueueLink(),)

    def __init__(self, *, job_name: str, namespace: str = "default", queue_name: str | None = None,
                 dead_letter_queue: str | None = None, fail_on_dead_letters: bool = True,
                 delete_on_kill: bool = True, delete_job_on_failure: bool = False, deferrable: bool = True,
                 image_pull_grace_seconds: float | None = 300.0,
                 kubernetes_conn_id: str = DEFAULT_CONN_ID,
                 amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 24 * 3600)
        super().__init__(**kwargs)
        self.job_name = job_name
        self.namespace = namespace
        self.queue_name = queue_name
        self.dead_letter_queue = dead_letter_queue
        self.fail_on_dead_letters = fail_on_dead_letters
        self.delete_on_kill = delete_on_kill
        self.delete_job_on_failure = delete_job_on_failure
        self.image_pull_grace_seconds = image_pull_grace_seconds
        self.deferrable = deferrable
        self.kubernetes_conn_id = kubernetes_conn_id
        self.amqp_conn_id = amqp_conn_id

    @cached_property
    def job_wait(self) -> JobWait:
        """The poke's state across pokes (in ``mode="reschedule"`` each poke starts afresh, hence
        ``list_pods_early``: pods are listed on every poke that finds some not ready)."""
        return JobWait(self.kubernetes, self.job_name, self.namespace, grace_seconds=self.image_pull_grace_seconds,
                       log=self.log, list_pods_early=True)

    @property
    def verification(self) -> Verification:
        return Verification(self.amqp, self.queue_name, self.dead_letter_queue, self.fail_on_dead_letters)

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
        self.defer_until_done(job_name=self.job_name, namespace=self.namespace, queue_name=self.queue_name)

    def poke(self, context: Context) -> PokeReturnValue | bool:
        validate_name(self.job_name, "job_name")
        validate_name(self.namespace, "namespace")
        event = self.job_wait.step()
        if event is None:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self.finish_wait(event, context))

    def deletes_job_after(self) -> frozenset[WaitStatus]:
        """The sensor didn't create the Job: it deletes it only with ``delete_job_on_failure``."""
        return NEVER_ENDING if self.delete_job_on_failure else frozenset()

