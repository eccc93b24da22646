"""A private rabbitmq-server node for tests that restart or reconfigure their broker.

The shared brokers (127.0.0.1:5672, and 5673 for RabbitMQ 4.0) are never restarted or
reconfigured: tests that need a broker restart, a short ``consumer_timeout`` or a TLS listener start
their own node here, with its own node name, ports, data dir, logs, config and Erlang cookie (all
under a temp dir).

With ``WORKQUEUE_TEST_RABBITMQ_ROOT`` set to a root filesystem (the Debian trixie one that
scripts/ensure-rabbitmq4.sh builds, printed by its ``--root``), the node is that rootfs's
rabbitmq-server (RabbitMQ 4.0): run with ``chroot`` in a private mount namespace where the host's
/tmp is bind-mounted on the rootfs's /tmp, so every path (temp dir, TLS files) is the same inside
and out. Its epmd is the 4.0 nodes' own (``RABBITMQ4_EPMD_PORT``, 4370), not the host's 4369.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from localkube import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the host's, and the rootfs's (as seen inside it)
STARTUP_TIMEOUT = 120
ROOTFS = os.environ.get("WORKQUEUE_TEST_RABBITMQ_ROOT", "")
# $1 = rootfs; the rest is the command to run inside it. Mounts live only in the new namespace.
IN_ROOT = ('dir=$1; shift; mount -t proc proc "$dir/proc" && mount -t sysfs sysfs "$dir/sys" && '
           'mount --rbind /dev "$dir/dev" && mount --bind /tmp "$dir/tmp" || exit 125; exec chroot "$dir" "$@"')


def listen_port() -> int:
    """A free port for a node to listen on, below the ephemeral range (10000-24999): unlike a port the kernel
    hands out for ``bind(0)``, no outgoing connection can take it in the seconds before the node binds it."""
    for _ in range(100):
        port = random.randrange(10_000, 25_000)  # RabbitMQ's own fixed ports (25672, 35672-35682) are above
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def command(*argv: str) -> list[str]:
    """``argv`` run on the host, or inside the rootfs when WORKQUEUE_TEST_RABBITMQ_ROOT is set."""
    if not ROOTFS:
        return list(argv)
    if not (Path(ROOTFS) / str(RABBITMQ_BIN / "rabbitmq-server").lstrip("/")).exists():
        raise PrivateBrokerError(f"WORKQUEUE_TEST_RABBITMQ_ROOT={ROOTFS} has no rabbitmq-server: "
                                 "run scripts/ensure-rabbitmq4.sh")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", IN_ROOT, "sh", ROOTFS, *argv]


class PrivateBrokerError(RuntimeError):
    pass


class PrivateBroker:
    """``rabbitmq-server`` in the foreground on <free port> of every local address (127.0.0.1 for the test,
    the local cluster's ``host_ip`` for pods), user ``user``/<random password>.

    ``config`` lines are appended to its rabbitmq.conf; ``advanced`` is an Erlang term list for
    advanced.config (e.g. ``[{rabbit, [{channel_tick_interval, 1000}]}]``).
    """

    def __init__(self, *, config: list[str] | None = None, advanced: str | None = None, tls_port: bool = False,
                 cookie: str | None = None, password: str | None = None):
        self.base = Path(tempfile.mkdtemp(prefix="workqueue-rabbit-", dir="/tmp" if ROOTFS else None))
        self.port = listen_port()
        self.dist_port = listen_port()
        self.tls_port = listen_port() if tls_port else None
        self.node = f"wq-{secrets.token_hex(4)}@localhost"
        self.user = "workqueue"
        self.password = password or secrets.token_urlsafe(24)
        self.config = list(config or [])
        self.advanced = advanced
        self.process: subprocess.Popen | None = None
        for sub in ("mnesia", "log", "home"):
            (self.base / sub).mkdir()
        cookie_file = self.base / "home" / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(16))
        cookie_file.chmod(0o400)

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HOME": str(self.base / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "0.0.0.0",  # every local address: pods reach it at the cluster's host_ip
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_LOGS": str(self.base / "log" / "rabbit.log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbitmq.pid"),
        })
        if ROOTFS:
            env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
            env["ERL_EPMD_PORT"] = os.environ.get("RABBITMQ4_EPMD_PORT", "4370")
        return env

    def start(self) -> PrivateBroker:
        for attempt in range(3):
            lines = ["loopback_users = none", f"default_user = {self.user}", f"default_pass = {self.password}",
                     *self.config]
            if self.tls_port:
                lines.append(f"listeners.ssl.default = {self.tls_port}")
            conf = self.base / "rabbitmq.conf"
            conf.write_text("\n".join(lines) + "\n")
            conf.chmod(0o600)
            (self.base / "advanced.config").write_text((self.advanced or "[]") + ".\n")
            (self.base / "enabled_plugins").write_text("[].\n")
            try:
                self._spawn()
                return self
            except PrivateBrokerError as e:
                # another process bound one of our ports between choosing it and the node's listen: new ports
                if "eaddrinuse" not in str(e) or attempt == 2:
                    raise
                self.port, self.dist_port = listen_port(), listen_port()
                self.tls_port = listen_port() if self.tls_port else None
        return self

    def _spawn(self) -> None:
        out = open(self.base / "log" / "stdout.log", "ab")
        try:
            self.process = subprocess.Popen(command(str(RABBITMQ_BIN / "rabbitmq-server")), env=self.env(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        finally:
            out.close()
        self.wait_until_running()

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(command(str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args), env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def wait_until_running(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise PrivateBrokerError(f"rabbitmq-server exited {self.process.returncode}:\n{self.log_tail()}")
            if self.ctl("await_startup", "--timeout", "10", timeout=30).returncode == 0:
                return
            time.sleep(0.3)
        raise PrivateBrokerError(f"rabbitmq node {self.node} did not start in {STARTUP_TIMEOUT} s:\n{self.log_tail()}")

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (connections dropped, data kept), the Erlang VM stays."""
        result = self.ctl("stop_app")
        if result.returncode != 0:
            raise PrivateBrokerError(f"stop_app failed: {result.stderr}")

    def start_app(self) -> None:
        result = self.ctl("start_app")
        if result.returncode != 0:
            raise PrivateBrokerError(f"start_app failed: {result.stderr}")
        self.wait_until_running()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the node's whole process group (the Erlang VM and its helpers; epmd is a daemon
        of its own and is spared)."""
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the node: no clean shutdown, its data dir stays for :meth:`restart`."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(30)

    def shutdown(self) -> None:
        """Stop the node cleanly (``rabbitmqctl shutdown``: what SIGTERM to a pod does), its data kept for :meth:`restart`."""
        assert self.process is not None
        result = self.ctl("shutdown", timeout=120)
        if result.returncode != 0:
            raise PrivateBrokerError(f"shutdown of {self.node} failed: {result.stderr}")
        self.process.wait(60)

    def restart(self) -> None:
        """Start the node again on its data (after :meth:`kill` or a stop), same name and ports."""
        self._spawn()

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("stdout.log", "rabbit.log"):
            path = self.base / "log" / name
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return text

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.ctl("stop", timeout=60)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
