"""How the item account is taken once the Job is Complete: items held by consumers, and a loss that a
broker restart only shows for a moment, are waited out (bounded); a loss that lasts fails the run."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeAmqpHook, ListLog
from workqueue_provider import verification
from workqueue_provider.amqp.receipts import Account
from workqueue_provider.exceptions import JobError
from workqueue_provider.verification import Verification, verify_items


def account(processed: int, left: int = 0) -> Account:
    return Account("fill", 3, processed, 0, 0, left, consumers=1)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(verification.time, "sleep", lambda seconds: None)


def test_a_loss_seen_just_after_a_broker_restart_is_read_again_and_not_believed():
    # the restarted broker first reads 2 processed + 0 left (one item still counted as held by a consumer
    # of before the restart), then gives the item back: 2 processed + 1 left
    amqp = FakeAmqpHook(accounts=[account(processed=2), account(processed=2), account(processed=2, left=1)])
    log = ListLog()
    with pytest.raises(JobError, match="1 item\\(s\\) are still in queue") as failed:
        verify_items("job", Verification(amqp, "q"), log)  # type: ignore[arg-type]
    assert "vanished" not in str(failed.value)
    assert "unaccounted for" in log.text() and "reading again" in log.text()


def test_a_loss_that_lasts_is_reported_once_the_recheck_time_is_over(monkeypatch):
    monkeypatch.setattr(verification, "LOSS_RECHECK_SECONDS", 0.05)
    clock = iter(float(second) for second in range(1000))
    monkeypatch.setattr(verification.time, "monotonic", lambda: next(clock) * 0.01)
    amqp = FakeAmqpHook(accounts=[account(processed=2)])
    with pytest.raises(JobError, match="1 item\\(s\\) vanished from the queue"):
        verify_items("job", Verification(amqp, "q"), ListLog())  # type: ignore[arg-type]
    assert amqp.reads > 1


def test_a_complete_account_is_taken_at_the_first_reading():
    amqp = FakeAmqpHook(accounts=[account(processed=3)])
    summary = verify_items("job", Verification(amqp, "q"), ListLog())  # type: ignore[arg-type]
    assert summary["account"]["processed"] == 3 and amqp.reads == 1
