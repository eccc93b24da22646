"""The real node's network: a network namespace of its own, as a machine of its own would have.

The node's processes (containerd and so the pods' CNI plugins, the kubelet, kube-proxy, CoreDNS) run in
the namespace ``lk<id>`` (through ``nsenter --net``), so kube-proxy's iptables rules and the pods' bridge
stay there, and two clusters side by side never share a chain. Addresses (all on links created here):

- the pods' bridge ``lk<id>`` inside the namespace, on a free ``10.244.<n>.0/24``; its ``.1`` is the
  node IP (the kubelet serves there, CoreDNS answers there: it is the pods' gateway);
- a veth pair between the host (``lkh<id>``, ``10.245.<n>.1/30``, :attr:`NodeNetwork.host_ip`: where pods
  reach the host's services) and the namespace (``10.245.<n>.2/30``, its default route);
- a host route to the pod /24 through the veth, so the API server, tests and Airflow on the host reach
  pods, and NodePorts at the node IP.

Nothing is routed or NATed off the machine: the namespace's only way out is the host end of the veth.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from localkube.errors import ClusterError
from localkube.processes import pid_alive

POD_PREFIX = "10.244"  # pod subnets 10.244.<n>.0/24, one per cluster
LINK_PREFIX = "10.245"  # host <-> node veth links 10.245.<n>.0/30
SERVICE_CIDR = "10.0.0.0/24"  # the API server's --service-cluster-ip-range (lives in the namespace only)
OWNERS = Path("/run/localkube/networks")  # <namespace> -> the pid of the process that created it


class NodeNetwork:
    """Create (:meth:`create`) and remove (:meth:`remove`) one node's namespace, links and routes."""

    def __init__(self, tag: str) -> None:
        self.netns = self.bridge = f"lk{tag}"
        self.host_veth, self.node_veth = f"lkh{tag}", f"lkn{tag}"
        self.subnet = self.node_ip = self.host_ip = self.link_ip = ""

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run in the node's network namespace (nsenter execs it: the pid is the program's)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def create(self) -> None:
        n = self._free_index()
        self.subnet, self.node_ip = f"{POD_PREFIX}.{n}.0/24", f"{POD_PREFIX}.{n}.1"
        self.host_ip, self.link_ip = f"{LINK_PREFIX}.{n}.1", f"{LINK_PREFIX}.{n}.2"
        ns = ["ip", "-n", self.netns]
        steps = [
            ["ip", "netns", "add", self.netns],
            [*ns, "link", "set", "lo", "up"],
            ["ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.node_veth],
            ["ip", "link", "set", self.node_veth, "netns", self.netns],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_veth],
            ["ip", "link", "set", self.host_veth, "up"],
            [*ns, "addr", "add", f"{self.link_ip}/30", "dev", self.node_veth],
            [*ns, "link", "set", self.node_veth, "up"],
            [*ns, "route", "add", "default", "via", self.host_ip],
            [*ns, "link", "add", self.bridge, "type", "bridge"],
            [*ns, "addr", "add", f"{self.node_ip}/24", "dev", self.bridge],
            [*ns, "link", "set", self.bridge, "up"],
            ["ip", "route", "add", self.subnet, "via", self.link_ip],
            # the namespace routes between its veth and the bridge; bridged traffic between two pods passes
            # iptables, so a ClusterIP reply from a pod on the same bridge is un-NATed (kube-proxy needs it)
            self.enter(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"]),
        ]
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.netns).write_text(str(os.getpid()))
        for argv in steps:
            _check(argv, "creating the node's network")

    def remove(self) -> None:
        """Delete the namespace (its veth end, bridge and iptables rules go with it) and the host's veth end."""
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True)
        (OWNERS / self.netns).unlink(missing_ok=True)

    def _free_index(self) -> int:
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        if self.netns in namespaces.split():
            raise ClusterError(f"the network namespace {self.netns} exists already")
        free = [n for n in range(16, 250) if f"{POD_PREFIX}.{n}." not in routes and f"{LINK_PREFIX}.{n}." not in routes]
        if not free:
            raise ClusterError(f"no free /24 left in {POD_PREFIX}.0.0/16 for the pod network")
        return random.choice(free)


def remove_stale_networks() -> list[str]:
    """Remove the networks of nodes whose launcher died without stopping them (killed, e.g. by a CI timeout):
    their namespace, link and route would otherwise stay until the machine reboots. Returns their names."""
    removed = []
    for marker in OWNERS.glob("lk*") if OWNERS.exists() else ():
        try:
            owner = int(marker.read_text())
        except (ValueError, OSError):
            continue
        if pid_alive(owner):
            continue
        NodeNetwork(marker.name[2:]).remove()
        removed.append(marker.name)
    return removed


def _check(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"{what}: {' '.join(argv)} failed: {result.stderr.strip()}")
