"""The "RabbitMQ queue" extra link: URL built from the AMQP connection, stored in XCom, never a password."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from airflow.sdk import Connection

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.links import RabbitMQQueueLink, management_base_url, rabbitmq_queue_url
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.sensors.job import JobCompleteSensor

RUN_QUEUE = "job1-manual__2026-01-02T03:04:05+00:00"


def conn(conn_type="amqp", host="rabbit.example", schema="", extra=None) -> Connection:
    return Connection(conn_id="amqp_default", conn_type=conn_type, host=host, port=5672, login="alice",
                      password="s3cret", schema=schema, extra=json.dumps(extra) if extra else None)


@pytest.mark.parametrize(("connection", "expected"), [
    pytest.param(conn(), "http://rabbit.example:15672/#/queues/%2F/jobs", id="default-vhost"),
    pytest.param(conn(schema="batch/a"), "http://rabbit.example:15672/#/queues/batch%2Fa/jobs", id="vhost-quoted"),
    pytest.param(conn("amqps"), "https://rabbit.example:15671/#/queues/%2F/jobs", id="amqps-https-15671"),
    pytest.param(conn(host="::1"), "http://[::1]:15672/#/queues/%2F/jobs", id="ipv6"),
    pytest.param(conn(extra={"management_url": "https://mq.example/rabbit/"}),
                 "https://mq.example/rabbit/#/queues/%2F/jobs", id="management_url-extra"),
])
def test_queue_url_is_built_from_the_connection(connection, expected):
    assert rabbitmq_queue_url(connection, "jobs") == expected


def test_queue_name_with_run_id_characters_is_quoted():
    url = rabbitmq_queue_url(conn(), RUN_QUEUE)
    assert url.endswith("/job1-manual__2026-01-02T03%3A04%3A05%2B00%3A00")


def test_no_credentials_in_the_link_even_if_the_management_url_carries_some():
    connection = conn(extra={"management_url": "http://bob:hunter2@mq.example:15672/?token=x"})
    for url in (management_base_url(connection), rabbitmq_queue_url(connection, "jobs")):
        assert "s3cret" not in url and "alice" not in url
        assert "hunter2" not in url and "bob" not in url and "token" not in url
    assert management_base_url(connection) == "http://mq.example:15672"


def test_management_url_extra_does_not_break_the_broker_settings():
    settings = BrokerSettings(host="h").with_options({"management_url": "http://h:15672"})
    assert settings.host == "h"


def test_persist_pushes_the_url_under_the_links_xcom_key(monkeypatch):
    from airflow.sdk import BaseHook

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(lambda cls, conn_id: conn()))
    pushed = {}
    ti = SimpleNamespace(xcom_push=lambda key, value: pushed.__setitem__(key, value))
    url = RabbitMQQueueLink.persist({"ti": ti}, amqp_conn_id="amqp_default", queue_name="jobs")
    assert pushed == {RabbitMQQueueLink.xcom_key: "http://rabbit.example:15672/#/queues/%2F/jobs"} == {
        RabbitMQQueueLink().xcom_key: url}


def test_persist_never_fails_the_task(monkeypatch):
    from airflow.sdk import BaseHook

    def missing(cls, conn_id):
        raise LookupError(f"no connection {conn_id}")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(missing))
    warnings = []
    log = SimpleNamespace(warning=lambda *args: warnings.append(args))
    assert RabbitMQQueueLink.persist({"ti": None}, amqp_conn_id="nope", queue_name="jobs", log=log) is None
    assert warnings


def test_get_link_reads_the_persisted_url_from_xcom(monkeypatch):
    from airflow.sdk.execution_time import xcom

    seen = {}

    def get_value(*, ti_key, key):
        seen.update(ti_key=ti_key, key=key)
        return "http://rabbit.example:15672/#/queues/%2F/jobs"

    monkeypatch.setattr(xcom.XCom, "get_value", staticmethod(get_value))
    key = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    assert RabbitMQQueueLink().get_link(None, ti_key=key) == "http://rabbit.example:15672/#/queues/%2F/jobs"
    assert seen == {"ti_key": key, "key": RabbitMQQueueLink.xcom_key}


def test_job_operator_and_sensor_carry_the_link_into_the_serialized_dag():
    from datetime import datetime

    from airflow.sdk import DAG
    from airflow.serialization import serialized_objects

    # DagSerialization since Airflow 3.2; SerializedDAG before.
    serializer = getattr(serialized_objects, "DagSerialization", None) or serialized_objects.SerializedDAG

    with DAG("links", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        QueueJobOperator(task_id="run_job", image="i", queue_name="q")
        JobCompleteSensor(task_id="wait_for_job", job_name="j", queue_name="q")
    tasks = {t["__var"]["task_id"]: t["__var"] for t in serializer.to_dict(dag)["dag"]["tasks"]}
    for task_id in ("run_job", "wait_for_job"):
        # What the API server reads: link name -> the XCom key persist() pushed to.
        assert tasks[task_id]["_operator_extra_links"] == {"RabbitMQ queue": "workqueue_rabbitmq_queue_link"}


def test_link_is_registered_in_provider_info():
    import workqueue_provider

    assert workqueue_provider.get_provider_info()["extra-links"] == ["workqueue_provider.links.RabbitMQQueueLink"]


def test_a_cluster_connection_links_to_its_first_node():
    cluster = Connection(conn_id="amqp_default", conn_type="amqp", host="rabbit-0,rabbit-1:5673,[fd00::2]", port=5672)
    assert management_base_url(cluster) == "http://rabbit-0:15672"
