"""`make demo`: run the example DAG end to end with `airflow dags test`.

Without KUBECONFIG it runs the tutorial literally on a local cluster (localkube: real kube-apiserver,
kube-controller-manager, kube-scheduler and etcd, and a real node: kubelet, containerd, kube-proxy,
CoreDNS): the DAG's first task starts RabbitMQ as the tutorial's StatefulSet and `rabbitmq-service`
in a container (reached by Airflow through a NodePort), and the Job's pods run the image built from
worker/Dockerfile and reach the broker as `rabbitmq-service:5672`. With KUBECONFIG it uses that
cluster, and the broker named by AIRFLOW_CONN_AMQP_DEFAULT (the DAG's first task starts one in the
cluster if none answers).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/demo.py`: scripts.cluster (the example's image) is importable
DAG_ID = "work_queue_example"
LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def airflow_env(kubeconfig: str, airflow_home: str, amqp_url: str | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Airflow commands: isolated home, the repo's dags/, both connections (and ``extra``)."""
    env = {**os.environ, **(extra or {})}
    env.update({
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": kubeconfig}}),
    })
    env["AIRFLOW_CONN_AMQP_DEFAULT"] = amqp_url or os.environ.get("AIRFLOW_CONN_AMQP_DEFAULT", LOCAL_BROKER)
    return env


def airflow(args: Sequence[str], env: dict[str, str], *, echo: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the venv's `airflow` CLI, echoing its output as it comes."""
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert process.stdout is not None
    started = time.monotonic()
    for line in process.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
        if time.monotonic() - started > timeout:
            process.kill()
    process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def run_example_dag(kubeconfig: str, airflow_home: str, conf: dict[str, Any] | None = None, *,
                    amqp_url: str | None = None, echo: bool = True,
                    extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = airflow_env(kubeconfig, airflow_home, amqp_url, extra_env)
    migrated = airflow(["db", "migrate"], env, echo=False)
    if migrated.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{migrated.stdout[-3000:]}")
    args = ["dags", "test", DAG_ID]
    if conf:
        args += ["--conf", json.dumps(conf)]
    return airflow(args, env, echo=echo)


@contextlib.contextmanager
def control_plane() -> Iterator[tuple[str, Any, dict[str, str]]]:
    """(kubeconfig, LocalCluster or None, the DAG's environment): KUBECONFIG's cluster, or a local cluster
    with a real node holding the example's images, and the settings that make the DAG start its broker there."""
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"].split(os.pathsep)[0], None, {}
        return
    from localkube import LocalCluster
    from scripts.cluster import example_environment, example_images

    print("demo: the worker image (from worker/Dockerfile) and the RabbitMQ 4.0 image (built once, then cached)...",
          flush=True)
    images = example_images()
    print("demo: starting the local cluster (kube-apiserver, controllers, scheduler, etcd; a real node: kubelet, "
          "containerd, kube-proxy, CoreDNS)...", flush=True)
    with LocalCluster() as cluster:
        for _, archive in images:
            cluster.load_image(archive)
        node = cluster.kubelet_node
        assert node is not None
        environment = example_environment(node.node_ip)
        print(f"demo: cluster ready in {cluster.startup_seconds:.1f} s; kubeconfig {cluster.kubeconfig}; the DAG starts "
              f"RabbitMQ there, reached from here at {environment['AIRFLOW_CONN_AMQP_DEFAULT'].split('@')[1].split('/')[0]} "
              "(NodePort)", flush=True)
        yield str(cluster.kubeconfig), cluster, environment


def report(kubeconfig: str, cluster: Any, namespace: str = "default") -> None:
    """Print the Job's final status and what each worker printed."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    jobs = batch.list_namespaced_job(namespace, label_selector="app.kubernetes.io/managed-by=airflow-provider-workqueue")
    for job in jobs.items:
        conditions = ", ".join(f"{c.type}={c.status}" for c in job.status.conditions or [])
        print(f"demo: Job {namespace}/{job.metadata.name}: succeeded {job.status.succeeded or 0}/"
              f"{job.spec.completions}, failed {job.status.failed or 0}; conditions: {conditions}")
        pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}")
        for pod in pods.items:
            if cluster is not None:
                text = cluster.read_pod_log(namespace, pod.metadata.name)
            else:
                text = core.read_namespaced_pod_log(pod.metadata.name, namespace, _preload_content=False).data.decode()
            for line in text.splitlines():
                print(f"demo:   {pod.metadata.name}: {line}")


def dag_run_succeeded(result: subprocess.CompletedProcess) -> bool:
    """`airflow dags test` ends with a "DagRun Finished: ... state=<state>" line."""
    finished = [line for line in result.stdout.splitlines() if "DagRun Finished" in line]
    return result.returncode == 0 and bool(finished) and "state=success" in finished[-1]


def print_next_commands(cluster: Any, kubeconfig: str, namespace: str) -> None:
    """What to run next, so nobody has to read this script to continue."""
    from scripts.cluster import next_commands

    if cluster is not None:
        print("demo: the demo's cluster has stopped. To keep one running: `make cluster` (the same real node and "
              "images); it prints the commands to run the example against it.", flush=True)
        return
    print("demo: next, against the cluster in KUBECONFIG:", flush=True)
    for command in next_commands(kubeconfig, namespace=namespace, local_broker=False):
        print(f"  {command}", flush=True)


def main() -> int:
    started = time.monotonic()
    namespace = os.environ.get("WORKQUEUE_NAMESPACE", "default")
    with control_plane() as (kubeconfig, cluster, dag_env), tempfile.TemporaryDirectory(prefix="workqueue-demo-") as home:
        result = run_example_dag(kubeconfig, home, amqp_url=dag_env.pop("AIRFLOW_CONN_AMQP_DEFAULT", None),
                                 extra_env=dag_env)
        report(kubeconfig, cluster, namespace)
    for line in result.stdout.splitlines():  # the item account, as the wait task logged it
        if "Item account of queue" in line:
            print("demo: " + line[line.index("Item account of queue"):].split(" [")[0], flush=True)
    ok = dag_run_succeeded(result)
    print(f"demo: DAG {DAG_ID} {'succeeded' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s", flush=True)
    print_next_commands(cluster, kubeconfig, namespace)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
