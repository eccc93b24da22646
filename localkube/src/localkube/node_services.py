"""Services and cluster DNS on the real node: kube-proxy (iptables mode) and CoreDNS beside the cluster,
both in the node's network namespace (:mod:`localkube.node_network`), both reaching the API server
through the node's kubeconfig.

CoreDNS (built by build.sh from its pinned Go module with the ``kubernetes`` plugin) answers for
``cluster.local`` on the node IP, which the kubelet gives pods as their nameserver (``clusterDNS``), so
``rabbitmq-service`` and ``rabbitmq-service.default.svc.cluster.local`` resolve in pods. Other names get
no answer: nothing is forwarded off the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

CLUSTER_DOMAIN = "cluster.local"
DNS_READY_PORT = 8181  # CoreDNS's ready plugin, on the node IP (200 once the kubernetes plugin has synced)
PROXY_HEALTHZ_PORT = 10256


def kube_proxy_argv(bin_dir: Path, folder: Path, *, kubeconfig: str, node_name: str, node_ip: str,
                    cluster_cidr: str) -> list[str]:
    """kube-proxy's command line, its configuration written into ``folder``."""
    config = folder / "kube-proxy.yaml"
    config.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "iptables", "clientConnection": {"kubeconfig": kubeconfig},
        "hostnameOverride": node_name, "bindAddress": node_ip, "clusterCIDR": cluster_cidr,
        "healthzBindAddress": f"{node_ip}:{PROXY_HEALTHZ_PORT}", "metricsBindAddress": "127.0.0.1:10249",
        # leave the conntrack sysctls alone: they are the machine's, not the namespace's
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }, indent=2))
    return [str(bin_dir / "kube-proxy"), "--config", str(config), "--v=1"]


def coredns_argv(bin_dir: Path, folder: Path, *, kubeconfig: str, node_ip: str) -> list[str]:
    """CoreDNS's command line, its Corefile written into ``folder``."""
    corefile = folder / "Corefile"
    corefile.write_text(f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    errors
    ready {node_ip}:{DNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
    cache 5
}}
""")
    return [str(bin_dir / "coredns"), "-conf", str(corefile)]
