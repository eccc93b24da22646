"""The ``amqp://`` Asset URI scheme for a RabbitMQ queue (provider-info ``asset-uris``).

``amqp://<host>[:<port>]/<vhost>/<queue>``, the vhost percent-encoded (``%2F`` for ``/``), as in
RabbitMQ's management URLs: e.g. ``amqp://rabbitmq-service:5672/%2F/batches``. The same names are
the OpenLineage dataset of the queue: namespace ``amqp://<host>:<port>/<vhost>``, name ``<queue>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, unquote, urlsplit

if TYPE_CHECKING:
    from airflow.sdk import Asset

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


def queue_uri(host: str, queue: str, *, vhost: str = "/", port: int | None = None, scheme: str = "amqp") -> str:
    """The Asset URI of ``queue``; the port is always written (the default one for ``scheme`` if None)."""
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}/{quote(vhost, safe='')}/{quote(queue, safe='')}"


def lineage_names(uri: str) -> tuple[str, str]:
    """(OpenLineage namespace, name) of a queue's Asset URI."""
    parts = sanitize_uri(urlsplit(uri))
    _, vhost, queue = parts.path.split("/")
    return f"{parts.scheme}://{parts.netloc}/{vhost}", unquote(queue)


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Airflow's handler: require host, vhost and queue; add the default port; no credentials."""
    if not uri.hostname:
        raise ValueError(f"An {uri.scheme}:// asset URI needs a host: {uri.scheme}://host:port/vhost/queue.")
    if uri.username or uri.password:
        raise ValueError(f"An {uri.scheme}:// asset URI must not carry credentials: use a connection for them.")
    segments = uri.path.split("/")[1:]
    if len(segments) != 2 or not all(segments):
        raise ValueError(f"An {uri.scheme}:// asset URI names a vhost and a queue: {uri.scheme}://host:port/vhost/queue "
                         "(the vhost '/' is written %2F).")
    port = uri.port or DEFAULT_PORTS[uri.scheme]
    host = f"[{uri.hostname}]" if ":" in uri.hostname else uri.hostname
    return uri._replace(netloc=f"{host}:{port}", query="", fragment="")


def create_asset(*, host: str, queue_name: str, vhost: str = "/", port: int | None = None, scheme: str = "amqp",
                 extra: dict[str, Any] | None = None) -> Asset:
    """Airflow's factory: the Asset of a queue."""
    from airflow.sdk import Asset

    return Asset(uri=queue_uri(host, queue_name, vhost=vhost, port=port, scheme=scheme), extra=extra)


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> Any:
    """Airflow's OpenLineage converter: the queue as an OpenLineage dataset."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    namespace, name = lineage_names(asset.uri)
    return Dataset(namespace=namespace, name=name)
