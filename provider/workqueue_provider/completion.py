"""What a finished Job means: one place that turns a Job's final state into a summary or an error.

Used by QueueJobOperator and JobCompleteSensor. A Complete Job doesn't prove the work was done
(``amqp-consume`` exits 0 when the worker fails), so success is verified against the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from workqueue_provider.amqp.receipts import Account
from workqueue_provider.exceptions import ConfigurationError, JobError, QueueNotFoundError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.jobs import JobsHook
from workqueue_provider.kube.job_status import JobAssessment, JobPhase, assess, condition

IN_FLIGHT_GRACE_SECONDS = 90.0  # the longest a terminating pod holds an item: its grace period, and then some


class Log(Protocol):
    """What this module needs of a logger (the stdlib's, or Airflow's task logger)."""

    def info(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Verification:
    """Which queue to check after the Job completes (``queue_name=None`` turns the check off)."""

    amqp_conn_id: str
    queue_name: str | None
    dead_letter_queue: str | None = None
    fail_on_dead_letters: bool = True


def check_seconds(value: Any, name: str) -> None:
    """Waiting knobs: a positive number of seconds (``poll_interval=0`` would poll in a tight loop)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name}={value!r} must be a positive number of seconds.")


def conclude(job: dict[str, Any], jobs: JobsHook, verification: Verification, log: Log) -> dict[str, Any]:
    """Return the run's summary for a Complete Job, or raise :class:`JobError` saying why it failed."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    verdict = assess(job)
    if verdict.phase is JobPhase.RUNNING:
        raise JobError(f"Job {namespace}/{name} has not finished ({verdict.progress()}).")
    if verdict.phase is JobPhase.FAILED:
        details = jobs.failed_pod_details(name, namespace)
        raise JobError(
            f"Job {namespace}/{name} failed: {verdict.reason}: {verdict.message} ({verdict.progress()})."
            + ("".join(f"\n  - {line}" for line in details) if details else "")
        )
    summary = _summary(job, verdict)
    log.info("Job %s/%s is Complete: %s, in %s s (noticed %s s after the Complete condition).", namespace, name,
             verdict.progress(), summary["duration_seconds"], summary["noticed_after_seconds"])
    if verification.queue_name:
        summary.update(_verify_queue(name, verification, log))
    return summary


def stuck_error(name: str, namespace: str, jobs: JobsHook, grace_seconds: float | None,
                first_seen: dict[str, float] | None = None) -> JobError | None:
    """The error to raise when the Job's pods have waited longer than ``grace_seconds`` on an image that
    can't be pulled (or a config that can't be created), else None: such a Job never finishes by itself.
    ``first_seen``: the caller's state across checks (see :func:`stuck_containers`)."""
    if grace_seconds is None:
        return None
    stuck = jobs.stuck_containers(name, namespace, grace_seconds, first_seen)
    return stuck_job_error(name, namespace, grace_seconds, stuck) if stuck else None


def stuck_job_error(name: str, namespace: str, grace_seconds: float, stuck: list[str], *,
                    deleted: bool = False) -> JobError:
    """The error for a Job whose pods can't start; ``stuck`` lists them (see ``stuck_containers``).
    ``deleted``: the caller deleted the Job (the message says so)."""
    return JobError(
        f"Job {namespace}/{name} can't start its pods (waiting more than {grace_seconds:g} s):"
        + "".join(f"\n  - {line}" for line in stuck[:3])
        + "\nCheck the image name and tag, that the registry is reachable, image_pull_secrets, and the "
        "Secrets/ConfigMaps the pod uses. "
        + ("The Job was deleted." if deleted else f"Delete the Job (kubectl -n {namespace} delete job {name}).")
    )


def finish_from_event(event: dict[str, Any], jobs: JobsHook, verification: Verification, log: Log) -> dict[str, Any]:
    """Turn a JobCompleteTrigger event into the summary (or the error). The verdict comes from the Job the
    trigger saw finish (``event["job"]``), not from a second read: with a short ``ttl_seconds_after_finished``
    the Job may be gone by now."""
    if event["status"] in ("timeout", "error"):
        raise JobError(event["message"])
    if event["status"] == "stuck":
        raise stuck_job_error(event["job_name"], event["namespace"], event["grace_seconds"], event["stuck"])
    job = event.get("job") or jobs.get_job(event["job_name"], event["namespace"])
    if job is None:
        raise JobError(f"Job {event['namespace']}/{event['job_name']} vanished before its result could be read.")
    return conclude(job, jobs, verification, log)


def _verify_queue(job_name: str, verification: Verification, log: Log) -> dict[str, Any]:
    """The item account (amqp/receipts.py) when the workers keep receipts; else "the queue is empty"."""
    queue = verification.queue_name
    assert queue is not None
    amqp = AmqpHook(amqp_conn_id=verification.amqp_conn_id)
    try:
        account = _settled_account(amqp, queue, verification.dead_letter_queue, log)
    except QueueNotFoundError as e:
        raise JobError(f"Job {job_name} completed, but its queue {queue!r} is gone, so the work can't be verified.") from e
    if account is None or not account.kept:
        return _verify_depth(job_name, verification, log, filled_by_us=account is not None)
    log.info("Item account of queue %r: %s.", queue, account.describe())
    if account.left or account.lost:
        raise JobError(
            f"Job {job_name} is Complete but not every item was processed ({account.describe()}). "
            + (f"{account.left} item(s) are still in queue {queue!r}: completions was lower than the items, or "
               "workers exited 0 without processing them; clear the task to run a new Job on them. " if account.left else "")
            + (f"{account.lost} item(s) vanished from the queue without being processed or dead-lettered: "
               "a max_length that dropped them, a message TTL or delivery limit without a dead-letter queue, or a "
               "reject without a dead-letter exchange. Re-run the fill for them. " if account.lost else "")
        )
    if account.duplicated:
        log.warning("%d item(s) of queue %r were processed more than once (a worker stopped between finishing an "
                    "item and acknowledging it: at-least-once delivery).", account.duplicated, queue)
    _report_dead_letters(job_name, account.dead_lettered, verification, log)
    return {"items_left": 0, "dead_lettered": account.dead_lettered,
            "dead_letter_queue": verification.dead_letter_queue, "account": account.as_dict()}


def _settled_account(amqp: AmqpHook, queue: str, dead_letter_queue: str | None, log: Log) -> Account | None:
    """The account once no consumer holds an item of the queue: items still held (unacked) by pods of an
    earlier, deleted Job count as neither left nor processed until those pods let go. Waits up to
    :data:`IN_FLIGHT_GRACE_SECONDS` for that, then takes the account as it is."""
    deadline = time.monotonic() + IN_FLIGHT_GRACE_SECONDS
    while True:
        account = amqp.item_account(queue, dead_letter_queue)
        if account is None or account.complete or time.monotonic() > deadline:
            return account
        consumers = amqp.queue_depth(queue).consumers
        if not consumers:
            return account
        log.info("%d consumer(s) still hold items of queue %r (pods of an earlier Job?): waiting for them to finish "
                 "or let go before the account is taken (%s).", consumers, queue, account.describe())
        time.sleep(2)


def _verify_depth(job_name: str, verification: Verification, log: Log, *, filled_by_us: bool) -> dict[str, Any]:
    """Without receipts: the best we can check is that the queue is empty."""
    queue = verification.queue_name
    assert queue is not None
    log.warning(
        "No item account for queue %r: %s, so only \"the queue is empty\" is checked; items dropped by the broker "
        "(max_length, TTL, delivery limit) can't be told from processed ones. Run workqueue-consume in the image "
        "and fill with FillQueueOperator to get the account.", queue,
        "its workers keep no receipts (plain amqp-consume?)" if filled_by_us else "it was not filled by FillQueueOperator")
    amqp = AmqpHook(amqp_conn_id=verification.amqp_conn_id)
    left = amqp.queue_depth(queue).messages
    dead = amqp.queue_depth(verification.dead_letter_queue).messages if verification.dead_letter_queue else 0
    if left:
        raise JobError(
            f"Job {job_name} is Complete but {left} item(s) are still in queue {queue!r}: some workers exited 0 "
            "without processing their item (amqp-consume does that when the worker fails) or completions was "
            "lower than the number of items. Check the worker logs; use workqueue-consume to make failures visible."
        )
    _report_dead_letters(job_name, dead, verification, log)
    log.info("Verified: queue %r is empty%s.", queue,
             f", {dead} item(s) in {verification.dead_letter_queue!r}" if verification.dead_letter_queue else "")
    return {"items_left": 0, "dead_lettered": dead, "dead_letter_queue": verification.dead_letter_queue,
            "account": None}


def _report_dead_letters(job_name: str, dead: int, verification: Verification, log: Log) -> None:
    if not dead:
        return
    message = (f"{dead} item(s) of Job {job_name} were dead-lettered into queue "
               f"{verification.dead_letter_queue!r} after failing; the other items were processed.")
    if verification.fail_on_dead_letters:
        raise JobError(message + " Inspect them there, fix the worker, and move them back to retry.")
    log.warning(message)


def _summary(job: dict[str, Any], verdict: JobAssessment) -> dict[str, Any]:
    status = job.get("status") or {}
    started, finished = status.get("startTime"), status.get("completionTime")
    duration = None
    if started and finished:
        duration = (_parse_time(finished) - _parse_time(started)).total_seconds()
    complete = condition(job, "Complete")
    noticed_after = None
    if complete and complete.get("lastTransitionTime"):  # seconds resolution, as the API keeps it
        noticed_after = round((datetime.now(UTC) - _parse_time(complete["lastTransitionTime"])).total_seconds(), 1)
    return {
        "job_name": job["metadata"]["name"],
        "namespace": job["metadata"]["namespace"],
        "succeeded": verdict.succeeded,
        "failed": verdict.failed,
        "completions": verdict.completions,
        "duration_seconds": duration,
        "noticed_after_seconds": noticed_after,
    }


def _parse_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
