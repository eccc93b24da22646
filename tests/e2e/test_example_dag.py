"""Every DAG in dags/ runs end to end on the real broker and control plane: the example here with
`airflow dags test`, the event-driven one in a running Airflow (test_event_driven.py)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from kubernetes import client

from scripts.demo import dag_run_succeeded, run_example_dag
from tests.conftest import WORKER_IMAGE
from workqueue_provider.hooks.amqp import AmqpHook

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]

#: each DAG in dags/, and the end-to-end test that runs it
DAG_TESTS = {
    "work_queue_example": "tests.e2e.test_example_dag:test_the_example_dag_processes_every_item_once_and_deletes_its_queue",
    "work_queue_on_arrival": "tests.e2e.test_event_driven:test_one_batch_message_starts_one_run_that_processes_every_item",
    "work_queue_batch_report": "tests.e2e.test_event_driven:test_the_account_of_a_batch_reaches_the_dag_scheduled_on_its_asset",
}


def test_every_dag_in_dags_has_an_end_to_end_test():
    from airflow.sdk import DAG

    dag_ids = set()
    for path in sorted((REPO / "dags").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"dags_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dag_ids |= {value.dag_id for value in vars(module).values() if isinstance(value, DAG)}
    assert dag_ids == set(DAG_TESTS), "a DAG in dags/ without an end-to-end test (or a test for a DAG gone)"
    for target in DAG_TESTS.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name, None)), f"{target} does not exist"


def test_the_example_dag_processes_every_item_once_and_deletes_its_queue(broker_url, pod_broker_url, cluster, tmp_path,
                                                                        monkeypatch):
    items = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
    result = run_example_dag(str(cluster.kubeconfig), str(tmp_path), {"items": items, "parallelism": 2},
                             amqp_url=pod_broker_url, extra_env={"WORKQUEUE_WORKER_IMAGE": WORKER_IMAGE}, echo=False)
    assert dag_run_succeeded(result), result.stdout[-5000:]
    for task in ("start_broker", "declare_queue", "fill_queue", "run_job", "wait_for_job", "delete_queue"):
        assert f"task_id='{task}'" in result.stdout, f"{task} did not run"

    batch = client.BatchV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    jobs = [j for j in batch.list_namespaced_job("default").items
            if j.metadata.labels.get("app.kubernetes.io/managed-by") == "airflow-provider-workqueue"]
    job = max(jobs, key=lambda j: j.metadata.creation_timestamp)
    assert job.status.succeeded == 8
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)
    pods = core.list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}").items
    printed = sorted(line for pod in pods for line in cluster.read_pod_log("default", pod.metadata.name).splitlines())
    assert printed == sorted(f"Processing {item}" for item in items), "every item processed exactly once"

    queue = job.spec.template.spec.containers[0].env[1].value
    assert queue.startswith("job1-")
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", broker_url)
    from workqueue_provider.exceptions import QueueNotFoundError
    with pytest.raises(QueueNotFoundError):
        AmqpHook().queue_depth(queue)
    assert "succeeded 8/8, active 0, failed 0" in result.stdout, "progress and summary in the task log"
    account = "8 filled = 8 processed + 0 dead-lettered + 0 left + 0 lost; 0 processed more than once"
    assert account in result.stdout, "the item account in the task log"
