"""pytest plugin: a session-scoped ``local_cluster`` fixture (a started LocalCluster).

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


def _wants_cluster(items) -> bool:
    return any("local_cluster" in getattr(item, "fixturenames", ()) for item in items)


def pytest_collection_finish(session):
    if _wants_cluster(session.items) and not session.config.option.collectonly:
        try:
            _build["bin_dir"] = ensure_built()
        except Exception as e:  # reported by the fixture
            _build["error"] = e


@pytest.fixture(scope="session")
def local_cluster(pytestconfig):
    """A running LocalCluster (admin kubeconfig: ``local_cluster.kubeconfig``); ``{repo}`` in image
    entries names pytest's root directory."""
    if "error" in _build:
        raise ClusterError(f"building the local control plane failed: {_build['error']}")
    bin_dir = _build.get("bin_dir") or ensure_built()
    cluster = LocalCluster(bin_dir=bin_dir, repo=pytestconfig.rootpath)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
