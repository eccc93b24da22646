"""A real local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built
from the Kubernetes Go modules by ``build.sh``) run as local processes on free loopback ports, and a real
node (:mod:`localkube.kubelet_node`: kubelet, containerd, CNI networking, kube-proxy, CoreDNS) runs the
pods in containers. See README.md.

    from localkube import LocalCluster
    with LocalCluster() as cluster:
        api = kubernetes.client.CoreV1Api(cluster.api_client())
        ...
        print(cluster.read_pod_log("default", "my-pod"))
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from localkube.access import ClusterAccess
from localkube.build import ensure_built
from localkube.errors import ClusterError
from localkube.kubelet_node import KubeletNode
from localkube.node_network import SERVICE_CIDR, remove_stale_networks
from localkube.observe import ClusterObservation
from localkube.pki import generate_pki
from localkube.processes import (
    MARK_ID,
    MARK_OWNER,
    free_port,
    kill_stale_clusters,
    kill_until_gone,
    marked_pids,
    terminate,
)

CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "statefulset-controller",
    "serviceaccount-controller",
    "replicaset-controller",
    "deployment-controller",
    "cronjob-controller",
    "resourcequota-controller",  # a ResourceQuota is enforced once this has counted the namespace's usage
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt: a real kubelet mounts it into every pod
    # the kubelet registers with the not-ready taint, lifted once the node is Ready (and a node that stops
    # reporting is tainted and its pods evicted, as on any cluster)
    "node-lifecycle-controller",
    "endpointslice-controller",  # kube-proxy and CoreDNS read EndpointSlices
    # PersistentVolumeClaims bind to PersistentVolumes (a StatefulSet's volumeClaimTemplates); the claims'
    # and volumes' protection finalizers are lifted once nothing uses them
    "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
]

#: Users with a token in the token-auth-file.  "admin" is in system:masters;
#: the spare users have no group and no rights until a test binds a role to
#: them (RBAC subjects: kind User, name "user-1" ...).
DEFAULT_USERS: dict[str, list[str]] = {
    "admin": ["system:masters"],
    "user-1": [],
    "user-2": [],
    "user-3": [],
}

#: Audit policy for LocalCluster(audit_log=True): every request at Metadata level (user, userAgent,
#: verb, requestURI, response code; no bodies).
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
"""

class LocalCluster(ClusterAccess, ClusterObservation):
    """Context manager running a local control plane and a real node: a kubelet with containerd and CNI
    networking (:mod:`localkube.kubelet_node`); images are loaded with :meth:`load_image`, as a pull would.

    Attributes once started: ``kubeconfig`` (admin kubeconfig path), ``server``
    (API server URL), ``admin_token``, ``ca_path``, ``tokens`` (user -> bearer
    token), ``users`` (user -> groups), ``workdir`` (temp dir, removed on
    stop), ``bin_dir``, ``kubectl_path``, ``node_name``, ``startup_seconds``.
    """

    def __init__(self, bin_dir: str | os.PathLike | None = None, *, users: dict[str, list[str]] | None = None,
                 node_name: str = "workqueue-node", workdir: str | os.PathLike | None = None,
                 keep_workdir: bool = False, startup_timeout: float = 90.0, audit_log: bool = False):
        self.kubelet_node: KubeletNode | None = None
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.users = {**DEFAULT_USERS, **(users or {})}
        self.node_name = node_name
        self._workdir_arg = Path(workdir) if workdir else None
        self.keep_workdir = keep_workdir
        self.startup_timeout = startup_timeout
        self.audit_log = audit_log  # opt-in: the API server logs every request (Metadata level), see audit_events()
        self.procs: dict[str, subprocess.Popen] = {}
        self.workdir: Path | None = None
        self.cluster_id = secrets.token_hex(8)
        self.tokens: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._started = False

    # -- context manager
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- public properties
    @property
    def admin_token(self) -> str:
        return self.tokens["admin"]

    @property
    def _work(self) -> Path:
        """The running cluster's working directory."""
        assert self.workdir is not None, "the cluster is not started"
        return self.workdir

    @property
    def _bin(self) -> Path:
        assert self.bin_dir is not None, "the cluster's binaries are not built"
        return self.bin_dir

    @property
    def workdir_path(self) -> Path:
        """The running cluster's working directory."""
        return self._work

    @property
    def bin_path(self) -> Path:
        """Where the built binaries are."""
        return self._bin

    def load_image(self, archive: str | os.PathLike) -> None:
        """Load a docker-archive or OCI archive into the node's containerd, as a pull would."""
        self._node.load_image(Path(archive))

    @property
    def _node(self) -> KubeletNode:
        assert self.kubelet_node is not None, "the cluster is not started"
        return self.kubelet_node

    @property
    def host_ip(self) -> str:
        """The host as pods see it: a broker or any server on the host that listens there is reachable
        from pods (the host's end of the node's link)."""
        return self._node.host_ip

    @property
    def node_ip(self) -> str:
        """The node's address: where this machine reaches a NodePort."""
        return self._node.node_ip

    @property
    def ca_path(self) -> str:
        return str(self._work / "pki" / "ca.crt")

    @property
    def kubectl_path(self) -> str:
        return str(self._bin / "kubectl")

    # -- start
    def start(self) -> LocalCluster:
        if self._started:
            return self
        t0 = time.monotonic()
        kill_stale_clusters()
        remove_stale_networks()
        if self.bin_dir is None:
            self.bin_dir = ensure_built()
        if self._workdir_arg:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="cluster-", dir=self._workdir_arg))
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="workqueue-cluster-"))
        self._started = True
        try:
            self._start(t0)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, t0: float) -> None:
        w = self._work
        for sub in ("pki", "etcd", "logs", "node", "kcm-certs", "apiserver-certs"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        pki = w / "pki"
        generate_pki(pki)
        # tokens
        lines = []
        for user, groups in self.users.items():
            token = secrets.token_hex(24)
            self.tokens[user] = token
            lines.append(f'{token},{user},{user}' + (f',"{",".join(groups)}"' if groups else ""))
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")
        (pki / "tokens.csv").chmod(0o600)

        etcd_client, etcd_peer, api_port, kcm_port = (free_port() for _ in range(4))
        self.server = f"https://127.0.0.1:{api_port}"
        self.api_port = api_port
        self.kubeconfig = str(self.kubeconfig_for("admin", w / "kubeconfig"))

        self._spawn("etcd", [
            str(self._bin / "etcd"), "--name", "default", "--data-dir", str(w / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{etcd_client}/health"), "etcd /health")

        audit_args = []
        if self.audit_log:
            (w / "audit-policy.yaml").write_text(AUDIT_POLICY)
            audit_args = [f"--audit-policy-file={w / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log_path}",
                          "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0"]
        self._spawn("kube-apiserver", [
            str(self._bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            f"--cert-dir={w / 'apiserver-certs'}",
            "--v=1",
            *audit_args,
        ])
        self._wait(lambda: self._http_ok(f"{self.server}/readyz", token=self.admin_token), "kube-apiserver /readyz")

        self._spawn("kube-controller-manager", [
            str(self._bin / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={w / 'kcm-certs'}",
            "--leader-elect=false",
            "--controllers=" + ",".join(CONTROLLERS),
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--kube-api-qps=200", "--kube-api-burst=400",
            "--profiling=false",
            "--v=1",
        ])
        self._spawn("kube-scheduler", [
            str(self._bin / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false", "--v=1",
        ])
        self.kubelet_node = KubeletNode(self)
        self.kubelet_node.start()
        # the serviceaccount controller creating "default" proves the controller manager works
        self._wait(lambda: self._http_ok(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default",
                                         token=self.admin_token), "kube-controller-manager (default ServiceAccount)")
        self._wait(self._node_ready, "the kubelet (Ready node)")
        self.startup_seconds = time.monotonic() - t0

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ)
        env[MARK_ID] = self.cluster_id
        env[MARK_OWNER] = str(os.getpid())
        logf = open(self._work / "logs" / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                                env=env, start_new_session=True, cwd=str(self.workdir))
        finally:
            logf.close()

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_path)

    def _http_ok(self, url: str, token: str | None = None) -> bool:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            ctx = self._ssl_context() if url.startswith("https") else None
            with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _node_ready(self) -> bool:
        """The node is Ready and schedulable (a kubelet registers with the not-ready taint; it is lifted once Ready)."""
        req = urllib.request.Request(f"{self.server}/api/v1/nodes/{self.node_name}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(req, timeout=2, context=self._ssl_context()) as r:
                node = json.load(r)
        except (urllib.error.URLError, OSError):
            return False
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in (node.get("status") or {}).get("conditions") or [])
        return ready and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints") or [])

    def _wait(self, check, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.component_log(name, tail_lines=30))
            if check():
                return
            time.sleep(0.1)
        raise ClusterError(f"timed out after {self.startup_timeout}s waiting for {what}")

    # -- stop
    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        # the node first: removed whole (containers, mounts, network, cgroups; see kubelet_node.py)
        if self.kubelet_node is not None:
            self.kubelet_node.stop()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            p = self.procs.get(name)
            if p is not None:
                self._terminate(p, 5.0)
        self._kill_marked()
        if self.workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, p: subprocess.Popen, timeout: float) -> None:
        """Stop one of the cluster's processes (:func:`localkube.processes.terminate`); the one place
        stop() ends a process, so a subclass can watch what needed SIGKILL."""
        terminate(p, timeout)

    def _kill_marked(self) -> None:
        kill_until_gone(lambda: marked_pids(MARK_ID, self.cluster_id), timeout=10)

    # -- faults
    def restart_apiserver(self, down_seconds: float = 0.0) -> float:
        """Stop kube-apiserver (SIGTERM, then SIGKILL) and start it again with the same arguments and
        port, keeping etcd (and so every object and resourceVersion); returns the seconds it was away.
        Watches and connections to it drop meanwhile: a fault for tests of clients that must reconnect."""
        old = self.procs["kube-apiserver"]
        started = time.monotonic()
        self._terminate(old, 5.0)
        time.sleep(down_seconds)
        self._spawn("kube-apiserver", [str(arg) for arg in old.args])  # type: ignore[union-attr]
        self._wait(lambda: self._http_ok(f"{self.server}/readyz", token=self.admin_token), "kube-apiserver /readyz")
        return time.monotonic() - started

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def state(self) -> dict:
        return {"kubeconfig": self.kubeconfig, "server": self.server, "ca": self.ca_path,
                "admin_token": self.admin_token, "tokens": self.tokens, "workdir": str(self.workdir),
                "bin_dir": str(self.bin_dir), "kubectl": self.kubectl_path, "launcher_pid": os.getpid(),
                "pids": self.pids(), "cluster_id": self.cluster_id, "node": self.node_name,
                "containerd_socket": str(self._node.socket), "node_ip": self.node_ip, "host_ip": self.host_ip,
                "startup_seconds": self.startup_seconds}
