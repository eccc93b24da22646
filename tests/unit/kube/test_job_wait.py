"""JobProgress (one wait's view of a Job) and WaitEvent (how every wait ends)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.unit.fakes import job, pod_waiting_on_image
from workqueue_provider.kube.job_wait import (
    CHECK_EVERY_SECONDS,
    NOTICE_SECONDS,
    REFUSED_GRACE_SECONDS,
    JobProgress,
    WaitEvent,
    WaitStatus,
)

QUOTA = ('pods "j-x" is forbidden: exceeded quota: small, requested: cpu=1, used: cpu=0, limited: cpu=100m')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(grace=60.0, early=False) -> tuple[JobProgress, Clock]:
    clock = Clock()
    return JobProgress("j", "ns", grace_seconds=grace, list_pods_early=early, clock=clock), clock


def failed_create(message: str, when: str = "2026-12-01T00:00:00Z") -> dict:
    return {"reason": "FailedCreate", "message": message, "lastTimestamp": when}


def test_observe_reports_only_changes_of_the_progress_line():
    p, _ = progress()
    assert p.observe(job(active=2, ready=2)) is True
    assert p.observe(job(active=2, ready=2)) is False
    assert p.observe(job(active=1, ready=1, succeeded=1, completions=2)) is True
    assert p.last_line == "succeeded 1/2, active 1, failed 0"


def test_ending_carries_the_finished_job():
    p, _ = progress()
    running, complete = job(active=1, ready=1), job(succeeded=1, conditions=("Complete",))
    p.observe(running)
    assert p.ending(running) is None
    p.observe(complete)
    assert p.ending(complete) == WaitEvent(WaitStatus.SUCCEEDED, "j", "ns", job=complete)
    failed = job(failed=1, conditions=("FailureTarget",))
    p.observe(failed)
    assert p.ending(failed).status is WaitStatus.FAILED  # FailureTarget already decides


def test_a_healthy_job_never_needs_its_pods_or_events_read():
    p, clock = progress()
    for _ in range(100):
        p.observe(job(active=2, ready=2))
        clock.now += 30
        assert not p.pods_worth_listing() and not p.events_worth_listing()


def test_pods_are_read_once_some_stay_unready_for_a_few_seconds_then_at_most_every_check_period():
    p, clock = progress(grace=60)
    p.observe(job(active=2, ready=1))
    clock.now += NOTICE_SECONDS - 1
    assert not p.pods_worth_listing()
    clock.now += 1
    assert p.pods_worth_listing()
    assert not p.pods_worth_listing()
    clock.now += CHECK_EVERY_SECONDS
    assert p.pods_worth_listing()
    p.observe(job(active=2, ready=2))  # ready again: the clock starts over
    clock.now += 60
    p.observe(job(active=2, ready=1))
    assert not p.pods_worth_listing()


def test_listing_early_reads_unready_pods_at_once_and_never_without_a_grace():
    p, _ = progress(grace=60, early=True)
    p.observe(job(active=1, ready=0))
    assert p.pods_worth_listing()
    off, clock = progress(grace=None, early=True)
    off.observe(job(active=1, ready=0))
    clock.now += 600
    assert not off.pods_worth_listing()


def test_waiting_pods_are_noticed_at_once_and_stuck_only_after_the_grace():
    p, _ = progress(grace=60)
    created = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    fresh = [pod_waiting_on_image(created="2026-12-01T00:00:00Z")]
    notice, ending = p.look_at_pods(fresh, now=created + 10)
    assert notice == "pods waiting: pod j-abc ErrImagePull (image 'missing:1')" and ending is None
    assert p.look_at_pods(fresh, now=created + 20) == (None, None)  # said once
    _, ending = p.look_at_pods(fresh, now=created + 61)
    assert ending.status is WaitStatus.STUCK and ending.grace_seconds == 60
    assert ending.reasons == ["pod j-abc container 'worker' image 'missing:1': ErrImagePull (not found)"]


def test_an_unschedulable_pod_is_noticed_with_the_schedulers_reason():
    p, _ = progress()
    pending = {"metadata": {"name": "j-1", "creationTimestamp": "2026-12-01T00:00:00Z"},
               "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                              "reason": "Unschedulable",
                                                              "message": "0/1 nodes are available: 1 Insufficient cpu."}]}}
    notice, ending = p.look_at_pods([pending])
    assert notice == "pods waiting: pod j-1 Unschedulable (0/1 nodes are available: 1 Insufficient cpu.)"
    assert ending is None


def test_a_job_without_pods_gets_its_events_read_and_refusals_end_the_wait_after_their_grace():
    p, clock = progress(grace=None)
    p.observe(job(active=0))
    clock.now += NOTICE_SECONDS
    assert p.events_worth_listing()
    notice, ending = p.look_at_events([failed_create(QUOTA), {"reason": "SuccessfulCreate", "message": "x"}])
    assert notice == f"pod creation refused: {QUOTA}" and ending is None
    clock.now += REFUSED_GRACE_SECONDS
    _, ending = p.look_at_events([failed_create(QUOTA)])
    assert ending.status is WaitStatus.REFUSED and ending.reasons == [QUOTA]


def test_refusals_that_stop_do_not_end_the_wait():
    p, clock = progress()
    p.observe(job(active=0))
    p.look_at_events([failed_create(QUOTA)])
    clock.now += REFUSED_GRACE_SECONDS / 2
    p.observe(job(active=1, ready=1))  # a pod got created after all
    p.observe(job(active=0, succeeded=1, completions=2))
    clock.now += REFUSED_GRACE_SECONDS
    assert p.look_at_events([failed_create(QUOTA)])[1] is None  # the refusal clock started over


def test_a_suspended_job_is_not_taken_for_one_whose_pods_are_refused():
    p, clock = progress()
    suspended = job(active=0)
    suspended["spec"]["suspend"] = True
    p.observe(suspended)
    clock.now += 600
    assert not p.events_worth_listing()


@pytest.mark.parametrize("event", [
    WaitEvent(WaitStatus.SUCCEEDED, "j", "ns", job=job(succeeded=1, conditions=("Complete",))),
    WaitEvent(WaitStatus.STUCK, "j", "ns", message="m", reasons=["pod x"], grace_seconds=5.0),
    WaitEvent(WaitStatus.REFUSED, "j", "ns", message="m", reasons=[QUOTA], grace_seconds=20.0),
    WaitEvent(WaitStatus.TIMEOUT, "j", "ns", message="late"),
])
def test_wait_events_survive_the_trip_through_a_trigger_event(event):
    payload = json.loads(json.dumps(event.as_dict()))  # what the triggerer stores and hands back
    assert payload["status"] == event.status.value
    assert WaitEvent.from_dict(payload) == event
