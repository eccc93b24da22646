"""The work-queue example, started by the work itself: one DAG run per batch published on a queue.

A producer publishes a batch (a JSON list of items, or ``{"items": [...]}``) on the RabbitMQ queue
"batches"; the triggerer's AmqpMessageTrigger (through common-messaging's MessageQueueTrigger)
turns it into an asset event, the scheduler starts a run, and the run fills its own work queue with
the batch's items and runs the Job, exactly as work_queue_example does.

The "batches" queue must exist (durable, with a dead-letter queue for the messages the trigger
rejects as undecodable): see docs/event-driven.md. Batches that arrive together may start a single
run (Airflow merges the asset events it has not started a run for yet): a run takes the items of
every batch that triggered it, so no batch is ever skipped.

The task that sees the Job complete (wait_for_job) has the Asset "work_queue_processed_batches" as its
outlet: its event carries the item account, the Job and the queue, and the DAG
work_queue_batch_report, scheduled on that Asset, reads them from ``triggering_asset_events``.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import DAG, Asset, AssetWatcher, Param, task

from workqueue_provider.operators.broker import EnsureBrokerOperator
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor

BATCHES_QUEUE = os.environ.get("WORKQUEUE_BATCHES_QUEUE", "batches")

# [START work_queue_on_arrival]
batches = Asset(
    "work_queue_batches",
    watchers=[AssetWatcher(
        name="batches_queue",
        # One event per message; ack only once Airflow has the event; undecodable -> dead-lettered.
        trigger=MessageQueueTrigger(scheme="amqp", queue_name=BATCHES_QUEUE, amqp_conn_id="amqp_default",
                                    body_format="json"),
    )],
)
QUEUE = "batch-{{ run_id }}"  # one work queue per run
processed_batches = Asset("work_queue_processed_batches")  # its events' extra: the item account of a run

with DAG(
    dag_id="work_queue_on_arrival",
    description="One run per batch published on the 'batches' queue: fill a work queue with it, run the Job",
    schedule=[batches],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    render_template_as_native_obj=True,  # "{{ params.parallelism }}" renders to an int
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10)},
    params={
        "parallelism": Param(2, type="integer", minimum=1, maximum=100, title="Pods at once"),
        "image": Param(os.environ.get("WORKQUEUE_WORKER_IMAGE", "job-wq-1"), type="string", minLength=1),
        "namespace": Param(os.environ.get("WORKQUEUE_NAMESPACE", "default"), type="string"),
        "pod_broker_host": Param(os.environ.get("WORKQUEUE_POD_BROKER_HOST"), type=["null", "string"]),
    },
    tags=["workqueue", "kubernetes", "rabbitmq", "event-driven"],
) as dag:

    @task
    def batch_items(*, triggering_asset_events=None) -> list:
        """The items of every batch that triggered this run, in arrival order."""
        items: list = []
        for event in triggering_asset_events[batches]:
            body = event.extra["payload"]["body"]
            batch = body.get("items") if isinstance(body, dict) else body
            if not isinstance(batch, list) or not batch:
                raise ValueError(f"A batch must be a non-empty JSON list of items or {{\"items\": [...]}}; got "
                                 f"{str(body)[:200]!r} (message_id {event.extra['payload']['properties'].get('message_id')}).")
            items += batch
        return items

    items = batch_items()
    start_broker = EnsureBrokerOperator(task_id="start_broker", namespace="{{ params.namespace }}")
    declare_queue = DeclareQueueOperator(task_id="declare_queue", queue_name=QUEUE)
    fill_queue = FillQueueOperator(task_id="fill_queue", queue_name=QUEUE, items=items)
    run_job = QueueJobOperator(
        task_id="run_job",
        image="{{ params.image }}",
        queue_name=QUEUE,
        namespace="{{ params.namespace }}",
        parallelism="{{ params.parallelism }}",
        pod_broker_host="{{ params.pod_broker_host }}",
        wait_for_completion=False,
        ttl_seconds_after_finished=3600,
    )
    wait_for_job = JobCompleteSensor(
        task_id="wait_for_job",
        job_name="{{ ti.xcom_pull(task_ids='run_job')['job_name'] }}",
        namespace="{{ params.namespace }}",
        queue_name=QUEUE,  # verified completion: every item of the batch processed
        timeout=3600,
        delete_job_on_failure=True,  # a Job that can never finish is deleted, not left behind
        outlets=[processed_batches],  # the event's extra: {"account": {...}, "job_name", "namespace", "queue_name"}
    )
    delete_queue = DeleteQueueOperator(
        task_id="delete_queue", queue_name=QUEUE, keep_if_not_empty=True,
    ).as_teardown(setups=declare_queue)

    start_broker >> declare_queue >> items >> fill_queue >> run_job >> wait_for_job >> delete_queue

with DAG(
    dag_id="work_queue_batch_report",
    description="Report the item account of every batch work_queue_on_arrival processed",
    schedule=[processed_batches],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["workqueue", "event-driven"],
) as report_dag:

    @task
    def report(*, triggering_asset_events=None) -> list:
        """One line per processed batch: its Job, queue and item account (from the asset event's extra)."""
        extras = [dict(event.extra) for event in triggering_asset_events[processed_batches]]
        for extra in extras:
            print(f"Job {extra['namespace']}/{extra['job_name']} (queue {extra['queue_name']}): {extra['account']}")
        return extras

    report()
# [END work_queue_on_arrival]
