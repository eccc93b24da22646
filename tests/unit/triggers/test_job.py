"""JobCompleteTrigger against a scripted API: serialize round trip, and the event each sequence of
list/watch answers ends in (mirrors how the cncf provider tests its triggers)."""

from __future__ import annotations

import asyncio
import importlib
import time

import pytest

from tests.unit.fakes import AsyncCluster, api_exception, job, pod_waiting_on_image
from workqueue_provider.kube.job_wait import WaitEvent, WaitStatus
from workqueue_provider.triggers.job import JobCompleteTrigger

RUNNING = job(active=1, ready=1, version="1")
COMPLETE = job(succeeded=1, conditions=("Complete",), version="3")


def trigger(**overrides) -> JobCompleteTrigger:
    return JobCompleteTrigger(**{"job_name": "j", "namespace": "ns", "kubernetes_conn_id": "k", "progress_every": 0,
                                 **overrides})


def fire(t: JobCompleteTrigger, timeout: float = 10) -> WaitEvent:
    async def first() -> WaitEvent:
        async for event in t.run():
            return WaitEvent.from_dict(event.payload)
        raise AssertionError("the trigger ended without an event")
    return asyncio.run(asyncio.wait_for(first(), timeout))


def test_serialize_round_trip_rebuilds_the_same_trigger():
    original = trigger(deadline=1234.5, delete_on_kill=False, progress_every=30, queue_name="q", amqp_conn_id="a",
                       image_pull_grace_seconds=60)
    path, kwargs = original.serialize()
    module, _, name = path.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)
    assert kwargs["image_pull_grace_seconds"] == 60 and kwargs["deadline"] == 1234.5


def test_a_job_that_completes_on_the_watch_ends_succeeded_with_the_job_as_seen(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING], streams=[[("MODIFIED", COMPLETE)]]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.SUCCEEDED and event.job == COMPLETE
    assert [kind for kind, _ in cluster.requests] == ["list", "watch"]
    assert cluster.requests[1][1]["resource_version"] == "1"  # watched from the list's resourceVersion


def test_a_job_already_finished_when_listed_ends_without_waiting(monkeypatch):
    cluster = AsyncCluster(lists=[job(failed=2, conditions=("Failed",))], streams=[[]]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.FAILED and event.job["status"]["failed"] == 2
    assert cluster.count("list") == 1


def test_a_watch_that_ends_is_reopened_from_the_last_resource_version(monkeypatch):
    middle = job(active=1, ready=1, succeeded=0, version="2")
    cluster = AsyncCluster(lists=[RUNNING], streams=[[("MODIFIED", middle)], [("MODIFIED", COMPLETE)]]).install(monkeypatch)
    assert fire(trigger()).status is WaitStatus.SUCCEEDED
    watches = [kwargs for kind, kwargs in cluster.requests if kind == "watch"]
    assert [w["resource_version"] for w in watches] == ["1", "2"]
    assert cluster.count("list") == 1


def test_410_gone_lists_the_job_again(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING, job(active=1, version="7")],
                           streams=[[api_exception(410, "Gone")], [("MODIFIED", COMPLETE)]]).install(monkeypatch)
    assert fire(trigger()).status is WaitStatus.SUCCEEDED
    assert cluster.count("list") == 2
    assert [kw["resource_version"] for kind, kw in cluster.requests if kind == "watch"] == ["1", "7"]


def test_a_dropped_connection_reconnects_and_the_wait_goes_on(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING], streams=[[ConnectionResetError("reset")], [("MODIFIED", COMPLETE)]])
    cluster.install(monkeypatch)
    assert fire(trigger()).status is WaitStatus.SUCCEEDED
    assert cluster.count("watch") == 2


def test_a_deleted_job_ends_the_wait_with_an_error(monkeypatch):
    AsyncCluster(lists=[RUNNING], streams=[[("DELETED", RUNNING)]]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.ERROR and "was deleted while waiting" in event.message


def test_a_job_that_does_not_exist_ends_the_wait_with_an_error(monkeypatch):
    AsyncCluster(lists=[None]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.ERROR and "ns/j does not exist" in event.message


def test_a_deadline_in_the_past_ends_with_a_timeout_without_any_request(monkeypatch):
    cluster = AsyncCluster().install(monkeypatch)
    event = fire(trigger(deadline=time.time() - 1))
    assert event.status is WaitStatus.TIMEOUT and "did not finish before the timeout" in event.message
    assert cluster.requests == []


def test_an_expired_token_rebuilds_the_client_once_and_the_wait_goes_on(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING], streams=[[api_exception(401, "Unauthorized")], [("MODIFIED", COMPLETE)]])
    cluster.install(monkeypatch)
    assert fire(trigger()).status is WaitStatus.SUCCEEDED
    assert cluster.clients_built == 2


def test_credentials_that_stay_refused_end_the_wait_with_an_error(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING], streams=[[api_exception(401, "Unauthorized")],
                                                     [api_exception(401, "Unauthorized")]]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.ERROR and "401 Unauthorized" in event.message
    assert cluster.clients_built == 2


def test_forbidden_ends_the_wait_naming_rbac(monkeypatch):
    AsyncCluster(lists=[api_exception(403, "Forbidden")]).install(monkeypatch)
    event = fire(trigger())
    assert event.status is WaitStatus.ERROR and "403 Forbidden" in event.message and "deploy/rbac.yaml" in event.message


def stalled_cluster(monkeypatch, pods=(), *, active=1, events=()) -> AsyncCluster:
    """A Job with ``active`` pods that never get ready; the watch then stays silent. The trigger looks
    at pods and events after half a second instead of five."""
    from workqueue_provider.hooks import kubernetes_async
    from workqueue_provider.kube import job_wait

    monkeypatch.setattr(job_wait, "NOTICE_SECONDS", 0.5)
    monkeypatch.setattr(job_wait, "REFUSED_GRACE_SECONDS", 1.0)
    monkeypatch.setattr(job_wait, "CHECK_EVERY_SECONDS", 0.5)
    cluster = AsyncCluster(lists=[job(active=active, ready=0)], streams=[[]], pods=list(pods),
                           events=list(events)).install(monkeypatch)

    async def silent(self, func, *args, **kwargs):
        cluster.requests.append(("watch", kwargs))
        await asyncio.Event().wait()
        yield  # pragma: no cover

    monkeypatch.setattr(kubernetes_async.async_watch.Watch, "stream", silent)
    return cluster


def test_pods_stuck_on_a_missing_image_end_the_wait_naming_the_image(monkeypatch):
    cluster = stalled_cluster(monkeypatch, pods=[[pod_waiting_on_image()]])
    event = fire(trigger(image_pull_grace_seconds=0.5))
    assert event.status is WaitStatus.STUCK and event.grace_seconds == 0.5
    assert "image 'missing:1': ErrImagePull (not found)" in event.reasons[0]
    assert cluster.count("pods") == 1


def test_pods_are_not_listed_without_a_grace_period(monkeypatch):
    cluster = stalled_cluster(monkeypatch, pods=[[pod_waiting_on_image()]])
    with pytest.raises(TimeoutError):
        fire(trigger(image_pull_grace_seconds=None), timeout=2)
    assert cluster.count("pods") == 0


def test_refused_pod_listing_leaves_the_decision_to_the_watch(monkeypatch):
    cluster = stalled_cluster(monkeypatch, pods=[api_exception(403, "Forbidden")])
    with pytest.raises(TimeoutError):
        fire(trigger(image_pull_grace_seconds=0.5), timeout=2.5)
    assert cluster.count("pods") == 1  # asked once, then gave up on the check


def test_refused_pod_creations_end_the_wait_quoting_the_api_server(monkeypatch):
    refusal = {"reason": "FailedCreate", "message": 'pods "j-1" is forbidden: violates PodSecurity "restricted:latest"'}
    cluster = stalled_cluster(monkeypatch, active=0, events=[[refusal]])
    event = fire(trigger())
    assert event.status is WaitStatus.REFUSED and "violates PodSecurity" in event.reasons[0]
    assert cluster.count("pods") == 0  # no pod to look at
    selector = next(kw["field_selector"] for kind, kw in cluster.requests if kind == "events")
    assert "involvedObject.name=j" in selector and "reason=FailedCreate" in selector


def test_cancelling_the_wait_closes_every_api_client(monkeypatch):
    cluster = stalled_cluster(monkeypatch, pods=[[]])

    async def cancel_after_a_while():
        task = asyncio.ensure_future(trigger(image_pull_grace_seconds=30).run().__anext__())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_a_while())
    assert cluster.clients_built >= 1 and cluster.clients_closed == cluster.clients_built


def test_on_kill_deletes_the_job_unless_the_event_was_already_sent(monkeypatch):
    cluster = AsyncCluster(lists=[RUNNING], streams=[[("MODIFIED", COMPLETE)]]).install(monkeypatch)
    asyncio.run(trigger().on_kill())
    assert cluster.deleted == ["j"]
    fired = trigger()
    fire(fired)
    asyncio.run(fired.on_kill())
    assert cluster.deleted == ["j"]  # the Job it reported on is left for the task to judge
    asyncio.run(trigger(delete_on_kill=False).on_kill())
    assert cluster.deleted == ["j"]
