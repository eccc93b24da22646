"""What a running cluster shows: container logs, component logs, the audit log; and its image table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localkube.errors import ClusterError
from localkube.images import make_entry


class ClusterObservation:
    """Mixed into :class:`localkube.LocalCluster`, which sets the attributes below once started."""

    audit_log: bool
    images_file: Path
    node: str

    if TYPE_CHECKING:  # provided by LocalCluster and ClusterAccess
        @property
        def _work(self) -> Path: ...
        @property
        def log_dir(self) -> Path: ...
        def api_client(self, user: str = "admin") -> Any: ...

    def register_image(self, name: str, entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                       env: dict[str, str] | None = None, working_dir: str | None = None) -> None:
        """Add an image-table entry, effective for containers started from now on (see images.py)."""
        if self.node != "agent":
            raise ClusterError("register_image is the node agent's image table; a real node loads images: load_image()")
        table = json.loads(self.images_file.read_text())
        table[name] = make_entry(entrypoint, cmd, env, working_dir)
        write_image_table(self.images_file, table)

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

    # -- logs
    def pod_log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        d = self.log_dir / namespace / pod
        if container is None:
            files = sorted(d.glob("*.log")) if d.is_dir() else []
            if len(files) == 1:
                return files[0]
            container = self._default_container(namespace, pod)
            if container is None:
                names = [f.stem for f in files]
                raise ValueError(f"pod {namespace}/{pod}: give a container name (logs: {names})")
        return d / f"{container}.log"

    def _default_container(self, namespace: str, pod: str) -> str | None:
        try:
            import kubernetes
            p = kubernetes.client.CoreV1Api(self.api_client()).read_namespaced_pod(pod, namespace)
        except Exception:
            return None
        ann = p.metadata.annotations or {}
        return ann.get("kubectl.kubernetes.io/default-container") or p.spec.containers[0].name

    def read_pod_log(self, namespace: str, pod: str, container: str | None = None,
                     tail_lines: int | None = None) -> str:
        """stdout+stderr a pod's container printed: with the node agent, all its runs, kept after the
        pod is deleted; on a real node (``node="kubelet"``), what the kubelet serves (``pods/log``) while
        the pod exists. Returns "" when the container never started."""
        if self.node != "agent":
            return self._read_pod_log_from_api(namespace, pod, container, tail_lines)
        path = self.pod_log_path(namespace, pod, container)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
        return text

    def _read_pod_log_from_api(self, namespace: str, pod: str, container: str | None, tail_lines: int | None) -> str:
        """What the kubelet serves for the container (its current or last run; "" if it never started)."""
        import kubernetes
        api = kubernetes.client.CoreV1Api(self.api_client())
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

    def component_log(self, name: str, tail_lines: int | None = None) -> str:
        """Log of a component: etcd, kube-apiserver, kube-controller-manager, node-agent."""
        try:
            text = (self._work / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines:
            text = "".join(text.splitlines(keepends=True)[-tail_lines:])
        return text


def write_image_table(path: Path, table: dict[str, Any]) -> None:
    """Replace the node agent's image table at once (it may be reading it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, path)
