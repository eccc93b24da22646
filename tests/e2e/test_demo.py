"""`make demo` (scripts/demo.py) on a fresh local cluster with a real node: the tutorial literally. The DAG's
first task starts RabbitMQ in a container (the tutorial's StatefulSet and rabbitmq-service), the Job's
pods run the image built from worker/Dockerfile and reach the broker by name, and the demo prints
what each pod printed and the item account."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.e2e, pytest.mark.localkube_only,
              pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]
ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


def test_make_demo_runs_the_tutorial_on_a_real_node():
    env = {key: value for key, value in os.environ.items() if key not in ("KUBECONFIG", "AIRFLOW_CONN_AMQP_DEFAULT")}
    done = subprocess.run([sys.executable, str(REPO / "scripts/demo.py")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1100)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    demo = [line for line in output.splitlines() if line.startswith("demo:")]
    assert "demo: DAG work_queue_example succeeded" in "\n".join(demo), "\n".join(demo)
    printed = sorted(line.split(": ", 2)[2] for line in demo if line.startswith("demo:   "))
    assert printed == sorted(f"Processing {item}" for item in ITEMS), "what each pod printed"
    assert "8 filled = 8 processed + 0 dead-lettered + 0 left + 0 lost" in "\n".join(demo)
    for created in ("Created Service 'rabbitmq-service'", "Created StatefulSet 'rabbitmq'"):
        assert created in output, f"the broker was not started in the cluster: {created!r} missing"
    assert "The pods reach the broker at rabbitmq-service:5672." in output, "the pods' broker is the Service, by name"
    assert "amqp://workqueue:" not in output, "the broker's password was printed"
