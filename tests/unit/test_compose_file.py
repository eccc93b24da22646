"""docker-compose.yaml is valid Compose (no engine runs here, so validate it against the schema)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

# The schema Docker Compose itself validates with, from the compose-go Go module (Go module proxy).
COMPOSE_GO = "github.com/compose-spec/compose-go/v2@v2.16.2"


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    result = subprocess.run([go, "mod", "download", "-json", COMPOSE_GO], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"could not fetch {COMPOSE_GO} from the Go module proxy: {result.stderr}"
    schema = Path(json.loads(result.stdout)["Dir"]) / "schema" / "compose-spec.json"
    return json.loads(schema.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification(compose, compose_schema):
    jsonschema.validate(compose, compose_schema)
    assert {"rabbitmq", "k3s", "airflow"} <= set(compose["services"])


def test_every_file_the_compose_file_references_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_airflow_gets_the_provider_the_dags_and_both_connections(compose):
    airflow = compose["services"]["airflow"]
    assert any(v.startswith("./dags:") for v in airflow["volumes"])
    env = airflow["environment"]
    assert env["AIRFLOW_CONN_AMQP_DEFAULT"].startswith("amqp://")
    assert json.loads(env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])["extra"]["kube_config_path"] == "/kube/config"
    dockerfile = (REPO / airflow["build"]["context"] / airflow["build"]["dockerfile"]).read_text()
    assert "pip install" in dockerfile and "/opt/provider" in dockerfile
