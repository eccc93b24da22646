"""localkube: a real Kubernetes cluster on this host for tests and demos (kube-apiserver,
kube-controller-manager, kube-scheduler, etcd, and a node with the kubelet, containerd, CNI networking,
kube-proxy and CoreDNS, built from their Go modules and Debian's packages). Public API:
:class:`LocalCluster`, :class:`ExternalCluster` (a cluster in a kubeconfig), :func:`ensure_built`,
:class:`ClusterError`, and the process helpers tests use; the ``local_cluster`` pytest fixture comes with
the package (pytest11)."""

from localkube.build import ensure_built
from localkube.cluster import LocalCluster
from localkube.errors import ClusterError
from localkube.external import ExternalCluster
from localkube.processes import MARK_ID, free_port, marked_pids, pid_alive

__all__ = ["MARK_ID", "ClusterError", "ExternalCluster", "LocalCluster", "ensure_built", "free_port", "marked_pids", "pid_alive"]
