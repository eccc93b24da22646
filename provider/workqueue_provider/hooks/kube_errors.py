"""Kubernetes API failures as this package's errors: the one place that words them.

Every message names what was being done, where, and the fix; ``ApiException`` and transport
errors never leak out of the hooks (callers ``raise ... from e``).
"""

from __future__ import annotations

import json
from typing import Any

from workqueue_provider.exceptions import ConfigurationError, JobError, WorkQueueError


def api_error(error: Any, action: str, *, kubernetes_conn_id: str, namespace: str | None = None,
              default: type[WorkQueueError] = JobError) -> WorkQueueError:
    """A kubernetes ``ApiException`` raised while doing ``action`` (e.g. "create Job 'x'")."""
    status = getattr(error, "status", None)
    message, kind, name = _status_details(error)
    where = f" in namespace {namespace!r}" if namespace else ""
    if status == 404 and kind == "namespaces":
        missing = name or namespace
        return ConfigurationError(
            f"Can't {action}: namespace {missing!r} does not exist. Create it (kubectl create namespace "
            f"{missing}) or set namespace= to an existing one."
        )
    if status == 403:
        return ConfigurationError(
            f"Kubernetes refused to {action}{where} (403 Forbidden): {message}. The identity of the Kubernetes "
            f"connection {kubernetes_conn_id!r} lacks RBAC rights there: bind it to the Role in deploy/rbac.yaml."
        )
    if status == 401:
        return ConfigurationError(
            f"Can't {action}: the Kubernetes API rejected the credentials of connection {kubernetes_conn_id!r} "
            "(401 Unauthorized): fix its token or kubeconfig."
        )
    if status == 422:
        return ConfigurationError(f"Can't {action}: the API server refused the object as invalid ({message}).")
    return default(f"Can't {action}{where}: the Kubernetes API answered {status} {getattr(error, 'reason', '')} ({message}).")


def transport_error(error: Exception, kubernetes_conn_id: str, default: type[WorkQueueError] = JobError) -> WorkQueueError:
    """An error below the API (connection refused, TLS, timeouts)."""
    if isinstance(error, WorkQueueError):
        return error
    text = f"{type(error).__name__}: {error}"
    return default(
        f"The Kubernetes API of connection {kubernetes_conn_id!r} can't be reached ({text[:200]}): "
        "check that the cluster is up and the connection's kubeconfig."
    )


def _status_details(error: Any) -> tuple[str, str | None, str | None]:
    """The Status object's message and its details (kind, name), as far as the body holds them."""
    try:
        body = json.loads(getattr(error, "body", None) or "{}")
    except (TypeError, ValueError):
        body = {}
    details = body.get("details") or {}
    message = body.get("message") or str(getattr(error, "reason", "") or error)
    return message, details.get("kind"), details.get("name")
