"""A cluster localkube did not start (kind, k3s, a real one), named by a kubeconfig: the part of
:class:`localkube.LocalCluster`'s API that any cluster offers, so the same tests run on either."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from localkube.errors import ClusterError
from localkube.observe import read_pod_log


class ExternalCluster:
    """The cluster of ``kubeconfig`` (its current context), as its user. ``host_ip``: where pods reach
    this machine (a broker on it), e.g. the Docker network's gateway for kind (``docker network inspect
    kind``); required by what runs pods against a broker here."""

    def __init__(self, kubeconfig: str | os.PathLike, *, host_ip: str | None = None):
        self.kubeconfig = str(Path(kubeconfig).expanduser().resolve())
        if not Path(self.kubeconfig).is_file():
            raise ClusterError(f"KUBECONFIG {self.kubeconfig}: no such file")
        self._host_ip = host_ip
        self.kubelet_node = None  # not a localkube node: no tag_image(), no node network of ours

    @property
    def server(self) -> str:
        """The API server's URL, as the kubeconfig gives it."""
        return self.api_client().configuration.host

    def api_client(self, user: str = "admin") -> Any:
        """An API client as the kubeconfig's user (the only one this cluster gives us: ``user`` must be "admin")."""
        if user != "admin":
            raise ClusterError(f"user {user!r}: a cluster in KUBECONFIG has only the kubeconfig's own user")
        import kubernetes
        return kubernetes.config.new_client_from_config(config_file=self.kubeconfig)

    @property
    def kubectl_path(self) -> str:
        """``kubectl`` on PATH, else the one localkube builds."""
        found = shutil.which("kubectl")
        if found:
            return found
        from localkube.build import ensure_built
        return str(ensure_built() / "kubectl")

    def kubectl(self, *args: str, user: str = "admin", check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess:
        if user != "admin":
            raise ClusterError(f"user {user!r}: a cluster in KUBECONFIG has only the kubeconfig's own user")
        return subprocess.run([self.kubectl_path, "--kubeconfig", self.kubeconfig, *args], capture_output=True,
                              text=True, check=check, timeout=timeout, input=input)

    def read_pod_log(self, namespace: str, pod: str, container: str | None = None,
                     tail_lines: int | None = None) -> str:
        return read_pod_log(self.api_client(), namespace, pod, container, tail_lines)

    @property
    def host_ip(self) -> str:
        if not self._host_ip:
            raise ClusterError("where do this cluster's pods reach this machine? Set LOCALKUBE_HOST_IP (for "
                               "kind: the gateway of its Docker network, `docker network inspect kind`)")
        return self._host_ip

    @property
    def node_ip(self) -> str:
        """The first node's InternalIP: where this machine reaches a NodePort."""
        import kubernetes
        nodes = kubernetes.client.CoreV1Api(self.api_client()).list_node().items
        for node in nodes:
            for address in node.status.addresses or []:
                if address.type == "InternalIP":
                    return address.address
        raise ClusterError(f"no node of the cluster in {self.kubeconfig} has an InternalIP")

    def load_image(self, archive: str | os.PathLike) -> None:
        raise ClusterError(f"load {archive} into the cluster in KUBECONFIG yourself before the tests, e.g. "
                           f"`kind load image-archive {archive}` (see docs/testing-on-another-cluster.md)")
