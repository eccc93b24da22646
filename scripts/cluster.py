"""``make cluster``: the local cluster (localkube) with a real node and the example's images loaded (the
worker built from worker/Dockerfile, RabbitMQ 4.0), running in the foreground; prints the kubeconfig path,
and on stderr the commands to run the example against it (the DAG then starts RabbitMQ in the cluster,
as `make demo` does).

    python scripts/cluster.py up [--kubeconfig-out P] [--state-file F] [--detach]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import urllib.parse
from pathlib import Path

from localkube import LocalCluster
from localkube.cli import add_up_arguments, up

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/cluster.py`: scripts.real_node_images is importable

#: Where `make cluster` writes the admin kubeconfig: the same path every time, so the next commands stay valid.
MAKE_CLUSTER_KUBECONFIG = Path(os.environ.get("WORKQUEUE_CACHE", Path.home() / ".cache/workqueue")) / "local-cluster/kubeconfig"
BROKER_NODE_PORT = 30672  # the example broker's Service on the local node, for Airflow on this machine
BROKER_SECRET = "rabbitmq-credentials"


def example_images() -> list[tuple[str, Path]]:
    """(reference, docker-archive) of the example's images for a real node: the worker and RabbitMQ."""
    from scripts.real_node_images import rabbitmq_image, worker_image

    return [worker_image(), rabbitmq_image()]


def example_environment(node_ip: str) -> dict[str, str]:
    """The example DAG's settings on a local cluster with a real node: its first task starts RabbitMQ there
    (the worker and broker images loaded), exposed on a NodePort for Airflow on this machine, with a password
    it generates into the Secret ``rabbitmq-credentials`` (never printed); the pods use ``rabbitmq-service:5672``."""
    from scripts.real_node_images import RABBITMQ_IMAGE, WORKER_IMAGE

    return {
        "AIRFLOW_CONN_AMQP_DEFAULT": f"amqp://workqueue@{node_ip}:{BROKER_NODE_PORT}/?credentials_secret={BROKER_SECRET}",
        "WORKQUEUE_WORKER_IMAGE": WORKER_IMAGE, "WORKQUEUE_BROKER_IMAGE": RABBITMQ_IMAGE,
        "WORKQUEUE_BROKER_NODE_PORT": str(BROKER_NODE_PORT),
        "WORKQUEUE_POD_BROKER_HOST": "rabbitmq-service", "WORKQUEUE_POD_BROKER_PORT": "5672",
    }


def next_commands(kubeconfig: str | os.PathLike, *, kubectl: str = "kubectl", namespace: str = "default",
                  local_broker: bool = True, environment: dict[str, str] | None = None) -> list[str]:
    """The shell commands a user can run next against a cluster: kubectl, both Airflow connections, the example.

    ``environment``: the example's settings (:func:`example_environment`, no passwords), exported; otherwise
    ``local_broker``: the connection to the local RabbitMQ (`make broker`, user guest); otherwise the user's
    own AIRFLOW_CONN_AMQP_DEFAULT is kept (never printed: it may hold a password)."""
    venv_bin = Path(sys.executable).parent
    kubeconfig = str(Path(kubeconfig).resolve())
    if environment:
        broker = " ".join(f"{key}={shlex.quote(value)}" for key, value in environment.items())
        broker = f"export {broker}   # the DAG starts RabbitMQ in the cluster"
    elif local_broker:
        broker = "export AIRFLOW_CONN_AMQP_DEFAULT='amqp://127.0.0.1:5672/'   # the local RabbitMQ (make broker)"
    else:
        broker = "# AIRFLOW_CONN_AMQP_DEFAULT: keep the one set now"
    return [
        f". {shlex.quote(str(venv_bin / 'activate'))}   # airflow, workqueue-consume",
        f"export KUBECONFIG={shlex.quote(kubeconfig)}",
        f"{kubectl} -n {namespace} get jobs,pods -l app.kubernetes.io/managed-by=airflow-provider-workqueue",
        f"export AIRFLOW_CONN_KUBERNETES_DEFAULT='kubernetes://?kube_config_path={urllib.parse.quote(kubeconfig)}'",
        broker,
        f"export AIRFLOW__CORE__DAGS_FOLDER={shlex.quote(str(REPO / 'dags'))} AIRFLOW__CORE__LOAD_EXAMPLES=False",
        "airflow db migrate && airflow dags test work_queue_example   # or, in the repository: make demo",
    ]


def announce(cluster: LocalCluster, kubeconfig: str) -> None:
    assert cluster.kubelet_node is not None
    print(f"cluster up in {cluster.startup_seconds:.1f}s: {cluster.server} (Ctrl-C stops it); the worker and "
          f"RabbitMQ images loaded (the README's example). Next, in another shell:", file=sys.stderr)
    environment = example_environment(cluster.kubelet_node.node_ip)
    for command in next_commands(kubeconfig, kubectl=cluster.kubectl_path, environment=environment):
        print(f"  {command}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_up_arguments(sub.add_parser("up", help="start the cluster; runs until SIGINT/SIGTERM"))
    args = parser.parse_args(argv)
    args.load += [str(archive) for _, archive in example_images()]
    return up(args, announce=announce)


if __name__ == "__main__":
    sys.exit(main())
