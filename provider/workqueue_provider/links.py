"""Extra links shown on the Job tasks in the Airflow UI.

Airflow 3's UI reads a link from XCom (key = the link's ``xcom_key``); the API server never runs
provider code for it. So the operator computes the URL while it runs and stores it with
:meth:`RabbitMQQueueLink.persist`: the link appears as soon as the task has started (also while it
is deferred), and ``get_link`` (which the task runner calls when the task ends) returns the same URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

from workqueue_provider.amqp.addresses import bracketed, parse_hosts

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Connection, Context
    from airflow.sdk.types import TaskInstanceKey

MANAGEMENT_URL_EXTRA = "management_url"
DEFAULT_MANAGEMENT_PORTS = {"amqp": 15672, "amqps": 15671}


def management_base_url(conn: Connection) -> str:
    """The RabbitMQ management UI for an AMQP connection: the ``management_url`` extra, else
    ``http://<host>:15672`` (``https://<host>:15671`` for ``amqps``). Never carries credentials."""
    configured = (conn.extra_dejson or {}).get(MANAGEMENT_URL_EXTRA)
    if configured:
        parts = urlsplit(str(configured))
        netloc = parts.hostname or ""
        if ":" in netloc:  # IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme or 'http'}://{netloc}{parts.path}".rstrip("/")  # userinfo, query dropped
    tls = conn.conn_type == "amqps"
    host = bracketed(parse_hosts(conn.host, 5672)[0].host) if conn.host else "localhost"  # a cluster: its first node
    return f"{'https' if tls else 'http'}://{host}:{DEFAULT_MANAGEMENT_PORTS['amqps' if tls else 'amqp']}"


def rabbitmq_queue_url(conn: Connection, queue_name: str) -> str:
    """The queue's page in the management UI: ``<base>/#/queues/<vhost>/<queue>``, both quoted."""
    vhost = conn.schema or "/"
    return f"{management_base_url(conn)}/#/queues/{quote(vhost, safe='')}/{quote(queue_name, safe='')}"


class RabbitMQQueueLink(BaseOperatorLink):
    """"RabbitMQ queue": the task's work queue in the RabbitMQ management UI."""

    name: ClassVar[str] = "RabbitMQ queue"  # type: ignore[misc]
    xcom_key: ClassVar[str] = "workqueue_rabbitmq_queue_link"  # type: ignore[misc]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""

    @classmethod
    def persist(cls, context: Context, *, amqp_conn_id: str, queue_name: str, log: Any = None) -> str | None:
        """Store the queue's URL for the UI. A link is a convenience: failing to build it logs a
        warning and never fails the task."""
        from airflow.sdk import BaseHook

        try:
            url = rabbitmq_queue_url(BaseHook.get_connection(amqp_conn_id), queue_name)
            context["ti"].xcom_push(key=cls.xcom_key, value=url)
        except Exception as e:
            if log is not None:
                log.warning("Could not store the %r link for queue %r: %s", cls.name, queue_name, e)
            return None
        return url
