"""Reaching a running cluster as one of its users: tokens, kubeconfigs, API clients, kubectl, RBAC waits."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from localkube.errors import ClusterError


class ClusterAccess:
    """Mixed into :class:`localkube.LocalCluster`, which sets the attributes below once started."""

    server: str
    kubeconfig: str
    tokens: dict[str, str]

    if TYPE_CHECKING:  # provided by LocalCluster
        @property
        def ca_path(self) -> str: ...
        @property
        def kubectl_path(self) -> str: ...
        @property
        def _work(self) -> Path: ...

    def token_for(self, user: str) -> str:
        """Bearer token of a user declared at start (DEFAULT_USERS or ``users=``)."""
        return self.tokens[user]

    def kubeconfig_for(self, user: str, path: str | os.PathLike | None = None) -> Path:
        """Write a kubeconfig authenticating as ``user`` (default: <workdir>/kubeconfig-<user>)."""
        path = Path(path) if path else self._work / f"kubeconfig-{user}"
        ca_data = base64.b64encode(Path(self.ca_path).read_bytes()).decode()  # self-contained file
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "workqueue-local",
                          "cluster": {"server": self.server, "certificate-authority-data": ca_data}}],
            "users": [{"name": user, "user": {"token": self.tokens[user]}}],
            "contexts": [{"name": f"{user}@workqueue-local",
                          "context": {"cluster": "workqueue-local", "user": user, "namespace": "default"}}],
            "current-context": f"{user}@workqueue-local",
        }
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)
        return path

    def api_client(self, user: str = "admin"):
        """A ``kubernetes.client.ApiClient`` authenticated as ``user``."""
        import kubernetes
        conf = kubernetes.client.Configuration()
        conf.host = self.server
        conf.ssl_ca_cert = self.ca_path
        conf.api_key = {"authorization": f"Bearer {self.tokens[user]}"}
        return kubernetes.client.ApiClient(conf)

    def wait_until_allowed(self, user: str, verb: str, resource: str, namespace: str, group: str = "",
                           timeout: float = 30.0) -> None:
        """Wait until the RBAC authorizer lets ``user`` do ``verb`` on ``resource``.

        A new RoleBinding takes effect only once the authorizer's informers have seen it (usually
        well under a second, longer on a loaded machine), so a test must not use it right away.
        """
        import kubernetes
        api = kubernetes.client.AuthorizationV1Api(self.api_client())
        review = {"spec": {"user": user, "resourceAttributes": {
            "verb": verb, "resource": resource, "group": group, "namespace": namespace}}}
        deadline = time.monotonic() + timeout
        while not api.create_subject_access_review(review).status.allowed:
            if time.monotonic() > deadline:
                raise ClusterError(f"{user} still may not {verb} {resource} in {namespace} after {timeout:.0f} s")
            time.sleep(0.1)

    def kubectl(self, *args: str, user: str = "admin", check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster; returns the CompletedProcess (text)."""
        kc = self.kubeconfig if user == "admin" else str(self.kubeconfig_for(user))
        return subprocess.run([self.kubectl_path, "--kubeconfig", kc, *args], capture_output=True, text=True,
                              check=check, timeout=timeout, input=input)
