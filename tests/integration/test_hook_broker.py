"""AmqpHook against the real RabbitMQ: connection forms, probes, and clear failures."""

import socket
import subprocess
import time
import uuid

import pytest

from workqueue_provider.amqp.queues import QueueSpec
from workqueue_provider.exceptions import BrokerAuthError, BrokerUnreachableError, QueueNotFoundError
from workqueue_provider.hooks.amqp import AmqpHook, AmqpsHook

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_test_connection_against_the_live_broker(amqp_conn):
    ok, message = AmqpHook(amqp_conn_id=amqp_conn).test_connection()
    assert ok, message
    assert message.startswith("Connected to RabbitMQ 3.") and "127.0.0.1:5672" in message


def test_test_connection_against_a_closed_port_returns_quickly(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("AIRFLOW_CONN_DOWN", f"amqp://guest:guest@127.0.0.1:{port}/?connection_attempts=2&retry_delay=0.2")
    started = time.monotonic()
    ok, message = AmqpHook(amqp_conn_id="down").test_connection()
    assert not ok
    assert f"127.0.0.1:{port}" in message and "did not answer" in message and "2 attempt(s)" in message
    assert time.monotonic() - started < 30  # bounded by the connection timeouts, not a hang


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("amqp://guest:guest@127.0.0.1:5672/", id="slash-vhost-empty-path"),
        pytest.param("amqp://guest:guest@127.0.0.1:5672/%2F", id="encoded-slash-vhost"),
        pytest.param("amqp://guest:guest@127.0.0.1/%2F?heartbeat=10&blocked_connection_timeout=5", id="default-port-options"),
    ],
)
def test_connection_uri_forms_from_environment(broker_url, monkeypatch, uri):
    monkeypatch.setenv("AIRFLOW_CONN_FORMS", uri)
    hook = AmqpHook(amqp_conn_id="forms")
    assert hook.settings.vhost == "/"
    assert hook.test_connection()[0]


def test_amqps_uri_turns_tls_on(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SECURE", "amqps://u:p@rabbit.example:5671/jobs?ca_certs=/etc/ca.pem")
    settings = AmqpsHook(amqp_conn_id="secure").settings
    assert settings.tls and settings.effective_port == 5671 and settings.ca_file == "/etc/ca.pem"
    assert settings.vhost == "jobs"


def test_wrong_credentials_are_said_plainly_without_the_password(broker_url, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BADPW", "amqp://guest:not-the-password-123@127.0.0.1:5672/")
    with pytest.raises(BrokerAuthError, match="refused the credentials of user 'guest'") as raised:
        AmqpHook(amqp_conn_id="badpw").queue_depth("anything")
    assert "not-the-password-123" not in str(raised.value)
    assert not AmqpHook(amqp_conn_id="badpw").test_connection()[0]


def test_missing_vhost_is_named(broker_url, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOVHOST", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    with pytest.raises(BrokerAuthError, match="vhost 'no-such-vhost'"):
        AmqpHook(amqp_conn_id="novhost").declare_queue(QueueSpec("q"))


def test_unreachable_host_is_named(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOHOST", "amqp://u:p@no-such-host.invalid:5672/")
    with pytest.raises(BrokerUnreachableError, match="no-such-host.invalid"):
        AmqpHook(amqp_conn_id="nohost").queue_depth("q")


def test_depth_purge_and_delete(amqp_conn, queue_name):
    hook = AmqpHook(amqp_conn_id=amqp_conn)
    with pytest.raises(QueueNotFoundError, match=queue_name):
        hook.queue_depth(queue_name)
    hook.declare_queue(QueueSpec(queue_name))
    hook.publish(queue_name, [b"a", b"b", b"c"], total=3)
    depth = hook.queue_depth(queue_name)
    assert (depth.messages, depth.consumers) == (3, 0)
    assert hook.purge_queue(queue_name) == 3
    assert hook.queue_depth(queue_name).messages == 0
    assert hook.delete_queue(queue_name) == 0
    assert hook.delete_queue(queue_name) is None


def test_hook_closes_every_connection(amqp_conn, queue_name):
    def open_connections() -> int:
        out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "name"], capture_output=True, text=True, check=True)
        return len([line for line in out.stdout.splitlines() if line.strip() and not line.startswith("name")])

    hook = AmqpHook(amqp_conn_id=amqp_conn)
    before = open_connections()
    hook.declare_queue(QueueSpec(queue_name))
    hook.publish(queue_name, [str(uuid.uuid4()).encode() for _ in range(100)], total=100)
    hook.queue_depth(queue_name)
    hook.test_connection()
    time.sleep(0.5)
    assert open_connections() == before
