"""The cluster's processes on this host: free ports, and the marks (environment variables) that find a
cluster's processes again, even those of a launcher that died without stopping them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MARK_ID = "WORKQUEUE_CLUSTER_ID"  # every process of a cluster has its id in this variable
MARK_OWNER = "WORKQUEUE_CLUSTER_OWNER"  # ... and its launcher's pid in this one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def marked_pids(key: str, value: str | None = None) -> dict[int, dict[str, str]]:
    """Processes whose environment has ``key`` (= ``value``): a /proc scan."""
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = _proc_environ(int(entry))
        if key in env and (value is None or env[key] == value):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # zombie: already dead
            except OSError:
                continue
            found[int(entry)] = env
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_stale_clusters() -> None:
    """Kill processes of clusters whose launcher died without stopping them."""
    for pid, env in marked_pids(MARK_OWNER).items():
        try:
            owner = int(env[MARK_OWNER])
        except ValueError:
            continue
        if not pid_alive(owner):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_until_gone(find_pids: Callable[[], Iterable[int]], timeout: float) -> None:
    """SIGKILL what ``find_pids()`` names until it names nothing, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = list(find_pids())
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def terminate(p: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``p``'s process group, SIGKILL what is left after ``timeout`` seconds."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the rest of its process group
    except ProcessLookupError:
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
