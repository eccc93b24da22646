"""OpenLineage for the work-queue operators: the queue as a dataset, the Kubernetes Job as a run facet.

Mixins for operators (``class FillQueueOperator(QueueWriterLineageMixin, BaseOperator)``), following
the OpenLineage provider's developer guide: ``get_openlineage_facets_on_start/_on_complete/_on_failure``
with every OpenLineage import inside the methods, so nothing here needs the OpenLineage provider
unless it is installed (its listener is then the only caller).

They read attributes the operators already have: ``queue_name`` and ``amqp_conn_id``; for the Job,
``job_name`` and ``namespace`` (the sensor's), or ``_launched``, the ``(name, namespace)`` that
QueueJobOperator records once it has launched its Job (its ``job_name`` is only a name prefix).

The dataset: namespace ``amqp://<host>:<port>/<vhost>``, name ``<queue>`` (see :mod:`workqueue_provider.assets`),
from the AMQP connection's host, port and schema. The password is never read into a facet.
"""

from __future__ import annotations

import logging
from typing import Any

from workqueue_provider.assets import lineage_names, queue_uri

log = logging.getLogger(__name__)


class QueueLineageMixin:
    """The queue as an input dataset (a consumer of the queue); subclasses pick the direction."""

    _queue_lineage_role = "input"

    def get_openlineage_facets_on_start(self) -> Any:
        return self._queue_lineage()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return self._queue_lineage()

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self._queue_lineage()

    def _queue_lineage(self) -> Any:
        from airflow.providers.common.compat.openlineage.facet import Dataset, ExternalQueryRunFacet
        from airflow.providers.openlineage.extractors import OperatorLineage

        queue = getattr(self, "queue_name", None)
        datasets = []
        if isinstance(queue, str) and queue:
            namespace, name = queue_dataset(queue, getattr(self, "amqp_conn_id", None) or "amqp_default")
            datasets.append(Dataset(namespace=namespace, name=name))
        run_facets = {}
        job = self._kubernetes_job()
        if job is not None:
            namespace, job_name = job
            run_facets["externalQuery"] = ExternalQueryRunFacet(
                externalQueryId=job_name, source=f"kubernetes://batch/v1/namespaces/{namespace}/jobs")
        if self._queue_lineage_role == "output":
            return OperatorLineage(outputs=datasets, run_facets=run_facets)
        return OperatorLineage(inputs=datasets, run_facets=run_facets)

    def _kubernetes_job(self) -> tuple[str, str] | None:
        """(namespace, name) of the operator's Job, if it has one and it is known yet."""
        if hasattr(self, "_launched"):  # QueueJobOperator: its job_name is a prefix; the name is known once launched
            launched = self._launched
            if isinstance(launched, tuple) and len(launched) == 2 and all(isinstance(p, str) for p in launched):
                return launched[1], launched[0]
            return None
        name, namespace = getattr(self, "job_name", None), getattr(self, "namespace", None)
        if isinstance(name, str) and name and "{{" not in name:
            return (namespace if isinstance(namespace, str) and namespace else "default"), name
        return None


class QueueWriterLineageMixin(QueueLineageMixin):
    """The queue as an output dataset (FillQueueOperator)."""

    _queue_lineage_role = "output"


class QueueReaderLineageMixin(QueueLineageMixin):
    """The queue as an input dataset and the Job as a run facet (QueueJobOperator, JobCompleteSensor)."""


def queue_dataset(queue: str, amqp_conn_id: str) -> tuple[str, str]:
    """(OpenLineage namespace, name) of ``queue`` on the broker of connection ``amqp_conn_id``; the
    connection id stands in for the host if the connection can't be read."""
    try:
        from workqueue_provider.hooks.amqp import amqp_connection

        conn = amqp_connection(amqp_conn_id)
        scheme = "amqps" if conn.conn_type == "amqps" else "amqp"
        return lineage_names(queue_uri(conn.host or amqp_conn_id, queue, vhost=conn.schema or "/", port=conn.port,
                                       scheme=scheme))
    except Exception as e:  # lineage must never fail the task
        log.warning("OpenLineage: can't read the AMQP connection %r (%s); naming the queue's namespace after it.",
                    amqp_conn_id, e)
        return f"amqp://{amqp_conn_id}", queue
