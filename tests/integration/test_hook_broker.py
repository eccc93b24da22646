"""AmqpHook against the real RabbitMQ: connection forms, probes, and clear failures."""

import socket
import subprocess
import time
import uuid

import psutil
import pytest

from tests.conftest import BROKER_URL
from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.amqp.queues import QueueSpec
from workqueue_provider.exceptions import BrokerAuthError, BrokerUnreachableError, QueueNotFoundError
from workqueue_provider.hooks.amqp import AmqpHook, AmqpsHook

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_test_connection_against_the_live_broker(amqp_conn, broker_url):
    ok, message = AmqpHook(amqp_conn_id=amqp_conn).test_connection()
    assert ok, message
    # 3.10 on 5672, or 4.0 on 5673 in make test's second pass
    assert message.startswith("Connected to RabbitMQ ") and BrokerSettings.from_url(broker_url).address in message


def test_test_connection_against_a_closed_port_fails_within_its_attempts_and_timeouts(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("AIRFLOW_CONN_DOWN", f"amqp://guest:guest@127.0.0.1:{port}/"
                                            "?connection_attempts=2&retry_delay=0.2&socket_timeout=1&stack_timeout=2")
    hook = AmqpHook(amqp_conn_id="down")
    settings = hook.settings
    assert (settings.connection_attempts, settings.retry_delay, settings.socket_timeout, settings.stack_timeout) \
        == (2, 0.2, 1.0, 2.0)
    # each attempt is bounded by its stack timeout, and the delays come between attempts; plus 3 s of slack for a
    # loaded machine (anything near the old 30 s bound would be a hang, not the configured timeouts)
    bound = settings.connection_attempts * settings.stack_timeout + (settings.connection_attempts - 1) * settings.retry_delay
    started = time.monotonic()
    ok, message = hook.test_connection()
    elapsed = time.monotonic() - started
    assert not ok
    assert f"127.0.0.1:{port}" in message and "did not answer" in message and "2 attempt(s)" in message
    assert elapsed < bound + 3, f"took {elapsed:.1f} s; 2 attempts with these timeouts take at most {bound:.1f} s"


@pytest.mark.parametrize(
    ("uri", "options"),
    [
        pytest.param("amqp://guest:guest@127.0.0.1:5672/", {}, id="slash-vhost-empty-path"),
        pytest.param("amqp://guest:guest@127.0.0.1:5672/%2F", {}, id="encoded-slash-vhost"),
        pytest.param("amqp://guest:guest@127.0.0.1/%2F?heartbeat=10&blocked_connection_timeout=5",
                     {"heartbeat": 10, "blocked_connection_timeout": 5.0}, id="default-port-options"),
    ],
)
def test_connection_uri_forms_from_environment(broker_url, monkeypatch, uri, options):
    monkeypatch.setenv("AIRFLOW_CONN_FORMS", uri)
    hook = AmqpHook(amqp_conn_id="forms")
    settings = hook.settings
    assert settings.vhost == "/" and settings.effective_port == 5672
    expected = {"heartbeat": 60, "blocked_connection_timeout": 60.0, **options}  # the defaults unless the URI says
    assert {name: getattr(settings, name) for name in expected} == expected
    parameters = settings.pika_parameters()
    assert {name: getattr(parameters, name) for name in expected} == expected
    assert hook.test_connection()[0]
    # and the broker agreed to the heartbeat the URI asked for (the connection's negotiated value)
    connection = open_connection(settings)
    try:
        assert connection._impl.params.heartbeat == expected["heartbeat"]
    finally:
        connection.close()


def test_amqps_uri_turns_tls_on(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SECURE", "amqps://u:p@rabbit.example:5671/jobs?ca_certs=/etc/ca.pem")
    settings = AmqpsHook(amqp_conn_id="secure").settings
    assert settings.tls and settings.effective_port == 5671 and settings.ca_file == "/etc/ca.pem"
    assert settings.vhost == "jobs"


def test_wrong_credentials_are_said_plainly_without_the_password(broker_url, monkeypatch):
    address = BrokerSettings.from_url(broker_url).address
    monkeypatch.setenv("AIRFLOW_CONN_BADPW", f"amqp://guest:not-the-password-123@{address}/")
    with pytest.raises(BrokerAuthError, match="refused the credentials of user 'guest'") as raised:
        AmqpHook(amqp_conn_id="badpw").queue_depth("anything")
    assert "not-the-password-123" not in str(raised.value)
    assert not AmqpHook(amqp_conn_id="badpw").test_connection()[0]


def test_missing_vhost_is_named(broker_url, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOVHOST", f"amqp://guest:guest@{BrokerSettings.from_url(broker_url).address}/no-such-vhost")
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


def test_a_burst_of_publishes_reaches_the_socket_in_few_writes(amqp_conn, queue_name, monkeypatch):
    """pika writes each frame on its own (3 writes, so 3 ``send()`` calls, per message); the fill hands the
    messages of one burst to the socket together. Every message still arrives, in order, with its id."""
    from pika.adapters.utils import io_services_utils

    from workqueue_provider.amqp import publisher

    writes = []
    original = io_services_utils._AsyncPlaintextTransport.write

    def counting_write(transport, data):
        writes.append(len(data))
        original(transport, data)
    monkeypatch.setattr(io_services_utils._AsyncPlaintextTransport, "write", counting_write)
    hook = AmqpHook(amqp_conn_id=amqp_conn)
    hook.declare_queue(QueueSpec(queue_name))
    bodies = [f"item-{i:05d}".encode() for i in range(3000)]
    publisher.publish(hook.settings, queue_name, bodies, total=len(bodies), message_ids=str)
    assert len(writes) < 300, f"{len(writes)} writes for 3,000 messages: the frames were not written together"
    channel = open_connection(hook.settings).channel()
    got = [channel.basic_get(queue_name, auto_ack=True) for _ in range(len(bodies))]
    assert [body for _m, _p, body in got] == bodies
    assert [properties.message_id for _m, properties, _b in got] == [str(i) for i in range(len(bodies))]
    channel.connection.close()


def broker_connections_of_this_process() -> set[int]:
    """This process's connections as the broker lists them: the broker's peer ports that are local ports of
    this process's sockets to it. Other clients of the shared broker neither add to nor hide from it."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "peer_host", "peer_port"], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    at_broker = {int(fields[1]) for fields in (line.split() for line in listed.splitlines())
                 if len(fields) == 2 and fields[1].isdigit() and fields[0] in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    port = BrokerSettings.from_url(BROKER_URL).effective_port
    ours = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port}
    return at_broker & ours


def wait_for_connections(expected: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (found := broker_connections_of_this_process()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_hook_closes_every_connection(amqp_conn, queue_name):
    before = broker_connections_of_this_process()
    # the count sees a connection this process opens (so it can't be blind to a leak)
    probe = open_connection(BrokerSettings.from_url(BROKER_URL))
    try:
        assert len(wait_for_connections(before | {probe._impl._transport._sock.getsockname()[1]}) - before) == 1
    finally:
        probe.close()
    assert wait_for_connections(before) == before

    hook = AmqpHook(amqp_conn_id=amqp_conn)
    hook.declare_queue(QueueSpec(queue_name))
    hook.publish(queue_name, [str(uuid.uuid4()).encode() for _ in range(100)], total=100)
    hook.queue_depth(queue_name)
    hook.test_connection()
    left = wait_for_connections(before)
    assert left == before, f"connections left open by the hook (local ports): {sorted(left - before)}"
