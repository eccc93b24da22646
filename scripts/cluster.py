"""``make cluster``: the local cluster (localkube) with the README example's image loaded, running in the
foreground; prints the kubeconfig path, and on stderr the commands to run the example against it.

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

#: The README example's worker image (the tutorial's job-wq-1) as the node agent runs it: workqueue-consume
#: giving each item to worker/worker.py. `make cluster` and scripts/demo.py (make demo) load it.
EXAMPLE_IMAGES: dict[str, dict] = {
    "job-wq-1": {"entrypoint": ["sh", "-c", "exec {venv_bin}/workqueue-consume {python} {repo}/worker/worker.py"]},
}
#: Where `make cluster` writes the admin kubeconfig: the same path every time, so the next commands stay valid.
MAKE_CLUSTER_KUBECONFIG = Path(os.environ.get("WORKQUEUE_CACHE", Path.home() / ".cache/workqueue")) / "local-cluster/kubeconfig"


def next_commands(kubeconfig: str | os.PathLike, *, kubectl: str = "kubectl", namespace: str = "default",
                  local_broker: bool = True) -> list[str]:
    """The shell commands a user can run next against a cluster: kubectl, both Airflow connections, the example.

    ``local_broker``: the connection to the local RabbitMQ (`make broker`, user guest); otherwise the user's
    own AIRFLOW_CONN_AMQP_DEFAULT is kept (never printed: it may hold a password)."""
    venv_bin = Path(sys.executable).parent
    kubeconfig = str(Path(kubeconfig).resolve())
    broker = ("export AIRFLOW_CONN_AMQP_DEFAULT='amqp://127.0.0.1:5672/'   # the local RabbitMQ (make broker)"
              if local_broker else "# AIRFLOW_CONN_AMQP_DEFAULT: keep the one set now")
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
    print(f"cluster up in {cluster.startup_seconds:.1f}s: {cluster.server} (Ctrl-C stops it); "
          f"image {', '.join(EXAMPLE_IMAGES)} loaded (the README's example). Next, in another shell:", file=sys.stderr)
    for command in next_commands(kubeconfig, kubectl=cluster.kubectl_path):
        print(f"  {command}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_up_arguments(sub.add_parser("up", help="start the cluster; runs until SIGINT/SIGTERM"))
    args = parser.parse_args(argv)
    args.repo = args.repo or str(REPO)
    return up(args, images=EXAMPLE_IMAGES, announce=announce)


if __name__ == "__main__":
    sys.exit(main())
