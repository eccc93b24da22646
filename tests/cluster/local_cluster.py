"""A real local Kubernetes control plane for tests and the demo.

etcd, kube-apiserver and kube-controller-manager (built from the Kubernetes
Go modules by ``build.sh``) run as local processes on free loopback ports;
``node_agent.py`` plays the kubelet, running pod containers as host
processes.  See README.md in this directory.

Python::

    from tests.cluster.local_cluster import LocalCluster
    with LocalCluster() as cluster:
        api = kubernetes.client.CoreV1Api(cluster.api_client())
        ...
        print(cluster.read_pod_log("default", "my-pod"))

CLI::

    python tests/cluster/local_cluster.py build            # prints the bin dir
    python tests/cluster/local_cluster.py up [--state-file F] [--kubeconfig-out P] [--detach]
    python tests/cluster/local_cluster.py down --state-file F
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SH = HERE / "build.sh"
NODE_AGENT = HERE / "node_agent.py"

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

MARK_ID = "WORKQUEUE_CLUSTER_ID"
MARK_OWNER = "WORKQUEUE_CLUSTER_OWNER"


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------- build

def ensure_built(quiet: bool = False) -> Path:
    """Run build.sh (instant when the cache is warm) and return the bin dir."""
    proc = subprocess.run(["bash", str(BUILD_SH)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL if quiet else None, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"tests/cluster/build.sh failed with exit code {proc.returncode}")
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl"):
        if not (bin_dir / name).exists():
            raise ClusterError(f"{bin_dir / name} missing after build")
    return bin_dir


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def marked_pids(key: str, value: str | None = None) -> dict[int, dict[str, str]]:
    """Processes whose environment has ``key`` (= ``value``): a /proc scan."""
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = _proc_environ(int(entry))
        if key in env and (value is None or env[key] == value):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # zombie: already dead
            except OSError:
                continue
            found[int(entry)] = env
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_stale_clusters() -> None:
    """Kill processes of clusters whose launcher died without stopping them."""
    for pid, env in marked_pids(MARK_OWNER).items():
        try:
            owner = int(env[MARK_OWNER])
        except ValueError:
            continue
        if not pid_alive(owner):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _generate_pki(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workqueue-local-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, d / "ca.key")

    key = ec.generate_private_key(ec.SECP256R1())
    names = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.0.0.1")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "serving.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, d / "serving.key")

    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(sa, d / "sa.key")
    (d / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))


# ---------------------------------------------------------------- cluster

class LocalCluster:
    """Context manager running a local control plane + node agent.

    Attributes once started: ``kubeconfig`` (admin kubeconfig path), ``server``
    (API server URL), ``admin_token``, ``ca_path``, ``tokens`` (user -> bearer
    token), ``users`` (user -> groups), ``workdir`` (temp dir, removed on
    stop), ``bin_dir``, ``kubectl_path``, ``node_name``, ``startup_seconds``.
    """

    def __init__(self, bin_dir: str | os.PathLike | None = None, *, users: dict[str, list[str]] | None = None,
                 images: dict[str, dict] | None = None, node_name: str = "workqueue-node",
                 workdir: str | os.PathLike | None = None, keep_workdir: bool = False,
                 startup_timeout: float = 90.0, audit_log: bool = False):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.users = {**DEFAULT_USERS, **(users or {})}
        self._initial_images = dict(images or {})
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
    def ca_path(self) -> str:
        return str(self._work / "pki" / "ca.crt")

    @property
    def kubectl_path(self) -> str:
        return str(self._bin / "kubectl")

    @property
    def log_dir(self) -> Path:
        """Container logs: <log_dir>/<namespace>/<pod>/<container>.log"""
        return self._work / "node" / "logs"

    # -- start
    def start(self) -> LocalCluster:
        if self._started:
            return self
        t0 = time.monotonic()
        kill_stale_clusters()
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
        _generate_pki(pki)
        # tokens
        lines = []
        for user, groups in self.users.items():
            token = secrets.token_hex(24)
            self.tokens[user] = token
            lines.append(f'{token},{user},{user}' + (f',"{",".join(groups)}"' if groups else ""))
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")
        (pki / "tokens.csv").chmod(0o600)
        self.images_file = w / "images.json"
        self.images_file.write_text(json.dumps(self._initial_images))

        etcd_client, etcd_peer, api_port, kcm_port, log_port = (free_port() for _ in range(5))
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
            "--service-cluster-ip-range=10.0.0.0/24",
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
        self._spawn("node-agent", [
            sys.executable, str(NODE_AGENT), "--kubeconfig", self.kubeconfig, "--state-dir", str(w / "node"),
            "--node-name", self.node_name, "--images-file", str(self.images_file),
            "--log-port", str(log_port), "--tls-cert", str(pki / "serving.crt"), "--tls-key", str(pki / "serving.key"),
            "--cluster-id", self.cluster_id, "--api-host", "127.0.0.1", "--api-port", str(api_port),
        ])
        # the serviceaccount controller creating "default" proves the controller manager works
        self._wait(lambda: self._http_ok(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default",
                                         token=self.admin_token), "kube-controller-manager (default ServiceAccount)")
        self._wait(self._node_ready, "node agent (Ready node)")
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
        req = urllib.request.Request(f"{self.server}/api/v1/nodes/{self.node_name}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(req, timeout=2, context=self._ssl_context()) as r:
                node = json.load(r)
        except (urllib.error.URLError, OSError):
            return False
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in (node.get("status") or {}).get("conditions") or [])

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
        # the node agent first: it stops the containers (SIGTERM, then SIGKILL)
        for name in ("node-agent", "kube-controller-manager", "kube-apiserver", "etcd"):
            p = self.procs.get(name)
            if p is None:
                continue
            self._terminate(p, 10.0 if name == "node-agent" else 5.0)
            if name == "node-agent":
                self._kill_container_groups()
        self._kill_marked()
        if self.workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate(p: subprocess.Popen, timeout: float) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the rest of its process group
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _kill_container_groups(self) -> None:
        try:
            pgids = [int(x) for x in (self._work / "node" / "agent" / "pgids").read_text().split()]
        except (OSError, ValueError):
            pgids = []
        for pgid in pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill_marked(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            pids = marked_pids(MARK_ID, self.cluster_id)
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

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

    # -- users and clients
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

    # -- images
    def register_image(self, name: str, entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                       env: dict[str, str] | None = None, working_dir: str | None = None) -> None:
        """Add an image-table entry, effective for containers started from now on (see images.py)."""
        table = json.loads(self.images_file.read_text())
        entry: dict[str, Any] = {"entrypoint": list(entrypoint or []), "cmd": list(cmd or [])}
        if env:
            entry["env"] = dict(env)
        if working_dir:
            entry["workingDir"] = working_dir
        table[name] = entry
        tmp = self.images_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, self.images_file)

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
        """stdout+stderr a pod's container printed (all runs, kept after the pod is deleted).

        Returns "" when the container never started.  The same logs are served
        through the API (``kubectl logs``, ``read_namespaced_pod_log``) while
        the pod exists.
        """
        path = self.pod_log_path(namespace, pod, container)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
        return text

    def component_log(self, name: str, tail_lines: int | None = None) -> str:
        """Log of a component: etcd, kube-apiserver, kube-controller-manager, node-agent."""
        try:
            text = (self._work / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines:
            text = "".join(text.splitlines(keepends=True)[-tail_lines:])
        return text

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def state(self) -> dict:
        return {"kubeconfig": self.kubeconfig, "server": self.server, "ca": self.ca_path,
                "admin_token": self.admin_token, "tokens": self.tokens, "workdir": str(self.workdir),
                "bin_dir": str(self.bin_dir), "kubectl": self.kubectl_path, "launcher_pid": os.getpid(),
                "pids": self.pids(), "cluster_id": self.cluster_id, "node": self.node_name,
                "log_dir": str(self.log_dir), "images_file": str(self.images_file),
                "startup_seconds": self.startup_seconds}


# ---------------------------------------------------------------- CLI

#: The README example's worker image (the tutorial's job-wq-1) as the node agent runs it: workqueue-consume
#: giving each item to worker/worker.py. `up` (make cluster) and scripts/demo.py (make demo) register it.
EXAMPLE_IMAGES: dict[str, dict] = {
    "job-wq-1": {"entrypoint": ["sh", "-c", "exec {venv_bin}/workqueue-consume {python} {repo}/worker/worker.py"]},
}
#: Where `make cluster` writes the admin kubeconfig: the same path every time, so the next commands stay valid.
MAKE_CLUSTER_KUBECONFIG = Path(os.environ.get("WORKQUEUE_CACHE", Path.home() / ".cache/workqueue")) / "local-cluster/kubeconfig"


def next_commands(kubeconfig: str | os.PathLike, *, kubectl: str = "kubectl", namespace: str = "default",
                  local_broker: bool = True) -> list[str]:
    """The shell commands a user can run next against a cluster: kubectl, both Airflow connections, the example.

    ``local_broker``: the connection to the local RabbitMQ (`make broker`, user guest); otherwise the user's
    own AIRFLOW_CONN_AMQP_DEFAULT is kept (never printed: it may hold a password)."""
    venv_bin = Path(sys.executable).parent
    kubeconfig = str(Path(kubeconfig).resolve())
    broker = ("export AIRFLOW_CONN_AMQP_DEFAULT='amqp://127.0.0.1:5672/'   # the local RabbitMQ (make broker)"
              if local_broker else "# AIRFLOW_CONN_AMQP_DEFAULT: keep the one set now")
    return [
        f". {shlex.quote(str(venv_bin / 'activate'))}   # airflow, workqueue-consume",
        f"export KUBECONFIG={shlex.quote(kubeconfig)}",
        f"{kubectl} -n {namespace} get jobs,pods -l app.kubernetes.io/managed-by=airflow-provider-workqueue",
        f"export AIRFLOW_CONN_KUBERNETES_DEFAULT='kubernetes://?kube_config_path={urllib.parse.quote(kubeconfig)}'",
        broker,
        f"export AIRFLOW__CORE__DAGS_FOLDER={shlex.quote(str(REPO / 'dags'))} AIRFLOW__CORE__LOAD_EXAMPLES=False",
        "airflow db migrate && airflow dags test work_queue_example   # or, in the repository: make demo",
    ]


def _cmd_up(a) -> int:
    if a.detach:
        argv = [sys.executable, str(Path(__file__).resolve()), "up"]
        if a.state_file:
            argv += ["--state-file", a.state_file]
        if a.kubeconfig_out:
            argv += ["--kubeconfig-out", a.kubeconfig_out]
        log_path = a.log_file or os.path.join(tempfile.gettempdir(), "workqueue-cluster.log")
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                 start_new_session=True, text=True)
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if not line:
            p.wait()
            print(f"cluster failed to start (exit {p.returncode}); see {log_path}", file=sys.stderr)
            return 1
        print(line, flush=True)
        return 0

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(images=EXAMPLE_IMAGES)
    try:
        cluster.start()
        kubeconfig = cluster.kubeconfig
        if a.kubeconfig_out:
            Path(a.kubeconfig_out).resolve().parent.mkdir(parents=True, exist_ok=True)
            kubeconfig = str(cluster.kubeconfig_for("admin", Path(a.kubeconfig_out).resolve()))
            Path(kubeconfig).chmod(0o600)
        if a.state_file:
            state = cluster.state()
            state["kubeconfig"] = kubeconfig
            Path(a.state_file).write_text(json.dumps(state, indent=2))
        print(f"cluster up in {cluster.startup_seconds:.1f}s: {cluster.server} (Ctrl-C stops it); "
              f"image {', '.join(EXAMPLE_IMAGES)} registered (the README's example). Next, in another shell:",
              file=sys.stderr)
        for command in next_commands(kubeconfig, kubectl=cluster.kubectl_path):
            print(f"  {command}", file=sys.stderr)
        print(kubeconfig, flush=True)
        try:
            sys.stdout.close()
        except OSError:
            pass
        while not stop["flag"]:
            time.sleep(0.2)
            for name, p in cluster.procs.items():
                if p.poll() is not None:
                    print(f"{name} exited with {p.returncode}; stopping the cluster", file=sys.stderr)
                    stop["flag"] = True
    finally:
        cluster.stop()
        if a.state_file:
            try:
                os.unlink(a.state_file)
            except FileNotFoundError:
                pass
        print("cluster stopped", file=sys.stderr)
    return 0


def _cmd_down(a) -> int:
    try:
        state = json.loads(Path(a.state_file).read_text())
    except FileNotFoundError:
        print(f"{a.state_file}: no running cluster", file=sys.stderr)
        return 0
    pid = state["launcher_pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in marked_pids(MARK_ID, state["cluster_id"]):
        os.kill(p, signal.SIGKILL)
    try:
        os.unlink(a.state_file)
    except FileNotFoundError:
        pass
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="local Kubernetes control plane for tests and the demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or reuse) the binaries; prints the bin dir")
    up = sub.add_parser("up", help="start a cluster with the example's image registered; prints the kubeconfig path "
                                   "(stdout) and the next commands (stderr); runs until SIGINT/SIGTERM")
    up.add_argument("--state-file", help="write a JSON with kubeconfig, server, tokens, pids (removed on stop)")
    up.add_argument("--kubeconfig-out", help="also write the admin kubeconfig here (and print this path)")
    up.add_argument("--detach", action="store_true", help="return once the cluster is up, leaving it running")
    up.add_argument("--log-file", help="with --detach: where the launcher's messages go")
    down = sub.add_parser("down", help="stop a cluster started with up --state-file")
    down.add_argument("--state-file", required=True)
    a = p.parse_args(argv)
    if a.cmd == "build":
        print(ensure_built())
        return 0
    if a.cmd == "up":
        return _cmd_up(a)
    return _cmd_down(a)


if __name__ == "__main__":
    sys.exit(main())
