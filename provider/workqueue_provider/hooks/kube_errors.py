"""Kubernetes API failures as this package's errors: the one place that words them.

Every message names what was being done, where, and the fix; ``ApiException`` (sync or asyncio
client) and transport errors never leak out of the access layer (callers ``raise ... from e``).
"""

from __future__ import annotations

import json
from typing import Any

from workqueue_provider.exceptions import (
    KubernetesAuthError,
    KubernetesError,
    KubernetesNotFoundError,
    KubernetesUnreachableError,
    WorkQueueError,
)

TRANSIENT_STATUSES = (429, 500, 502, 503, 504)  # throttled, or the API server restarting


def api_error(error: Any, action: str, *, kubernetes_conn_id: str, namespace: str | None = None) -> KubernetesError:
    """A kubernetes ``ApiException`` raised while doing ``action`` (e.g. "create Job 'x'")."""
    status = getattr(error, "status", None)
    message, kind, name = _status_details(error)
    where = f" in namespace {namespace!r}" if namespace else ""
    if status == 404 and kind == "namespaces":
        missing = name or namespace
        return KubernetesNotFoundError(
            f"Can't {action}: namespace {missing!r} does not exist. Create it (kubectl create namespace "
            f"{missing}) or set namespace= to an existing one."
        )
    if status == 404:
        return KubernetesNotFoundError(f"Can't {action}{where}: it does not exist ({message}).")
    if status == 403:
        return KubernetesAuthError(
            f"Kubernetes refused to {action}{where} (403 Forbidden): {message}. The identity of the Kubernetes "
            f"connection {kubernetes_conn_id!r} lacks RBAC rights there: bind it to the Role in deploy/rbac.yaml."
        )
    if status == 401:
        return KubernetesAuthError(
            f"Can't {action}: the Kubernetes API rejected the credentials of connection {kubernetes_conn_id!r} "
            "(401 Unauthorized): fix its token or kubeconfig."
        )
    if status == 422:
        return KubernetesError(f"Can't {action}: the API server refused the object as invalid ({message}).")
    reason = getattr(error, "reason", "")
    return KubernetesError(f"Can't {action}{where}: the Kubernetes API answered {status} {reason} ({message}).")


def transport_error(error: Exception, kubernetes_conn_id: str) -> WorkQueueError:
    """An error below the API (connection refused, TLS, timeouts)."""
    if isinstance(error, WorkQueueError):
        return error
    text = f"{type(error).__name__}: {error}"
    return KubernetesUnreachableError(
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
