"""QueueJobOperator without services: launch, re-attach and skip decisions, deferral, the in-worker
wait and how its end is judged, all on a fake Kubernetes API and AMQP hook."""

from __future__ import annotations

import pytest

from tests.conftest import task_context
from tests.unit.fakes import FakeAmqpHook, FakeKubernetesApi, job, pod_waiting_on_image
from workqueue_provider.amqp.receipts import Account
from workqueue_provider.compat import AirflowSkipException, TaskDeferred
from workqueue_provider.exceptions import ConfigurationError, JobError
from workqueue_provider.kube.job_manifest import SPEC_HASH_ANNOTATION
from workqueue_provider.kube.job_wait import WaitEvent, WaitStatus
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.triggers.job import JobCompleteTrigger


def operator(api: FakeKubernetesApi, amqp: FakeAmqpHook, **kwargs) -> QueueJobOperator:
    op = QueueJobOperator(task_id="run_job", image="img:1", queue_name="q", namespace="ns", **kwargs)
    op.__dict__.update(kubernetes=api, amqp=amqp)
    return op


def account(filled=3, processed=0, dead=0, left=3, duplicated=0) -> Account:
    return Account("fill", filled, processed, duplicated, dead, left, consumers=1)


def name_of(op: QueueJobOperator) -> str:
    return op.resolve_job_name(task_context())


def existing(op: QueueJobOperator, **status) -> dict:
    """A Job this task created earlier (same spec fingerprint)."""
    fingerprint = op.job_options(task_context()).fingerprint()
    return job(name_of(op), "ns", annotations={SPEC_HASH_ANNOTATION: fingerprint}, **status)


@pytest.mark.parametrize(("knob", "value"), [
    pytest.param("poll_interval", 0, id="poll-interval-zero"),
    pytest.param("timeout", -5, id="negative-timeout"),
    pytest.param("image_pull_grace_seconds", "soon", id="grace-not-a-number"),
    pytest.param("poll_interval", True, id="poll-interval-bool"),
])
def test_waiting_knobs_are_checked_before_anything_is_created(knob, value):
    op = QueueJobOperator(task_id="run_job", image="img:1", queue_name="q", **{knob: value})
    op.__dict__["kubernetes"] = op.__dict__["amqp"] = None  # any call to Kubernetes or the broker fails
    with pytest.raises(ConfigurationError, match=f"{knob}=.* must be a positive number of seconds"):
        op.execute(task_context())


def test_the_dead_letter_queue_is_templated_like_the_sensors():
    assert "dead_letter_queue" in QueueJobOperator.template_fields


def test_a_first_attempt_creates_the_job_and_its_secret_and_the_job_owns_the_secret():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=3)
    op = operator(api, amqp, wait_for_completion=False)
    result = op.execute(task_context())
    name = name_of(op)
    assert result == {"job_name": name, "namespace": "ns"}
    assert api.created == [name] and api.adopted == [f"{name}-broker"]
    assert api.jobs[name]["spec"]["completions"] == 3
    labels = api.jobs[name]["metadata"]["labels"]
    assert labels["airflow.apache.org/dag-id"] == "dag" and labels["airflow.apache.org/run-id"] == "manual__1"
    assert api.jobs[name]["spec"]["template"]["metadata"]["labels"]["airflow.apache.org/task-id"] == "task"
    assert "secret@broker" in api.secrets[f"{name}-broker"]["stringData"]["BROKER_URL"]


def test_a_retry_reattaches_to_the_running_job_instead_of_creating_another():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=3)
    op = operator(api, amqp, wait_for_completion=False)
    api.jobs[name_of(op)] = existing(op, active=2, ready=2)
    assert op.execute(task_context(try_number=2))["job_name"] == name_of(op)
    assert api.created == [] and api.adopted == [f"{name_of(op)}-broker"]


def test_a_job_of_the_same_name_with_another_spec_is_refused():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=3)
    op = operator(api, amqp, wait_for_completion=False)
    api.jobs[name_of(op)] = job(name_of(op), "ns", active=1)
    with pytest.raises(ConfigurationError, match="already exists with a different spec"):
        op.execute(task_context())
    assert api.created == []


def test_a_finished_job_with_items_left_gets_a_next_generation_for_them():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=2, account=account(processed=1, left=2))
    op = operator(api, amqp, wait_for_completion=False)
    api.jobs[name_of(op)] = existing(op, failed=3, conditions=("Failed",))
    assert op.execute(task_context(try_number=2))["job_name"] == f"{name_of(op)}-g2"
    assert api.created == [f"{name_of(op)}-g2"] and api.jobs[f"{name_of(op)}-g2"]["spec"]["completions"] == 2


def test_a_finished_job_whose_items_are_all_processed_counts_as_done():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=0, account=account(processed=3, left=0))
    op = operator(api, amqp, wait_for_completion=False)
    api.jobs[name_of(op)] = existing(op, succeeded=3, conditions=("Complete",))
    assert op.execute(task_context(try_number=2))["job_name"] == name_of(op)
    assert api.created == []


def test_an_empty_queue_skips_without_creating_anything():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=0)
    with pytest.raises(AirflowSkipException, match="Queue 'q' is empty"):
        operator(api, amqp).execute(task_context())
    assert api.created == [] and api.secrets == {}


def test_completions_below_the_items_are_refused_before_anything_is_created():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=5)
    with pytest.raises(ConfigurationError, match="completions=2 .* lower than the 5 items"):
        operator(api, amqp, completions=2).execute(task_context())
    assert api.created == [] and api.secrets == {}


def test_waiting_defers_to_the_trigger_with_the_tasks_settings():
    api, amqp = FakeKubernetesApi(), FakeAmqpHook(ready=3)
    op = operator(api, amqp, image_pull_grace_seconds=42, delete_on_kill=False, timeout=600)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(task_context())
    trigger = deferred.value.trigger
    assert isinstance(trigger, JobCompleteTrigger) and deferred.value.method_name == "execute_complete"
    assert (trigger.job_name, trigger.namespace, trigger.queue_name) == (name_of(op), "ns", "q")
    assert (trigger.image_pull_grace_seconds, trigger.delete_on_kill) == (42, False)


def test_the_wait_in_the_worker_polls_until_complete_and_verifies_the_account():
    api = FakeKubernetesApi()
    amqp = FakeAmqpHook(ready=3, accounts=[account(), account(processed=3, left=0)])  # at launch, at the end
    op = operator(api, amqp, deferrable=False, poll_interval=0.01)
    name = name_of(op)
    done = job(name, "ns", succeeded=3, completions=3, conditions=("Complete",))
    api.job_reads[name] = [None, job(name, "ns", active=2, ready=2), done]  # None: the launch's own lookup
    summary = op.execute(task_context())
    assert summary["succeeded"] == 3 and summary["items_left"] == 0 and summary["account"]["processed"] == 3


def test_the_wait_in_the_worker_fails_and_deletes_a_job_stuck_on_its_image(monkeypatch):
    from workqueue_provider.kube import job_wait

    monkeypatch.setattr(job_wait, "NOTICE_SECONDS", 0.0)
    api = FakeKubernetesApi(pods=[pod_waiting_on_image()])
    op = operator(api, FakeAmqpHook(ready=3), deferrable=False, poll_interval=0.01, image_pull_grace_seconds=0.05)
    name = name_of(op)
    api.job_reads[name] = [None] + [job(name, "ns", active=1, ready=0)] * 50
    with pytest.raises(JobError, match="(?s)can't start its pods .*missing:1.*The Job was deleted"):
        op.execute(task_context())
    assert api.deleted == [name]


@pytest.mark.parametrize(("delete_on_kill", "deleted"), [(True, ["j"]), (False, [])])
def test_a_stuck_event_from_the_trigger_deletes_the_job_only_with_delete_on_kill(delete_on_kill, deleted):
    api = FakeKubernetesApi(jobs={"j": job()})
    op = operator(api, FakeAmqpHook(), delete_on_kill=delete_on_kill)
    event = WaitEvent(WaitStatus.STUCK, "j", "ns", reasons=["pod j-1 image 'x': ErrImagePull"], grace_seconds=300)
    with pytest.raises(JobError, match="waiting more than 300 s"):
        op.execute_complete(task_context(), event.as_dict())
    assert api.deleted == deleted


def test_a_completed_job_with_items_left_fails_naming_them():
    api = FakeKubernetesApi()
    op = operator(api, FakeAmqpHook(account=account(processed=2, left=1)))
    event = WaitEvent(WaitStatus.SUCCEEDED, "j", "ns", job=job(succeeded=1, conditions=("Complete",)))
    with pytest.raises(JobError, match="not every item was processed .*1 item\\(s\\) are still in queue 'q'"):
        op.execute_complete(task_context(), event.as_dict())


def test_a_failed_job_fails_with_the_pods_exit_codes_and_output():
    api = FakeKubernetesApi(pods=[{"metadata": {"name": "j-1"}, "status": {"containerStatuses": [
        {"restartCount": 2, "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}}])
    api.logs["j-1"] = "Traceback: boom"
    op = operator(api, FakeAmqpHook())
    event = WaitEvent(WaitStatus.FAILED, "j", "ns", job=job(failed=3, conditions=("Failed",)))
    with pytest.raises(JobError, match="(?s)failed: FailedReason: Failed message .*pod j-1 exited 3 \\(Error, 2 restarts\\); "
                                       "last output: 'Traceback: boom'"):
        op.execute_complete(task_context(), event.as_dict())


def test_a_completed_job_puts_its_account_on_the_events_of_its_outlet_assets():
    from airflow.sdk import Asset, AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors

    results, alias = Asset("results"), AssetAlias("any")
    op = operator(FakeKubernetesApi(), FakeAmqpHook(account=account(processed=3, left=0)), outlets=[results, alias])
    context = {**task_context(), "outlet_events": OutletEventAccessors()}
    event = WaitEvent(WaitStatus.SUCCEEDED, "j", "ns", job=job(succeeded=3, conditions=("Complete",)))
    op.execute_complete(context, event.as_dict())
    assert context["outlet_events"][results].extra == {
        "job_name": "j", "namespace": "ns", "queue_name": "q",
        "account": {"filled": 3, "processed": 3, "dead_lettered": 0, "left": 0, "duplicated": 0, "lost": 0}}
    assert context["outlet_events"][alias].extra == {}


def test_a_failed_wait_puts_nothing_on_the_outlet_events():
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    results = Asset("results")
    op = operator(FakeKubernetesApi(), FakeAmqpHook(account=account(processed=2, left=1)), outlets=[results])
    context = {**task_context(), "outlet_events": OutletEventAccessors()}
    event = WaitEvent(WaitStatus.SUCCEEDED, "j", "ns", job=job(succeeded=1, conditions=("Complete",)))
    with pytest.raises(JobError):
        op.execute_complete(context, event.as_dict())
    assert context["outlet_events"][results].extra == {}
