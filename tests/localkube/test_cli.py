"""The ``localkube`` command line: up (detached, with a state file), load-image (an image archive into the
node's containerd), a pod from that image, down; nothing of the cluster is left running."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localkube import MARK_ID, marked_pids
from localkube.image_build import PYTHON_IMAGE, ensure_python_image

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600), pytest.mark.localkube_only]
LOCALKUBE = [sys.executable, "-m", "localkube"]


@contextlib.contextmanager
def _running_cluster(tmp_path: Path, *up_args: str, timeout: float = 120) -> Iterator[tuple[Path, dict, list[str]]]:
    """``localkube up --detach`` with a state file; yields (state file, state, kubectl argv). On the way out
    ``localkube down``, then nothing of the cluster may be left running."""
    state_file = tmp_path / "cluster.json"
    up = subprocess.run([*LOCALKUBE, "up", "--detach", *up_args, "--state-file", str(state_file), "--log-file",
                         str(tmp_path / "launcher.log")], capture_output=True, text=True, timeout=timeout)
    assert up.returncode == 0, up.stderr + (tmp_path / "launcher.log").read_text()
    state = json.loads(state_file.read_text())
    assert up.stdout.strip() == state["kubeconfig"]
    try:
        yield state_file, state, [state["kubectl"], "--kubeconfig", state["kubeconfig"]]
    finally:
        down = subprocess.run([*LOCALKUBE, "down", "--state-file", str(state_file)], capture_output=True, text=True,
                              timeout=90)
    assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    assert not marked_pids(MARK_ID, state["cluster_id"]), "processes of the cluster are still running"


def test_up_load_image_run_a_pod_from_it_and_down(tmp_path: Path):
    pod = ["run", "py", f"--image={PYTHON_IMAGE}", "--restart=Never", "--image-pull-policy=Never", "--command", "--",
           "python3", "-c", "print(6 * 7)"]
    with _running_cluster(tmp_path, timeout=300) as (state_file, _, kubectl):
        subprocess.run([*kubectl, *pod], check=True, capture_output=True, timeout=30)
        # not on the node before load-image (the wait fails the test unless the kubelet says so)
        _wait_for_field(kubectl, "py", "{.status.containerStatuses[0].state.waiting.reason}", until="ErrImageNeverPull")
        subprocess.run([*kubectl, "delete", "pod", "py", "--wait=false"], check=True, capture_output=True, timeout=30)
        loaded = subprocess.run([*LOCALKUBE, "load-image", "--archive", str(ensure_python_image()), "--state-file",
                                 str(state_file)], capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr
        subprocess.run([*kubectl, *pod[:1], "py2", *pod[2:]], check=True, capture_output=True, timeout=30)
        _wait_for_field(kubectl, "py2", "{.status.phase}", until="Succeeded")
        logs = subprocess.run([*kubectl, "logs", "py2"], capture_output=True, text=True, timeout=30)
        assert logs.stdout.strip() == "42"


def _wait_for_field(kubectl: list[str], pod: str, path: str, until: str | None = None, timeout: float = 90) -> str:
    """The pod's field at ``path`` once it is set (and, with ``until``, equal to it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = subprocess.run([*kubectl, "get", "pod", pod, "-o", f"jsonpath={path}"], capture_output=True,
                               text=True, timeout=30).stdout
        if value and (until is None or value == until):
            return value
        assert time.monotonic() < deadline, f"pod {pod}: {path} still {value!r} after {timeout} s"
        time.sleep(0.3)
