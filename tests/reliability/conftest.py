"""Fixtures for the fault tests: a private RabbitMQ node that may be restarted and has a short consumer_timeout."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.reliability.private_broker import PrivateBroker, PrivateBrokerError

CONSUMER_TIMEOUT_MS = 4000


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    """Its own node (never a shared one, 5672 or 5673): consumer_timeout 4 s, checked every second."""
    broker = PrivateBroker(config=[f"consumer_timeout = {CONSUMER_TIMEOUT_MS}"],
                           advanced="[{rabbit, [{channel_tick_interval, 1000}]}]")
    try:
        broker.start()
    except PrivateBrokerError as e:
        broker.stop()
        pytest.fail(f"the private RabbitMQ node for the fault tests could not start: {e}")
    yield broker
    broker.stop()


@pytest.fixture
def private_conn(request: pytest.FixtureRequest, private_broker: PrivateBroker, monkeypatch: pytest.MonkeyPatch) -> str:
    """Airflow connection ``amqp_private`` to the private node: where pods reach it too when the test runs
    pods (``cluster``)."""
    host = request.getfixturevalue("cluster").host_ip if "cluster" in request.fixturenames else "127.0.0.1"
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_PRIVATE", json.dumps({
        "conn_type": "amqp", "host": host, "port": private_broker.port, "login": private_broker.user,
        "password": private_broker.password}))
    return "amqp_private"
