"""A run that misses its deadline and fails, for tests/e2e/test_event_driven.py: the Job's worker holds
its one item past the 5 s deadline, then exits with the poison exit code, which fails the Job at once
(queue_failure_policy). The example DAG's deadline alert and failure notifier, with a short deadline."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG
from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference

from workqueue_provider.kube.failure_policy import queue_failure_policy
from workqueue_provider.notifications import JobFailureNotifier, log_missed_deadline
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

QUEUE = "alerts-{{ run_id }}"
WORKER = "item=$(cat); sleep 8; echo \"poison: $item\" >&2; exit 3"

with DAG(
    dag_id="work_queue_alerts",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 0, "on_failure_callback": JobFailureNotifier(queue_name=QUEUE)},
    deadline=DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(seconds=5),
                           callback=AsyncCallback(log_missed_deadline, kwargs={"note": "alerts-e2e"})),
) as dag:
    declare = DeclareQueueOperator(task_id="declare_queue", queue_name=QUEUE)
    fill = FillQueueOperator(task_id="fill_queue", queue_name=QUEUE, items=["rotten-apple"])
    run_job = QueueJobOperator(
        task_id="run_job", image=os.environ.get("WORKQUEUE_WORKER_IMAGE", "job-wq-1"), queue_name=QUEUE,
        restart_policy="Never", backoff_limit=6,
        pod_failure_policy=queue_failure_policy(poison_exit_code=3), deferrable=False, poll_interval=1,
        command=["workqueue-consume", "sh", "-c", WORKER],
    )
    delete = DeleteQueueOperator(task_id="delete_queue", queue_name=QUEUE, keep_if_not_empty=False).as_teardown(
        setups=declare)
    declare >> fill >> run_job >> delete
