"""Image table of the local node agent: which host command an image stands for.

The node agent runs containers as host processes, so an image is only a name.
When a container has no ``command``, the agent looks its image up here and uses
the entry's ``entrypoint`` + ``cmd`` the way a container runtime uses an
image's ENTRYPOINT + CMD:

* container ``command`` set      -> ``command + args``  (the table is not consulted)
* only container ``args`` set    -> ``entry.entrypoint + args``
* neither                        -> ``entry.entrypoint + entry.cmd``

An entry may also carry ``env`` (image default environment, overridden by the
pod's env) and ``workingDir``.

Matching: the image reference is normalised by dropping a ``@digest``, a
``:tag``, a registry host (a first path component containing ``.`` or ``:`` or
equal to ``localhost``) and a leading ``library/``.  The full remaining path is
looked up first (``bitnami/rabbitmq``), then its last component (``rabbitmq``).
So ``docker.io/library/busybox:1.36`` and ``busybox`` both match ``busybox``.

Placeholders in entrypoint/cmd/env/workingDir values are filled with
``str.format``-style names: ``{repo}`` (repository root), ``{python}`` (the
node agent's interpreter), ``{venv_bin}`` (its bin dir), ``{pod_dir}`` (a
scratch directory private to the pod, kept until the cluster stops),
``{pod}``, ``{namespace}``, ``{container}``.  After that, ``$(VAR)`` references
are expanded with the container's environment exactly as Kubernetes expands
``command``/``args``.

Extending the table (later work adds ``job-wq-1`` and ``rabbitmq``):

* ``LocalCluster(images={...})`` or ``cluster.register_image(name, entrypoint,
  cmd, env=None, working_dir=None)`` at run time (written to a file the agent
  re-reads before each container start);
* the environment variable ``WORKQUEUE_IMAGE_TABLE``: one or more YAML/JSON
  files (``os.pathsep``-separated) holding ``{name: {entrypoint: [...], cmd:
  [...], env: {...}, workingDir: ...}}``, read by the node agent (re-read when
  they change);
* in-process, :func:`register_image` adds to :data:`IMAGES` (only affects a
  node agent running in this process, e.g. in this module's own tests).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

#: Built-in entries.  ``busybox``/``ubuntu``/``debian``/``alpine`` just run the
#: command through the host's shell tools (their CMD is a shell).
IMAGES: dict[str, dict[str, Any]] = {
    "busybox": {"entrypoint": [], "cmd": ["sh"]},
    "ubuntu": {"entrypoint": [], "cmd": ["bash"]},
    "debian": {"entrypoint": [], "cmd": ["bash"]},
    "alpine": {"entrypoint": [], "cmd": ["sh"]},
    "python": {"entrypoint": [], "cmd": ["{python}"]},
}

ENV_VAR = "WORKQUEUE_IMAGE_TABLE"


def register_image(
    name: str,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    working_dir: str | None = None,
) -> None:
    """Add or replace an entry in this process's table (:data:`IMAGES`)."""
    IMAGES[normalize(name)] = make_entry(entrypoint, cmd, env, working_dir)


def make_entry(entrypoint=None, cmd=None, env=None, working_dir=None) -> dict[str, Any]:
    entry: dict[str, Any] = {"entrypoint": list(entrypoint or []), "cmd": list(cmd or [])}
    if env:
        entry["env"] = {str(k): str(v) for k, v in env.items()}
    if working_dir:
        entry["workingDir"] = working_dir
    return entry


def normalize(image: str) -> str:
    """``registry:5000/library/name:tag@sha256:..`` -> ``name`` (see module doc)."""
    ref = image.strip()
    ref = ref.split("@", 1)[0]
    parts = ref.split("/")
    last = parts[-1]
    if ":" in last:
        parts[-1] = last.split(":", 1)[0]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


def load_file(path: str) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: image table must be a mapping of image name to entry")
    out = {}
    for name, entry in data.items():
        entry = entry or {}
        out[normalize(str(name))] = make_entry(
            entry.get("entrypoint"), entry.get("cmd"), entry.get("env"), entry.get("workingDir")
        )
    return out


class ImageTable:
    """The table the node agent consults: built-ins + files (re-read on change)."""

    def __init__(self, files: list[str] | None = None):
        env_files = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
        self.files = list(env_files) + list(files or [])
        self._cache: dict[str, tuple[float, dict]] = {}

    def _file_entries(self, path: str) -> dict:
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return {}
        cached = self._cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        entries = load_file(path)
        self._cache[path] = (mtime, entries)
        return entries

    def table(self) -> dict[str, dict[str, Any]]:
        merged = dict(IMAGES)
        for path in self.files:
            merged.update(self._file_entries(path))
        return merged

    def lookup(self, image: str) -> dict[str, Any] | None:
        table = self.table()
        name = normalize(image)
        if name in table:
            return table[name]
        return table.get(name.rsplit("/", 1)[-1])
