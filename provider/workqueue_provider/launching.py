"""Launching a queue's Job exactly once per run: re-attach on a retry, a new generation when needed.

The Job's name is derived from the DAG, task and run, so an Airflow retry finds the Job of the
earlier attempt and re-attaches to it instead of creating a second one. A Job that has already
finished (or is being deleted) is not adopted while items are left: the next generation
``<name>-g2`` is launched for them. How many items are left comes from the item account when the
pods keep receipts (it also counts items that pods of a deleted Job still hold), else from the queue.
"""

from __future__ import annotations

import time
from typing import Any

from workqueue_provider.compat import AirflowSkipException
from workqueue_provider.exceptions import ConfigurationError, WorkQueueError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.kubernetes import KubernetesApi
from workqueue_provider.kube.job_manifest import (
    SPEC_HASH_ANNOTATION,
    JobOptions,
    build_job,
    build_secret,
    completions_for,
    next_generation,
)
from workqueue_provider.kube.job_status import assess
from workqueue_provider.verification import IN_FLIGHT_GRACE_SECONDS, Log


class JobLauncher:
    """Creates (or finds) the Job for one task of one run, with its broker Secret."""

    def __init__(self, api: KubernetesApi, amqp: AmqpHook, log: Log, *, dead_letter_queue: str | None = None) -> None:
        self.api, self.amqp, self.log = api, amqp, log
        self.dead_letter_queue = dead_letter_queue

    def launch_or_reattach(self, first_name: str, options: JobOptions, pod_url: str) -> str:
        """The name of the Job that processes the queue's items for this run (created if needed).
        Skips the task (AirflowSkipException) when the queue holds nothing to do."""
        name, existing = self._latest_generation(first_name, options.namespace)
        over = existing is not None and (assess(existing).done or bool(existing["metadata"].get("deletionTimestamp")))
        if existing is not None and (not over or self._outstanding(options.queue_name) == 0):
            self._reattach(existing, options)
            return name
        if existing is not None:
            self.log.info("Job %s/%s from an earlier attempt has finished or is being deleted (%s) with items left "
                          "in queue %r: launching a new Job for them.", options.namespace, name,
                          assess(existing).progress(), options.queue_name)
            name = next_generation(name)
        return self._launch(name, options, pod_url)

    def _latest_generation(self, first: str, namespace: str) -> tuple[str, dict[str, Any] | None]:
        """The newest Job this task launched for this run, or ``(first, None)`` if there is none yet."""
        name, job = first, self.api.get_job(first, namespace)
        while job is not None:
            following = next_generation(name)
            newer = self.api.get_job(following, namespace)
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
        return self.amqp.queue_depth(queue_name, checked=True).messages

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
            self.api.adopt_secret(f"{name}-broker", job)
        except WorkQueueError as e:
            self.log.warning("Could not make Job %s/%s own its Secret %s-broker: %s", options.namespace, name, name, e)

    def _launch(self, name: str, options: JobOptions, pod_url: str) -> str:
        """Create the Job (and its Secret); returns its name."""
        items = self._outstanding(options.queue_name)
        self._wait_for_items_in_flight(options.queue_name, items)
        if items == 0:
            raise AirflowSkipException(f"Queue {options.queue_name!r} is empty: no Job created.")
        self._check_capacity(options, items)
        completions = completions_for(options, items)
        secret_name = f"{name}-broker"
        job = build_job(name, options, completions=completions, secret_name=secret_name)
        self.api.apply_secret(build_secret(secret_name, options.namespace, pod_url))
        try:
            created = self.api.create_job(job)
        except WorkQueueError:
            concurrent = self.api.get_job(name, options.namespace)
            if concurrent is not None:  # another attempt created it first: its Secret is in use, keep it
                self._reattach(concurrent, options)
                return name
            try:
                self.api.delete_secret(secret_name, options.namespace)
            except WorkQueueError as e:
                self.log.warning("Could not delete Secret %s/%s: %s", options.namespace, secret_name, e)
            raise
        self.api.adopt_secret(secret_name, created)
        self.log.info("Created Job %s/%s: %s items in queue %r, completions %s, parallelism %d.",
                      options.namespace, name, items, options.queue_name,
                      completions if completions is not None else "unset (drain mode)", options.parallelism)
        return name

    def _check_capacity(self, options: JobOptions, items: int) -> None:
        """Explicit completions must cover the items (fewer would leave some unprocessed)."""
        if options.completions is None or options.items_per_pod is None:
            return
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
