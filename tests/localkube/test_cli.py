"""The ``localkube`` command line: up (detached, with a state file), load-image into the running node,
a pod from that image, down; nothing of the cluster is left running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localkube import MARK_ID, marked_pids

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]
LOCALKUBE = [sys.executable, "-m", "localkube"]


def test_up_load_image_run_a_pod_and_down(tmp_path: Path):
    state_file = tmp_path / "cluster.json"
    up = subprocess.run([*LOCALKUBE, "up", "--detach", "--state-file", str(state_file), "--log-file",
                         str(tmp_path / "launcher.log")], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr + (tmp_path / "launcher.log").read_text()
    state = json.loads(state_file.read_text())
    try:
        assert up.stdout.strip() == state["kubeconfig"]
        loaded = subprocess.run([*LOCALKUBE, "load-image", "greeter:1.0", "--state-file", str(state_file),
                                 "--env", "GREETING=hello", "--entrypoint", "sh -c 'echo $GREETING from $HOSTNAME'"],
                                capture_output=True, text=True, timeout=30)
        assert loaded.returncode == 0, loaded.stderr
        kubectl = [state["kubectl"], "--kubeconfig", state["kubeconfig"]]
        subprocess.run([*kubectl, "run", "greeter", "--image=registry.local/greeter:1.0", "--restart=Never"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 60
        phase = ""
        while phase != "Succeeded":
            assert time.monotonic() < deadline, f"the pod did not succeed (phase {phase!r})"
            phase = subprocess.run([*kubectl, "get", "pod", "greeter", "-o", "jsonpath={.status.phase}"],
                                   capture_output=True, text=True, timeout=30).stdout
            time.sleep(0.3)
        logs = subprocess.run([*kubectl, "logs", "greeter"], capture_output=True, text=True, timeout=30)
        assert logs.stdout.strip() == "hello from greeter"
    finally:
        down = subprocess.run([*LOCALKUBE, "down", "--state-file", str(state_file)], capture_output=True, text=True,
                              timeout=90)
    assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    assert not marked_pids(MARK_ID, state["cluster_id"]), "processes of the cluster are still running"
