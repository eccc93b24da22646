"""Publish -> DAG-run-start latency of event-driven scheduling through AmqpMessageTrigger.

    python bench/event_latency.py [--runs 10]

Starts Airflow (scheduler, dag-processor, triggerer, api-server: tests/e2e/airflow_services.py)
with one DAG scheduled on an Asset watched by ``MessageQueueTrigger(scheme="amqp", ...)`` on a
fresh queue, then publishes one message at a time and waits for its run. Per message it records:
publish -> run created (``queued_at``) and publish -> run started (``start_date``). The run's one
task does nothing: the figure is the event path (broker -> trigger -> triggerer -> asset event ->
scheduler -> run), which the example DAG shares. Medians over ``--runs`` messages; results in
bench/results/event_latency.json. A measurement, not a test: no target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.e2e.airflow_services import AirflowServices  # noqa: E402  (the e2e tests' Airflow)

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
DAG = '''
from datetime import datetime
from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, AssetWatcher

batches = Asset("bench_batches", watchers=[AssetWatcher(
    name="bench_queue", trigger=MessageQueueTrigger(scheme="amqp", queue_name="{queue}"))])
with DAG(dag_id="event_latency", schedule=[batches], start_date=datetime(2026, 1, 1), catchup=False):
    EmptyOperator(task_id="noop")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    import pika

    from workqueue_provider.amqp.connection import BrokerSettings, open_connection
    from workqueue_provider.amqp.queues import QueueSpec, declare, delete, depth

    settings = BrokerSettings.from_url(BROKER_URL)
    queue = f"bench-batches-{uuid.uuid4().hex[:8]}"
    connection = open_connection(settings)
    declare(connection, QueueSpec(f"{queue}.dead"))
    declare(connection, QueueSpec(queue, dead_letter_exchange="", dead_letter_routing_key=f"{queue}.dead"))
    connection.close()
    home = Path(tempfile.mkdtemp(prefix="event-latency-"))
    dags = home / "dags"
    dags.mkdir()
    (dags / "event_latency.py").write_text(DAG.format(queue=queue))
    created, started = [], []
    try:
        airflow = AirflowServices(home / "airflow", kubeconfig="/dev/null", amqp_url=BROKER_URL, dags_folder=dags)
        airflow.env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "True"  # asset-triggered runs need it
        with airflow:
            airflow.wait_until("the DAG to be parsed", lambda: airflow.api("GET", "/dags/event_latency").json(), 300)
            airflow.api("PATCH", "/dags/event_latency", json={"is_paused": False})

            def consumers() -> int:
                c = open_connection(settings)
                try:
                    return depth(c, queue).consumers
                finally:
                    c.close()
            airflow.wait_until("the trigger to consume", consumers, 300, 1)
            for n in range(args.runs):
                before = {r["dag_run_id"] for r in airflow.api("GET", "/dags/event_latency/dagRuns").json()["dag_runs"]}
                c = open_connection(settings)
                channel = c.channel()
                channel.confirm_delivery()
                published = time.time()
                channel.basic_publish("", queue, json.dumps([n]).encode(), pika.BasicProperties(delivery_mode=2))
                c.close()

                def started_run(before: set[str] = before) -> dict | None:
                    found = airflow.api("GET", "/dags/event_latency/dagRuns").json()["dag_runs"]
                    fresh = [r for r in found if r["dag_run_id"] not in before and r["start_date"]]
                    return fresh[0] if fresh else None
                run = airflow.wait_until(f"the run of message {n}", started_run, 300, 0.2)
                created.append(_ts(run["queued_at"]) - published)
                started.append(_ts(run["start_date"]) - published)
                print(f"message {n}: run created after {created[-1]:.2f} s, started after {started[-1]:.2f} s",
                      flush=True)
                path = f"/dags/event_latency/dagRuns/{run['dag_run_id']}"

                def finished(path: str = path) -> bool:
                    return airflow.api("GET", path).json()["state"] in ("success", "failed")
                airflow.wait_until("the run to finish", finished, 300, 0.5)
    finally:
        connection = open_connection(settings)
        for name in (queue, f"{queue}.dead"):
            delete(connection, name)
        connection.close()
    result = {"runs": args.runs, "median_publish_to_run_created_s": round(statistics.median(created), 2),
              "median_publish_to_run_start_s": round(statistics.median(started), 2),
              "publish_to_run_start_s": [round(s, 2) for s in started],
              "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    print(json.dumps(result, indent=2))
    (REPO / "bench" / "results" / "event_latency.json").write_text(json.dumps(result, indent=2) + "\n")


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    main()
