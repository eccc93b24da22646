"""Bad input is refused with a clear error before any side effect: one table across every operator
and ``workqueue-consume``, on the real broker and the real local control plane.

Each case starts from a classic queue holding three items and an empty test namespace, runs one
operator (or the CLI) with one bad input, and checks the error's type and a fragment of its message.
Afterwards the queue still holds exactly the three items (nothing published, nothing consumed), no
Job, Secret, Service or StatefulSet was created, and no message carries the wrong password used in
the credential cases. The one exception is a missing image: it can only show once the Job's pods
wait on it, so those cases check the error and that the operator deleted its Job.
The docs table is docs/bad-input.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from localkube import LocalCluster, free_port
from tests.conftest import WORKER_IMAGE, task_context
from workqueue_provider.amqp import queues
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
    ItemSourceError,
    JobError,
    KubernetesAuthError,
    KubernetesNotFoundError,
    KubernetesUnreachableError,
    QueueMismatchError,
    QueueNotFoundError,
)
from workqueue_provider.operators.broker import EnsureBrokerOperator
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, DeleteQueueOperator, FillQueueOperator
from workqueue_provider.sensors.job import JobCompleteSensor
from workqueue_provider.worker import cli

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

SETUP_ITEMS = ["apple", "banana", "cherry"]
WRONG_PASSWORD = "s3cr3t-Wr0ng"  # used by the credential cases; no message may ever show it
MISSING_NAMESPACE = f"wq-missing-{uuid.uuid4().hex[:8]}"
MISSING_IMAGE = "127.0.0.1:9/no-such-worker:1.0"  # a registry that refuses at once, on the node itself
HANG_GUARD = 60  # seconds; only keeps a regression from hanging the run

# Values for Case.env; "{...}" placeholders are filled in when the case runs.
UNREACHABLE = "amqp://guest:guest@127.0.0.1:{free_port}/?connection_attempts=1&outage_window=0"
WRONG_CREDENTIALS = f"amqp://guest:{WRONG_PASSWORD}@127.0.0.1:5672/?connection_attempts=1"
MISSING_VHOST = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost-wq?connection_attempts=1"
MALFORMED_URI = f"amqp://guest:{WRONG_PASSWORD}@127.0.0.1:56x72/"
# EnsureBrokerOperator: no broker answers at the connection's address, so it would start one.
NO_BROKER_GUEST = '{{"conn_type": "amqp", "host": "127.0.0.1", "port": {free_port}, "extra": {{"outage_window": 0}}}}'
NO_BROKER_OWN_USER = ('{{"conn_type": "amqp", "host": "127.0.0.1", "port": {free_port}, "login": "wq", '
                      f'"password": "{WRONG_PASSWORD}", "extra": {{{{"outage_window": 0}}}}}}}}')
AMQP = "AIRFLOW_CONN_AMQP_DEFAULT"
KUBE = "AIRFLOW_CONN_KUBERNETES_DEFAULT"
UNREACHABLE_KUBE = "{kube_conn_unreachable}"  # a kubeconfig whose API server address doesn't answer
NO_RIGHTS = "{kube_conn_of_user_2}"  # LocalCluster's user-2: authenticated, no RBAC rights at all


@dataclass(frozen=True)
class Case:
    run: Callable[[SimpleNamespace], Any]
    error: type[Exception]
    fragment: str
    env: dict[str, str] = field(default_factory=dict)
    job_left: str | None = None  # missing image only: "deleted" (by the operator) or "kept" (the sensor's)


def case(id: str, run: Callable[[SimpleNamespace], Any], error: type[Exception], fragment: str, **kw: Any):
    return pytest.param(Case(run, error, fragment, **kw), id=id)


# -- how each operator is run: the test's queue and namespace unless the case says otherwise

def declare(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    return lambda t: DeclareQueueOperator(task_id="declare", **{"queue_name": t.queue, **kw}).execute(task_context())


def fill(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    return lambda t: FillQueueOperator(task_id="fill", **{"queue_name": t.queue, **kw}).execute(task_context())


def fill_file(content: bytes | None, **kw: Any) -> Callable[[SimpleNamespace], Any]:
    """Fill from a file in tmp_path holding ``content`` (None: the file doesn't exist; b"/": a directory)."""
    def run(t: SimpleNamespace) -> Any:
        path = t.tmp_path / "items.txt"
        if content == b"/":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        return fill(items_file=str(path), **kw)(t)
    return run


def job(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    def run(t: SimpleNamespace) -> Any:
        options = {"image": WORKER_IMAGE, "queue_name": t.queue, "namespace": t.namespace, "deferrable": False,
                   "poll_interval": 0.5, "timeout": HANG_GUARD, **kw}
        return QueueJobOperator(task_id="run_job", **options).execute(task_context())
    return run


def sensor(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    def run(t: SimpleNamespace) -> Any:
        options = {"job_name": "job-wq-1-abc", "namespace": t.namespace, "queue_name": t.queue, "deferrable": False, **kw}
        return JobCompleteSensor(task_id="wait", **options).poke(task_context())
    return run


def sensor_on_missing_image(t: SimpleNamespace) -> Any:
    """Launch a Job whose image doesn't exist (not waiting), then poke as the sensor does until it fails."""
    import time

    launched = job(image=MISSING_IMAGE, wait_for_completion=False)(t)
    wait = JobCompleteSensor(task_id="wait", queue_name=t.queue, deferrable=False, image_pull_grace_seconds=2,
                             **launched)
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        wait.poke(task_context())
        time.sleep(0.5)
    raise AssertionError("the sensor never noticed the missing image")


def deferred(make_task: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
    """Run a deferrable task as Airflow does: execute, run its trigger to the first event, execute_complete."""
    def run(t: SimpleNamespace) -> Any:
        import asyncio


        task = make_task(t)
        with pytest.raises(TaskDeferred) as deferral:
            task.execute(task_context())

        async def first_event() -> Any:
            async for event in deferral.value.trigger.run():
                return event.payload
        event = asyncio.run(asyncio.wait_for(first_event(), 3 * HANG_GUARD))  # pull, back-off, grace, check
        return getattr(task, deferral.value.method_name)(task_context(), event)
    return run


def ensure_broker(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    return lambda t: EnsureBrokerOperator(
        task_id="broker", **{"namespace": t.namespace, "startup_timeout": 5, "poll_interval": 0.5, **kw}
    ).execute(task_context())


def delete_queue(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    return lambda t: DeleteQueueOperator(task_id="delete", **{"queue_name": t.queue, **kw}).execute(task_context())


CLI_ERRORS = {2: ConfigurationError, 69: BrokerError}  # workqueue-consume's exit codes: usage, broker


def consume(*argv: str, url: str | None = "{broker_url}", **env: str) -> Callable[[SimpleNamespace], Any]:
    """Run workqueue-consume's entry point as pods do (BROKER_URL and QUEUE from the environment); its
    exit code stands for the error type (2 = ConfigurationError, 69 = BrokerError), what it printed
    for the message."""
    def run(t: SimpleNamespace) -> Any:
        for name in ("BROKER_URL", "WORKQUEUE_MAX_ITEMS"):
            t.monkeypatch.delenv(name, raising=False)
        for name, value in {"QUEUE": t.queue, **env, **({"BROKER_URL": t.fill(url)} if url else {})}.items():
            t.monkeypatch.setenv(name, value)
        printed = io.StringIO()
        handler = logging.StreamHandler(printed)
        logging.getLogger("workqueue-consume").addHandler(handler)
        try:
            with contextlib.redirect_stderr(printed):
                code = cli.main(list(argv))
        finally:
            logging.getLogger("workqueue-consume").removeHandler(handler)
        if code in CLI_ERRORS:
            raise CLI_ERRORS[code](printed.getvalue())
        raise AssertionError(f"workqueue-consume exited {code}: {printed.getvalue()}")
    return run


WORKER = ["--", "sh", "-c", "cat >/dev/null"]

CASES = [
    # DeclareQueueOperator
    case("declare-empty-queue-name", declare(queue_name=""), ConfigurationError, "The queue name is empty"),
    case("declare-queue-name-over-255-bytes", declare(queue_name="q" * 256), ConfigurationError, "AMQP allows at most 255"),
    case("declare-reserved-amq-prefix", declare(queue_name="amq.work"), ConfigurationError, "'amq.', which RabbitMQ reserves"),
    case("declare-reserved-dead-letter-queue", declare(dead_letter_queue="amq.dead"), ConfigurationError, "RabbitMQ reserves"),
    case("declare-unknown-queue-type", declare(queue_type="lazy"), ConfigurationError, "Unknown queue type 'lazy'"),
    case("declare-conflicting-arguments", declare(queue_type="quorum"), QueueMismatchError,
         "x-queue-type: existing 'classic', requested 'quorum'"),
    case("declare-delivery-limit-on-classic", declare(queue_type="classic", delivery_limit=3), ConfigurationError,
         "delivery_limit needs a quorum queue"),
    case("declare-max-length-zero", declare(max_length=0), ConfigurationError, "max_length=0"),
    case("declare-arguments-render-to-a-string", declare(arguments="x-max-length=5"), ConfigurationError,
         "not a mapping"),
    case("declare-unreachable-broker", declare(), BrokerUnreachableError, "did not answer", env={AMQP: UNREACHABLE}),
    case("declare-wrong-credentials", declare(), BrokerAuthError, "refused the credentials of user 'guest'",
         env={AMQP: WRONG_CREDENTIALS}),
    case("declare-missing-vhost", declare(), BrokerAuthError, "refused vhost 'no-such-vhost-wq'",
         env={AMQP: MISSING_VHOST}),
    case("declare-malformed-connection-uri", declare(), ConfigurationError,
         "The AMQP connection 'amqp_default' is malformed", env={AMQP: MALFORMED_URI}),
    case("declare-unknown-amqp-connection", declare(amqp_conn_id="no_such_broker"), ConfigurationError,
         "The AMQP connection 'no_such_broker' isn't defined"),
    case("declare-unknown-broker-option", declare(), ConfigurationError, "Unknown broker option 'heartbeats'",
         env={AMQP: "amqp://guest:guest@127.0.0.1:5672/?heartbeats=5"}),
    # FillQueueOperator
    case("fill-empty-item-list", fill(items=[]), ItemSourceError, "There are no items to publish"),
    case("fill-empty-item-file", fill_file(b"\n\n"), ItemSourceError, "There are no items to publish"),
    case("fill-missing-item-file", fill_file(None), ItemSourceError, "can't be read: No such file or directory"),
    case("fill-item-file-is-a-directory", fill_file(b"/"), ItemSourceError, "can't be read: Is a directory"),
    case("fill-item-file-not-utf8", fill_file(b"ok\n\xff\xfe\n"), ItemSourceError, "is not UTF-8 text"),
    case("fill-dict-item-as-text", fill(items=["a", {"b": 1}]), ItemSourceError, "Item #1 ({'b': 1}) is dict"),
    case("fill-nan-as-json", fill(items=[float("nan")], encoding="json"), ItemSourceError, "can't be encoded as JSON"),
    case("fill-text-item-as-bytes", fill(items=["a"], encoding="bytes"), ItemSourceError, "is str, not bytes"),
    case("fill-item-not-in-charset", fill(items=["café"], charset="ascii"), ItemSourceError, "can't be encoded in ascii"),
    case("fill-unknown-charset", fill(items=["a"], charset="klingon"), ConfigurationError, "Unknown charset 'klingon'"),
    case("fill-unknown-encoding", fill(items=["a"], encoding="yaml"), ConfigurationError, "Unknown encoding 'yaml'"),
    case("fill-message-over-max-message-bytes", fill(items=["small", "x" * 11], max_message_bytes=10), ItemSourceError,
         "Item #1 is 11 bytes, over the 10-byte message limit"),
    case("fill-message-over-the-broker-default-limit", fill(items=lambda: ["x" * (16 * 1024 * 1024 + 1)]), ItemSourceError,
         "over the 16777216-byte message limit"),
    case("fill-max-message-bytes-zero", fill(items=["a"], max_message_bytes=0), ConfigurationError,
         "max_message_bytes=0 must be a positive integer"),
    case("fill-window-zero", fill(items=["a"], window=0), ConfigurationError, "window=0 must be a positive"),
    case("fill-items-render-to-a-non-list-string", fill(items="apple banana"), ConfigurationError,
         "items rendered to the string 'apple banana', not a list"),
    case("fill-items-is-a-dict", fill(items={"a": 1}), ItemSourceError, "items is a dict"),
    case("fill-callable-returns-a-number", fill(items=lambda: 5), ItemSourceError, "callable returned int"),
    case("fill-generator-raises-midway", fill(items=lambda: (1 / (2 - i) for i in range(3))), ItemSourceError,
         "Reading items failed after 2 items: ZeroDivisionError"),
    case("fill-two-item-sources", fill(items=["a"], items_file="/tmp/x"), ConfigurationError,
         "Give exactly one item source"),
    case("fill-unknown-on-existing-messages", fill(items=["a"], on_existing_messages="keep"), ConfigurationError,
         "on_existing_messages='keep'"),
    case("fill-queue-with-foreign-messages", fill(items=["a"]), ConfigurationError,
         "already holds 3 messages that this fill did not publish"),
    case("fill-missing-queue", lambda t: fill(items=["a"], queue_name=f"{t.queue}-missing")(t), QueueNotFoundError,
         "does not exist in vhost '/': declare it first"),
    case("fill-unreachable-broker", fill(items=["a"]), BrokerUnreachableError, "did not answer", env={AMQP: UNREACHABLE}),
    case("fill-wrong-credentials", fill(items=["a"]), BrokerAuthError, "refused the credentials",
         env={AMQP: WRONG_CREDENTIALS}),
    # QueueJobOperator
    case("job-invalid-job-name-prefix", job(job_name="My_Job"), ConfigurationError, "'My_Job' is not a valid RFC 1123 name"),
    case("job-job-name-over-63", job(job_name="j" * 64), ConfigurationError, "Kubernetes allows at most 63"),
    case("job-job-name-prefix-leaves-no-room-for-digest", job(job_name="j" * 53), ConfigurationError,
         "leave room for the run's digest"),
    case("job-invalid-namespace", job(namespace="Team_A"), ConfigurationError, "namespace 'Team_A' is not a valid RFC 1123"),
    case("job-namespace-over-63", job(namespace="n" * 64), ConfigurationError, "namespace 'nnnnnnnnnnnnnnnnnnnn'... is 64"),
    case("job-parallelism-zero", job(parallelism=0), ConfigurationError, "parallelism=0 must be a positive integer"),
    case("job-parallelism-negative", job(parallelism=-2), ConfigurationError, "parallelism=-2 must be a positive integer"),
    case("job-parallelism-renders-to-a-word", job(parallelism="two"), ConfigurationError,
         "parallelism rendered to 'two' (str), not a whole number"),
    case("job-completions-below-queue-depth", job(completions=2), ConfigurationError,
         "completions=2 (x items_per_pod=1) is lower than the 3 items"),
    case("job-backoff-limit-negative", job(backoff_limit=-1), ConfigurationError, "backoff_limit=-1 must be an integer >= 0"),
    case("job-command-renders-to-a-string", job(command="sleep 5"), ConfigurationError, "command must be a list, got str"),
    case("job-env-renders-to-a-string", job(env="A=1"), ConfigurationError, "env must be a mapping (dict), got str"),
    case("job-restart-policy-always", job(restart_policy="Always"), ConfigurationError, "restart_policy='Always'"),
    case("job-empty-image", job(image=""), ConfigurationError, "image is empty"),
    case("job-image-pull-policy-misspelt", job(image_pull_policy="IfNotPresnt"), ConfigurationError,
         "image_pull_policy='IfNotPresnt': use one of ('Always', 'IfNotPresent', 'Never')"),
    case("job-missing-queue", lambda t: job(queue_name=f"{t.queue}-missing")(t), QueueNotFoundError, "does not exist"),
    case("job-missing-namespace", job(namespace=MISSING_NAMESPACE), KubernetesNotFoundError,
         f"namespace {MISSING_NAMESPACE!r} does not exist"),
    case("job-rbac-refusal", job(), KubernetesAuthError, "(403 Forbidden)", env={KUBE: NO_RIGHTS}),
    case("job-unknown-kubernetes-connection", job(kubernetes_conn_id="no_such_cluster"), ConfigurationError,
         "The Kubernetes connection 'no_such_cluster' isn't defined"),
    case("job-malformed-kubernetes-connection", job(), ConfigurationError,
         "The Kubernetes connection 'kubernetes_default' is malformed", env={KUBE: '{{"conn_type": "kubernetes", '}),
    case("job-kubeconfig-not-found", job(), ConfigurationError, "The Kubernetes connection 'kubernetes_default' can't be used",
         env={KUBE: '{{"conn_type": "kubernetes", "extra": {{"kube_config_path": "/nonexistent/kubeconfig"}}}}'}),
    case("job-unreachable-kubernetes-api", job(), KubernetesUnreachableError,
         "The Kubernetes API of connection 'kubernetes_default' can't be reached", env={KUBE: UNREACHABLE_KUBE}),
    case("job-unreachable-broker", job(), BrokerUnreachableError, "did not answer", env={AMQP: UNREACHABLE}),
    case("job-missing-image", job(image=MISSING_IMAGE, image_pull_grace_seconds=2), JobError,
         f"image {MISSING_IMAGE!r}: ErrImagePull", job_left="deleted"),
    case("job-missing-image-deferred", deferred(lambda t: QueueJobOperator(
        task_id="run_job", image=MISSING_IMAGE, queue_name=t.queue, namespace=t.namespace, image_pull_grace_seconds=2)),
        JobError, f"image {MISSING_IMAGE!r}: ErrImagePull", job_left="deleted"),
    # JobCompleteSensor
    case("sensor-missing-job", sensor(), JobError, "does not exist: was it deleted, or never created?"),
    case("sensor-invalid-job-name", sensor(job_name="Job_1"), ConfigurationError, "job_name 'Job_1' is not a valid RFC 1123"),
    case("sensor-invalid-namespace", sensor(namespace="-ns"), ConfigurationError, "namespace '-ns' is not a valid RFC 1123"),
    case("sensor-rbac-refusal", sensor(), KubernetesAuthError, "(403 Forbidden)", env={KUBE: NO_RIGHTS}),
    case("sensor-unknown-kubernetes-connection", sensor(kubernetes_conn_id="no_such_cluster"), ConfigurationError,
         "The Kubernetes connection 'no_such_cluster' isn't defined"),
    case("sensor-missing-image", sensor_on_missing_image, JobError, f"image {MISSING_IMAGE!r}: ErrImagePull",
         job_left="kept"),
    case("sensor-missing-image-deferred", deferred(lambda t: JobCompleteSensor(
        task_id="wait", queue_name=t.queue, image_pull_grace_seconds=2,
        **job(image=MISSING_IMAGE, wait_for_completion=False)(t))),
        JobError, f"image {MISSING_IMAGE!r}: ErrImagePull", job_left="kept"),
    # EnsureBrokerOperator
    case("broker-guest-credentials-refused", ensure_broker(), ConfigurationError, "with the guest user",
         env={AMQP: NO_BROKER_GUEST}),
    case("broker-wrong-credentials-where-a-broker-answers", ensure_broker(), BrokerAuthError,
         "A broker answers there, so none is started", env={AMQP: WRONG_CREDENTIALS}),
    case("broker-none-answers-and-create-if-missing-false", ensure_broker(create_if_missing=False),
         BrokerUnreachableError, "create_if_missing=False", env={AMQP: NO_BROKER_OWN_USER}),
    case("broker-startup-timeout-zero", ensure_broker(startup_timeout=0), ConfigurationError, "must be positive"),
    case("broker-invalid-namespace", ensure_broker(namespace="Team_A"), ConfigurationError,
         "Namespace name 'Team_A' is not a valid RFC 1123 name"),
    case("broker-node-port-outside-the-range", ensure_broker(node_port=5672), ConfigurationError,
         "NodePort range 30000-32767"),
    case("broker-statefulset-name-over-52", ensure_broker(statefulset_name="r" * 53), ConfigurationError,
         "StatefulSet name"),
    case("broker-missing-namespace", ensure_broker(namespace=MISSING_NAMESPACE), KubernetesNotFoundError,
         f"namespace {MISSING_NAMESPACE!r} does not exist", env={AMQP: NO_BROKER_OWN_USER}),
    case("broker-rbac-refusal", ensure_broker(), KubernetesAuthError, "lacks RBAC rights",
         env={AMQP: NO_BROKER_OWN_USER, KUBE: NO_RIGHTS}),
    case("broker-unknown-kubernetes-connection", ensure_broker(kubernetes_conn_id="no_such_cluster"), ConfigurationError,
         "The Kubernetes connection 'no_such_cluster' isn't defined", env={AMQP: NO_BROKER_OWN_USER}),
    case("broker-malformed-connection-uri", ensure_broker(), ConfigurationError, "is malformed", env={AMQP: MALFORMED_URI}),
    # DeleteQueueOperator
    case("delete-empty-queue-name", delete_queue(queue_name=""), ConfigurationError, "The queue name is empty"),
    case("delete-reserved-amq-prefix", delete_queue(queue_name="amq.gen-1"), ConfigurationError, "RabbitMQ reserves"),
    case("delete-unreachable-broker", delete_queue(), BrokerUnreachableError, "did not answer", env={AMQP: UNREACHABLE}),
    case("delete-missing-vhost", delete_queue(), BrokerAuthError, "refused vhost", env={AMQP: MISSING_VHOST}),
    # workqueue-consume (the worker side; no Airflow)
    case("consume-no-broker-url", consume(*WORKER, url=None), ConfigurationError, "No broker URL"),
    case("consume-malformed-url", consume(*WORKER, url="amqp://guest:guest@127.0.0.1:56x72/"), ConfigurationError,
         "Malformed broker URL"),
    case("consume-unknown-url-option", consume(*WORKER, url="{broker_url}?prefetch=5"), ConfigurationError,
         "Unknown broker option 'prefetch'"),
    case("consume-max-items-not-a-number", consume(*WORKER, WORKQUEUE_MAX_ITEMS="all"), ConfigurationError,
         "WORKQUEUE_MAX_ITEMS='all' is not a number"),
    case("consume-max-items-zero", consume("--max-items", "0", *WORKER), ConfigurationError, "max_items=0 must be positive"),
    case("consume-no-command", consume(), ConfigurationError, "No command given"),
    case("consume-wrong-credentials", consume(*WORKER, url=WRONG_CREDENTIALS), BrokerError,
         "refused the credentials of user 'guest'"),
    case("consume-missing-vhost", consume(*WORKER, url=MISSING_VHOST), BrokerError, "refused vhost 'no-such-vhost-wq'"),
    # the worker rides out an outage for its own window (1 s here, 300 s by default), then names the address
    case("consume-unreachable-broker", consume(*WORKER, url=UNREACHABLE, WORKQUEUE_OUTAGE_WINDOW="1"), BrokerError,
         "did not answer"),
]


@pytest.fixture(scope="module")
def shared_namespace(real_cluster):
    """One namespace for every case: none may create anything in it (the missing-image cases' Jobs are
    deleted as each case ends)."""
    from kubernetes import client

    name = f"wq-bad-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(real_cluster.api_client())
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def kube_objects(cluster, namespace: str) -> dict[str, list[str]]:
    from kubernetes import client

    api = cluster.api_client()
    core, apps, batch = client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
    return {
        "Job": sorted(j.metadata.name for j in batch.list_namespaced_job(namespace).items),
        "Secret": sorted(s.metadata.name for s in core.list_namespaced_secret(namespace).items),
        "Service": sorted(s.metadata.name for s in core.list_namespaced_service(namespace).items),
        "StatefulSet": sorted(s.metadata.name for s in apps.list_namespaced_stateful_set(namespace).items),
    }


def ready_messages(broker_url: str, queue: str) -> int:
    connection = open_connection(BrokerSettings.from_url(broker_url))
    try:
        return queues.depth(connection, queue).messages
    finally:
        connection.close()


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_refused_with_a_clear_error_before_any_side_effect(
        bad: Case, amqp_conn, kube_conn, cluster, core, batch, shared_namespace, queue_name, broker_url, monkeypatch,
        tmp_path):
    namespace = shared_namespace
    DeclareQueueOperator(task_id="setup", queue_name=queue_name, queue_type="classic").execute(task_context())
    FillQueueOperator(task_id="setup", queue_name=queue_name, items=SETUP_ITEMS).execute(task_context(task_id="setup"))
    before = kube_objects(cluster, namespace)
    values = {"free_port": free_port(), "broker_url": broker_url}
    if any("{kube_conn_of_user_2}" in value for value in bad.env.values()):
        if not isinstance(cluster, LocalCluster):
            pytest.skip("needs a user without rights, which a cluster in KUBECONFIG does not give us")
        values["kube_conn_of_user_2"] = json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(cluster.kubeconfig_for("user-2"))}})
    unreachable = tmp_path / "kubeconfig-unreachable"  # the cluster's kubeconfig, at a port nothing listens on
    unreachable.write_text(Path(cluster.kubeconfig).read_text().replace(cluster.server, f"https://127.0.0.1:{free_port()}"))
    values["kube_conn_unreachable"] = json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(unreachable)}})
    for name, value in bad.env.items():
        monkeypatch.setenv(name, value.format(**values))
    target = SimpleNamespace(queue=queue_name, namespace=namespace, tmp_path=tmp_path, monkeypatch=monkeypatch,
                             fill=lambda text: text.format(**values))

    with pytest.raises(bad.error) as raised:
        bad.run(target)

    message = str(raised.value)
    assert bad.fragment in message
    assert WRONG_PASSWORD not in message
    assert ready_messages(broker_url, queue_name) == len(SETUP_ITEMS), "nothing was published or consumed"
    after = kube_objects(cluster, namespace)
    if bad.job_left is None:
        assert after == before, "no Job, Secret, Service or StatefulSet was created"
    else:  # a missing image shows only once the Job's pods wait on it
        new_jobs = sorted(set(after["Job"]) - set(before["Job"]))
        assert len(new_jobs) == (0 if bad.job_left == "deleted" else 1)
        assert after["Service"] == before["Service"] and after["StatefulSet"] == before["StatefulSet"]
        for name in new_jobs:  # the sensor doesn't own the Job it waits for
            batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    assert MISSING_NAMESPACE not in [ns.metadata.name for ns in core.list_namespace().items]


def test_the_docs_table_names_every_case():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bad-input.md").read_text()
    assert [param.id for param in CASES if f"`{param.id}`" not in doc] == []


def test_the_table_covers_every_operator_and_the_cli():
    ids = [param.id for param in CASES]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
    assert {i.split("-")[0] for i in ids} == {"declare", "fill", "job", "sensor", "broker", "delete", "consume"}
