"""JobCompleteTrigger's watch against a fake API (no cluster): a 401 rebuilds the client once."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from workqueue_provider.triggers import job as trigger_module
from workqueue_provider.triggers.job import JobCompleteTrigger

COMPLETE = {"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "2"},
            "spec": {"completions": 1},
            "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
RUNNING = {"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "1"}, "spec": {"completions": 1},
           "status": {"active": 1}}


class FakeApi:
    """One API client: its credentials are good until it has served ``good_calls`` requests."""

    def __init__(self, good_calls: int):
        self.good_calls = good_calls

    def sanitize_for_serialization(self, obj):
        return obj

    def call(self):
        if self.good_calls <= 0:
            raise ApiException(status=401, reason="Unauthorized")
        self.good_calls -= 1


def fake_kubernetes(monkeypatch, clients: list[FakeApi]):
    built: list[FakeApi] = []

    class Hook:
        @contextlib.asynccontextmanager
        async def get_conn(self):
            built.append(clients[len(built)])
            yield built[-1]

    class Batch:
        def __init__(self, api):
            self.api = api

        async def list_namespaced_job(self, namespace, **kwargs):
            self.api.call()
            return SimpleNamespace(items=[RUNNING], metadata=SimpleNamespace(resource_version="1"))

    class Watch:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def stream(self, func, *args, **kwargs):
            func.__self__.api.call()
            yield {"type": "MODIFIED", "raw_object": COMPLETE}

    monkeypatch.setattr(JobCompleteTrigger, "_hook", lambda self: Hook())
    monkeypatch.setattr(trigger_module.async_client, "BatchV1Api", Batch)
    monkeypatch.setattr(trigger_module.async_watch, "Watch", Watch)
    return built


def first_event(trigger):
    async def run():
        async for event in trigger._watch():
            return event.payload
    return asyncio.run(run())


def test_an_expired_token_rebuilds_the_client_once_and_the_wait_goes_on(monkeypatch):
    built = fake_kubernetes(monkeypatch, [FakeApi(good_calls=1), FakeApi(good_calls=5)])
    event = first_event(JobCompleteTrigger(job_name="j", namespace="ns", kubernetes_conn_id="k"))
    assert event["status"] == "succeeded" and event["job"] == COMPLETE
    assert len(built) == 2


@pytest.mark.parametrize("clients", [[FakeApi(0), FakeApi(0)], [FakeApi(1), FakeApi(0)]], ids=["at-once", "later"])
def test_credentials_that_stay_refused_end_the_wait_with_an_error(monkeypatch, clients):
    built = fake_kubernetes(monkeypatch, clients)
    event = first_event(JobCompleteTrigger(job_name="j", namespace="ns", kubernetes_conn_id="k"))
    assert event["status"] == "error" and "401" in event["message"]
    assert len(built) == 2
