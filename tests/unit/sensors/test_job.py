"""JobCompleteSensor without services: each poke reads the Job once and judges it like the operator."""

from __future__ import annotations

import pytest
from airflow.sdk import PokeReturnValue

from tests.conftest import task_context
from tests.unit.fakes import FakeAmqpHook, FakeKubernetesApi, job, pod_waiting_on_image
from workqueue_provider.amqp.receipts import Account
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import ConfigurationError, JobError
from workqueue_provider.sensors.job import JobCompleteSensor


def sensor(api: FakeKubernetesApi, amqp: FakeAmqpHook | None = None, **kwargs) -> JobCompleteSensor:
    s = JobCompleteSensor(task_id="wait", **{"job_name": "j", "namespace": "ns", **kwargs})
    s.__dict__.update(kubernetes=api, amqp=amqp or FakeAmqpHook())
    return s


def test_the_grace_period_is_checked_before_any_call():
    s = JobCompleteSensor(task_id="wait", job_name="j", image_pull_grace_seconds=0)
    s.__dict__["kubernetes"] = None  # any call to Kubernetes fails
    with pytest.raises(ConfigurationError, match="image_pull_grace_seconds=0 must be a positive number of seconds"):
        s.execute(task_context())


def test_a_running_job_pokes_false_and_a_complete_one_returns_the_verified_summary():
    api = FakeKubernetesApi()
    amqp = FakeAmqpHook(account=Account("f", 3, 3, 0, 0, 0, consumers=1))
    s = sensor(api, amqp, queue_name="q")
    api.job_reads["j"] = [job(active=1, ready=1), job(succeeded=3, completions=3, conditions=("Complete",))]
    assert s.poke(task_context()) is False
    done = s.poke(task_context())
    assert isinstance(done, PokeReturnValue) and done.is_done
    assert done.xcom_value["succeeded"] == 3 and done.xcom_value["account"]["processed"] == 3


def test_a_missing_job_fails_the_poke():
    with pytest.raises(JobError, match="ns/j does not exist"):
        sensor(FakeKubernetesApi()).poke(task_context())


def test_a_stuck_job_fails_at_the_first_poke_that_sees_it_and_is_left_alone():
    api = FakeKubernetesApi(jobs={"j": job(active=1, ready=0)}, pods=[pod_waiting_on_image()])
    with pytest.raises(JobError, match="(?s)can't start its pods.*Delete the Job \\(kubectl -n ns delete job j\\)"):
        sensor(api, image_pull_grace_seconds=60).poke(task_context())
    assert api.deleted == []  # the sensor didn't create it


def test_deferrable_pokes_once_then_defers_with_the_queue_for_progress_lines():
    api = FakeKubernetesApi(jobs={"j": job(active=1, ready=1)})
    with pytest.raises(TaskDeferred) as deferred:
        sensor(api, queue_name="q", amqp_conn_id="a").execute(task_context())
    trigger = deferred.value.trigger
    assert (trigger.job_name, trigger.queue_name, trigger.amqp_conn_id) == ("j", "q", "a")


def test_invalid_names_are_refused_before_the_api_is_called():
    s = sensor(None, job_name="Job_1")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="job_name 'Job_1' is not a valid RFC 1123"):
        s.poke(task_context())


def test_the_poke_that_sees_the_job_complete_puts_the_account_on_the_outlet_events():
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    results = Asset("results")
    api = FakeKubernetesApi(jobs={"j": job(succeeded=3, completions=3, conditions=("Complete",))})
    s = sensor(api, FakeAmqpHook(account=Account("f", 3, 3, 0, 0, 0, consumers=1)), queue_name="q", outlets=[results])
    context = {**task_context(), "outlet_events": OutletEventAccessors()}
    assert s.poke(context)
    assert context["outlet_events"][results].extra["account"]["processed"] == 3
    assert context["outlet_events"][results].extra["queue_name"] == "q"
