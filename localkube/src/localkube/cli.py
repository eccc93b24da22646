"""``localkube``: build, start and stop the local cluster, and load images into its node.

    localkube build [--node-images]                          # prints the bin dir
    localkube up [--state-file F] [--kubeconfig-out P] [--load ARCHIVE ...] [--detach]
    localkube down --state-file F
    localkube load-image --archive ARCHIVE --state-file F

``up`` prints the admin kubeconfig's path on stdout once the node is Ready and runs until SIGINT or
SIGTERM (``--detach``: returns then, leaving it running). ``load-image`` imports an image archive (e.g. from
``docker save`` or ``buildah push ... docker-archive:PATH``) into the running node's containerd, as a pull would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from localkube.build import ensure_built
from localkube.cluster import LocalCluster
from localkube.image_build import ensure_python_image
from localkube.kubelet_node import ensure_node_packages, import_image
from localkube.node_images import ensure_node_images
from localkube.processes import MARK_ID, marked_pids, pid_alive

#: What ``up`` prints once the cluster is ready, beside the kubeconfig path (the workqueue project's
#: ``make cluster`` prints its next commands here).
Announce = Callable[[LocalCluster, str], None]


def _announce(cluster: LocalCluster, kubeconfig: str) -> None:
    print(f"cluster up in {cluster.startup_seconds:.1f}s: {cluster.server} (Ctrl-C stops it)", file=sys.stderr)
    print(f"  export KUBECONFIG={kubeconfig}", file=sys.stderr)


def up(args: argparse.Namespace, announce: Announce = _announce) -> int:
    """Start a cluster and keep it running until SIGINT/SIGTERM (or, with ``--detach``, in a process of
    its own that this one waits for until it is ready)."""
    if args.detach:
        return _detach(args)
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster()
    try:
        cluster.start()
        for archive in args.load:
            cluster.load_image(archive)
        kubeconfig = cluster.kubeconfig
        if args.kubeconfig_out:
            Path(args.kubeconfig_out).resolve().parent.mkdir(parents=True, exist_ok=True)
            kubeconfig = str(cluster.kubeconfig_for("admin", Path(args.kubeconfig_out).resolve()))
        if args.state_file:
            state = cluster.state()
            state["kubeconfig"] = kubeconfig
            Path(args.state_file).write_text(json.dumps(state, indent=2))
        announce(cluster, kubeconfig)
        print(kubeconfig, flush=True)
        try:
            sys.stdout.close()
        except OSError:
            pass
        while not stop["flag"]:
            time.sleep(0.2)
            for name, p in cluster.procs.items():
                if p.poll() is not None:
                    print(f"{name} exited with {p.returncode}; stopping the cluster", file=sys.stderr)
                    stop["flag"] = True
    finally:
        cluster.stop()
        if args.state_file:
            Path(args.state_file).unlink(missing_ok=True)
        print("cluster stopped", file=sys.stderr)
    return 0


def _detach(args: argparse.Namespace) -> int:
    """Run this same command without ``--detach`` in a new session; return once it printed the kubeconfig."""
    argv = [sys.executable, sys.argv[0], *(a for a in sys.argv[1:] if a != "--detach")]
    log_path = args.log_file or os.path.join(tempfile.gettempdir(), "localkube.log")
    with open(log_path, "ab") as log:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                             start_new_session=True, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if not line:
        p.wait()
        print(f"cluster failed to start (exit {p.returncode}); see {log_path}", file=sys.stderr)
        return 1
    print(line, flush=True)
    return 0


def down(args: argparse.Namespace) -> int:
    """Stop the cluster started with ``up --state-file``: its launcher, then any process it left."""
    try:
        state = json.loads(Path(args.state_file).read_text())
    except FileNotFoundError:
        print(f"{args.state_file}: no running cluster", file=sys.stderr)
        return 0
    pid = state["launcher_pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in marked_pids(MARK_ID, state["cluster_id"]):
        os.kill(p, signal.SIGKILL)
    Path(args.state_file).unlink(missing_ok=True)
    return 0


def load_image(args: argparse.Namespace) -> int:
    """Import a docker-archive or OCI archive into the running node's containerd, as a pull would."""
    state = json.loads(Path(args.state_file).read_text())
    import_image(state["containerd_socket"], Path(args.archive))
    print(f"{args.archive} imported into the node's containerd", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localkube", description="a local Kubernetes control plane for tests and demos")
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the binaries; prints the bin dir")
    build.add_argument("--node-images", action="store_true",
                       help="also the real node's packages and images (pause, Debian, the python base)")
    start = sub.add_parser("up", help="start a cluster; prints the kubeconfig path (stdout); runs until SIGINT/SIGTERM")
    add_up_arguments(start)
    stop = sub.add_parser("down", help="stop a cluster started with up --state-file")
    stop.add_argument("--state-file", required=True)
    load = sub.add_parser("load-image", help="import an image into a running cluster's node (up --state-file)")
    load.add_argument("--state-file", required=True)
    load.add_argument("--archive", required=True, help="the image as a docker-archive or OCI archive")
    return p


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-file", help="write a JSON with kubeconfig, server, tokens, pids (removed on stop)")
    p.add_argument("--kubeconfig-out", help="also write the admin kubeconfig here (and print this path)")
    p.add_argument("--load", action="append", default=[], metavar="ARCHIVE",
                   help="an image archive to load into the node at start (repeatable)")
    p.add_argument("--detach", action="store_true", help="return once the cluster is up, leaving it running")
    p.add_argument("--log-file", help="with --detach: where the launcher's messages go")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "build":
        print(ensure_built())
        if args.node_images:
            ensure_node_packages()
            for archive in [*ensure_node_images().values(), ensure_python_image()]:
                print(archive)
        return 0
    commands = {"up": up, "down": down, "load-image": load_image}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
