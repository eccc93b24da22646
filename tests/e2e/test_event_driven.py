"""The event-driven example (dags/work_queue_on_arrival.py) in a running Airflow: a batch published on
the batches queue starts a run that processes every item through the Job; a malformed message starts
none and is dead-lettered; a triggerer killed with a message in flight loses nothing; the lineage
events name the queues. Airflow starts once for the module (with an OpenLineage file transport)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pika
import pytest
from kubernetes import client

from tests.conftest import WORKER_IMAGE, worker_output
from tests.e2e.airflow_services import REPO, AirflowServices
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.queues import QueueSpec, declare, delete, depth

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(2400)]

DAG_ID = "work_queue_on_arrival"
REPORT_DAG_ID = "work_queue_batch_report"  # scheduled on wait_for_job's outlet Asset
ALERTS_DAG_ID = "work_queue_alerts"  # tests/e2e/dags: a run that misses a 5 s deadline and fails
RUN_TIMEOUT = 900  # hang guards on 2 shared cores, not speed checks
EVENT_TIMEOUT = 180


@pytest.fixture(scope="module")
def batches_queue(broker_url):
    """This module's own "batches" queue (the DAG reads its name from WORKQUEUE_BATCHES_QUEUE),
    dead-lettering to ``<name>.dead``."""
    name = f"batches-{uuid.uuid4().hex[:8]}"
    connection = open_connection(BrokerSettings.from_url(broker_url))
    declare(connection, QueueSpec(f"{name}.dead"))
    declare(connection, QueueSpec(name, dead_letter_exchange="", dead_letter_routing_key=f"{name}.dead"))
    connection.close()
    yield name
    connection = open_connection(BrokerSettings.from_url(broker_url))
    for leftover in (name, f"{name}.dead"):
        delete(connection, leftover)
    connection.close()


@pytest.fixture(scope="module")
def lineage_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openlineage") / "events.jsonl"


@pytest.fixture(scope="module")
def airflow(broker_url, pod_broker_url, real_cluster, batches_queue, lineage_file, tmp_path_factory):
    dags = tmp_path_factory.mktemp("dags")
    (dags / f"{DAG_ID}.py").symlink_to(REPO / "dags" / f"{DAG_ID}.py")
    (dags / f"{ALERTS_DAG_ID}.py").symlink_to(REPO / "tests" / "e2e" / "dags" / f"{ALERTS_DAG_ID}.py")
    services = AirflowServices(tmp_path_factory.mktemp("airflow"), kubeconfig=str(real_cluster.kubeconfig),
                               amqp_url=pod_broker_url, dags_folder=dags)
    services.env.update({
        "WORKQUEUE_WORKER_IMAGE": WORKER_IMAGE,
        "WORKQUEUE_BATCHES_QUEUE": batches_queue,
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",  # asset-triggered runs need it; this folder has no timed DAG
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(lineage_file),
                                                       "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "workqueue-e2e",
        # A restarted triggerer takes over the killed one's triggers once its heartbeat is this old.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
    })
    with services:
        services.wait_until(f"DAG {DAG_ID} to be parsed", lambda: services.api("GET", f"/dags/{DAG_ID}").json(), 300)
        for dag_id in (DAG_ID, REPORT_DAG_ID, ALERTS_DAG_ID):
            services.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        wait_for_consumer(services, broker_url, batches_queue)
        yield services


def wait_for_consumer(airflow: AirflowServices, broker_url: str, queue: str) -> None:
    airflow.wait_until(f"the triggerer to consume {queue}", lambda: queue_depth(broker_url, queue).consumers >= 1,
                       EVENT_TIMEOUT, 1)


def queue_depth(broker_url: str, queue: str):
    connection = open_connection(BrokerSettings.from_url(broker_url))
    try:
        return depth(connection, queue)
    finally:
        connection.close()


def publish(broker_url: str, queue: str, body: bytes, message_id: str) -> None:
    connection = open_connection(BrokerSettings.from_url(broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, message_id=message_id,
                                                                content_type="application/json"), mandatory=True)
    connection.close()


def runs(airflow: AirflowServices, dag_id: str = DAG_ID) -> dict[str, dict]:
    found = airflow.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100}).json()["dag_runs"]
    return {run["dag_run_id"]: run for run in found}


def new_runs(airflow: AirflowServices, before: set[str], count: int) -> list[str] | None:
    fresh = [run_id for run_id in runs(airflow) if run_id not in before]
    return fresh if len(fresh) >= count else None


def finished(airflow: AirflowServices, run_id: str, dag_id: str = DAG_ID) -> dict | None:
    run = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()
    return run if run["state"] in ("success", "failed") else None


def triggering_payloads(airflow: AirflowServices, run_id: str) -> list[dict]:
    """The payloads of the asset events that triggered ``run_id``. Retried: Airflow 3.3's endpoint answers
    500 while a run its events created has not started yet (start_date None fails its response model)."""
    def payloads() -> list[dict]:
        events = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/upstreamAssetEvents").json()
        return [event["extra"]["payload"] for event in events["asset_events"]]
    return airflow.wait_until(f"the asset events of run {run_id}", payloads, 300, 2)


def xcom(airflow: AirflowServices, run_id: str, task_id: str, dag_id: str = DAG_ID):
    return airflow.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/"
                              "return_value").json()["value"]


def assert_processed(airflow: AirflowServices, cluster, run_id: str, items: list[str]) -> None:
    run = airflow.wait_until(f"run {run_id} to finish", lambda: finished(airflow, run_id), RUN_TIMEOUT, 3)
    assert run["state"] == "success", f"run {run_id} ended {run['state']}:\n{airflow.log_tails()}"
    assert run["run_type"] == "asset_triggered"
    assert xcom(airflow, run_id, "batch_items") == items
    name = xcom(airflow, run_id, "run_job")["job_name"]
    printed = [line for line in worker_output(cluster, client.CoreV1Api(cluster.api_client()), "default", name)
               if line.startswith("Processing ")]
    assert sorted(printed) == sorted(f"Processing {item}" for item in items), "every item processed once"


def test_one_batch_message_starts_one_run_that_processes_every_item(airflow, cluster, broker_url, batches_queue):
    items = ["kiwi", "mango", "papaya"]
    before = set(runs(airflow))
    publish(broker_url, batches_queue, json.dumps(items).encode(), "batch-one")
    [run_id] = airflow.wait_until("a run from the batch", lambda: new_runs(airflow, before, 1), EVENT_TIMEOUT, 1)
    assert_processed(airflow, cluster, run_id, items)
    [payload] = triggering_payloads(airflow, run_id)
    assert payload["body"] == items and payload["properties"]["message_id"] == "batch-one"
    assert len(new_runs(airflow, before, 1)) == 1, "one message, one run"
    airflow.wait_until("the message to be acknowledged", lambda: queue_depth(broker_url, batches_queue).messages == 0,
                       60, 1)


def test_the_account_of_a_batch_reaches_the_dag_scheduled_on_its_asset(airflow, cluster, broker_url, batches_queue):
    items = ["lychee", "guava"]
    before, reports_before = set(runs(airflow)), set(runs(airflow, REPORT_DAG_ID))
    publish(broker_url, batches_queue, json.dumps(items).encode(), "batch-report")
    [run_id] = airflow.wait_until("a run from the batch", lambda: new_runs(airflow, before, 1), EVENT_TIMEOUT, 1)
    assert_processed(airflow, cluster, run_id, items)
    job = xcom(airflow, run_id, "run_job")

    def reported() -> dict | None:
        for report_id in set(runs(airflow, REPORT_DAG_ID)) - reports_before:
            if run := finished(airflow, report_id, REPORT_DAG_ID):
                assert run["state"] == "success", f"report run {report_id} ended {run['state']}:\n{airflow.log_tails()}"
                extras = xcom(airflow, report_id, "report", REPORT_DAG_ID)
                return next((extra for extra in extras if extra["job_name"] == job["job_name"]), None)
        return None

    extra = airflow.wait_until("the report run of the batch", reported, RUN_TIMEOUT, 3)
    assert extra == {"job_name": job["job_name"], "namespace": "default", "queue_name": f"batch-{run_id}",
                     "account": {"filled": 2, "processed": 2, "dead_lettered": 0, "left": 0, "duplicated": 0, "lost": 0}}


def test_a_failed_run_notifies_its_account_and_reason_and_a_missed_deadline_is_reported(airflow):
    run_id = f"alerts-{uuid.uuid4().hex[:8]}"
    airflow.wait_until(f"DAG {ALERTS_DAG_ID} to be parsed", lambda: airflow.api("GET", f"/dags/{ALERTS_DAG_ID}").json(),
                       300)
    airflow.api("POST", f"/dags/{ALERTS_DAG_ID}/dagRuns", json={"dag_run_id": run_id, "logical_date": None})
    run = airflow.wait_until(f"run {run_id} to finish", lambda: finished(airflow, run_id, ALERTS_DAG_ID), RUN_TIMEOUT, 3)
    assert run["state"] == "failed"
    logs = sorted((airflow.home / "logs").glob(f"dag_id={ALERTS_DAG_ID}/run_id={run_id}/task_id=run_job/*.log"))
    text = "".join(path.read_text(errors="replace") for path in logs)
    notice = next((line for line in text.splitlines() if "failed. Reason:" in line), None)
    assert notice is not None, text[-3000:]
    assert f"task {ALERTS_DAG_ID}.run_job failed. Reason: JobError: Job default/" in notice
    assert "PodFailurePolicy" in notice and "exit code 3" in notice, notice
    account = "Item account of queue 'alerts-" + run_id + "': 1 filled = 0 processed + 0 dead-lettered + 1 left + 0 lost"
    assert account in text, text[-3000:]
    missed = f"Deadline missed: DAG {ALERTS_DAG_ID} run {run_id} "
    airflow.wait_until("the deadline callback in the triggerer's log",
                       lambda: missed in (airflow.logs / "triggerer.log").read_text(errors="replace"), 120, 1)


def test_three_messages_start_three_runs(airflow, cluster, broker_url, batches_queue):
    """Each batch is published once the previous one has its run: Airflow merges asset events that
    arrive before the scheduler has started a run for them (the DAG then takes every batch's items)."""
    batches = [[f"b{n}-apple", f"b{n}-fig"] for n in range(3)]
    before = set(runs(airflow))
    for n, batch in enumerate(batches):
        publish(broker_url, batches_queue, json.dumps({"items": batch}).encode(), f"batch-{n}")
        airflow.wait_until(f"the run of batch {n}", lambda n=n: new_runs(airflow, before, n + 1), EVENT_TIMEOUT, 0.5)
    created = new_runs(airflow, before, 3)
    assert created is not None and len(created) == 3
    by_message = {triggering_payloads(airflow, run_id)[0]["properties"]["message_id"]: run_id for run_id in created}
    assert sorted(by_message) == ["batch-0", "batch-1", "batch-2"]
    for n, batch in enumerate(batches):
        assert_processed(airflow, cluster, by_message[f"batch-{n}"], batch)


def test_a_malformed_message_starts_no_run_and_is_dead_lettered(airflow, broker_url, batches_queue):
    before = set(runs(airflow))
    publish(broker_url, batches_queue, b'["unclosed", ', "malformed-1")
    airflow.wait_until("the malformed message in the dead-letter queue",
                       lambda: queue_depth(broker_url, f"{batches_queue}.dead").messages == 1, EVENT_TIMEOUT, 1)
    time.sleep(15)  # longer than a scheduler loop: a run, had the message made an event, would exist by now
    assert new_runs(airflow, before, 1) is None, "a malformed message starts no run"
    log = (airflow.logs / "triggerer.log").read_text(errors="replace")
    line = next((line for line in log.splitlines() if "Rejected a message" in line), None)
    assert line is not None, log[-3000:]
    assert f"queue '{batches_queue}'" in line and "malformed-1" in line and "not valid JSON" in line


def test_a_triggerer_killed_with_a_message_in_flight_loses_nothing(airflow, cluster, broker_url, batches_queue):
    items = ["lost-not", "found"]
    before = set(runs(airflow))
    publish(broker_url, batches_queue, json.dumps(items).encode(), "in-flight")
    # Delivered to the trigger (no longer ready) but not yet acknowledged: kill the triggerer now.
    deadline = time.monotonic() + EVENT_TIMEOUT
    while queue_depth(broker_url, batches_queue).messages and time.monotonic() < deadline:
        time.sleep(0.02)
    airflow.kill("triggerer")
    killed_at = time.monotonic()
    while queue_depth(broker_url, batches_queue).consumers and time.monotonic() < killed_at + 60:
        time.sleep(0.2)  # the broker drops the killed triggerer's consumer (not airflow.wait_until: it is dead)
    print(f"triggerer killed; the queue has {queue_depth(broker_url, batches_queue).messages} ready message(s) again")
    airflow.start_component("triggerer")
    wait_for_consumer(airflow, broker_url, batches_queue)
    print(f"a restarted triggerer consumes again after {time.monotonic() - killed_at:.0f} s")

    fresh = airflow.wait_until("a run for the in-flight message", lambda: new_runs(airflow, before, 1), EVENT_TIMEOUT, 1)
    time.sleep(10)  # a duplicate run, if there is one, shows up by now
    fresh = new_runs(airflow, before, 1) or fresh
    payloads = [p for run_id in fresh for p in triggering_payloads(airflow, run_id)]
    assert all(p["properties"]["message_id"] == "in-flight" for p in payloads)
    assert any(p["redelivered"] for p in payloads), "the message was in flight when the triggerer died"
    print(f"runs for the message: {len(fresh)} (" + ("the kill came before the event was stored" if len(fresh) == 1
          else "a duplicate: the event was stored before the kill, within the ack delay") + ")")
    for run_id in fresh:
        assert_processed(airflow, cluster, run_id, items)


def test_lineage_events_name_the_queues(airflow, lineage_file):
    """Needs the lineage mixins on FillQueueOperator, QueueJobOperator and JobCompleteSensor."""
    def events() -> list[dict]:
        if not lineage_file.exists():
            return []
        return [json.loads(line) for line in lineage_file.read_text().splitlines() if line.strip()]

    def completed(task_id: str) -> list[dict]:
        return [e for e in events() if e.get("eventType") == "COMPLETE" and e["job"]["name"] == f"{DAG_ID}.{task_id}"]

    airflow.wait_until("lineage events of the runs", lambda: completed("wait_for_job"), 60, 1)
    job_names = {xcom(airflow, run_id, "run_job")["job_name"] for run_id, run in runs(airflow).items()
                 if run["state"] == "success"}
    broker = BrokerSettings.from_url(airflow.env["AIRFLOW_CONN_AMQP_DEFAULT"])
    namespace = f"amqp://{broker.host}:{broker.effective_port}/%2F"
    fills = completed("fill_queue")
    assert fills and all([(o["namespace"], o["name"][:6]) for o in e["outputs"]] == [(namespace, "batch-")]
                         for e in fills), fills[:1]
    for task_id in ("run_job", "wait_for_job"):
        for event in completed(task_id):
            assert [(i["namespace"], i["name"][:6]) for i in event["inputs"]] == [(namespace, "batch-")], event
            job = event["run"]["facets"]["externalQuery"]
            assert job["externalQueryId"] in job_names and job["source"] == "kubernetes://batch/v1/namespaces/default/jobs"
    assert broker.password not in lineage_file.read_text()
