"""The lineage mixins on the real operators: the queue is the fill's output and the Job's input, the
Job a run facet; the connection's password never reaches a facet."""

from __future__ import annotations

import pytest

from workqueue_provider.lineage import QueueReaderLineageMixin, QueueWriterLineageMixin
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor

BROKER = "amqp://user:s3cret-pw@rabbitmq-service:5672/%2F"
NAMESPACE = "amqp://rabbitmq-service:5672/%2F"


@pytest.fixture(autouse=True)
def connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", BROKER)


# The operators themselves carry the mixins.
Fill, RunJob, WaitForJob = FillQueueOperator, QueueJobOperator, JobCompleteSensor


def test_the_operators_carry_the_lineage_mixins():
    assert issubclass(FillQueueOperator, QueueWriterLineageMixin)
    assert issubclass(QueueJobOperator, QueueReaderLineageMixin)
    assert issubclass(JobCompleteSensor, QueueReaderLineageMixin)


def names(datasets) -> list[tuple[str, str]]:
    return [(d.namespace, d.name) for d in datasets]


def test_the_fill_reports_its_queue_as_an_output():
    fill = Fill(task_id="fill_queue", queue_name="job1-run", items=["a"])
    for lineage in (fill.get_openlineage_facets_on_start(),
                    fill.get_openlineage_facets_on_complete(None),
                    fill.get_openlineage_facets_on_failure(None)):
        assert names(lineage.outputs) == [(NAMESPACE, "job1-run")] and lineage.inputs == []


def test_the_job_operator_reports_the_queue_as_input_and_its_job_once_known():
    run_job = RunJob(task_id="run_job", image="job-wq-1", queue_name="job1-run", namespace="batch", job_name="job1")
    run_job._launched = None  # as before execute() (set in __init__ by the redesigned operator)
    started = run_job.get_openlineage_facets_on_start()
    assert names(started.inputs) == [(NAMESPACE, "job1-run")] and started.outputs == []
    assert started.run_facets == {}, "no Job yet: job_name is only a prefix, the name is known once launched"
    run_job._launched = ("job1-run-abc12", "batch")  # what execute() records
    done = run_job.get_openlineage_facets_on_complete(None)
    facet = done.run_facets["externalQuery"]
    assert facet.externalQueryId == "job1-run-abc12"
    assert facet.source == "kubernetes://batch/v1/namespaces/batch/jobs"


def test_the_sensor_reports_the_queue_as_input_and_the_job_it_waits_for():
    sensor = WaitForJob(task_id="wait", job_name="job1-run-abc12", namespace="batch", queue_name="job1-run")
    lineage = sensor.get_openlineage_facets_on_failure(None)
    assert names(lineage.inputs) == [(NAMESPACE, "job1-run")]
    assert lineage.run_facets["externalQuery"].externalQueryId == "job1-run-abc12"


def test_the_sensor_without_a_queue_reports_only_the_job():
    sensor = WaitForJob(task_id="wait", job_name="j", namespace="default")
    lineage = sensor.get_openlineage_facets_on_start()
    assert lineage.inputs == [] and lineage.run_facets["externalQuery"].externalQueryId == "j"


def test_no_password_in_any_facet():
    from openlineage.client.serde import Serde

    fill = Fill(task_id="fill_queue", queue_name="q", items=["a"])
    assert "s3cret-pw" not in Serde.to_json(fill.get_openlineage_facets_on_start().outputs[0])


def test_a_missing_connection_still_names_the_queue(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_AMQP_DEFAULT")
    fill = Fill(task_id="fill_queue", queue_name="q", items=["a"], amqp_conn_id="nowhere")
    assert names(fill.get_openlineage_facets_on_start().outputs) == [("amqp://nowhere", "q")]
