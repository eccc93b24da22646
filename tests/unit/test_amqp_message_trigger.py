"""AmqpMessageTrigger without a broker: arguments, serialize round trip, body decoding, and the
common-messaging ``amqp``/``amqps`` backend that builds it."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest

from workqueue_provider.amqp.async_consumer import UndecodableMessageError, decode_body
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.triggers.amqp_message import CLASSPATH, AmqpMessageTrigger

KWARGS = {"queue_name": "batches", "amqp_conn_id": "rabbit", "body_format": "json", "prefetch": 3, "ack_delay": 2.5,
          "max_body_bytes": 4096, "max_reconnect_wait": 30.0}


def test_serialize_round_trip_gives_the_same_trigger():
    classpath, kwargs = AmqpMessageTrigger(**KWARGS).serialize()
    assert classpath == CLASSPATH and kwargs == KWARGS
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    json.dumps(kwargs)  # stored as JSON by the triggerer


def test_serialize_carries_no_credentials(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RABBIT", "amqp://user:s3cret-pw@broker:5672/")
    _, kwargs = AmqpMessageTrigger(**KWARGS).serialize()
    assert "s3cret-pw" not in json.dumps(kwargs)


@pytest.mark.parametrize(("override", "named"), [
    pytest.param({"queue_name": ""}, "queue", id="empty-queue"),
    pytest.param({"body_format": "xml"}, "body_format", id="format"),
    pytest.param({"prefetch": 0}, "prefetch", id="prefetch"),
    pytest.param({"ack_delay": -1}, "ack_delay", id="ack-delay"),
    pytest.param({"amqp_conn_id": ""}, "amqp_conn_id", id="conn"),
])
def test_bad_arguments_fail_at_construction_naming_the_argument(override, named):
    with pytest.raises(ConfigurationError, match=named):
        AmqpMessageTrigger(**{**KWARGS, **override})


@pytest.mark.parametrize(("body", "properties", "body_format", "expected"), [
    pytest.param(b'["a", "b"]', {}, "auto", ["a", "b"], id="json-without-type"),
    pytest.param(b'{"items": [1]}', {"content_type": "application/json"}, "auto", {"items": [1]}, id="json-typed"),
    pytest.param(b"hello", {}, "auto", "hello", id="text-without-type"),
    pytest.param(b'["x"]', {"content_type": "text/plain"}, "auto", '["x"]', id="text-typed-not-parsed"),
    pytest.param("caf\xe9".encode("latin-1"), {"content_type": "text/plain; charset=latin-1"}, "auto", "caf\xe9",
                 id="charset"),
    pytest.param(b'["x"]', {}, "text", '["x"]', id="text-format"),
])
def test_bodies_are_decoded_as_json_or_text(body, properties, body_format, expected):
    assert decode_body(body, properties, body_format=body_format) == expected


@pytest.mark.parametrize(("body", "properties", "body_format", "reason"), [
    pytest.param(b"{oops", {"content_type": "application/json"}, "auto", "not valid JSON", id="typed-json"),
    pytest.param(b"hello", {}, "json", "not valid JSON", id="json-format"),
    pytest.param(b"\xff", {}, "auto", "not valid utf-8", id="charset"),
    pytest.param(b"x", {"content_type": "application/octet-stream"}, "auto", "neither JSON nor text", id="binary"),
    pytest.param(b"x", {"content_encoding": "gzip"}, "auto", "gzip", id="compressed"),
    pytest.param(b"x" * 11, {}, "auto", "over the limit of 10", id="too-big"),
])
def test_undecodable_bodies_are_refused_naming_why(body, properties, body_format, reason):
    with pytest.raises(UndecodableMessageError, match=reason):
        decode_body(body, properties, body_format=body_format, max_bytes=10)


@pytest.mark.parametrize("scheme", ["amqp", "amqps"])
def test_message_queue_trigger_with_the_amqp_scheme_is_an_amqp_message_trigger(scheme):
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    trigger = MessageQueueTrigger(scheme=scheme, queue_name="batches", amqp_conn_id="rabbit")
    assert isinstance(trigger.trigger, AmqpMessageTrigger)
    assert trigger.serialize() == (CLASSPATH, AmqpMessageTrigger(queue_name="batches", amqp_conn_id="rabbit").serialize()[1])


def test_the_deprecated_queue_uri_form_takes_the_queue_name_from_the_uri():
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trigger = MessageQueueTrigger(queue="amqp://rabbit:5672/%2F/batches", amqp_conn_id="rabbit")
    assert trigger.serialize()[1]["queue_name"] == "batches"


def test_the_queue_provider_matches_only_amqp():
    from workqueue_provider.messaging import AmqpMessageQueueProvider

    provider = AmqpMessageQueueProvider()
    assert provider.scheme_matches("amqp") and provider.scheme_matches("amqps")
    assert not provider.scheme_matches("kafka") and not provider.scheme_matches("redis+pubsub")
    assert provider.queue_matches("amqp://h/%2F/q") and provider.queue_matches("amqps://h:5671/v/q")
    assert not provider.queue_matches("amqp://h/") and not provider.queue_matches("https://sqs.aws/q")
    with pytest.raises(ConfigurationError, match="not both"):
        provider.trigger_kwargs("amqp://h/%2F/q", queue_name="other")


def assert_plain_json(value) -> None:
    """Exactly JSON's types: Airflow's event encoder refuses subclasses (and cancels the trigger)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{value!r} is a {type(value)}"


def test_message_properties_become_plain_json_types():
    import datetime
    import decimal

    from pika.compat import long
    from pika.spec import BasicProperties

    from workqueue_provider.amqp.async_consumer import properties_of

    properties = properties_of(BasicProperties(
        content_type="application/json", delivery_mode=2, priority=1,
        timestamp=long(1_700_000_000),
        headers={"x-delivery-count": long(1), b"raw": b"bytes", "price": decimal.Decimal("1.5"), "ok": True,
                 "when": datetime.datetime(2026, 1, 1), "nested": {"list": [long(2), b"x"]}}))
    assert_plain_json(properties)
    assert properties["headers"] == {"x-delivery-count": 1, "raw": "bytes", "price": "1.5", "ok": True,
                                     "when": "2026-01-01T00:00:00", "nested": {"list": [2, "x"]}}
