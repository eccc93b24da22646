"""A node agent that plays the kubelet for the local test cluster.

It registers one Ready Node (with a Lease renewed every 10 s), binds the pods
nobody else schedules (spec.nodeName empty, default scheduler, no scheduling
gates, nodeSelector matching the node's labels) through ``pods/binding``, and
runs every container of a pod bound to it as a *host process* (its own
session/process group), reporting status the way the kubelet does.

What it does:

* environment: ``env`` values with ``$(VAR)`` expansion, ``secretKeyRef``,
  ``configMapKeyRef``, ``fieldRef`` (metadata.name/namespace/uid/labels/
  annotations, spec.nodeName/serviceAccountName, status.podIP/hostIP),
  ``resourceFieldRef`` (from the container's resources), ``envFrom`` (secrets
  and configmaps, with prefix); ``command``/``args`` expanded like Kubernetes
  (``$$`` escapes, unknown references kept).  Base environment: PATH (the
  project venv's bin dir first), HOME, LANG, plus HOSTNAME=<pod name> and
  KUBERNETES_SERVICE_HOST/PORT pointing at the API server.
* images: a container without ``command`` takes its command from the image
  table (``images.py``).
* status: phase Pending -> Running -> Succeeded/Failed, conditions
  PodScheduled/Initialized/ContainersReady/Ready/PodReadyToStartContainers,
  podIP/hostIP 127.0.0.1, startTime, containerStatuses (waiting/running/
  terminated with exitCode, reason Completed/Error/StartError, startedAt,
  finishedAt, lastState, ready, restartCount, image, imageID, containerID).
  Conditions others set (DisruptionTarget, from an eviction) are kept, as the
  kubelet keeps them.
* readiness: a running container without readinessProbe is ready; exec,
  tcpSocket (127.0.0.1:port) and httpGet probes are run with their
  initialDelaySeconds/periodSeconds/timeoutSeconds/successThreshold/
  failureThreshold.  Liveness and startup probes are ignored.
* restartPolicy Always/OnFailure restart in place (restartCount, backoff
  0.5 s doubling to 10 s, state.waiting CrashLoopBackOff meanwhile); Never
  leaves the container terminated.  activeDeadlineSeconds kills the pod and
  fails it with reason DeadlineExceeded.  Init containers run in order first.
* deletion: a pod with deletionTimestamp gets SIGTERM to each container's
  process group, SIGKILL after the grace period (at most 30 s), is marked
  terminal (Failed unless it had Succeeded) and deleted with grace 0.  Finalizers
  (e.g. ``batch.kubernetes.io/job-tracking``) are never touched.
* logs: stdout+stderr of each container go to
  ``<state-dir>/logs/<namespace>/<pod>/<container>.log`` (appended across
  restarts, kept after the pod is deleted).  An HTTPS endpoint serves them to
  the API server as the kubelet does (``/containerLogs/...``), so
  ``kubectl logs`` and ``read_namespaced_pod_log`` work.

Run: ``python node_agent.py --kubeconfig K --state-dir D [--node-name N]
[--log-port P --tls-cert C --tls-key K] [--images-file F ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from localkube import images as image_table

log = logging.getLogger("node_agent")

JOB_FINALIZER = "batch.kubernetes.io/job-tracking"  # never touched
POD_IP = "127.0.0.1"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


# ---------------------------------------------------------------- expansion

def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (third_party/forked/golang/expansion)."""
    out = []
    checkpoint = 0
    cursor = 0
    n = len(value)
    while cursor < n:
        if value[cursor] == "$" and cursor + 1 < n:
            out.append(value[checkpoint:cursor])
            rest = value[cursor + 1:]
            if rest[0] == "$":
                read, is_var, advance = "$", False, 1
            elif rest[0] == "(":
                end = rest.find(")", 1)
                if end == -1:
                    read, is_var, advance = "$(", False, 1
                else:
                    read, is_var, advance = rest[1:end], True, end + 1
            else:
                read, is_var, advance = "$" + rest[0], False, 1
            if is_var:
                out.append(env[read] if read in env else "$(" + read + ")")
            else:
                out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(value[checkpoint:])
    return "".join(out)


class ConfigError(Exception):
    """Container can't be configured (missing secret/configmap key...)."""


# ---------------------------------------------------------------- API access

class Api:
    def __init__(self, kubeconfig: str):
        conf = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        conf.connection_pool_maxsize = 64
        self.client = k8s.ApiClient(conf)
        self.core = k8s.CoreV1Api(self.client)
        self.coord = k8s.CoordinationV1Api(self.client)

    @staticmethod
    def data(resp) -> dict:
        return json.loads(resp.data or b"{}")

    def get_pod(self, ns, name) -> dict:
        return self.data(self.core.read_namespaced_pod(name, ns, _preload_content=False))

    def get_secret(self, ns, name) -> dict | None:
        try:
            return self.data(self.core.read_namespaced_secret(name, ns, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_configmap(self, ns, name) -> dict | None:
        try:
            return self.data(self.core.read_namespaced_config_map(name, ns, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise


# ---------------------------------------------------------------- environment

def _field_ref(pod: dict, path: str) -> str:
    md = pod.get("metadata", {})
    spec = pod.get("spec", {})
    if path == "metadata.name":
        return md.get("name", "")
    if path == "metadata.namespace":
        return md.get("namespace", "")
    if path == "metadata.uid":
        return md.get("uid", "")
    if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
        kind, key = path.split("['", 1)
        key = key.rstrip("]").rstrip("'")
        return (md.get(kind.split(".", 1)[1]) or {}).get(key, "")
    if path == "spec.nodeName":
        return spec.get("nodeName", "")
    if path == "spec.serviceAccountName":
        return spec.get("serviceAccountName", "")
    if path in ("status.podIP", "status.hostIP"):
        return POD_IP
    if path in ("status.podIPs", "status.hostIPs"):
        return POD_IP
    raise ConfigError(f"unsupported fieldRef {path}")


def _resource_ref(container: dict, ref: dict) -> str:
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if value is None:
        value = {"cpu": str(os.cpu_count() or 1), "memory": "24Gi"}.get(name, "0")
    return str(value)


def resolve_env(api: Api, pod: dict, container: dict, base: dict[str, str]) -> dict[str, str]:
    ns = pod["metadata"]["namespace"]
    cache: dict[tuple[str, str], dict | None] = {}

    def fetch(kind: str, name: str):
        key = (kind, name)
        if key not in cache:
            cache[key] = api.get_secret(ns, name) if kind == "secret" else api.get_configmap(ns, name)
        return cache[key]

    def value_of(kind, obj, key):
        if kind == "secret":
            import base64
            raw = (obj.get("data") or {}).get(key)
            return None if raw is None else base64.b64decode(raw).decode("utf-8", "replace")
        v = (obj.get("data") or {}).get(key)
        if v is None and key in (obj.get("binaryData") or {}):
            import base64
            v = base64.b64decode(obj["binaryData"][key]).decode("utf-8", "replace")
        return v

    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, field in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = src.get(field)
            if not ref:
                continue
            obj = fetch(kind, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind} "{ref.get("name")}" not found')
            keys = list((obj.get("data") or {}).keys()) + list((obj.get("binaryData") or {}).keys())
            for key in keys:
                env[prefix + key] = value_of(kind, obj, key) or ""
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item or item.get("value"):
            env[name] = expand(item["value"], {**base, **env}) if item.get("value") else ""
            continue
        vf = item["valueFrom"]
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            kind, ref = ("secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("configmap", vf["configMapKeyRef"])
            obj = fetch(kind, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind} "{ref.get("name")}" not found')
            v = value_of(kind, obj, ref["key"])
            if v is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {ns}/{ref.get("name")}')
            env[name] = v
        elif "fieldRef" in vf:
            env[name] = _field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = _resource_ref(container, vf["resourceFieldRef"])
        else:
            raise ConfigError(f"unsupported valueFrom for {name}")
    return env


# ---------------------------------------------------------------- containers

class Container:
    def __init__(self, spec: dict, init: bool = False):
        self.spec = spec
        self.name = spec["name"]
        self.image = spec.get("image", "")
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.restart_count = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.ready = False
        self.started_at: str | None = None
        self.next_start = 0.0
        self.backoff = 0.5
        self.done = False  # will not run again
        self.exit_code: int | None = None
        self.started_once = False
        # readiness probe bookkeeping
        self.probe_next = 0.0
        self.probe_ok = 0
        self.probe_fail = 0

    def status(self) -> dict:
        st = {
            "name": self.name,
            "image": self.image,
            "imageID": "host-process://" + image_table.normalize(self.image),
            "containerID": f"host-process://{self.pgid}" if self.pgid else None,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": bool(self.proc is not None and "running" in self.state),
            "state": self.state,
            "lastState": self.last_state,
        }
        if st["containerID"] is None:
            del st["containerID"]
        return st


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class PodWorker(threading.Thread):
    def __init__(self, agent: Agent, pod: dict):
        md = pod["metadata"]
        super().__init__(name=f"pod-{md['namespace']}/{md['name']}", daemon=True)
        self.agent = agent
        self.api = agent.api
        self.uid = md["uid"]
        self.ns = md["namespace"]
        self.pod_name = md["name"]
        self.pod = pod
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.gone = False
        spec = pod.get("spec", {})
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self.phase = (pod.get("status") or {}).get("phase") or "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time = (pod.get("status") or {}).get("startTime")
        self.conditions: dict[str, dict] = {}
        self.pod_dir = agent.state_dir / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        self.log_dir = agent.state_dir / "logs" / self.ns / self.pod_name
        self.last_pushed: str | None = None
        self.init_index = 0

    # -- events from the watch
    def update(self, pod: dict) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def deleted(self) -> None:
        self.gone = True
        self.wake.set()

    # -- helpers
    def all_containers(self):
        return self.init_containers + self.containers

    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def set_condition(self, ctype: str, value: bool, reason: str | None = None) -> None:
        status = "True" if value else "False"
        old = self.conditions.get(ctype)
        if old and old["status"] == status and old.get("reason") == reason:
            return
        cond = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now()}
        if reason:
            cond["reason"] = reason
        self.conditions[ctype] = cond

    def base_env(self) -> dict[str, str]:
        host_path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env = {
            "PATH": f"{self.agent.venv_bin}{os.pathsep}{host_path}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": self.pod_name,
        }
        for key in ("TMPDIR", "TZ", "USER", "LOGNAME", "LC_ALL"):
            if key in os.environ:
                env[key] = os.environ[key]
        if self.agent.api_host:
            env["KUBERNETES_SERVICE_HOST"] = self.agent.api_host
            env["KUBERNETES_SERVICE_PORT"] = str(self.agent.api_port)
        return env

    @staticmethod
    def fill(value: str, ph: dict[str, str]) -> str:
        """Replace the known {placeholders} only (other braces, e.g. shell ${X}, stay)."""
        return re.sub(r"\{(" + "|".join(ph) + r")\}", lambda m: ph[m.group(1)], value)

    def placeholders(self, c: Container) -> dict[str, str]:
        return {
            "repo": self.agent.repo,
            "python": sys.executable,
            "venv_bin": self.agent.venv_bin,
            "pod_dir": str(self.pod_dir),
            "pod": self.pod_name,
            "namespace": self.ns,
            "container": c.name,
        }

    def build_command(self, c: Container) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and cwd of a container; may raise ConfigError."""
        with self.lock:
            pod = self.pod
        spec = c.spec
        ph = self.placeholders(c)
        env = self.base_env()
        entry = None
        if not spec.get("command"):
            entry = self.agent.images.lookup(c.image)
            if entry is None:
                raise ConfigError(f"ErrImagePull:image {c.image!r} is not in the node agent's image table "
                                  "(give the container a command or register the image)")
            for k, v in (entry.get("env") or {}).items():
                env[k] = self.fill(v, ph)
        # like the kubelet, $(VAR) sees the pod's own variables and the service variables only
        service_env = {k: v for k, v in env.items() if k.startswith("KUBERNETES_")}
        pod_env = resolve_env(self.api, pod, spec, service_env)
        env.update(pod_env)
        visible = {**service_env, **pod_env}
        if spec.get("command"):
            argv = list(spec["command"]) + list(spec.get("args") or [])
        else:
            assert entry is not None  # looked up above when the spec has no command
            ep = [self.fill(a, ph) for a in entry.get("entrypoint") or []]
            args = list(spec["args"]) if spec.get("args") else [self.fill(a, ph) for a in entry.get("cmd") or []]
            argv = ep + args
        argv = [expand(a, visible) for a in argv]
        if not argv:
            raise ConfigError("RunContainerError:no command specified")
        cwd = spec.get("workingDir") or self.fill((entry or {}).get("workingDir", ""), ph)
        if not cwd or not os.path.isdir(cwd):
            cwd = str(self.pod_dir)
        # markers that let the launcher find leftover processes (see processes.py)
        env["WORKQUEUE_CLUSTER_ID"] = self.agent.cluster_id
        if "WORKQUEUE_CLUSTER_OWNER" in os.environ:
            env["WORKQUEUE_CLUSTER_OWNER"] = os.environ["WORKQUEUE_CLUSTER_OWNER"]
        return argv, env, cwd

    def start_container(self, c: Container) -> None:
        try:
            argv, env, cwd = self.build_command(c)
        except ConfigError as e:
            msg = str(e)
            known = msg.startswith(("ErrImagePull:", "RunContainerError:"))
            reason, _, text = msg.partition(":") if known else ("CreateContainerConfigError", "", msg)
            c.state = {"waiting": {"reason": reason, "message": text or msg}}
            c.next_start = time.time() + 2.0
            return
        except ApiException as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": f"API error {e.status}"}}
            c.next_start = time.time() + 2.0
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{c.name}.log", "ab", buffering=0)
        try:
            c.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=logf,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            logf.write(f"node-agent: failed to start {argv!r}: {e}\n".encode())
            logf.close()
            t = now()
            self.container_exited(c, 128, "StartError", t, t, message=str(e))
            return
        logf.close()
        c.pgid = c.proc.pid
        self.agent.track_pgid(c.pgid)
        c.started_at = now()
        c.started_once = True
        c.state = {"running": {"startedAt": c.started_at}}
        c.probe_next = time.time() + float((c.spec.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
        c.probe_ok = c.probe_fail = 0
        c.ready = not c.spec.get("readinessProbe") and not c.init
        log.info("started %s/%s[%s]: %s (pid %s)", self.ns, self.pod_name, c.name, argv, c.proc.pid)

    def container_exited(self, c: Container, code: int, reason: str, started: str, finished: str, message=None):
        term = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished,
                "containerID": f"host-process://{c.pgid or 0}"}
        if message:
            term["message"] = message
        c.exit_code = code
        c.ready = False
        c.proc = None
        policy = self.restart_policy
        restart = policy == "Always" or (policy == "OnFailure" and code != 0)
        if c.init and code == 0:
            restart = False
        if restart and not self.deleting():
            c.last_state = {"terminated": term}
            c.restart_count += 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {c.backoff:g}s restarting failed container"}}
            c.next_start = time.time() + c.backoff
            c.backoff = min(c.backoff * 2, 10.0)
        else:
            c.state = {"terminated": term}
            c.done = True

    def poll(self, c: Container) -> None:
        if c.proc is None:
            return
        code = c.proc.poll()
        if code is None:
            return
        if code < 0:
            code = 128 - code
        if c.pgid:
            kill_group(c.pgid, signal.SIGKILL)  # leftovers of the container's session
            self.agent.untrack_pgid(c.pgid)
        self.container_exited(c, code, "Completed" if code == 0 else "Error", c.started_at or now(), now())

    def probe(self, c: Container) -> None:
        spec = c.spec.get("readinessProbe")
        if c.init or "running" not in c.state:
            return
        if not spec:
            c.ready = True
            return
        t = time.time()
        if t < c.probe_next:
            return
        c.probe_next = t + float(spec.get("periodSeconds", 10))
        timeout = float(spec.get("timeoutSeconds", 1))
        ok = False
        try:
            if "exec" in spec:
                argv, env, cwd = self.build_command(c)
                cmd = [expand(a, env) for a in spec["exec"].get("command") or []]
                ok = subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
            elif "tcpSocket" in spec:
                port = self.port_of(c, spec["tcpSocket"]["port"])
                with socket.create_connection((spec["tcpSocket"].get("host") or POD_IP, port), timeout=timeout):
                    ok = True
            elif "httpGet" in spec:
                hg = spec["httpGet"]
                port = self.port_of(c, hg["port"])
                scheme = hg.get("scheme", "HTTP").lower()
                url = f"{scheme}://{hg.get('host') or POD_IP}:{port}{hg.get('path', '/')}"
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                    ok = 200 <= r.status < 400
            else:
                ok = True  # grpc probes: not simulated
        except Exception:
            ok = False
        if ok:
            c.probe_ok += 1
            c.probe_fail = 0
            if c.probe_ok >= int(spec.get("successThreshold", 1)):
                c.ready = True
        else:
            c.probe_fail += 1
            c.probe_ok = 0
            if c.probe_fail >= int(spec.get("failureThreshold", 3)):
                c.ready = False

    @staticmethod
    def port_of(c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port}")

    def deleting(self) -> bool:
        with self.lock:
            return bool(self.pod["metadata"].get("deletionTimestamp")) or self.gone

    def kill_all(self, grace: float) -> None:
        running = [c for c in self.all_containers() if c.proc is not None]
        for c in running:
            kill_group(c.pgid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(c.proc.poll() is None for c in running):
            time.sleep(0.1)
        for c in running:
            kill_group(c.pgid, signal.SIGKILL)
            try:
                c.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            code = c.proc.returncode
            code = 128 - code if code is not None and code < 0 else (code if code is not None else 137)
            self.agent.untrack_pgid(c.pgid)
            c.proc = None
            c.ready = False
            c.exit_code = code
            c.done = True
            c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "startedAt": c.started_at or now(), "finishedAt": now(),
                                      "containerID": f"host-process://{c.pgid}"}}
        for c in self.all_containers():
            if c.proc is None and "terminated" not in c.state:
                c.done = True
                c.state = {"terminated": {"exitCode": 137 if c.started_once else 0,
                                          "reason": "ContainerStatusUnknown" if not c.started_once else "Error",
                                          "startedAt": c.started_at or now(), "finishedAt": now()}}

    # -- status
    def compute_phase(self) -> None:
        if self.terminal():
            return
        inits_done = all(c.done and c.exit_code == 0 for c in self.init_containers)
        init_failed = any(c.done and c.exit_code != 0 for c in self.init_containers)
        if init_failed:
            self.phase = "Failed"
            return
        if not inits_done:
            self.phase = "Pending"
            return
        if all(c.done for c in self.containers):
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"
        elif any(c.proc is not None or c.started_once for c in self.containers):
            self.phase = "Running"
        else:
            self.phase = "Pending"

    def build_status(self) -> dict:
        inits_done = all(c.done and c.exit_code == 0 for c in self.init_containers)
        all_ready = bool(self.containers) and all(c.ready for c in self.containers) and not self.terminal()
        self.set_condition("PodReadyToStartContainers", not self.terminal())
        self.set_condition("PodScheduled", True)
        self.set_condition("Initialized", inits_done or self.terminal() and not self.init_containers)
        ready_reason = None if all_ready else ("PodCompleted" if self.terminal() else "ContainersNotReady")
        self.set_condition("ContainersReady", all_ready, ready_reason)
        self.set_condition("Ready", all_ready, ready_reason)
        order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
        status = {
            "phase": self.phase,
            "conditions": [self.conditions[t] for t in order if t in self.conditions],
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        return status

    def push_status(self) -> None:
        status = self.build_status()
        key = json.dumps(status, sort_keys=True, default=str)
        if key == self.last_pushed:
            return
        for attempt in range(20):
            with self.lock:
                pod = self.pod
            body = dict(pod)
            merged = dict(pod.get("status") or {})
            for k in ("reason", "message"):
                merged.pop(k, None)
            # like the kubelet, keep the conditions others own (DisruptionTarget, set by an eviction)
            own = {c["type"] for c in status["conditions"]}
            others = [c for c in merged.get("conditions") or [] if c.get("type") not in own]
            merged.update(status)
            merged["conditions"] = status["conditions"] + others
            body["status"] = merged
            try:
                resp = self.api.core.replace_namespaced_pod_status(self.pod_name, self.ns, body,
                                                                   _preload_content=False)
                fresh = Api.data(resp)
                with self.lock:
                    if int(fresh["metadata"]["resourceVersion"]) >= int(self.pod["metadata"]["resourceVersion"]):
                        self.pod = fresh
                self.last_pushed = key
                return
            except ApiException as e:
                if e.status == 409:
                    try:
                        fresh = self.api.get_pod(self.ns, self.pod_name)
                    except ApiException as e2:
                        if e2.status == 404:
                            self.gone = True
                            return
                        time.sleep(0.2)
                        continue
                    if fresh["metadata"]["uid"] != self.uid:
                        self.gone = True
                        return
                    with self.lock:
                        self.pod = fresh
                    continue
                if e.status == 404:
                    self.gone = True
                    return
                log.warning("status update of %s/%s failed: %s", self.ns, self.pod_name, e)
                time.sleep(min(0.2 * (attempt + 1), 2))
            except Exception as e:  # connection trouble
                log.warning("status update of %s/%s failed: %s", self.ns, self.pod_name, e)
                time.sleep(min(0.2 * (attempt + 1), 2))

    def delete_now(self) -> None:
        try:
            self.api.core.delete_namespaced_pod(
                self.pod_name, self.ns, grace_period_seconds=0,
                body=k8s.V1DeleteOptions(grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=self.uid)),
                _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("delete of %s/%s failed: %s", self.ns, self.pod_name, e)

    # -- main loop
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s/%s crashed", self.ns, self.pod_name)
            self.kill_all(0)
        finally:
            self.agent.worker_done(self)

    def _run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        if self.terminal():
            # already finished (agent restart): only deletion matters
            for c in self.all_containers():
                c.done = True
        else:
            if not self.start_time:
                self.start_time = now()
            self.push_status()
        spec = self.pod.get("spec", {})
        deadline = spec.get("activeDeadlineSeconds")
        while not self.agent.stopping.is_set():
            if self.gone:
                self.kill_all(0)
                return
            if self.deleting():
                with self.lock:
                    grace = self.pod["metadata"].get("deletionGracePeriodSeconds", 30)
                self.kill_all(min(float(grace or 0), 30.0))
                if not self.terminal():
                    self.compute_phase()
                    if not self.terminal():
                        self.phase = "Failed"
                self.push_status()
                self.delete_now()
                return
            if self.terminal():
                self.wake.wait(5)
                self.wake.clear()
                continue
            if deadline is not None and self.start_time and time.time() - parse_time(self.start_time) >= float(deadline):
                self.kill_all(0)
                self.phase = "Failed"
                self.reason = "DeadlineExceeded"
                self.message = "Pod was active on the node longer than the specified deadline"
                self.push_status()
                continue
            # init containers in order, then the rest together
            t = time.time()
            inits_pending = [c for c in self.init_containers if not (c.done and c.exit_code == 0)]
            if inits_pending:
                c = inits_pending[0]
                self.poll(c)
                if c.proc is None and not c.done and t >= c.next_start:
                    self.start_container(c)
            else:
                for c in self.containers:
                    self.poll(c)
                    if c.proc is None and not c.done and t >= c.next_start:
                        self.start_container(c)
                    self.probe(c)
            self.compute_phase()
            if self.terminal():
                self.kill_all(0)  # e.g. a failed init container
            self.push_status()
            self.wake.wait(0.2)
            self.wake.clear()


# ---------------------------------------------------------------- log server

class LogHandler(http.server.BaseHTTPRequestHandler):
    agent: Agent
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        log.debug("logserver: " + fmt, *args)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts[:1] == ["healthz"]:
            return self._send(200, b"ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._send(404, b"not found")
        _, ns, pod, container = parts
        q = urllib.parse.parse_qs(url.query)
        tail = int(q["tailLines"][0]) if "tailLines" in q else None
        limit = int(q["limitBytes"][0]) if "limitBytes" in q else None
        follow = q.get("follow", ["false"])[0] == "true"
        path = self.agent.state_dir / "logs" / ns / pod / f"{container}.log"
        if not path.exists():
            return self._send(404, f"no logs for {ns}/{pod}/{container}".encode())
        data = path.read_bytes()
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail > 0 else b""
        if limit is not None:
            data = data[:limit]
        if not follow:
            return self._send(200, data)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pos = path.stat().st_size
        try:
            self._chunk(data)
            while not self.agent.stopping.is_set():
                size = path.stat().st_size
                if size > pos:
                    with open(path, "rb") as fh:
                        fh.seek(pos)
                        chunk = fh.read(size - pos)
                    pos = size
                    self._chunk(chunk)
                elif not self.agent.container_running(ns, pod, container):
                    break
                else:
                    time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chunk(self, data: bytes):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------- agent

class Agent:
    def __init__(self, kubeconfig: str, state_dir: str, node_name: str, images_files: list[str],
                 log_port: int | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 cluster_id: str = "", api_host: str = "", api_port: int = 0, repo: str = ""):
        self.api = Api(kubeconfig)
        self.repo = str(Path(repo or os.getcwd()).resolve())  # what {repo} in an image entry names
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        self.images = image_table.ImageTable(images_files)
        self.log_port = log_port
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.cluster_id = cluster_id or os.environ.get("WORKQUEUE_CLUSTER_ID", "")
        self.api_host, self.api_port = api_host, api_port
        self.venv_bin = os.path.dirname(sys.executable)
        self.stopping = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.pgids: set[int] = set()
        self.pgid_file = self.state_dir / "agent" / "pgids"
        self.pgid_file.parent.mkdir(parents=True, exist_ok=True)
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "host-process",
        }

    # pgids are written to a file so the launcher can kill leftovers even if the agent dies
    def track_pgid(self, pgid: int):
        with self.workers_lock:
            self.pgids.add(pgid)
            self._write_pgids()

    def untrack_pgid(self, pgid: int):
        with self.workers_lock:
            self.pgids.discard(pgid)
            self._write_pgids()

    def _write_pgids(self):
        tmp = self.pgid_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{p}\n" for p in sorted(self.pgids)))
        os.replace(tmp, self.pgid_file)

    def container_running(self, ns, pod, container) -> bool:
        with self.workers_lock:
            workers = [w for w in self.workers.values() if w.ns == ns and w.pod_name == pod]
        return any(c.proc is not None or not c.done for w in workers for c in w.all_containers()
                   if c.name == container)

    def worker_done(self, w: PodWorker):
        with self.workers_lock:
            if self.workers.get(w.uid) is w:
                del self.workers[w.uid]

    # -- node + lease
    def register_node(self):
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name, "labels": self.labels}}
        try:
            self.api.core.create_node(body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
        # TaintNodesByCondition adds a not-ready taint at creation; the node is ready.
        node = Api.data(self.api.core.read_node(self.node_name, _preload_content=False))
        if node.get("spec", {}).get("taints"):
            node["spec"]["taints"] = []
            self.api.core.replace_node(self.node_name, node, _preload_content=False)
        self.update_node_status()

    def update_node_status(self):
        t = now()

        def cond(ctype, status, reason, message):
            return {"type": ctype, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": t}

        capacity = {"cpu": str(os.cpu_count() or 2), "memory": "24Gi", "pods": "250", "ephemeral-storage": "100Gi"}
        status = {"status": {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "host-process node agent"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "host-process node agent"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "host-process node agent"),
                cond("Ready", "True", "KubeletReady", "workqueue node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node_name}],
            "capacity": capacity, "allocatable": capacity,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": int(self.log_port or 0)}},
            "nodeInfo": {"machineID": "workqueue", "systemUUID": "workqueue", "bootID": self.cluster_id or "boot",
                         "kernelVersion": os.uname().release, "osImage": "host processes",
                         "containerRuntimeVersion": "host-process://1", "kubeletVersion": "v0.0.0-workqueue-node-agent",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }}
        self.api.core.patch_node_status(self.node_name, status, _preload_content=False)

    def lease_loop(self):
        ns = "kube-node-lease"
        beats = 0
        while not self.stopping.wait(0 if beats == 0 else 10):
            beats += 1
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.node_name, "namespace": ns},
                    "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                             "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
            try:
                try:
                    cur = Api.data(self.api.coord.read_namespaced_lease(self.node_name, ns, _preload_content=False))
                    cur["spec"] = body["spec"]
                    self.api.coord.replace_namespaced_lease(self.node_name, ns, cur, _preload_content=False)
                except ApiException as e:
                    if e.status != 404:
                        raise
                    self.api.coord.create_namespaced_lease(ns, body, _preload_content=False)
                if beats % 4 == 0:
                    self.update_node_status()
            except Exception as e:
                log.warning("lease renewal failed: %s", e)

    # -- scheduling
    def bind(self, pod: dict):
        md, spec = pod["metadata"], pod.get("spec", {})
        if spec.get("schedulingGates"):
            return
        selector = spec.get("nodeSelector") or {}
        if any(self.labels.get(k) != v for k, v in selector.items()):
            return  # unschedulable here; stays Pending like with a real scheduler
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": md["name"], "namespace": md["namespace"], "uid": md["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            self.api.core.create_namespaced_pod_binding(md["name"], md["namespace"], body, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("bind of %s/%s failed: %s", md["namespace"], md["name"], e)

    def handle(self, etype: str, pod: dict):
        md, spec = pod["metadata"], pod.get("spec", {})
        uid = md["uid"]
        if etype == "DELETED":
            with self.workers_lock:
                w = self.workers.get(uid)
            if w:
                w.deleted()
            return
        node = spec.get("nodeName")
        if not node:
            if (spec.get("schedulerName") or "default-scheduler") == "default-scheduler" and not md.get("deletionTimestamp"):
                self.bind(pod)
            return
        if node != self.node_name:
            return
        with self.workers_lock:
            w = self.workers.get(uid)
            if w is None:
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed") and not md.get("deletionTimestamp"):
                    # finished before we (re)started; nothing to run. Deletion handled below.
                    pass
                w = PodWorker(self, pod)
                self.workers[uid] = w
                w.start()
                return
        w.update(pod)

    def watch_pods(self):
        from kubernetes.watch.watch import iter_resp_lines
        rv = None
        while not self.stopping.is_set():
            try:
                if rv is None:
                    lst = Api.data(self.api.core.list_pod_for_all_namespaces(_preload_content=False))
                    rv = lst["metadata"]["resourceVersion"]
                    seen = set()
                    for pod in lst.get("items") or []:
                        seen.add(pod["metadata"]["uid"])
                        self.handle("ADDED", pod)
                    with self.workers_lock:
                        missing = [w for uid, w in self.workers.items() if uid not in seen]
                    for w in missing:
                        w.deleted()
                resp = self.api.core.list_pod_for_all_namespaces(
                    watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=120,
                    _preload_content=False, _request_timeout=(5, 150))
                try:
                    for line in iter_resp_lines(resp):
                        if self.stopping.is_set():
                            break
                        if not line:
                            continue
                        ev = json.loads(line)
                        etype, obj = ev.get("type"), ev.get("object") or {}
                        if etype == "ERROR":
                            if obj.get("code") == 410:
                                rv = None  # expired: re-list
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if etype == "BOOKMARK":
                            continue
                        self.handle(etype, obj)
                finally:
                    resp.release_conn()
            except ApiException as e:
                if e.status == 410:
                    rv = None
                else:
                    log.warning("pod watch failed: %s", e)
                    time.sleep(1)
            except Exception as e:
                if self.stopping.is_set():
                    break
                log.warning("pod watch dropped: %s", e)
                time.sleep(0.5)

    def serve_logs(self):
        if not self.log_port:
            return
        handler = type("Handler", (LogHandler,), {"agent": self})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.log_port), handler)
        server.daemon_threads = True
        if self.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name="logserver", daemon=True).start()
        self.log_server = server

    def run(self):
        self.serve_logs()
        self.register_node()
        threading.Thread(target=self.lease_loop, name="lease", daemon=True).start()
        (self.state_dir / "agent" / "ready").write_text(str(os.getpid()))
        log.info("node %s registered; watching pods", self.node_name)
        watcher = threading.Thread(target=self.watch_pods, name="watch", daemon=True)
        watcher.start()
        self.stopping.wait()
        self.shutdown()

    def shutdown(self):
        with self.workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            for c in w.all_containers():
                if c.pgid:
                    kill_group(c.pgid, signal.SIGTERM)
        deadline = time.time() + 5
        with self.workers_lock:
            pgids = set(self.pgids)
        while time.time() < deadline and any(group_alive(p) for p in pgids):
            time.sleep(0.1)
        for p in pgids:
            kill_group(p, signal.SIGKILL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--node-name", default="workqueue-node")
    p.add_argument("--images-file", action="append", default=[])
    p.add_argument("--log-port", type=int)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--cluster-id", default="")
    p.add_argument("--api-host", default="")
    p.add_argument("--api-port", type=int, default=0)
    p.add_argument("--repo", default=os.getcwd(), help="what {repo} in an image entry names")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    agent = Agent(a.kubeconfig, a.state_dir, a.node_name, a.images_file, a.log_port, a.tls_cert, a.tls_key,
                  a.cluster_id, a.api_host, a.api_port, a.repo)

    def stop(signum, frame):
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


if __name__ == "__main__":
    main()
