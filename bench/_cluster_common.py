"""Helpers for the benchmarks that need the local control plane (wait_cost, drain, scale).

Run from the repository root: ``PYTHONPATH=. python bench/<name>.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BROKER_URL, blocking_connection, delete_queue, queue_depth  # noqa: E402  (shared with the fill benchmarks)

__all__ = ["BROKER_URL", "blocking_connection", "delete_queue", "queue_depth"]  # re-exported for drain.py

VENV_BIN = Path(sys.executable).parent

# This checkout's provider, whatever the venv's editable install points at (pods get it too: WORKER_ENV).
for _path in (REPO / "provider", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "provider")]
                                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
WORKER_ENV = {"PYTHONPATH": str(REPO / "provider")}


def setup_airflow_env() -> None:
    """An isolated AIRFLOW_HOME and the AMQP connection, before anything imports airflow."""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="workqueue-bench-airflow-home-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    os.environ["AIRFLOW_CONN_AMQP_DEFAULT"] = BROKER_URL


def set_kube_conn(conn_id: str, kubeconfig: str | os.PathLike) -> str:
    """An Airflow Kubernetes connection (environment variable) using ``kubeconfig``."""
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "namespace": "default"}})
    return conn_id


def task_context(dag_id: str = "bench", task_id: str = "task", run_id: str | None = None) -> Any:
    from tests.airflow_context import task_context as context

    return context(dag_id, task_id, run_id or f"bench__{uuid.uuid4().hex[:8]}")


def grant_job_reader(cluster: Any, users: list[str], namespace: str = "default") -> None:
    """A Role that can get/list/watch Jobs (and jobs/status) and list pods, bound to ``users``: the waiter's least rights."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "bench-job-reader"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs", "jobs/status"], "verbs": ["get", "list", "watch"]},
                  {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],  # our stuck-image check
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "bench-job-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bench-job-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u} for u in users],
    })
    for user in users:
        cluster.wait_until_allowed(user, "watch", "jobs", namespace, group="batch")


def requests_of(cluster: Any, user: str, since: float = 0.0) -> list[dict[str, Any]]:
    """The API requests ``user`` made (one entry per auditID), from the API server's audit log."""
    by_id: dict[str, dict[str, Any]] = {}
    for event in cluster.audit_events(user):
        received = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        if received < since:
            continue
        entry = by_id.setdefault(event["auditID"], {
            "verb": event.get("verb"), "uri": event.get("requestURI"), "user_agent": event.get("userAgent"),
            "received": received, "stages": []})
        entry["stages"].append(event.get("stage"))
        code = (event.get("responseStatus") or {}).get("code")
        if code is not None:
            entry["code"] = code
    return sorted(by_id.values(), key=lambda e: e["received"])


def verb_counts(requests: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        counts[r["verb"]] = counts.get(r["verb"], 0) + 1
    return counts


def delete_job(cluster: Any, name: str, namespace: str = "default") -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.BatchV1Api(cluster.api_client()).delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise


@contextlib.contextmanager
def bench_queue(kind: str) -> Iterator[str]:
    """A fresh queue name ``bench-<kind>-<id>``; the queue is deleted afterwards whatever happens."""
    name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        delete_queue(name)


@contextlib.contextmanager
def real_node_cluster(**cluster_options: Any) -> Iterator[tuple[Any, str]]:
    """The local cluster with a real node (containerd, runc, CNI) and the worker image built from
    worker/Dockerfile loaded; yields ``(cluster, broker URL)``: the bench's broker as Airflow and the pods
    both reach it (the host's address on the pod network, a user of its own; guest is loopback-only).
    Airflow's ``amqp_default`` points there."""
    import secrets
    import subprocess
    from urllib.parse import urlsplit

    from localkube import LocalCluster
    from scripts.real_node_images import worker_image

    archive = worker_image()[1]
    user, password = f"bench-{secrets.token_hex(3)}", secrets.token_urlsafe(18)
    subprocess.run(["rabbitmqctl", "-q", "add_user", user, password], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", user, ".*", ".*", ".*"], check=True, capture_output=True)
    try:
        with LocalCluster(**cluster_options) as cluster:
            cluster.load_image(archive)
            url = f"amqp://{user}:{password}@{cluster.host_ip}:{urlsplit(BROKER_URL).port or 5672}/"
            os.environ["AIRFLOW_CONN_AMQP_DEFAULT"] = url
            yield cluster, url
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)


def job_output(cluster: Any, job_name: str, namespace: str = "default") -> list[str]:
    """Every line the Job's worker commands printed: the pods' logs (read through the API server and the
    kubelet), without workqueue-consume's own lines (its stderr is in the log too)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    return [line for pod in pods for line in cluster.read_pod_log(namespace, pod.metadata.name).splitlines()
            if not line.startswith("workqueue-consume:")]


def check_lines(path: Path, expected: list[str]) -> dict[str, Any]:
    """Every expected item exactly once in ``path`` (one line per processed item)?"""
    lines = path.read_text().splitlines() if path.exists() else []
    seen: dict[str, int] = {}
    for line in lines:
        seen[line] = seen.get(line, 0) + 1
    want = set(expected)
    missing = len(want - seen.keys())
    duplicated = sum(1 for k, n in seen.items() if n > 1)
    unexpected = sum(1 for k in seen if k not in want)
    return {"lines": len(lines), "distinct": len(seen), "missing": missing, "duplicated": duplicated,
            "unexpected": unexpected, "unexpected_sample": [k for k in seen if k not in want][:3],
            "exactly_once": len(lines) == len(expected) and not missing and not duplicated and not unexpected}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
            **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}", flush=True)
    return path


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def now() -> float:
    return time.time()
