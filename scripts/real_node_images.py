"""The example's images for a real node (``LocalCluster``, kind, any cluster), built here
without a Docker engine or a registry, cached in ``$WORKQUEUE_CACHE/localkube/images`` by content hash:

- :func:`worker_image`: the tutorial's job-wq-1 worker, built from ``worker/Dockerfile`` itself (buildah,
  on a Debian python base);
- :func:`tutorial_worker_image`: the tutorial's own job-wq-1 (``amqp-consume``), from
  ``worker/Dockerfile.amqp-consume``;
- :func:`rabbitmq_image`: RabbitMQ 4.0 from Debian trixie's ``rabbitmq-server`` (the root filesystem
  ``scripts/ensure-rabbitmq4.sh`` builds with debootstrap for the broker-side tests), with an entrypoint
  that takes the official image's ``RABBITMQ_DEFAULT_USER``/``RABBITMQ_DEFAULT_PASS``, running as uid 999
  like the official image (EnsureBrokerOperator's "restricted" pod runs as 999).

Each returns ``(image reference, docker-archive)``; load it with ``LocalCluster.load_image`` or
``localkube load-image``, or ``kind load image-archive`` on kind. ``python scripts/real_node_images.py``
builds the three and prints their archives.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from localkube.image_build import PYTHON_IMAGE, build_image, ensure_python_image
from localkube.node_images import PATH_ENV, cached, docker_archive

REPO = Path(__file__).resolve().parents[1]
WORKER_IMAGE = "localkube.local/job-wq-1:dev"  # a real tag: IfNotPresent, so no pull is attempted
TUTORIAL_WORKER_IMAGE = "localkube.local/job-wq-1:amqp-consume"
RABBITMQ_IMAGE = "localkube.local/rabbitmq:4.0-trixie"
RABBITMQ_UID = 999
ENTRYPOINT = REPO / "scripts/images/rabbitmq-entrypoint.sh"
BROKER_DATA = "var/lib/workqueue-rabbit4"  # the 4.0 test broker's own data in that rootfs: never in the image


def worker_image() -> tuple[str, Path]:
    """The worker image built from worker/Dockerfile (rebuilt when the provider or worker changes)."""
    archive = build_image(REPO / "worker/Dockerfile", context=REPO, ref=WORKER_IMAGE, build_args={"BASE": PYTHON_IMAGE},
                          bases=[ensure_python_image()],
                          inputs=[REPO / "provider", REPO / "worker", REPO / "pyproject.toml", REPO / "README.md"])
    return WORKER_IMAGE, archive


def tutorial_worker_image() -> tuple[str, Path]:
    """The tutorial's worker image (amqp-consume from Debian's amqp-tools), from worker/Dockerfile.amqp-consume."""
    archive = build_image(REPO / "worker/Dockerfile.amqp-consume", context=REPO, ref=TUTORIAL_WORKER_IMAGE,
                          build_args={"BASE": PYTHON_IMAGE}, bases=[ensure_python_image()],
                          inputs=[REPO / "worker/worker.py"])
    return TUTORIAL_WORKER_IMAGE, archive


def rabbitmq_image() -> tuple[str, Path]:
    """The RabbitMQ 4.0 image (packs the trixie root filesystem once per version of it and of the entrypoint)."""
    root = Path(subprocess.run([str(REPO / "scripts/ensure-rabbitmq4.sh"), "--root"], capture_output=True, text=True,
                               check=True).stdout.strip())
    version = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"],
                             capture_output=True, text=True, check=True).stdout
    recipe = f"{root} rabbitmq-server {version} uid {RABBITMQ_UID} " + hashlib.sha256(ENTRYPOINT.read_bytes()).hexdigest()
    return RABBITMQ_IMAGE, cached("rabbitmq", recipe, lambda out: _pack_rabbitmq(root, out))


def _pack_rabbitmq(root: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        passwd, group = Path(tmp) / "passwd", Path(tmp) / "group"
        passwd.write_text(_with_id((root / "etc/passwd").read_text(), "rabbitmq", RABBITMQ_UID, gid_field=3))
        group.write_text(_with_id((root / "etc/group").read_text(), "rabbitmq", RABBITMQ_UID))
        docker_archive(out, RABBITMQ_IMAGE, root=root, exclude=(BROKER_DATA,), user=str(RABBITMQ_UID),
                       files={"/etc/passwd": passwd, "/etc/group": group, "/usr/local/bin/rabbitmq-entrypoint": ENTRYPOINT},
                       entrypoint=["/usr/local/bin/rabbitmq-entrypoint"],
                       env=[PATH_ENV, "HOME=/var/lib/rabbitmq", "RABBITMQ_LOGS=-", "LANG=C.UTF-8"])


def _with_id(table: str, name: str, new_id: int, gid_field: int | None = None) -> str:
    """``/etc/passwd`` or ``/etc/group`` text with ``name``'s id (and with ``gid_field``, its group) set to ``new_id``."""
    lines = []
    for line in table.splitlines():
        fields = line.split(":")
        if fields[0] == name:
            fields[2] = str(new_id)
            if gid_field is not None:
                fields[gid_field] = str(new_id)
        elif len(fields) > 2 and fields[2] == str(new_id):
            raise RuntimeError(f"id {new_id} is taken by {fields[0]!r} in the RabbitMQ root filesystem")
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Build (or reuse) the example's images and print their docker-archives, one per line: what to load into
    another cluster before running the tests on it (``kind load image-archive``)."""
    for build in (worker_image, tutorial_worker_image, rabbitmq_image):
        print(build()[1], flush=True)


if __name__ == "__main__":
    main()
