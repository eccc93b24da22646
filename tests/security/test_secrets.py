"""The broker password reaches pods only through a Secret: it is in no Job, pod, log line, XCom value,
rendered template field, trigger argument or error message."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing

from tests.conftest import WORKER_IMAGE, task_context, worker_output
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import WorkQueueError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]


def rabbitmqctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {args[0]} failed: {result.stderr}")


@pytest.fixture
def secret_user(broker_url):
    """A broker user with a unique random password on the shared node (deleted afterwards)."""
    # "p" first: a password starting with "-" would be read as an option by rabbitmqctl
    user, password = f"wq-sec-{secrets.token_hex(4)}", "p" + secrets.token_urlsafe(24)
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


def rendered(operator, context) -> str:
    operator.render_template_fields(context)
    return json.dumps({name: getattr(operator, name) for name in operator.template_fields}, default=str)


def error_of(call) -> str:
    try:
        call()
    except WorkQueueError as e:
        return f"{type(e).__name__}: {e} (caused by {e.__cause__!r})"
    raise AssertionError("expected an error")


def test_the_password_appears_nowhere_but_in_the_secret(secret_user, kube_conn, cluster, core, batch, namespace,
                                                        queue_name, monkeypatch, capfd, caplog):
    user, password = secret_user
    wrong = secrets.token_urlsafe(24)
    host = cluster.host_ip  # where Airflow and the pods both reach the broker
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", f"amqp://{user}:{password}@{host}:5672/")
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    context = task_context()

    with structlog.testing.capture_logs() as task_log:
        declare = DeclareQueueOperator(task_id="declare", queue_name=queue_name)
        fill = FillQueueOperator(task_id="fill", queue_name=queue_name, items=["a", "b"])
        launch = QueueJobOperator(task_id="run_job", queue_name=queue_name, namespace=namespace, image=WORKER_IMAGE,
                                  deferrable=False, poll_interval=0.5, timeout=300)
        for op in (declare, fill, launch):
            seen.append(rendered(op, context))
        seen += [json.dumps(declare.execute(context)), json.dumps(fill.execute(context))]
        summary = launch.execute(context)
        seen.append(json.dumps(summary, default=str))
        assert summary["succeeded"] == 2 and summary["items_left"] == 0

        # deferring (a retry re-attaches to the same Job): the trigger's arguments are stored in the database
        deferrable = QueueJobOperator(task_id="run_job", queue_name=queue_name, namespace=namespace,
                                      image=WORKER_IMAGE, timeout=300)
        with pytest.raises(TaskDeferred) as deferred:
            deferrable.execute(task_context(try_number=2))
        seen.append(json.dumps(deferred.value.trigger.serialize(), default=str))
        seen.append(repr(AmqpHook().settings) + AmqpHook().settings.describe() + str(AmqpHook().test_connection()))

        # every error we can provoke with this password (or a wrong one) in the connection
        for url in (f"amqp://{user}:{wrong}@127.0.0.1:5672/",                      # wrong password
                    # unreachable, ridden out for 1 s (not the default 300 s) before the outage error
                    f"amqp://{user}:{password}@127.0.0.1:1/?connection_attempts=1&outage_window=1",
                    f"amqp://{user}:{password}@127.0.0.1:5672/no-such-vhost",       # missing vhost
                    f"amqp://{user}:{password}@127.0.0.1:5672/?bogus=1"):           # bad option
            monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", url)
            seen.append(error_of(lambda: AmqpHook().queue_depth(queue_name)))
            seen.append(str(AmqpHook().test_connection()))
        monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", f"amqp://{user}:{password}@{host}:5672/")
        seen.append(error_of(lambda: AmqpHook().queue_depth("no-such-queue")))
        seen.append(error_of(lambda: FillQueueOperator(task_id="f", queue_name="no-such-queue", items=["x"])
                             .execute(task_context(task_id="other"))))
        seen.append(error_of(lambda: QueueJobOperator(task_id="j", queue_name="no-such-queue", namespace="no-such-ns",
                                                      image=WORKER_IMAGE).execute(context)))
        seen.append(str(DeleteQueueOperator(task_id="delete", queue_name=queue_name).execute(context)))

    # the worker side: a wrong URL and a missing queue, from workqueue-consume's stderr
    env = {**os.environ, "PYTHONPATH": str(REPO / "provider")}
    for url, queue in ((f"amqp://{user}:{wrong}@127.0.0.1:5672/", "q"),
                       (f"amqp://{user}:{password}@127.0.0.1:5672/", "no-such-queue")):
        run = subprocess.run([sys.executable, "-m", "workqueue_provider.worker.cli", "--url", url, "-q", queue, "--",
                              "cat"], capture_output=True, text=True, timeout=60, env=env)
        assert run.returncode != 0
        seen.append(run.stdout + run.stderr)

    job = batch.read_namespaced_job(summary["job_name"], namespace)
    seen.append(json.dumps(batch.api_client.sanitize_for_serialization(job)))
    seen.append(json.dumps(core.api_client.sanitize_for_serialization(core.list_namespaced_pod(namespace))))
    seen += worker_output(cluster, core, namespace, summary["job_name"])
    captured = capfd.readouterr()
    seen += [captured.out, captured.err, *(repr(e) for e in task_log), *(r.getMessage() for r in caplog.records)]

    everything = "\n".join(seen)
    assert "Processing a" in everything and "refused the credentials" in everything  # we did look at the right things
    assert "longer than the outage window" in everything  # ... the unreachable broker's error too
    assert password not in everything and wrong not in everything
    # ... and the Secret is where it is: referenced by the Job, owned by it
    env_var = next(e for e in job.spec.template.spec.containers[0].env if e.name == "BROKER_URL")
    assert env_var.value is None and env_var.value_from.secret_key_ref.name == f"{summary['job_name']}-broker"
    import base64
    secret = core.read_namespaced_secret(env_var.value_from.secret_key_ref.name, namespace)
    assert password in base64.b64decode(secret.data["BROKER_URL"]).decode()
    print(f"\nscanned {len(everything)} characters from {len(seen)} sources: the password is only in the Secret")
