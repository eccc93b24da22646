"""QueueJobOperator: run the seed's Job against a filled queue, and (by default) wait for it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.sdk import BaseOperator

from workqueue_provider.compat import AirflowSkipException
from workqueue_provider.completion import (
    IN_FLIGHT_GRACE_SECONDS,
    Verification,
    check_seconds,
    conclude,
    finish_from_event,
    stuck_job_error,
)
from workqueue_provider.exceptions import ConfigurationError, JobError, WorkQueueError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.jobs import JobsHook
from workqueue_provider.kube.job_manifest import (
    SPEC_HASH_ANNOTATION,
    JobOptions,
    build_job,
    build_secret,
    completions_for,
    job_name_for,
    next_generation,
)
from workqueue_provider.kube.job_status import assess
from workqueue_provider.links import RabbitMQQueueLink
from workqueue_provider.triggers.job import JobCompleteTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

_INT_FIELDS = ("parallelism", "completions", "items_per_pod", "backoff_limit", "active_deadline_seconds",
               "ttl_seconds_after_finished")


class QueueJobOperator(BaseOperator):
    """Create a batch/v1 Job whose pods take items from ``queue_name``, then wait until it is Complete
    and the queue is empty.

    * completions default to the number of items in the queue at launch (one pod per item), or to
      ``ceil(items / items_per_pod)``; ``items_per_pod=None`` is drain mode (completions unset, each
      pod takes items until the queue is empty; needs ``workqueue-consume`` in the image). An empty
      queue skips the task without creating a Job.
    * pods get ``BROKER_URL`` from a Secret the Job owns (``secretKeyRef``) and ``QUEUE`` in plain;
      ``pod_broker_host``/``pod_broker_port`` let pods reach the broker at an in-cluster Service
      name while Airflow uses another address.
    * the Job is named from the DAG, task and run (``job_name`` sets a prefix), so an Airflow retry
      re-attaches to the Job of the earlier attempt instead of creating a second one. A Job that has
      already finished is not adopted when items are left (a retry after a Failed Job, or a cleared
      run whose fill published again): the next generation ``<name>-g2`` is launched for them. A
      finished Job whose items are all processed counts as done.
    * success is verified with the item account (amqp/receipts.py) when the pods run
      ``workqueue-consume``: ``processed + dead_lettered + left + lost = filled``; the task fails when
      items are left or lost and reports those processed twice; the summary carries the account.
      With plain ``amqp-consume`` it falls back to "the queue is empty" and says so.
    * a broker outage while the pods work is not a worker failure: ``workqueue-consume`` reconnects
      for up to ``WORKQUEUE_OUTAGE_WINDOW`` seconds (default 300; set it with ``env``), so the
      container neither exits nor counts against ``backoff_limit``; only a longer outage ends it with
      exit 69, which then does count: the run fails naming the broker, with the items kept in the
      queue. That is why the tutorial's ``restart_policy="OnFailure"`` stays the default rather than
      ``Never`` plus a ``podFailurePolicy`` that ignores exit 69 (which would replace pods forever
      while the broker is away).
    * waiting defers to :class:`JobCompleteTrigger` (a watch; no worker slot held); killing the
      deferred task deletes the Job with Background propagation.
    * an API-server outage (a restart, a control-plane upgrade) doesn't fail the wait: the deferred
      watch reconnects, and waiting in the worker retries its reads with backoff for up to 120 s.
    * waiting (deferred or in the worker) fails once a pod has waited longer than
      ``image_pull_grace_seconds`` on an image that can't be pulled (ErrImagePull, ImagePullBackOff,
      CreateContainerConfigError...), naming the image, and deletes the Job (with ``delete_on_kill``);
      such a Job would never end by itself. ``None`` turns the check off.

    :param image: worker image; its command consumes items (the seed's ``job-wq-1``).
    :param queue_name: the filled queue; pods get it as ``QUEUE``.
    :param namespace: namespace of the Job and its Secret.
    :param job_name: name prefix (RFC 1123, at most 52 characters); the run's digest is appended.
    :param parallelism: pods running at once.
    :param completions: explicit completions; refused when lower than the queue's items.
    :param items_per_pod: items each pod takes (``WORKQUEUE_MAX_ITEMS``); None drains the queue.
    :param command: container command, overriding the image's.
    :param args: container arguments.
    :param env: extra plain environment variables for the worker.
    :param restart_policy: ``OnFailure`` (the seed's) or ``Never``.
    :param backoff_limit: pod failures before the Job fails (Kubernetes default 6).
    :param active_deadline_seconds: the Job's deadline; it wins over backoff_limit.
    :param ttl_seconds_after_finished: delete the finished Job (and its pods and Secret) after this.
    :param pod_failure_policy: the Job's podFailurePolicy (needs ``restart_policy="Never"``).
    :param container_resources: the worker container's requests/limits.
    :param node_selector: pod nodeSelector.
    :param tolerations: pod tolerations.
    :param service_account_name: the pods' service account.
    :param image_pull_secrets: names of image pull Secrets.
    :param labels: labels for the Job and its pods.
    :param annotations: annotations for the Job and its pods.
    :param pod_template: pod template dict merged under the generated one (anything else).
    :param job_template: Job dict merged under the generated one (anything else).
    :param pod_broker_host: broker host as pods see it (an in-cluster Service name); default: the connection's.
    :param pod_broker_port: broker port as pods see it; default: the connection's.
    :param wait_for_completion: wait for the Job; False only launches it and returns its name.
    :param deferrable: wait in the triggerer (a watch); False waits in the worker, polling.
    :param timeout: seconds to wait before failing.
    :param poll_interval: seconds between polls when ``deferrable=False``.
    :param verify_queue: after Complete, fail if items are left in the queue.
    :param dead_letter_queue: report (and by default fail on) items dead-lettered there.
    :param fail_on_dead_letters: fail when the dead-letter queue holds items.
    :param delete_on_kill: delete the Job when the waiting task is killed.
    :param image_pull_grace_seconds: fail (naming the image) and delete the Job (with ``delete_on_kill``)
        once a pod has waited this long on an image that can't be pulled. None: never.
    :param kubernetes_conn_id: the cncf provider's Kubernetes connection.
    :param amqp_conn_id: the AMQP connection (queue depth, verification, the pods' BROKER_URL).
    :return: with ``wait_for_completion``: the summary (job_name, namespace, succeeded, failed,
        duration_seconds, items_left, dead_lettered); otherwise ``{"job_name", "namespace"}``.
    """

    template_fields: Sequence[str] = ("image", "queue_name", "namespace", "job_name", "pod_broker_host",
                                      "parallelism", "completions", "items_per_pod", "command", "args", "env",
                                      "labels", "annotations", "dead_letter_queue")
    ui_color = "#d6eaff"
    operator_extra_links = (RabbitMQQueueLink(),)

    def __init__(
        self, *, image: str, queue_name: str, namespace: str = "default", job_name: str | None = None,
        parallelism: int = 2, completions: int | None = None, items_per_pod: int | None = 1,
        command: list[str] | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
        restart_policy: str = "OnFailure", backoff_limit: int | None = None,
        active_deadline_seconds: int | None = None, ttl_seconds_after_finished: int | None = None,
        pod_failure_policy: dict[str, Any] | None = None, container_resources: dict[str, Any] | None = None,
        node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
        service_account_name: str | None = None, image_pull_secrets: list[str] | None = None,
        labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        pod_template: dict[str, Any] | None = None, job_template: dict[str, Any] | None = None,
        pod_broker_host: str | None = None, pod_broker_port: int | None = None,
        wait_for_completion: bool = True, deferrable: bool = True, timeout: float = 24 * 3600,
        poll_interval: float = 5.0, verify_queue: bool = True, dead_letter_queue: str | None = None,
        fail_on_dead_letters: bool = True, delete_on_kill: bool = True, image_pull_grace_seconds: float | None = 300.0,
        kubernetes_conn_id: str = KubernetesHook.default_conn_name,
        amqp_conn_id: str = AmqpHook.default_conn_name, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.queue_name = queue_name
        self.namespace = namespace
        self.job_name = job_name
        self.parallelism = parallelism
        self.completions = completions
        self.items_per_pod = items_per_pod
        self.command = command
        self.args = args
        self.env = env
        self.restart_policy = restart_policy
        self.backoff_limit = backoff_limit
        self.active_deadline_seconds = active_deadline_seconds
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.pod_failure_policy = pod_failure_policy
        self.container_resources = container_resources
        self.node_selector = node_selector
        self.tolerations = tolerations
        self.service_account_name = service_account_name
        self.image_pull_secrets = image_pull_secrets
        self.labels = labels
        self.annotations = annotations
        self.pod_template = pod_template
        self.job_template = job_template
        self.pod_broker_host = pod_broker_host
        self.pod_broker_port = pod_broker_port
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.verify_queue = verify_queue
        self.dead_letter_queue = dead_letter_queue
        self.fail_on_dead_letters = fail_on_dead_letters
        self.delete_on_kill = delete_on_kill
        self.image_pull_grace_seconds = image_pull_grace_seconds
        self.kubernetes_conn_id = kubernetes_conn_id
        self.amqp_conn_id = amqp_conn_id
        self._launched: tuple[str, str] | None = None

    @cached_property
    def jobs(self) -> JobsHook:
        return JobsHook(self.kubernetes_conn_id)

    @cached_property
    def amqp(self) -> AmqpHook:
        return AmqpHook(amqp_conn_id=self.amqp_conn_id)

    @property
    def verification(self) -> Verification:
        return Verification(self.amqp_conn_id, self.queue_name if self.verify_queue else None,
                            self.dead_letter_queue, self.fail_on_dead_letters)

    def job_options(self) -> JobOptions:
        """The validated options (raises ConfigurationError before anything is created)."""
        ints: dict[str, Any] = {name: _as_int(getattr(self, name), name) for name in _INT_FIELDS}
        return JobOptions(
            image=self.image, queue_name=self.queue_name, namespace=self.namespace, command=self.command,
            args=self.args, restart_policy=self.restart_policy, pod_failure_policy=self.pod_failure_policy,
            resources=self.container_resources, node_selector=self.node_selector, tolerations=self.tolerations,
            service_account_name=self.service_account_name, image_pull_secrets=self.image_pull_secrets,
            env=self.env, labels=dict(self.labels or {}), annotations=dict(self.annotations or {}),
            pod_template=self.pod_template, job_template=self.job_template, **ints,
        )

    def resolve_job_name(self, context: Context) -> str:
        ti = context["ti"]
        return job_name_for(ti.dag_id, ti.task_id, context["run_id"], getattr(ti, "map_index", -1), self.job_name or None)

    def execute(self, context: Context) -> dict[str, Any] | None:
        options = self.job_options()
        check_seconds(self.timeout, "timeout")
        check_seconds(self.poll_interval, "poll_interval")
        if self.image_pull_grace_seconds is not None:
            check_seconds(self.image_pull_grace_seconds, "image_pull_grace_seconds")
        RabbitMQQueueLink.persist(context, amqp_conn_id=self.amqp_conn_id, queue_name=options.queue_name, log=self.log)
        pod_url = self.amqp.settings.url(host=self.pod_broker_host, port=_as_int(self.pod_broker_port, "pod_broker_port"))
        name, existing = self._latest_generation(self.resolve_job_name(context), options.namespace)
        over = existing is not None and (assess(existing).done or bool(existing["metadata"].get("deletionTimestamp")))
        if existing is not None and (not over or self._outstanding(options.queue_name) == 0):
            self._reattach(existing, options)
        else:
            if existing is not None:
                self.log.info("Job %s/%s from an earlier attempt has finished or is being deleted (%s) with items left "
                              "in queue %r: launching a new Job for them.", options.namespace, name,
                              assess(existing).progress(), options.queue_name)
                name = next_generation(name)
            name = self._launch(name, options, pod_url)
        self._launched = (name, options.namespace)
        if not self.wait_for_completion:
            return {"job_name": name, "namespace": options.namespace}
        if not self.deferrable:
            return self._wait_here(name, options.namespace)
        self.defer(
            trigger=JobCompleteTrigger(job_name=name, namespace=options.namespace,
                                       kubernetes_conn_id=self.kubernetes_conn_id,
                                       deadline=time.time() + float(self.timeout), delete_on_kill=self.delete_on_kill,
                                       queue_name=options.queue_name, amqp_conn_id=self.amqp_conn_id,
                                       image_pull_grace_seconds=self.image_pull_grace_seconds),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def _latest_generation(self, first: str, namespace: str) -> tuple[str, dict[str, Any] | None]:
        """The newest Job this task launched for this run (a retry after a finished Job launches the next
        generation ``<name>-2``, ``-3``...), or ``(first, None)`` if there is none yet."""
        name, job = first, self.jobs.get_job(first, namespace)
        while job is not None:
            following = next_generation(name)
            newer = self.jobs.get_job(following, namespace)
            if newer is None:
                break
            name, job = following, newer
        return name, job

    def _outstanding(self, queue_name: str) -> int:
        """Items not yet processed or dead-lettered: from the item account when there is one (it counts the
        items pods of a deleted Job still hold unacked), else the ready messages in the queue."""
        account = self.amqp.item_account(queue_name, self.dead_letter_queue)
        if account is not None and account.kept:
            return max(0, account.filled - account.processed - account.dead_lettered)
        return self.amqp.queue_depth(queue_name).messages

    def _wait_for_items_in_flight(self, queue_name: str, outstanding: int) -> None:
        """Pods of an earlier Job that was deleted (a kill, a stuck image) may still hold items unacked for
        their termination grace period. New pods started meanwhile would find the queue empty, exit 0 and
        let the new Job complete with those items still to do: wait (bounded) until no consumer is left."""
        deadline = time.monotonic() + IN_FLIGHT_GRACE_SECONDS
        depth = self.amqp.queue_depth(queue_name)
        while depth.consumers and outstanding > depth.messages and time.monotonic() < deadline:
            self.log.info("%d item(s) of queue %r are still held by %d consumer(s) (pods of an earlier Job?): waiting "
                          "for them to finish or let go before launching.", outstanding - depth.messages, queue_name,
                          depth.consumers)
            time.sleep(2)
            depth = self.amqp.queue_depth(queue_name)

    def _reattach(self, job: dict[str, Any], options: JobOptions) -> None:
        name = job["metadata"]["name"]
        found = (job["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if found != options.fingerprint():
            raise ConfigurationError(
                f"Job {options.namespace}/{name} already exists with a different spec (it was not created by this "
                "task with these arguments): delete it, or set job_name to another prefix."
            )
        self.log.info("Re-attaching to Job %s/%s from an earlier attempt (%s); not creating another.",
                      options.namespace, name, assess(job).progress())
        try:  # an attempt that died between creating the Job and adopting its Secret left it unowned
            self.jobs.adopt_secret(f"{name}-broker", job)
        except WorkQueueError as e:
            self.log.warning("Could not make Job %s/%s own its Secret %s-broker: %s", options.namespace, name, name, e)

    def _launch(self, name: str, options: JobOptions, pod_url: str) -> str:
        """Create the Job (and its Secret); returns its name."""
        items = self._outstanding(options.queue_name)
        self._wait_for_items_in_flight(options.queue_name, items)
        if items == 0:
            raise AirflowSkipException(f"Queue {options.queue_name!r} is empty: no Job created.")
        if options.completions is not None and options.items_per_pod is not None:
            capacity = options.completions * options.items_per_pod
            if capacity < items:
                raise ConfigurationError(
                    f"completions={options.completions} (x items_per_pod={options.items_per_pod}) is lower than the "
                    f"{items} items in queue {options.queue_name!r}: {items - capacity} items would "
                    "never be processed. Leave completions unset to derive it from the queue."
                )
            if capacity > items:
                self.log.warning(
                    "completions=%d but queue %r holds %d items: %d pods will find the queue empty "
                    "(workqueue-consume exits 0; the tutorial's amqp-consume would block forever).",
                    options.completions, options.queue_name, items, capacity - items)
        completions = completions_for(options, items)
        secret_name = f"{name}-broker"
        job = build_job(name, options, completions=completions, secret_name=secret_name)
        self.jobs.apply_secret(build_secret(secret_name, options.namespace, pod_url))
        try:
            created = self.jobs.create_job(job)
        except WorkQueueError:
            concurrent = self.jobs.get_job(name, options.namespace)
            if concurrent is not None:  # another attempt created it first: its Secret is in use, keep it
                self._reattach(concurrent, options)
                return name
            self.jobs.delete_secret(secret_name, options.namespace)
            raise
        self.jobs.adopt_secret(secret_name, created)
        self.log.info("Created Job %s/%s: %s items in queue %r, completions %s, parallelism %d.",
                      options.namespace, name, items, options.queue_name,
                      completions if completions is not None else "unset (drain mode)", options.parallelism)
        return name

    def _wait_here(self, name: str, namespace: str) -> dict[str, Any]:
        """Wait in the worker (deferrable=False): the same assessment, polled."""
        deadline = time.monotonic() + float(self.timeout)
        last = None
        waiting_since: dict[str, float] = {}
        while True:
            job = self.jobs.get_job(name, namespace, ride_out_outages=True)
            if job is None:
                raise JobError(f"Job {namespace}/{name} was deleted.")
            verdict = assess(job)
            if verdict.progress() != last:
                last = verdict.progress()
                self.log.info("Job %s/%s: %s", namespace, name, last)
            if verdict.done:
                return conclude(job, self.jobs, self.verification, self.log)
            grace = self.image_pull_grace_seconds
            if grace is not None and verdict.active > int((job.get("status") or {}).get("ready") or 0):
                stuck = self.jobs.stuck_containers(name, namespace, grace, waiting_since)
                if stuck:
                    raise self._delete_stuck_job(name, namespace, grace, stuck)
            if time.monotonic() > deadline:
                raise JobError(f"Job {namespace}/{name} timed out.")
            time.sleep(float(self.poll_interval))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event["status"] == "stuck":
            raise self._delete_stuck_job(event["job_name"], event["namespace"], event["grace_seconds"], event["stuck"])
        return finish_from_event(event, self.jobs, self.verification, self.log)

    def _delete_stuck_job(self, name: str, namespace: str, grace_seconds: float, stuck: list[str]) -> JobError:
        """Delete a Job whose pods can't start (with ``delete_on_kill``; left alone it would never end) and
        return the error to raise. A failed delete is logged; the error then says to delete it."""
        deleted = False
        if self.delete_on_kill:
            try:
                self.jobs.delete_job(name, namespace)  # False: already gone, which is as good
                deleted = True
            except WorkQueueError as e:
                self.log.error("Could not delete Job %s/%s: %s", namespace, name, e)
        return stuck_job_error(name, namespace, grace_seconds, stuck, deleted=deleted)

    def on_kill(self) -> None:
        """Killed while waiting in the worker: delete the Job (the trigger handles the deferred case)."""
        if self._launched and self.delete_on_kill:
            self.jobs.delete_job(*self._launched)


def _as_int(value: Any, name: str) -> int | None:
    """Templated numbers render to strings; accept "4", refuse anything that isn't a whole number."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, str) and value.strip() in ("", "None"):
        return None
    raise ConfigurationError(f"{name} rendered to {value!r} ({type(value).__name__}), not a whole number.")
