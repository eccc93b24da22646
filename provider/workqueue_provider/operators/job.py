"""QueueJobOperator: run the tutorial's Job against a filled queue, and (by default) wait for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from workqueue_provider.completion import check_seconds
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.kubernetes import DEFAULT_CONN_ID
from workqueue_provider.kube.job_manifest import JobOptions, job_name_for
from workqueue_provider.kube.job_wait import WaitStatus
from workqueue_provider.kube.names import airflow_labels
from workqueue_provider.launching import JobLauncher
from workqueue_provider.lineage import QueueReaderLineageMixin
from workqueue_provider.links import RabbitMQQueueLink
from workqueue_provider.verification import Verification
from workqueue_provider.waiting import JobWait, WaitsForJob

if TYPE_CHECKING:
    from airflow.sdk import Context

_INT_FIELDS = ("parallelism", "completions", "items_per_pod", "backoff_limit", "active_deadline_seconds",
               "ttl_seconds_after_finished")


class QueueJobOperator(QueueReaderLineageMixin, WaitsForJob, BaseOperator):
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
    * a replacement pod starts only once the pod it replaces has failed (``pod_replacement_policy="Failed"``,
      GA in Kubernetes 1.34): Kubernetes' default starts it while the old pod still terminates and may
      still hold an item, two consumers where one was meant.
    * ``pod_failure_policy=queue_failure_policy(poison_exit_code=...)`` (kube/failure_policy.py) is the
      policy for a queue: pods lost to a node drain, an eviction or a preemption (``DisruptionTarget``)
      are ignored, so they don't use up ``backoff_limit`` (their items go back to the queue); exit 69 is
      counted, as above; a worker exiting with ``poison_exit_code`` fails the Job at once. Any
      ``pod_failure_policy`` needs ``restart_policy="Never"`` and ``pod_replacement_policy="Failed"``
      (Kubernetes' rules; other values are refused before anything is created).
    * waiting defers to :class:`JobCompleteTrigger` (a watch; no worker slot held); killing the
      deferred task deletes the Job with Background propagation.
    * an API-server outage (a restart, a control-plane upgrade) doesn't fail the wait: the deferred
      watch reconnects, and waiting in the worker retries its reads with backoff for up to 120 s.
    * waiting (deferred or in the worker) fails once a pod has waited longer than
      ``image_pull_grace_seconds`` on an image that can't be pulled (ErrImagePull, ImagePullBackOff,
      CreateContainerConfigError...), naming the image, and deletes the Job (with ``delete_on_kill``);
      such a Job would never end by itself. ``None`` turns the check off. Pods that wait (on an
      image, unschedulable, in a crash loop) are named in the log after a few seconds, long before.
    * a Job whose pods the API server refuses to create (a PodSecurity violation, an exceeded
      ResourceQuota, a missing ServiceAccount, a webhook's denial) fails the wait within a minute,
      quoting the API server and naming the fix, and is deleted (with ``delete_on_kill``).
    * the pods meet the "restricted" Pod Security Standard by default, so they run in a locked-down
      namespace: ``runAsNonRoot`` with UID/GID 10001 (the user ``worker/Dockerfile`` creates),
      ``allowPrivilegeEscalation: false``, every capability dropped, the ``RuntimeDefault`` seccomp
      profile. ``pod_template`` overrides any of these key by key (e.g. ``{"spec": {"securityContext":
      {"runAsUser": 1000}}}`` for an image with another user).
    * the Job and its pods are labelled ``airflow.apache.org/dag-id``, ``task-id`` and ``run-id``
      (select on them with ``kubectl get jobs -l airflow.apache.org/dag-id=<dag>``).

    :param image: worker image; its command consumes items (the tutorial's ``job-wq-1``).
    :param queue_name: the filled queue; pods get it as ``QUEUE``.
    :param namespace: namespace of the Job and its Secret.
    :param job_name: name prefix (RFC 1123, at most 52 characters); the run's digest is appended.
    :param parallelism: pods running at once.
    :param completions: explicit completions; refused when lower than the queue's items.
    :param items_per_pod: items each pod takes (``WORKQUEUE_MAX_ITEMS``); None drains the queue.
    :param command: container command, overriding the image's.
    :param args: container arguments.
    :param env: extra plain environment variables for the worker.
    :param restart_policy: ``OnFailure`` (the tutorial's) or ``Never``.
    :param backoff_limit: pod failures before the Job fails (Kubernetes default 6).
    :param active_deadline_seconds: the Job's deadline; it wins over backoff_limit.
    :param ttl_seconds_after_finished: delete the finished Job (and its pods and Secret) after this.
    :param pod_failure_policy: the Job's podFailurePolicy, e.g. ``queue_failure_policy()`` (needs
        ``restart_policy="Never"``).
    :param pod_replacement_policy: when a failed pod's replacement starts: ``Failed`` (once the old pod
        is gone), ``TerminatingOrFailed`` (Kubernetes' default), or None to leave it unset.
    :param container_resources: the worker container's requests/limits.
    :param node_selector: pod nodeSelector.
    :param tolerations: pod tolerations.
    :param service_account_name: the pods' service account.
    :param image_pull_secrets: names of image pull Secrets.
    :param image_pull_policy: the worker container's imagePullPolicy (``Always``, ``IfNotPresent``,
        ``Never``); None: Kubernetes' default, which pulls ``:latest`` and untagged images every time
        (an image loaded onto the nodes without a registry needs ``IfNotPresent`` or ``Never``).
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
        pod_failure_policy: dict[str, Any] | None = None, pod_replacement_policy: str | None = "Failed",
        container_resources: dict[str, Any] | None = None,
        node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
        service_account_name: str | None = None, image_pull_secrets: list[str] | None = None,
        image_pull_policy: str | None = None, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        pod_template: dict[str, Any] | None = None, job_template: dict[str, Any] | None = None,
        pod_broker_host: str | None = None, pod_broker_port: int | None = None,
        wait_for_completion: bool = True, deferrable: bool = True, timeout: float = 24 * 3600,
        poll_interval: float = 5.0, verify_queue: bool = True, dead_letter_queue: str | None = None,
        fail_on_dead_letters: bool = True, delete_on_kill: bool = True, image_pull_grace_seconds: float | None = 300.0,
        kubernetes_conn_id: str = DEFAULT_CONN_ID,
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
        self.pod_replacement_policy = pod_replacement_policy
        self.container_resources = container_resources
        self.node_selector = node_selector
        self.tolerations = tolerations
        self.service_account_name = service_account_name
        self.image_pull_secrets = image_pull_secrets
        self.image_pull_policy = image_pull_policy
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

    @property
    def verification(self) -> Verification:
        return Verification(self.amqp, self.queue_name if self.verify_queue else None,
                            self.dead_letter_queue, self.fail_on_dead_letters)

    def deletes_job_after(self) -> frozenset[WaitStatus]:
        """A Job whose pods can't start or be created would never end: deleted with ``delete_on_kill``."""
        return frozenset({WaitStatus.STUCK, WaitStatus.REFUSED}) if self.delete_on_kill else frozenset()

    def job_options(self, context: Context | None = None) -> JobOptions:
        """The validated options (raises ConfigurationError before anything is created); with the task's
        ``context``, the Job is also labelled with its DAG, task and run."""
        ints: dict[str, Any] = {name: _as_int(getattr(self, name), name) for name in _INT_FIELDS}
        labels = dict(self.labels or {})
        if context is not None:
            ti = context["ti"]
            labels = {**airflow_labels(ti.dag_id, ti.task_id, context["run_id"]), **labels}
        return JobOptions(
            image=self.image, queue_name=self.queue_name, namespace=self.namespace, command=self.command,
            args=self.args, restart_policy=self.restart_policy, pod_failure_policy=self.pod_failure_policy,
            pod_replacement_policy=self.pod_replacement_policy,
            resources=self.container_resources, node_selector=self.node_selector, tolerations=self.tolerations,
            service_account_name=self.service_account_name, image_pull_secrets=self.image_pull_secrets,
            image_pull_policy=self.image_pull_policy, env=self.env, labels=labels, annotations=dict(self.annotations or {}),
            pod_template=self.pod_template, job_template=self.job_template, **ints,
        )

    def resolve_job_name(self, context: Context) -> str:
        ti = context["ti"]
        return job_name_for(ti.dag_id, ti.task_id, context["run_id"], getattr(ti, "map_index", -1), self.job_name or None)

    def execute(self, context: Context) -> dict[str, Any] | None:
        options = self.job_options(context)
        check_seconds(self.timeout, "timeout")
        check_seconds(self.poll_interval, "poll_interval")
        if self.image_pull_grace_seconds is not None:
            check_seconds(self.image_pull_grace_seconds, "image_pull_grace_seconds")
        RabbitMQQueueLink.persist(context, amqp_conn_id=self.amqp_conn_id, queue_name=options.queue_name, log=self.log)
        pod_host, pod_port = self.pod_broker_host, _as_int(self.pod_broker_port, "pod_broker_port")
        pod_url = self.amqp.settings.url(host=pod_host, port=pod_port)
        self.log.info("The pods reach the broker at %s.", self.amqp.settings.address_for(host=pod_host, port=pod_port))
        launcher = JobLauncher(self.kubernetes, self.amqp, self.log, dead_letter_queue=self.dead_letter_queue)
        name = launcher.launch_or_reattach(self.resolve_job_name(context), options, pod_url)
        self._launched = (name, options.namespace)
        if not self.wait_for_completion:
            return {"job_name": name, "namespace": options.namespace}
        if self.deferrable:
            self.defer_until_done(job_name=name, namespace=options.namespace, queue_name=options.queue_name)
        wait = JobWait(self.kubernetes, name, options.namespace, grace_seconds=self.image_pull_grace_seconds, log=self.log)
        return self.finish_wait(wait.until_done(timeout=float(self.timeout), poll_interval=float(self.poll_interval)),
                                context)

    def on_kill(self) -> None:
        """Killed while waiting in the worker: delete the Job (the trigger handles the deferred case)."""
        if self._launched and self.delete_on_kill:
            self.kubernetes.delete_job(*self._launched)


def _as_int(value: Any, name: str) -> int | None:
    """Templated numbers render to strings; accept "4", refuse anything that isn't a whole number."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, str) and value.strip() in ("", "None"):
        return None
    raise ConfigurationError(f"{name} rendered to {value!r} ({type(value).__name__}), not a whole number.")
