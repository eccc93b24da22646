"""localkube: a real Kubernetes control plane on this host for tests and demos (kube-apiserver,
kube-controller-manager and etcd built from the Kubernetes Go modules; a node agent in place of the
kubelet). Public API: :class:`LocalCluster`, :func:`ensure_built`, :class:`ClusterError`, and the
process helpers tests use; the ``local_cluster`` pytest fixture comes with the package (pytest11)."""

from localkube.build import ensure_built
from localkube.cluster import LocalCluster
from localkube.errors import ClusterError
from localkube.processes import MARK_ID, free_port, marked_pids, pid_alive

__all__ = ["MARK_ID", "ClusterError", "LocalCluster", "ensure_built", "free_port", "marked_pids", "pid_alive"]
