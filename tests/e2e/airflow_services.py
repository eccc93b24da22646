"""Airflow 3 as users run it, for the browser test: api-server (REST API + UI), scheduler,
dag-processor and triggerer as subprocesses on loopback, with an isolated AIRFLOW_HOME, SQLite
metadata, LocalExecutor, and Simple auth manager with one admin user and a password file.

Each process gets its own session (process group); :meth:`AirflowServices.stop` signals the groups
and then kills whatever descendant is still alive, so nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


class AirflowError(RuntimeError):
    """Airflow didn't start or didn't answer; the message carries the log tails."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowServices:
    """``with AirflowServices(home, kubeconfig=..., amqp_url=...) as airflow:`` starts everything and
    waits until the API server answers and the scheduler, DAG processor and triggerer report healthy."""

    def __init__(self, home: Path, *, kubeconfig: str, amqp_url: str, user: str = "admin", password: str = "admin",
                 dags_folder: Path = REPO / "dags") -> None:
        self.home = Path(home)
        self.user, self.password = user, password
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = self.home / "service-logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.killed: list[str] | None = None  # after __exit__: the processes that needed SIGKILL (none, if all is well)
        self._token: str | None = None
        passwords = self.home / "passwords.json"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            # This checkout's provider first, whatever the venv's editable install points at.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "provider"), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",  # works with SQLite in Airflow 3
            "AIRFLOW__CORE__PARALLELISM": "4",  # 2 shared cores: few task processes at once
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # Task processes call the API server; on 2 busy cores with SQLite its answers can take longer
            # than the default 5 s, which fails the attempt. A hang guard, not a speed requirement.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__SECRET_KEY": "workqueue-e2e-secret",
            "AIRFLOW__API_AUTH__JWT_SECRET": "workqueue-e2e-" + "jwt-secret-" * 6,  # >= 64 bytes for HS512
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            # Only the runs the test triggers: no scheduled run when the DAG is unpaused.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # The log servers default to fixed ports (8793, 8794): free ones, so parallel runs don't clash.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes",
                                                          "extra": {"kube_config_path": kubeconfig}}),
            "AIRFLOW_CONN_AMQP_DEFAULT": amqp_url,
        }
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        passwords.write_text(json.dumps({user: password}))

    # -- processes ---------------------------------------------------------------------------------

    def airflow_command(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / "airflow"), *args]

    def migrate(self) -> None:
        result = subprocess.run(self.airflow_command("db", "migrate"), env=self.env, capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise AirflowError(f"airflow db migrate failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")

    def start(self) -> None:
        self.migrate()
        for name, args in COMPONENTS.items():
            log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
            self.processes[name] = subprocess.Popen(
                self.airflow_command(*(a.format(port=self.port) for a in args)), env=self.env, cwd=self.home,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()

    def stop(self, grace: float = 20) -> list[str]:
        """Stop every process group; returns the commands of processes that had to be killed."""
        everyone: list[psutil.Process] = []
        for process in self.processes.values():
            try:
                parent = psutil.Process(process.pid)
                everyone += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(everyone, timeout=grace)
        killed = []
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGKILL)
        for straggler in alive:
            try:
                killed.append(" ".join(straggler.cmdline()[:4]))
                straggler.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for process in self.processes.values():
            process.wait(timeout=10)
        return killed

    def kill(self, name: str) -> None:
        """SIGKILL one component and its children (its process group), as a node loss or the OOM killer would."""
        _signal_group(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def start_component(self, name: str) -> None:
        """Start one component again (after :meth:`kill`); its log is appended to."""
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed when the process ends
        self.processes[name] = subprocess.Popen(
            self.airflow_command(*(a.format(port=self.port) for a in COMPONENTS[name])), env=self.env, cwd=self.home,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def pids(self) -> set[int]:
        """Every process Airflow started that is still alive (the services and their children)."""
        found = set()
        for process in self.processes.values():
            try:
                parent = psutil.Process(process.pid)
                found |= {p.pid for p in [parent, *parent.children(recursive=True)] if p.status() != psutil.STATUS_ZOMBIE}
            except psutil.NoSuchProcess:
                pass
        return found

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        for name in self.processes:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            parts.append(f"--- {name} (exit {self.processes[name].poll()}) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AirflowError(f"airflow {name} exited with {process.returncode}:\n{self.log_tails()}")

    def wait_until(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 2) -> Any:
        """Poll ``probe`` until it returns something truthy; fail naming ``what`` (with the logs)
        when a service dies or ``timeout`` passes. A hang guard, not a timed assertion."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            self.check_alive()
            try:
                result = probe()
                if result:
                    return result
            except (httpx.HTTPError, AirflowError, KeyError, ValueError) as e:
                last_error = e
            if time.monotonic() > deadline:
                raise AirflowError(f"Timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r}).\n"
                                   f"{self.log_tails()}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 300) -> None:
        def healthy() -> bool:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=10).json()
            return all(health.get(c, {}).get("status") == "healthy"
                       for c in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

        self.wait_until("the API server and a healthy scheduler, triggerer and DAG processor", healthy, timeout)

    def __enter__(self) -> AirflowServices:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.killed = self.stop()

    # -- REST API ----------------------------------------------------------------------------------

    def token(self) -> str:
        if self._token is None:
            response = httpx.post(f"{self.url}/auth/token", json={"username": self.user, "password": self.password},
                                  timeout=30)
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        response = httpx.request(method, f"{self.url}/api/v2{path}", headers=headers, timeout=60, **kwargs)
        response.raise_for_status()
        return response


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
