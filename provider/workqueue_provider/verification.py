"""Did the work get done? The item account of the Job's queue, checked once the Job is Complete.

A Complete Job doesn't prove the work was done (``amqp-consume`` exits 0 when the worker fails), so
success is verified against the queue: with ``workqueue-consume`` the item account
(:mod:`workqueue_provider.amqp.receipts`: processed + dead-lettered + left + lost = filled), else
"the queue is empty", said to be the weaker check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from workqueue_provider.amqp.receipts import Account
from workqueue_provider.exceptions import JobError, QueueNotFoundError
from workqueue_provider.hooks.amqp import AmqpHook

IN_FLIGHT_GRACE_SECONDS = 90.0  # the longest a terminating pod holds an item: its grace period, and then some
LOSS_RECHECK_SECONDS = 20.0  # how long a loss must persist to be believed (see settled_account)


class Log(Protocol):
    """What this module needs of a logger (the stdlib's, or Airflow's task logger)."""

    def info(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Verification:
    """Which queue to check after the Job completes (``queue_name=None`` turns the check off)."""

    amqp: AmqpHook
    queue_name: str | None
    dead_letter_queue: str | None = None
    fail_on_dead_letters: bool = True


def verify_items(job_name: str, verification: Verification, log: Log) -> dict[str, Any]:
    """The summary's queue part (items_left, dead_lettered, account), or a JobError when items are left
    or lost; ``{}`` when verification is off."""
    if not verification.queue_name:
        return {}
    return _verify_queue(job_name, verification, log)


def _verify_queue(job_name: str, verification: Verification, log: Log) -> dict[str, Any]:
    """The item account (amqp/receipts.py) when the workers keep receipts; else "the queue is empty"."""
    queue = verification.queue_name
    assert queue is not None
    amqp = verification.amqp
    try:
        account = settled_account(amqp, queue, verification.dead_letter_queue, log)
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


def settled_account(amqp: AmqpHook, queue: str, dead_letter_queue: str | None, log: Log) -> Account | None:
    """The account once no consumer holds an item of the queue, and a loss once it persists.

    Items still held (unacked) by pods of an earlier, deleted Job count as neither left nor processed
    until those pods let go: waits up to :data:`IN_FLIGHT_GRACE_SECONDS` while the queue has consumers.
    A broker that has just restarted counts the items its old consumers held the same way for a few
    seconds, with no consumer left, until its queues recover them: a loss is believed once it has lasted
    :data:`LOSS_RECHECK_SECONDS`. After that the account is taken as it is."""
    started = time.monotonic()
    while True:
        account = amqp.item_account(queue, dead_letter_queue)
        waited = time.monotonic() - started
        if account is None or account.complete:
            return account
        consumers = amqp.queue_depth(queue).consumers
        if consumers and waited < IN_FLIGHT_GRACE_SECONDS:
            log.info("%d consumer(s) still hold items of queue %r (pods of an earlier Job?): waiting for them to "
                     "finish or let go before the account is taken (%s).", consumers, queue, account.describe())
        elif account.lost and waited < LOSS_RECHECK_SECONDS:
            log.info("%d item(s) of queue %r are unaccounted for (%s): reading again, as a broker that has just "
                     "restarted gives back the items its old consumers held within seconds.",
                     account.lost, queue, account.describe())
        else:
            return account
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
    amqp = verification.amqp
    left = amqp.queue_depth(queue, checked=True).messages
    dead = amqp.queue_depth(verification.dead_letter_queue, checked=True).messages if verification.dead_letter_queue else 0
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
