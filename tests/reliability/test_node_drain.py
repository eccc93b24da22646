"""A node drain on the local control plane: a pod evicted through the Eviction API while it holds an item.

With the queue's policies (``queue_failure_policy()``, ``restart_policy="Never"``, the default
``pod_replacement_policy="Failed"``) and ``backoff_limit=0``, an eviction counted as a failure would fail
the Job at once: it completes instead, with the evicted pod's item processed by another pod."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from tests.conftest import task_context
from tests.reliability.test_job_faults import filled, job_op, processed, worker_script
from workqueue_provider.kube.failure_policy import queue_failure_policy

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.localkube_only]


def evict_when_held(core, namespace: str, holder, timeout: float = 120) -> str:
    """Wait until a pod writes its name to ``holder`` (it then holds the item), and evict it."""
    deadline = time.monotonic() + timeout
    while not (holder.exists() and holder.read_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no pod took the victim item within {timeout} s")
        time.sleep(0.2)
    pod = holder.read_text().strip()
    core.create_namespaced_pod_eviction(pod, namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=pod, namespace=namespace)))
    return pod


def test_an_evicted_pod_uses_no_backoff_and_its_item_is_processed_by_another(amqp_conn, kube_conn, cluster, core,
                                                                             batch, namespace, queue_name, tmp_path):
    items = ["apple", "victim", "cherry", "date"]
    filled(queue_name, items)
    marker, holder = tmp_path / "taken", tmp_path / "holder"
    command = worker_script(tmp_path, f"""
if [ "$item" = victim ] && mkdir {marker} 2>/dev/null; then
  echo "$HOSTNAME" > {holder}.tmp && mv {holder}.tmp {holder}
  exec sleep 120
fi
echo "Processing $item"
""")
    operator = job_op(queue_name, namespace, command, restart_policy="Never", backoff_limit=0,
                      pod_failure_policy=queue_failure_policy(poison_exit_code=3))
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = operator.execute(task_context())
        except Exception as e:  # reported by the assertion below
            result["error"] = e

    waiting = threading.Thread(target=run)
    waiting.start()
    evicted = evict_when_held(core, namespace, holder)
    waiting.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    account = {k: summary["account"][k] for k in ("filled", "processed", "dead_lettered", "left", "lost", "duplicated")}
    assert account == {"filled": 4, "processed": 4, "dead_lettered": 0, "left": 0, "lost": 0, "duplicated": 0}
    assert processed(tmp_path, summary["job_name"]) == sorted(f"Processing {i}" for i in items)
    assert evicted not in {p.metadata.name for p in core.list_namespaced_pod(namespace).items}
    job = batch.read_namespaced_job(summary["job_name"], namespace)
    conditions = {c.type: c.status for c in job.status.conditions or []}
    print(f"\nevicted {evicted}; Job status: succeeded={job.status.succeeded} failed={job.status.failed} "
          f"conditions={conditions}")
    assert conditions.get("Complete") == "True" and "Failed" not in conditions
    assert job.status.succeeded == 4
    assert not job.status.failed  # the Job controller ignored the evicted pod: not counted, no backoff used
