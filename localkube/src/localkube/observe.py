"""What a running cluster shows: container logs (through the API), component logs, the audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localkube.errors import ClusterError


class ClusterObservation:
    """Mixed into :class:`localkube.LocalCluster`, which sets the attributes below once started."""

    audit_log: bool

    if TYPE_CHECKING:  # provided by LocalCluster and ClusterAccess
        @property
        def _work(self) -> Path: ...
        def api_client(self, user: str = "admin") -> Any: ...

    # -- audit log (LocalCluster(audit_log=True))
    @property
    def audit_log_path(self) -> Path:
        return self._work / "logs" / "audit.log"

    def audit_events(self, user: str | None = None) -> list[dict]:
        """The API server's audit events so far (one per request and stage; RequestReceived is omitted, so
        a finished request has ResponseComplete, a watch still open only ResponseStarted; group by
        ``auditID`` to count requests), optionally only those of ``user``."""
        if not self.audit_log:
            raise ClusterError("start the cluster with LocalCluster(audit_log=True) to get an audit log")
        events = []
        try:
            lines = self.audit_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            if user is None or (event.get("user") or {}).get("username") == user:
                events.append(event)
        return events

    def read_pod_log(self, namespace: str, pod: str, container: str | None = None,
                     tail_lines: int | None = None) -> str:
        """What the kubelet serves for the container (see :func:`read_pod_log`)."""
        return read_pod_log(self.api_client(), namespace, pod, container, tail_lines)

    def component_log(self, name: str, tail_lines: int | None = None) -> str:
        """Log of a component: etcd, kube-apiserver, kube-controller-manager, kube-scheduler."""
        try:
            text = (self._work / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines:
            text = "".join(text.splitlines(keepends=True)[-tail_lines:])
        return text


def read_pod_log(api_client: Any, namespace: str, pod: str, container: str | None = None,
                 tail_lines: int | None = None) -> str:
    """What the kubelet serves for the container (``pods/log``: its current or last run) while the pod
    exists; "" when it never started or the pod is gone. Read raw: the client would parse JSON-like lines."""
    import kubernetes
    api = kubernetes.client.CoreV1Api(api_client)
    kwargs: dict[str, Any] = {"_preload_content": False}
    if container:
        kwargs["container"] = container
    if tail_lines is not None:
        kwargs["tail_lines"] = tail_lines
    try:
        return api.read_namespaced_pod_log(pod, namespace, **kwargs).data.decode(errors="replace")
    except kubernetes.client.ApiException as e:
        if e.status in (400, 404):  # waiting to start, or gone
            return ""
        raise
