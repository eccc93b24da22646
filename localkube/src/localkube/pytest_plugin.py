"""pytest plugin: the session-scoped ``local_cluster``, started once and shared by the tests that ask for it:
the control plane with a real node (kubelet, containerd, CNI networking, kube-proxy and CoreDNS), or, when
``KUBECONFIG`` is set, the cluster it names (an :class:`~localkube.ExternalCluster`: kind, k3s, any cluster;
``LOCALKUBE_HOST_IP`` says where its pods reach this machine). Tests marked ``localkube_only`` need a cluster
started here (its users, its node's network, files shared through ``hostPath``): they are skipped, saying so,
when the cluster is the one in ``KUBECONFIG``.

Registered through the ``pytest11`` entry point: installing localkube enables it.

The cluster's binaries are built (``build.sh``, a no-op when the cache is warm) in the background from the
end of collection when any collected test uses the fixture. The modules whose tests use it run after the
others (their order is kept otherwise), so a cold build overlaps the tests that need no cluster, and the
first test that needs it waits for the build before its timeout starts. If the build or the start fails,
the fixture raises: tests that need the cluster fail, they are never skipped.
"""

from __future__ import annotations

import os
import threading

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
    # whole modules move, so their module-scoped fixtures are set up once
    modules_wanting = {_module(item) for item in items if _wants_cluster(item)}
    items.sort(key=lambda item: _module(item) in modules_wanting)


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0]


def _wants_cluster(item) -> bool:
    return bool({"local_cluster", "localkube_bin_dir"} & set(getattr(item, "fixturenames", ())))


def pytest_collection_finish(session):
    if any(map(_wants_cluster, session.items)) and not session.config.option.collectonly and not external_kubeconfig():
        _build["thread"] = threading.Thread(target=_run_build, name="localkube-build", daemon=True)
        _build["thread"].start()


def _run_build() -> None:
    try:
        _build["bin_dir"] = ensure_built()
    except Exception as e:  # reported by the fixture
        _build["error"] = e


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Before a test that needs the cluster (and before its timeout starts: this wrapper is the outermost),
    wait for the build."""
    if "thread" in _build and _wants_cluster(item):
        _build["thread"].join()
    yield


@pytest.fixture(scope="session")
def localkube_bin_dir() -> str:
    """The built binaries' directory, for tests that start clusters of their own (``localkube up``)."""
    if "error" in _build:
        raise ClusterError(f"building the local control plane failed: {_build['error']}")
    return str(_build.get("bin_dir") or ensure_built())


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
