"""``make test`` pointed at another cluster through ``KUBECONFIG`` (docs/testing-on-another-cluster.md): a
cluster started apart with ``localkube up --detach`` plays kind here. Its images are loaded the documented
way (``scripts/real_node_images.py`` prints the archives; ``localkube load-image`` stands in for ``kind load
image-archive``), and a pytest session with ``KUBECONFIG`` and ``LOCALKUBE_HOST_IP`` set runs Job-side tests
on it: they pass, the Jobs are created in that cluster (its API server counted them), and a
``localkube_only`` test is skipped saying why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.localkube.test_cli import LOCALKUBE, _running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.localkube_only, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
ON_THE_OTHER_CLUSTER = ["tests/integration/test_job_side.py::test_the_seed_job_processes_every_item_once",
                        "tests/integration/test_job_side.py::test_the_trigger_watches_until_complete_and_the_sensor_verifies"]
LOCAL_ONLY = "tests/localkube/test_control_plane.py::test_kubectl_get_jobs"


def jobs_created(kubectl: list[str]) -> int:
    """Job creations the cluster's API server has answered (its own metrics)."""
    metrics = subprocess.run([*kubectl, "get", "--raw", "/metrics"], check=True, capture_output=True, text=True,
                             timeout=30).stdout
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("apiserver_request_total{") and 'resource="jobs"' in line and 'verb="POST"' in line
               and 'code="201"' in line)


def test_the_suite_runs_on_the_cluster_in_kubeconfig(broker_url, tmp_path):
    with _running_cluster(tmp_path, timeout=300) as (state_file, state, kubectl):
        archives = subprocess.run([sys.executable, "scripts/real_node_images.py"], cwd=REPO, check=True,
                                  capture_output=True, text=True, timeout=1200).stdout.split()
        assert len(archives) == 3, archives
        for archive in archives:
            subprocess.run([*LOCALKUBE, "load-image", "--archive", archive, "--state-file", str(state_file)],
                           check=True, capture_output=True, timeout=300)
        before = jobs_created(kubectl)
        env = {key: value for key, value in os.environ.items() if key != "AIRFLOW_HOME"}  # an Airflow home of its own
        env |= {"KUBECONFIG": state["kubeconfig"], "LOCALKUBE_HOST_IP": state["host_ip"], "CI": "true"}
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                              *ON_THE_OTHER_CLUSTER, LOCAL_ONLY], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=800)
        created = jobs_created(kubectl) - before
    summary = run.stdout.strip().splitlines()[-1]
    print(f"\npytest on the cluster in KUBECONFIG: {summary}; Jobs it created there: {created}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"\b3 passed, 1 skipped\b", summary), run.stdout[-3000:]
    assert "needs a cluster localkube starts; the tests use the one in KUBECONFIG=" in run.stdout
    assert created >= 3, "the tests did not run their Jobs on the cluster in KUBECONFIG"
