"""pytest plugin: session-scoped clusters, started once and shared by the tests that ask for them:
``local_cluster`` (the control plane with the node agent) and ``local_node_cluster`` (the control plane
with a real node: kubelet, containerd, CNI networking, kube-proxy and CoreDNS).

Registered through the ``pytest11`` entry point: installing localkube enables it.

The control plane is built (``build.sh``, a no-op when the cache is warm) right
after collection when any collected test uses the fixture, so the cold build does
not count against per-test timeouts.  If the build or the start fails, the fixture
raises: tests that need the cluster fail, they are never skipped.
"""

from __future__ import annotations

import pytest

from localkube.build import ensure_built
from localkube.cluster import LocalCluster
from localkube.errors import ClusterError

_build: dict = {}


CLUSTER_FIXTURES = ("local_cluster", "local_node_cluster")


def _wants_cluster(items) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for item in items for name in CLUSTER_FIXTURES)


def pytest_collection_finish(session):
    if _wants_cluster(session.items) and not session.config.option.collectonly:
        try:
            _build["bin_dir"] = ensure_built()
        except Exception as e:  # reported by the fixture
            _build["error"] = e


@pytest.fixture(scope="session")
def local_cluster(pytestconfig):
    """A running LocalCluster with the node agent (admin kubeconfig: ``local_cluster.kubeconfig``);
    ``{repo}`` in image entries names pytest's root directory."""
    yield from _running(pytestconfig, node="agent")


@pytest.fixture(scope="session")
def local_node_cluster(pytestconfig):
    """A running LocalCluster with a real node (``node="kubelet"``); load images with ``load_image``."""
    yield from _running(pytestconfig, node="kubelet")


def _running(pytestconfig, node: str):
    if "error" in _build:
        raise ClusterError(f"building the local control plane failed: {_build['error']}")
    bin_dir = _build.get("bin_dir") or ensure_built()
    cluster = LocalCluster(bin_dir=bin_dir, repo=pytestconfig.rootpath, node=node)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
