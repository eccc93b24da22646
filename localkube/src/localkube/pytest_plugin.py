"""pytest plugin: the session-scoped ``local_cluster``, started once and shared by the tests that ask for it:
the control plane with a real node (kubelet, containerd, CNI networking, kube-proxy and CoreDNS), or, when
``KUBECONFIG`` is set, the cluster it names (an :class:`~localkube.ExternalCluster`: kind, k3s, any cluster;
``LOCALKUBE_HOST_IP`` says where its pods reach this machine). Tests marked ``localkube_only`` need a cluster
started here (its users, its node's network, files shared through ``hostPath``): they are skipped, saying so,
when the cluster is the one in ``KUBECONFIG``.

Registered through the ``pytest11`` entry point: installing localkube enables it.

The control plane is built (``build.sh``, a no-op when the cache is warm) right
after collection when any collected test uses the fixture, so the cold build does
not count against per-test timeouts.  If the build or the start fails, the fixture
raises: tests that need the cluster fail, they are never skipped.
"""

from __future__ import annotations

import os

import pytest

from localkube.build import ensure_built
from localkube.cluster import LocalCluster
from localkube.errors import ClusterError
from localkube.external import ExternalCluster

_build: dict = {}


def external_kubeconfig() -> str | None:
    """The kubeconfig of the cluster to use instead of starting one (``KUBECONFIG``), if any."""
    return os.environ.get("KUBECONFIG") or None


def pytest_configure(config):
    config.addinivalue_line("markers", "localkube_only: needs a cluster localkube started (skipped with KUBECONFIG)")


def pytest_collection_modifyitems(config, items):
    kubeconfig = external_kubeconfig()
    if kubeconfig:
        skip = pytest.mark.skip(reason=f"needs a cluster localkube starts; the tests use the one in KUBECONFIG={kubeconfig}")
        for item in items:
            if item.get_closest_marker("localkube_only"):
                item.add_marker(skip)


def _wants_cluster(items) -> bool:
    return any("local_cluster" in getattr(item, "fixturenames", ()) for item in items)


def pytest_collection_finish(session):
    if _wants_cluster(session.items) and not session.config.option.collectonly and not external_kubeconfig():
        try:
            _build["bin_dir"] = ensure_built()
        except Exception as e:  # reported by the fixture
            _build["error"] = e


@pytest.fixture(scope="session")
def local_cluster():
    """A running LocalCluster (admin kubeconfig: ``local_cluster.kubeconfig``; load images with ``load_image``),
    or the ExternalCluster in KUBECONFIG."""
    kubeconfig = external_kubeconfig()
    if kubeconfig:
        yield ExternalCluster(kubeconfig, host_ip=os.environ.get("LOCALKUBE_HOST_IP"))
        return
    if "error" in _build:
        raise ClusterError(f"building the local control plane failed: {_build['error']}")
    cluster = LocalCluster(bin_dir=_build.get("bin_dir") or ensure_built())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
