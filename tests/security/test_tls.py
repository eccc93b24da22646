"""amqps:// with a self-signed CA, on a private RabbitMQ node with a TLS listener (the shared node on
5672 is not reconfigured): works from Airflow and from workqueue-consume with the CA given; a wrong
CA is refused with a clear error."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import task_context
from tests.reliability.private_broker import PrivateBroker, PrivateBrokerError
from workqueue_provider.exceptions import BrokerUnreachableError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.worker.consume import EXIT_BROKER

pytestmark = [pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
CONSUME = [sys.executable, "-m", "workqueue_provider.worker.cli"]  # this checkout's workqueue-consume
CONSUME_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "provider"),
                                                                          os.environ.get("PYTHONPATH")]))}


def make_ca(directory: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(directory: Path, ca_key, ca_cert) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """(broker, CA that signed its cert, another CA)."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert, ca_path = make_ca(directory, "workqueue-test-ca")
    _, _, wrong_ca_path = make_ca(directory, "some-other-ca")
    cert, key = make_server_cert(directory, ca_key, ca_cert)
    broker = PrivateBroker(tls_port=True, config=[
        f"ssl_options.cacertfile = {ca_path}", f"ssl_options.certfile = {cert}", f"ssl_options.keyfile = {key}",
        "ssl_options.verify = verify_none", "ssl_options.fail_if_no_peer_cert = false"])
    try:
        broker.start()
    except PrivateBrokerError as e:
        broker.stop()
        pytest.fail(f"the private RabbitMQ node with a TLS listener could not start: {e}")
    yield broker, ca_path, wrong_ca_path
    broker.stop()


def amqps_url(broker: PrivateBroker, ca: Path | None = None) -> str:
    query = f"?ca_certs={ca}" if ca else ""
    return f"amqps://{broker.user}:{broker.password}@localhost:{broker.tls_port}/%2F{query}"


def test_amqps_works_from_airflow_and_workqueue_consume_with_the_ca(tls_broker, monkeypatch):
    broker, ca, _ = tls_broker
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_TLS", amqps_url(broker, ca))
    hook = AmqpHook(amqp_conn_id="amqp_tls")
    assert hook.settings.tls and hook.settings.ca_file == str(ca)
    ok, message = hook.test_connection()
    assert ok and f"amqps://{broker.user}@localhost:{broker.tls_port}" in message, message
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    DeclareQueueOperator(task_id="declare", queue_name=queue, amqp_conn_id="amqp_tls").execute(task_context())
    assert FillQueueOperator(task_id="fill", queue_name=queue, items=["one", "two"],
                             amqp_conn_id="amqp_tls").execute(task_context()) == 2

    url = amqps_url(broker)  # the pods' BROKER_URL; the CA comes from --ca-file or BROKER_CA_FILE
    first = subprocess.run([*CONSUME, "--url", url, "-q", queue, "--ca-file", str(ca), "--", "cat"],
                           capture_output=True, text=True, timeout=60, env=CONSUME_ENV)
    second = subprocess.run([*CONSUME, "-q", queue, "--", "cat"], capture_output=True, text=True, timeout=60,
                            env={**CONSUME_ENV, "BROKER_URL": url, "BROKER_CA_FILE": str(ca)})
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stdout + second.stdout == "onetwo"
    assert hook.queue_depth(queue).messages == 0
    hook.delete_queue(queue)


def test_a_wrong_ca_is_refused_with_a_clear_error(tls_broker, monkeypatch):
    broker, _, wrong_ca = tls_broker
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_TLS", amqps_url(broker, wrong_ca))
    with pytest.raises(BrokerUnreachableError) as raised:
        AmqpHook(amqp_conn_id="amqp_tls").queue_depth("anything")
    message = str(raised.value)
    assert f"TLS handshake with the broker at localhost:{broker.tls_port} failed" in message, message
    assert "CERTIFICATE_VERIFY_FAILED" in message and "check the CA file" in message, message
    ok, probe = AmqpHook(amqp_conn_id="amqp_tls").test_connection()
    assert not ok and "TLS handshake" in probe

    run = subprocess.run([*CONSUME, "--url", amqps_url(broker), "-q", "anything", "--ca-file", str(wrong_ca), "--",
                          "cat"], capture_output=True, text=True, timeout=60, env=CONSUME_ENV)
    assert run.returncode == EXIT_BROKER and "TLS handshake" in run.stderr and "CA file" in run.stderr, run.stderr
    for text in (message, probe, run.stderr):
        assert broker.password not in text
