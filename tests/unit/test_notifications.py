"""JobFailureNotifier's message and the deadline callback, without services."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import task_context
from workqueue_provider import notifications
from workqueue_provider.amqp.receipts import Account
from workqueue_provider.exceptions import BrokerError, JobError


class Hook:
    def __init__(self, account=None, error=None, **kwargs):
        self._account, self._error = account, error

    def item_account(self, queue_name, dead_letter_queue=None):
        if self._error:
            raise self._error
        return self._account


@pytest.fixture
def hook(monkeypatch):
    def install(**kwargs):
        monkeypatch.setattr(notifications, "AmqpHook", lambda **_: Hook(**kwargs))
    return install


def test_the_failure_message_has_the_reason_and_the_item_account(hook):
    hook(account=Account("f", 3, 1, 0, 0, 2, consumers=0))
    sent = []
    notifier = notifications.JobFailureNotifier(queue_name="q", send=sent.append)
    notifier.notify({**task_context(task_id="run_job"), "exception": JobError("Job ns/j failed: BackoffLimitExceeded")})
    assert sent == ["Work-queue run manual__1: task dag.run_job failed. Reason: JobError: Job ns/j failed: "
                    "BackoffLimitExceeded\nItem account of queue 'q': 3 filled = 1 processed + 0 dead-lettered + "
                    "2 left + 0 lost; 0 processed more than once"]


def test_an_account_that_cant_be_read_is_said_to_be_unknown_and_the_notifier_does_not_raise(hook):
    hook(error=BrokerError("broker 127.0.0.1:5672 timed out"))
    text = notifications.JobFailureNotifier(queue_name="q").message(task_context())
    assert "Reason: no exception recorded" in text and "unknown (BrokerError: broker 127.0.0.1:5672 timed out)" in text


def test_the_deadline_callback_names_the_run_and_the_deadline():
    context = {"dag_run": {"dag_id": "d", "dag_run_id": "r1", "state": "running", "queued_at": "t0"},
               "deadline": {"deadline_time": "t1"}}
    text = asyncio.run(notifications.log_missed_deadline(context=context, note="x"))
    assert text == "Deadline missed: DAG d run r1 (state running, queued at t0) passed its deadline t1. {'note': 'x'}"
