"""The ``amqp://`` Asset URI scheme: Airflow normalises a queue's URI through the provider's handler."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from workqueue_provider.assets import lineage_names, queue_uri, sanitize_uri


def test_airflow_normalises_an_amqp_asset_uri_through_the_provider():
    from airflow.sdk import Asset

    assert Asset(uri="amqp://rabbitmq-service/%2F/batches").uri == "amqp://rabbitmq-service:5672/%2F/batches"
    assert Asset(uri="amqps://rabbit/jobs/batches").uri == "amqps://rabbit:5671/jobs/batches"


@pytest.mark.parametrize(("uri", "problem"), [
    pytest.param("amqp:///%2F/q", "needs a host", id="no-host"),
    pytest.param("amqp://h/q", "names a vhost and a queue", id="no-vhost"),
    pytest.param("amqp://user:pw@h/%2F/q", "credentials", id="credentials"),
])
def test_a_malformed_queue_uri_is_refused_naming_the_form(uri, problem):
    with pytest.raises(ValueError, match=problem):
        sanitize_uri(urlsplit(uri))


def test_the_lineage_names_follow_the_uri():
    uri = queue_uri("rabbit", "job1-manual__2026-01-01T00:00:00+00:00")
    assert uri == "amqp://rabbit:5672/%2F/job1-manual__2026-01-01T00%3A00%3A00%2B00%3A00"
    assert lineage_names(uri) == ("amqp://rabbit:5672/%2F", "job1-manual__2026-01-01T00:00:00+00:00")


def test_the_openlineage_converter_gives_the_same_dataset():
    from airflow.sdk import Asset

    from workqueue_provider.assets import convert_asset_to_openlineage

    dataset = convert_asset_to_openlineage(Asset(uri="amqp://rabbit/%2F/batches"), None)
    assert (dataset.namespace, dataset.name) == ("amqp://rabbit:5672/%2F", "batches")
