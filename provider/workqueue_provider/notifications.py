"""What a work-queue run tells people when it goes wrong.

* :class:`JobFailureNotifier`, an ``on_failure_callback``: one message with the failed task, the reason
  (the task's exception: a Failed Job's condition and its pods' exit codes and output, or the items
  left or lost) and the item account of the run's queue as it stands then.
* :func:`log_missed_deadline`, a DAG ``DeadlineAlert`` callback (``AsyncCallback``, run by the
  triggerer): it logs which run missed which deadline. Use a chat notifier's callback there to be paged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from airflow.sdk import BaseNotifier

from workqueue_provider.hooks.amqp import AmqpHook

log = logging.getLogger(__name__)
MAX_REASON = 2000  # characters of the exception quoted in a message


class JobFailureNotifier(BaseNotifier):
    """``on_failure_callback=JobFailureNotifier(queue_name=QUEUE)``: logs the message (as an error, in the
    failed task's log) and hands it to ``send``, e.g. ``lambda text: SlackWebhookHook(...).send(text=text)``.
    It never raises: an account it can't read is said to be unknown, with why.

    :param queue_name: the run's queue. Templated.
    :param dead_letter_queue: its dead-letter queue, counted in the account. Templated.
    :param amqp_conn_id: the AMQP connection.
    :param send: called with the message; None: only logged.
    """

    template_fields: Sequence[str] = ("queue_name", "dead_letter_queue")

    def __init__(self, *, queue_name: str, dead_letter_queue: str | None = None,
                 amqp_conn_id: str = AmqpHook.default_conn_name, send: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        self.queue_name = queue_name
        self.dead_letter_queue = dead_letter_queue
        self.amqp_conn_id = amqp_conn_id
        self.send = send

    def notify(self, context: Any) -> None:
        text = self.message(context)
        self.log.error("%s", text)
        if self.send is not None:
            self.send(text)

    def message(self, context: Any) -> str:
        ti = context["ti"]
        exception = context.get("exception")
        reason = f"{type(exception).__name__}: {exception}"[:MAX_REASON] if exception is not None else "no exception recorded"
        return (f"Work-queue run {context.get('run_id')}: task {ti.dag_id}.{ti.task_id} failed. Reason: {reason}\n"
                f"Item account of queue {self.queue_name!r}: {self.account()}")

    def account(self) -> str:
        try:
            account = AmqpHook(amqp_conn_id=self.amqp_conn_id).item_account(self.queue_name, self.dead_letter_queue)
        except Exception as e:  # a notifier must not fail: say why the account is unknown
            return f"unknown ({type(e).__name__}: {e})"
        if account is None:
            return "none kept (the queue was not filled by FillQueueOperator)"
        return account.describe()


async def log_missed_deadline(*, context: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """A ``DeadlineAlert`` callback: log (in the triggerer's log) and return which run missed its deadline;
    ``kwargs`` (the ``AsyncCallback``'s) are appended."""
    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    text = (f"Deadline missed: DAG {run.get('dag_id')} run {run.get('dag_run_id') or run.get('run_id')} (state "
            f"{run.get('state')}, queued at {run.get('queued_at')}) passed its deadline {deadline.get('deadline_time')}."
            + (f" {kwargs}" if kwargs else ""))
    log.warning("%s", text)
    return text
