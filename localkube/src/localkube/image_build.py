"""Images built from Dockerfiles without a Docker engine or a registry: Debian's ``buildah``
(daemonless, ``--isolation chroot``), on base images loaded from docker-archives, written out as a
docker-archive for :meth:`localkube.LocalCluster.load_image`.

    archive = build_image(Path("worker/Dockerfile"), context=repo, ref="localkube.local/job-wq-1:dev",
                          build_args={"BASE": PYTHON_IMAGE}, bases=[ensure_python_image()],
                          inputs=[repo / "provider", repo / "worker", repo / "pyproject.toml"])

The archive is cached in ``$WORKQUEUE_CACHE/localkube/images/`` by the hash of everything the build
reads: the Dockerfile, the build args, the base archives, and the files (or folders) ``inputs``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from localkube.errors import ClusterError
from localkube.node_images import DEBIAN_MIRROR, DEBIAN_SUITE, PATH_ENV, apt_install, cached, docker_archive, run

#: A Python base image like ``python:3.12-slim`` (pip installs system-wide, ``python3`` on PATH), from
#: Debian bookworm's python3 and pip: for Dockerfiles that take their base as a build argument.
PYTHON_IMAGE = "localkube.local/python:3.11-bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the machine's trust store, for pip in builds


def ensure_python_image() -> Path:
    """The Python base image's docker-archive (debootstrap + python3 and pip: about 2 min, once)."""
    return cached("python", f"debootstrap minbase {DEBIAN_SUITE} {DEBIAN_MIRROR} python3 python3-pip ca-certificates",
                  _build_python)


def _build_python(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates", DEBIAN_SUITE,
             str(root), DEBIAN_MIRROR], f"debootstrap {DEBIAN_SUITE} with python3")
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()  # as in the python images: pip installs into the system's site-packages
        if HOST_CA_BUNDLE.exists():
            shutil.copy(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        docker_archive(out, PYTHON_IMAGE, root=root, cmd=["python3"],
                       env=[PATH_ENV, "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"])


def build_image(dockerfile: Path, *, context: Path, ref: str, build_args: dict[str, str] | None = None,
                bases: list[Path] | None = None, inputs: list[Path] | None = None) -> Path:
    """Build ``dockerfile`` (context ``context``) with buildah into a docker-archive tagged ``ref``; the
    base images come from the docker-archives ``bases``. Cached by the hash of what the build reads."""
    args = dict(build_args or {})
    digest = hashlib.sha256()
    for part in (dockerfile.read_bytes(), repr(sorted(args.items())).encode(), ref.encode()):
        digest.update(part)
    for base in bases or []:
        digest.update(f"{base.name}:{base.stat().st_size}".encode())  # base archives are named by their own hash
    for given in inputs or []:
        files = [given] if given.is_file() else sorted(p for p in given.rglob("*") if p.is_file())
        for path in (f for f in files if "__pycache__" not in f.parts):
            digest.update(str(path.relative_to(context)).encode() + path.read_bytes())
    name = ref.rsplit("/", 1)[-1].replace(":", "-")
    return cached(name, digest.hexdigest(), lambda out: _buildah(dockerfile, context, ref, args, bases or [], out))


def _buildah(dockerfile: Path, context: Path, ref: str, args: dict[str, str], bases: list[Path], out: Path) -> None:
    if shutil.which("buildah") is None:
        apt_install("buildah")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        storage = ["--root", os.path.join(tmp, "root"), "--runroot", os.path.join(tmp, "run"), "--storage-driver", "vfs"]
        for base in bases:
            run(["buildah", *storage, "pull", "-q", f"docker-archive:{base}"], f"loading {base.name} into buildah")
        build = ["buildah", *storage, "bud", "--isolation", "chroot", "--layers=false", "-f", str(dockerfile), "-t", ref]
        for key, value in args.items():
            build += ["--build-arg", f"{key}={value}"]
        result = subprocess.run([*build, str(context)], capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterError(f"buildah bud -f {dockerfile} failed (exit {result.returncode}):\n{result.stdout[-3000:]}"
                               f"\n{result.stderr[-3000:]}")
        run(["buildah", *storage, "push", "-q", ref, f"docker-archive:{out}:{ref}"], f"writing {ref} as a docker-archive")
