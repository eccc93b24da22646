"""Building the control plane's binaries (``build.sh``: once per machine, cached outside the repository)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from localkube.errors import ClusterError

BUILD_SH = Path(__file__).resolve().parent / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")


def ensure_built(quiet: bool = False) -> Path:
    """Run build.sh (instant when the cache is warm) and return the bin dir."""
    proc = subprocess.run(["bash", str(BUILD_SH)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL if quiet else None, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"localkube/build.sh failed with exit code {proc.returncode}")
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    for name in BINARIES:
        if not (bin_dir / name).exists():
            raise ClusterError(f"{bin_dir / name} missing after build")
    return bin_dir
