"""The Kubernetes "Coarse Parallel Processing Using a Work Queue" example as an Airflow DAG.

start the broker if needed -> declare the queue -> fill it (one message per item) -> run the Job
-> wait until it is Complete and the queue is empty -> delete the queue (a teardown: it runs
whatever happened, and a failure upstream still fails the run; a queue with items left is kept).

A failed task sends one message with the reason and the item account (JobFailureNotifier).

Trigger it from the UI to get a form (items, parallelism, image, namespace); scheduled runs use
the defaults. Every run gets its own queue, so scheduled and manual runs never share one.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from workqueue_provider.kube.broker_manifests import DEFAULT_IMAGE as DEFAULT_BROKER_IMAGE
from workqueue_provider.notifications import JobFailureNotifier
from workqueue_provider.operators.broker import EnsureBrokerOperator
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor

# [START work_queue_example]
QUEUE = "job1-{{ run_id }}"  # one queue per run

with DAG(
    dag_id="work_queue_example",
    description="Fill a RabbitMQ queue and let a Kubernetes Job's pods take one item each",
    schedule="@daily",  # a batch job: once a day; manual runs any time from the UI
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    render_template_as_native_obj=True,  # "{{ params.items }}" renders to a list, not its text
    default_args={
        "retries": 2, "retry_delay": timedelta(seconds=10),
        # a failed task (after its retries) says why, with the item account of the run's queue; pass
        # send=... (e.g. a Slack webhook's send) to have the message delivered as well as logged
        "on_failure_callback": JobFailureNotifier(queue_name=QUEUE),
    },
    params={
        "items": Param(["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"],
                       type="array", items={"type": "string", "minLength": 1}, title="Work items",
                       description="One message per item; each worker pod processes one."),
        "parallelism": Param(2, type="integer", minimum=1, maximum=100, title="Pods at once"),
        "items_file": Param(None, type=["null", "string"], title="Items file",
                            description="Path (on the Airflow workers) of a file with one item per line; "
                                        "used instead of the items above. Best for large runs."),
        "items_per_pod": Param(1, type=["null", "integer"], minimum=1, title="Items per pod",
                               description="How many items each pod takes (completions = items / this). "
                                           "Empty (null) = drain mode: each pod takes items until the queue is empty, "
                                           "best for many short items."),
        "image": Param(os.environ.get("WORKQUEUE_WORKER_IMAGE", "job-wq-1"), type="string", minLength=1,
                       title="Worker image", description="Image whose command consumes one item (see worker/)."),
        "namespace": Param(os.environ.get("WORKQUEUE_NAMESPACE", "default"), type="string",
                           pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63, title="Kubernetes namespace"),
        "pod_broker_host": Param(os.environ.get("WORKQUEUE_POD_BROKER_HOST"), type=["null", "string"],
                                 title="Broker host for pods",
                                 description="Leave empty to use the AMQP connection's host (e.g. rabbitmq-service)."),
    },
    tags=["workqueue", "kubernetes", "rabbitmq"],
) as dag:
    # where no broker answers, start the tutorial's (image and NodePort for Airflow outside the cluster: `make demo`)
    start_broker = EnsureBrokerOperator(
        task_id="start_broker", namespace="{{ params.namespace }}",
        image=os.environ.get("WORKQUEUE_BROKER_IMAGE", DEFAULT_BROKER_IMAGE),
        node_port=int(os.environ["WORKQUEUE_BROKER_NODE_PORT"]) if os.environ.get("WORKQUEUE_BROKER_NODE_PORT") else None,
    )

    declare_queue = DeclareQueueOperator(task_id="declare_queue", queue_name=QUEUE)

    fill_queue = FillQueueOperator(
        task_id="fill_queue",
        queue_name=QUEUE,
        items="{{ None if params['items_file'] else params['items'] }}",
        items_file="{{ params['items_file'] }}",  # large runs: a file keeps the run's conf small
    )

    run_job = QueueJobOperator(
        task_id="run_job",
        image="{{ params.image }}",
        queue_name=QUEUE,
        namespace="{{ params.namespace }}",
        parallelism="{{ params.parallelism }}",
        items_per_pod="{{ params.items_per_pod }}",
        pod_broker_host="{{ params.pod_broker_host }}",
        pod_broker_port=os.environ.get("WORKQUEUE_POD_BROKER_PORT"),  # with a NodePort: the Service's 5672
        wait_for_completion=False,  # the sensor below waits, so the UI shows launch and wait apart
        ttl_seconds_after_finished=3600,
    )

    wait_for_job = JobCompleteSensor(
        task_id="wait_for_job",
        job_name="{{ ti.xcom_pull(task_ids='run_job')['job_name'] }}",
        namespace="{{ params.namespace }}",
        queue_name=QUEUE,  # verified completion: fail if items are left in the queue
        timeout=3600,
        # a Job that can never finish (a missing image, pods the namespace refuses, a timed-out wait) is
        # deleted with its broker Secret instead of being left behind; a Failed one goes after its TTL
        delete_job_on_failure=True,
    )

    # A teardown: runs whatever happened upstream, and doesn't hide a failure from the run's state.
    # It deletes nothing unprocessed: a queue with items left (a failed run) is kept, and its log says
    # how many and how to finish them (clear the run's failed tasks); keep_if_not_empty=False would delete them.
    delete_queue = DeleteQueueOperator(
        task_id="delete_queue", queue_name=QUEUE, keep_if_not_empty=True,
    ).as_teardown(setups=declare_queue)

    start_broker >> declare_queue >> fill_queue >> run_job >> wait_for_job >> delete_queue
# [END work_queue_example]
