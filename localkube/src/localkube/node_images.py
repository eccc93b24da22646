"""The real node's images, built here without a registry: the sandbox ("pause") image and a Debian
minbase image, each a docker-archive (one layer, a config, a manifest) that ``ctr images import`` takes.

Built once per machine into ``$WORKQUEUE_CACHE/localkube/images/<name>-<hash>.tar``, where the hash
covers what the image is made from (the pause program's source; the Debian suite, variant and
mirror), so a change rebuilds it and nothing else does. A lock makes parallel callers wait for one
build. The Debian image is ``debootstrap --variant=minbase`` (about 1.5 min, 210 MB).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from localkube.errors import ClusterError

PAUSE_IMAGE = "localkube.local/pause:1.0"  # containerd's sandbox_image: the CRI pulls it otherwise
DEBIAN_IMAGE = "localkube.local/debian:bookworm"  # a shell, coreutils and apt: the image tests run
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The sandbox's process: holds the pod's namespaces, reaps orphans, exits on SIGTERM/SIGINT.
PAUSE_C = """\
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, stop); signal(SIGTERM, stop); signal(SIGCHLD, reap);
  for (;;) pause();
}
"""


def cache_dir() -> Path:
    return Path(os.environ.get("WORKQUEUE_CACHE", Path.home() / ".cache/workqueue")) / "localkube" / "images"


def ensure_node_images() -> dict[str, Path]:
    """Image reference -> docker-archive, built if missing: the pause and the Debian image."""
    return {PAUSE_IMAGE: cached("pause", PAUSE_C, _build_pause),
            DEBIAN_IMAGE: cached("debian", f"debootstrap minbase {DEBIAN_SUITE} {DEBIAN_MIRROR}", _build_debian)}


def cached(name: str, recipe: str, build) -> Path:
    """``<cache>/<name>-<hash of recipe>.tar``, made by ``build(path)`` unless it exists (one builder at a time)."""
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{name}-{digest}.tar"
    with _lock(folder / f".{name}.lock"):
        if not archive.exists():
            partial = archive.with_suffix(".tmp")
            build(partial)
            partial.rename(archive)
    return archive


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_pause(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
        source.write_text(PAUSE_C)
        run(["gcc", "-static", "-Os", "-o", str(binary), str(source)], "building the pause program")
        docker_archive(out, PAUSE_IMAGE, files={"/pause": binary}, entrypoint=["/pause"])


def _build_debian(out: Path) -> None:
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(root), DEBIAN_MIRROR],
             f"debootstrap --variant=minbase {DEBIAN_SUITE}")
        docker_archive(out, DEBIAN_IMAGE, root=root, cmd=["bash"])


def docker_archive(out: Path, ref: str, *, root: Path | None = None, files: dict[str, Path] | None = None,
                   entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                   env: list[str] | None = None, user: str | None = None, exclude: tuple[str, ...] = ()) -> Path:
    """Write a one-layer docker-archive of ``root`` (a directory, as /; paths in ``exclude`` left out) and
    ``files`` (path in the image -> file on the host, added last: they replace the root's), tagged ``ref``."""
    skip = {path.strip("/") for path in (*exclude, *(files or {}))}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        layer = Path(tmp) / "layer.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
            if root is not None:
                for entry in sorted(os.listdir(root)):
                    tar.add(root / entry, arcname=entry, filter=lambda info: None if info.name in skip else info)
            for name, source in (files or {}).items():
                tar.add(source, arcname=name.lstrip("/"))
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env or [PATH_ENV], **({"User": user} if user else {})},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha256(layer)}"]},
        }).encode()
        config_name = f"{hashlib.sha256(config).hexdigest()}.json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode()
        with tarfile.open(out, "w") as archive:
            for name, data in ((config_name, config), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            archive.add(layer, arcname="layer.tar")
    return out


def with_command(archive: Path, out: Path, ref: str, command: list[str]) -> Path:
    """Write ``out``: the docker-archive ``archive`` with another command (``Cmd``; the entrypoint cleared), tagged
    ``ref``: the same layers, a new config, as ``FROM <image>`` + ``CMD`` would make (no build, no copy of a
    root filesystem's worth of work)."""
    with tarfile.open(archive) as source:
        manifest = json.loads(_member(source, "manifest.json"))
        config = json.loads(_member(source, manifest[0]["Config"]))
        config["config"] = {**config.get("config", {}), "Entrypoint": None, "Cmd": command}
        config_data = json.dumps(config).encode()
        config_name = f"{hashlib.sha256(config_data).hexdigest()}.json"
        manifest_data = json.dumps([{**manifest[0], "Config": config_name, "RepoTags": [ref]}]).encode()
        with tarfile.open(out, "w") as target:
            for name, data in ((config_name, config_data), ("manifest.json", manifest_data)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
            for member in source.getmembers():
                if member.name not in ("manifest.json", "repositories", manifest[0]["Config"]):
                    target.addfile(member, source.extractfile(member) if member.isfile() else None)
    return out


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    handle = archive.extractfile(name)
    if handle is None:
        raise ClusterError(f"{archive.name!s}: {name} is not a file")
    return handle.read()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ClusterError(f"{what} failed (exit {result.returncode}): {result.stderr[-2000:]}")


APT_LOCK_WAIT = 900  # seconds: on a cold machine the broker set-up and parallel builds install packages too


def apt_install(*packages: str) -> None:
    """Install Debian packages, waiting while another apt-get holds dpkg's lock (instead of failing at once)."""
    run(["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT}", "install", "-y", "-q", *packages],
        f"apt-get install {' '.join(packages)}", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
