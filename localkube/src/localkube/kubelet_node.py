"""A real node for :class:`localkube.LocalCluster`: the kubelet and kube-proxy built
from the same pinned module as the API server, Debian's containerd and runc (CRI v1, cgroupfs driver on
this machine's cgroup v1), pod networking with the standard CNI plugins (bridge + host-local IPAM +
portmap + loopback), Services through kube-proxy and cluster DNS through CoreDNS, all in a network
namespace of the node's own (:mod:`localkube.node_network`; :mod:`localkube.node_services`).

Everything it creates carries the cluster's id, so clusters started side by side don't meet: the
namespace and bridge ``lk<id>``, the cgroup root ``/localkube-<id>`` in every hierarchy, containerd's
root, state and socket in the cluster's work dir. The node reaches the API server through a relay on the
host's end of the node's link (``apiserver-relay``). :meth:`KubeletNode.stop` removes all of it:
containers (every process in the cgroup root), containerd and its shims, the pods' network namespaces,
the mounts under the work dir, the node's namespace and links, and the cgroups.

Not here: a registry (images are loaded with :meth:`KubeletNode.load_image`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import yaml

from localkube.errors import ClusterError
from localkube.node_images import PAUSE_IMAGE, apt_install, ensure_node_images
from localkube.node_network import NodeNetwork
from localkube.node_services import DNS_READY_PORT, PROXY_HEALTHZ_PORT, coredns_argv, kube_proxy_argv
from localkube.pki import issue_serving_cert
from localkube.processes import free_port, kill_until_gone

CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
MAX_RESTART_BACKOFF_SECONDS = 10
NODE_PACKAGES = {"containerd": "containerd", "runc": "runc", "ctr": "containerd",
                 f"{CNI_BIN_DIR}/bridge": "containernetworking-plugins", "gcc": "gcc", "socat": "socat",
                 "iptables": "iptables", "conntrack": "conntrack"}


class NodeHost(Protocol):
    """What the node needs of its cluster (:class:`localkube.LocalCluster`), which owns the processes."""

    cluster_id: str
    node_name: str
    kubeconfig: str
    api_port: int
    procs: dict[str, subprocess.Popen]

    @property
    def workdir_path(self) -> Path: ...

    @property
    def bin_path(self) -> Path: ...

    def _spawn(self, name: str, argv: list[str]) -> None: ...

    def _terminate(self, p: subprocess.Popen, timeout: float) -> None: ...

    def _wait(self, check: Callable[[], bool], what: str) -> None: ...

    def _http_ok(self, url: str, token: str | None = None) -> bool: ...


class KubeletNode:
    """containerd and the kubelet of one cluster (started by LocalCluster, which owns their processes)."""

    def __init__(self, cluster: NodeHost) -> None:
        self.cluster = cluster
        self.tag = cluster.cluster_id[:10]
        self.network = NodeNetwork(self.tag)
        self.cgroup_root = f"localkube-{self.tag}"
        self.dir = cluster.workdir_path / "kubelet-node"
        self.socket = self.dir / "containerd" / "containerd.sock"
        self.kubeconfig = str(self.dir / "kubeconfig")

    @property
    def node_ip(self) -> str:
        """The pods' gateway on the node's bridge: the kubelet, NodePorts and cluster DNS are here."""
        return self.network.node_ip

    @property
    def host_ip(self) -> str:
        """The host as pods see it (the host's end of the node's link): a broker on the host is here."""
        return self.network.host_ip

    @property
    def subnet(self) -> str:
        return self.network.subnet

    @property
    def bridge(self) -> str:
        return self.network.bridge

    # -- start
    def start(self) -> None:
        ensure_node_packages()
        images = ensure_node_images()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network.create()
        self._start_apiserver_relay()
        self._create_cgroup_root()
        self._start_containerd()
        for archive in images.values():
            self.load_image(archive)
        self._start_kubelet()
        self._start_services()

    def load_image(self, archive: Path) -> None:
        """Import a docker-archive (or OCI archive) into the node's containerd, as a pull would."""
        import_image(str(self.socket), archive)

    def tag_image(self, source: str, target: str) -> None:
        """Give a loaded image another reference (as ``docker tag``), e.g. a ``:latest`` one."""
        result = self._ctr("images", "tag", "--force", source, target)
        if result.returncode != 0:
            raise ClusterError(f"tagging {source} as {target} failed: {result.stderr.strip()}")

    def _start_apiserver_relay(self) -> None:
        """The API server listens on the host's loopback; the node reaches it at the host's end of its link
        (a TCP relay there), with a kubeconfig naming ``kubernetes`` (in the serving certificate) as server."""
        port = self.cluster.api_port
        self.cluster._spawn("apiserver-relay", ["socat", f"TCP-LISTEN:{port},bind={self.host_ip},fork,reuseaddr",
                                                f"TCP:127.0.0.1:{port}"])
        config = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        for entry in config["clusters"]:
            entry["cluster"]["server"] = f"https://{self.host_ip}:{port}"
            entry["cluster"]["tls-server-name"] = "kubernetes"
        Path(self.kubeconfig).write_text(yaml.safe_dump(config))
        Path(self.kubeconfig).chmod(0o600)

    def _create_cgroup_root(self) -> None:
        for hierarchy in cgroup_hierarchies():
            path = hierarchy / self.cgroup_root
            path.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset has no cpus or mems until given its parent's
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (path / name).write_text((hierarchy / name).read_text())

    def _start_containerd(self) -> None:
        base = self.dir / "containerd"
        (self.dir / "cni").mkdir(parents=True, exist_ok=True)
        (self.dir / "cni" / "10-localkube.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = base / "config.toml"
        base.mkdir(parents=True, exist_ok=True)
        config.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # no CAP_SYS_RESOURCE on these machines: a lowered oom_score_adj (-998 for sandboxes) is refused
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / 'cni'}"
""")
        self.cluster._spawn("containerd", self.network.enter(["containerd", "--config", str(config)]))
        self.cluster._wait(lambda: self._ctr("version").returncode == 0, "containerd")

    def _cni_config(self) -> dict:
        return {"cniVersion": "0.4.0", "name": f"localkube-{self.tag}", "plugins": [
            {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet, "gateway": self.node_ip}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.dir / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"}]}

    def _start_kubelet(self) -> None:
        cluster = self.cluster
        cert, key = issue_serving_cert(cluster.workdir_path / "pki", cluster.node_name, self.node_ip, self.dir)
        self.kubelet_port = free_port()
        config = self.dir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup_root}", "failCgroupV1": False,
            "failSwapOn": False, "address": self.node_ip, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "tlsCertFile": str(cert), "tlsPrivateKeyFile": str(key),
            # served on the cluster's own bridge only; the API server verifies the kubelet's certificate
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(self.dir / "pod-logs"), "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf", "clusterDNS": [self.node_ip], "protectKernelDefaults": False,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False, "serializeImagePulls": False,
            # a crash-looping container waits at most 10 s between restarts (default 300 s; an alpha knob in
            # 1.34, KEP-4603): the same CrashLoopBackOff, without minutes of waiting in every such test
            "featureGates": {"KubeletCrashLoopBackOffMax": True},
            "crashLoopBackOff": {"maxContainerRestartPeriod": f"{MAX_RESTART_BACKOFF_SECONDS}s"},
        }, indent=2))
        cluster._spawn("kubelet", self.network.enter([
            str(cluster.bin_path / "kubelet"), "--config", str(config), "--kubeconfig", self.kubeconfig,
            "--root-dir", str(self.dir / "root"), "--hostname-override", cluster.node_name,
            "--node-ip", self.node_ip, "--v=1"]))

    def _start_services(self) -> None:
        """kube-proxy and CoreDNS in the node's namespace; returns once both answer."""
        cluster = self.cluster
        cluster._spawn("kube-proxy", self.network.enter(kube_proxy_argv(
            cluster.bin_path, self.dir, kubeconfig=self.kubeconfig, node_name=cluster.node_name,
            node_ip=self.node_ip, cluster_cidr=self.subnet)))
        cluster._spawn("coredns", self.network.enter(coredns_argv(
            cluster.bin_path, self.dir, kubeconfig=self.kubeconfig, node_ip=self.node_ip)))
        cluster._wait(lambda: cluster._http_ok(f"http://{self.node_ip}:{PROXY_HEALTHZ_PORT}/healthz"), "kube-proxy")
        cluster._wait(lambda: cluster._http_ok(f"http://{self.node_ip}:{DNS_READY_PORT}/ready"), "CoreDNS")

    # -- stop
    def stop(self) -> None:
        """Remove everything the node created (see the module doc); safe on a partly started node."""
        netns = self._sandbox_netns() if self.socket.exists() else []
        self._terminate("kubelet", "kube-proxy", "coredns")
        self._kill_containers()
        self._terminate("containerd")
        _kill_matching(str(self.socket))  # the runc shims of this containerd
        self._terminate("apiserver-relay")
        for path in netns:
            subprocess.run(["umount", path], capture_output=True)
            Path(path).unlink(missing_ok=True)
        unmount_under(self.dir)
        self.network.remove()
        self._remove_cgroup_root()

    def _terminate(self, *names: str) -> None:
        for name in names:
            process = self.cluster.procs.get(name)
            if process is not None:
                self.cluster._terminate(process, 5.0)

    def _sandbox_netns(self) -> list[str]:
        """The network namespaces (bind mounts in /var/run/netns) of this node's pod sandboxes."""
        paths = []
        for container in self._ctr("containers", "ls", "-q").stdout.split():
            info = self._ctr("containers", "info", container)
            try:
                spec = json.loads(info.stdout).get("Spec") or {}
            except ValueError:
                continue
            for namespace in (spec.get("linux") or {}).get("namespaces") or []:
                if namespace.get("type") == "network" and namespace.get("path"):
                    paths.append(namespace["path"])
        return sorted(set(paths))

    def _kill_containers(self) -> None:
        """SIGKILL every process in the node's cgroup root (containers and sandboxes) until none is left."""
        kill_until_gone(self.cgroup_pids, timeout=5)

    def cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for hierarchy in cgroup_hierarchies():
            root = hierarchy / self.cgroup_root
            for procs in root.rglob("cgroup.procs") if root.exists() else ():
                try:
                    pids.update(int(line) for line in procs.read_text().split())
                except OSError:
                    pass
        return pids

    def _remove_cgroup_root(self) -> None:
        for hierarchy in cgroup_hierarchies():
            root = hierarchy / self.cgroup_root
            if not root.exists():
                continue
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    folder.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError:
                pass

    def _ctr(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout)


def import_image(socket: str, archive: Path) -> None:
    """Import a docker-archive (or OCI archive) into the containerd at ``socket`` (the CRI's namespace)."""
    result = subprocess.run(["ctr", "--address", socket, "--namespace", "k8s.io", "images", "import", str(archive)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise ClusterError(f"importing {archive} into the node failed: {result.stderr.strip()}")


def ensure_node_packages() -> None:
    """containerd, runc, the CNI plugins (and gcc for the pause program): Debian's, installed if missing."""
    missing = sorted({package for command, package in NODE_PACKAGES.items()
                      if not (os.path.exists(command) if command.startswith("/") else shutil.which(command))})
    if missing:
        apt_install(*missing)


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (cpu, memory, pids, ..., name=systemd)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup":
            found.append(Path(fields[4]))
    return found


def unmount_under(folder: Path) -> None:
    """Unmount every mount point at or under ``folder``, the deepest first."""
    prefix = str(folder.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def _kill_matching(text: str) -> None:
    """SIGKILL processes whose command line contains ``text``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry) != os.getpid():
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass

