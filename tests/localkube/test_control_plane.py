"""Faithfulness tests: the local cluster (control plane and real node) behaves like Kubernetes for what the
project uses: Jobs, StatefulSets, env resolution, kubectl, users and RBAC, a clean stop."""

from __future__ import annotations

import ipaddress
import threading
import time
import uuid

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from localkube.node_images import DEBIAN_IMAGE
from tests.conftest import WORKER_IMAGE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120), pytest.mark.localkube_only]


def wait_for(fn, timeout=60.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def api(real_cluster):
    return real_cluster.api_client()


@pytest.fixture(scope="module")
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def batch(api):
    return client.BatchV1Api(api)


@pytest.fixture
def ns(core):
    name = "t-" + uuid.uuid4().hex[:8]
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def job_manifest(name, command, *, completions=1, parallelism=1, backoff_limit=6, restart_policy="Never",
                 env=None, **spec):
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completions": completions, "parallelism": parallelism, "backoffLimit": backoff_limit, **spec,
            "template": {"spec": {"restartPolicy": restart_policy, "containers": [
                {"name": "main", "image": DEBIAN_IMAGE, "command": command, "env": env or []}]}},
        },
    }


def condition(job, ctype):
    for c in job.status.conditions or []:
        if c.type == ctype and c.status == "True":
            return c
    return None


def wait_job_condition(batch, ns, name, ctype, timeout=60):
    return wait_for(lambda: condition(batch.read_namespaced_job_status(name, ns), ctype) and
                    batch.read_namespaced_job_status(name, ns), timeout, 0.3, f"job {name} {ctype}")


# ------------------------------------------------------------------ Jobs

def test_job_completions_and_parallelism(cluster, core, batch, ns):
    running: set[str] = set()
    max_running = [0]
    stop = threading.Event()
    started = threading.Event()

    def observe():
        w = watch.Watch()
        started.set()
        for ev in w.stream(core.list_namespaced_pod, ns, label_selector="job-name=items", timeout_seconds=90):
            pod = ev["object"]
            if ev["type"] != "DELETED" and pod.status.phase == "Running":
                running.add(pod.metadata.name)
            else:
                running.discard(pod.metadata.name)
            max_running[0] = max(max_running[0], len(running))
            if stop.is_set():
                w.stop()

    t = threading.Thread(target=observe, daemon=True)
    t.start()
    started.wait(5)
    manifest = job_manifest("items", ["sh", "-c", "echo $ITEM $JOB_COMPLETION_INDEX; sleep 0.5; exit 0"],
                            completions=8, parallelism=2, completionMode="Indexed",
                            env=[{"name": "ITEM", "value": "work-item"}])
    batch.create_namespaced_job(ns, manifest)
    job = wait_job_condition(batch, ns, "items", "Complete", timeout=90)
    stop.set()
    assert job.status.succeeded == 8
    assert condition(job, "SuccessCriteriaMet") is not None
    print("max pods running at once:", max_running[0])
    assert 1 <= max_running[0] <= 2, max_running[0]
    pods = core.list_namespaced_pod(ns, label_selector="job-name=items").items
    printed = sorted(cluster.read_pod_log(ns, p.metadata.name).strip() for p in pods
                     if p.status.phase == "Succeeded")
    assert printed == [f"work-item {i}" for i in range(8)]


def test_job_backoff_limit_exceeded(core, batch, ns):
    batch.create_namespaced_job(ns, job_manifest("fails", ["sh", "-c", "exit 1"], backoff_limit=1))
    job = wait_job_condition(batch, ns, "fails", "Failed", timeout=90)
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    assert job.status.failed == 2
    pods = core.list_namespaced_pod(ns, label_selector="job-name=fails").items
    for p in pods:
        assert p.status.phase == "Failed"
        assert p.status.container_statuses[0].state.terminated.exit_code == 1
        assert p.status.container_statuses[0].state.terminated.reason == "Error"


def test_job_on_failure_restarts_in_place(cluster, core, batch, ns):
    """The same pod's container runs again (its emptyDir survives a restart in place)."""
    script = 'if [ -e "$MARKER" ]; then echo second run; exit 0; fi; touch "$MARKER"; echo first run; exit 1'
    manifest = job_manifest("flaky", ["sh", "-c", script], restart_policy="OnFailure",
                            env=[{"name": "MARKER", "value": "/scratch/marker"}])
    pod_spec = manifest["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    batch.create_namespaced_job(ns, manifest)
    job = wait_job_condition(batch, ns, "flaky", "Complete", timeout=60)
    assert job.status.succeeded == 1
    (pod,) = core.list_namespaced_pod(ns, label_selector="job-name=flaky").items
    cs = pod.status.container_statuses[0]
    assert cs.restart_count == 1
    assert cs.state.terminated.exit_code == 0 and cs.state.terminated.reason == "Completed"
    assert pod.status.phase == "Succeeded"
    # the second run found the first one's marker (the kubelet keeps no earlier run of an ended pod: its log
    # and lastState go with it; test_real_node sees lastState while a container crash-loops)
    assert cluster.read_pod_log(ns, pod.metadata.name) == "second run\n"


def test_job_active_deadline(core, batch, ns):
    manifest = job_manifest("slow", ["sleep", "300"])
    manifest["spec"]["template"]["spec"]["activeDeadlineSeconds"] = 2
    manifest["spec"]["backoffLimit"] = 0
    batch.create_namespaced_job(ns, manifest)
    wait_job_condition(batch, ns, "slow", "Failed", timeout=60)
    (pod,) = core.list_namespaced_pod(ns, label_selector="job-name=slow").items
    assert pod.status.phase == "Failed" and pod.status.reason == "DeadlineExceeded"


def test_delete_job_background_removes_pods(cluster, core, batch, ns):
    batch.create_namespaced_job(ns, job_manifest("sleeper", ["sh", "-c", "echo up; sleep 300"], parallelism=2,
                                                 completions=2))

    def running_pods():
        pods = core.list_namespaced_pod(ns, label_selector="job-name=sleeper").items
        return len([p for p in pods if p.status.phase == "Running"]) == 2 and pods

    pods = wait_for(running_pods, 60, what="2 running pods")
    for name in [p.metadata.name for p in pods]:
        wait_for(lambda name=name: cluster.read_pod_log(ns, name, "main") == "up\n", 30, what=f"{name} log")
    batch.delete_namespaced_job("sleeper", ns, propagation_policy="Background")
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector="job-name=sleeper").items, 90,
             what="pods removed")


def test_ttl_after_finished_removes_job(batch, ns):
    """The TTL controller deletes the Job once it is Complete (only finished Jobs: a 1 s TTL can delete it
    before a poll sees Complete on a loaded machine, so the Job's last state seen is checked, not timed)."""
    batch.create_namespaced_job(ns, job_manifest("ttl", ["true"], ttlSecondsAfterFinished=1))
    seen: dict = {}

    def gone():
        try:
            seen["job"] = batch.read_namespaced_job("ttl", ns)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, 90, what="job deleted by the TTL controller")
    last = seen.get("job")
    assert last is None or not any(c.type == "Failed" and c.status == "True" for c in last.status.conditions or [])


# ------------------------------------------------------------------ pods

def test_statefulset_pod_runs_and_is_ready(cluster, core, api, ns):
    port = 8080
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": port}]}})
    apps = client.AppsV1Api(api)
    apps.create_namespaced_stateful_set(ns, {
        "metadata": {"name": "web"},
        "spec": {"serviceName": "web", "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                     "name": "http", "image": WORKER_IMAGE,
                     "command": ["python3", "-m", "http.server", str(port)],
                     "ports": [{"name": "http", "containerPort": port}],
                     "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
                 }]}}},
    })

    def ready():
        try:
            pod = core.read_namespaced_pod("web-0", ns)
        except ApiException:
            return False
        ok = pod.status.phase == "Running" and any(c.type == "Ready" and c.status == "True"
                                                   for c in pod.status.conditions or [])
        return ok and pod

    pod = wait_for(ready, 60, what="web-0 Running and Ready")
    assert pod.status.container_statuses[0].ready
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(cluster.kubelet_node.subnet)
    wait_for(lambda: apps.read_namespaced_stateful_set("web", ns).status.ready_replicas == 1, 30,
             what="statefulset readyReplicas")


def test_env_resolution_reaches_the_process(cluster, core, ns):
    core.create_namespaced_secret(ns, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t",
                                                                                        "user": "bob"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"queue": "jobs", "MODE": "fast"}})
    env = [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "QUEUE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "queue"}}},
        {"name": "URL", "value": "amqp://$(QUEUE)@host/$(MISSING)/$$(QUEUE)"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GREETING", "value": "hi"},
    ]
    core.create_namespaced_pod(ns, {"metadata": {"name": "envpod"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": DEBIAN_IMAGE, "env": env,
         "envFrom": [{"prefix": "S_", "secretRef": {"name": "creds"}}, {"configMapRef": {"name": "cfg"}}],
         "args": ["sh", "-c", 'echo "$PASSWORD|$QUEUE|$URL|$POD|$S_user|$MODE|$HOSTNAME|$(QUEUE)"']},
        {"name": "greeter", "image": DEBIAN_IMAGE, "env": env + [
            {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
         "command": ["sh", "-c", 'echo "greeter in $NAMESPACE/$POD: $(GREETING)"']},
    ]}})
    wait_for(lambda: core.read_namespaced_pod("envpod", ns).status.phase == "Succeeded", 30, what="pod Succeeded")
    expected = "s3cr3t|jobs|amqp://jobs@host/$(MISSING)/$(QUEUE)|envpod|bob|fast|envpod|jobs\n"
    assert cluster.read_pod_log(ns, "envpod", "main") == expected
    assert cluster.read_pod_log(ns, "envpod", "greeter") == f"greeter in {ns}/envpod: hi\n"
    # the same logs through the API (pods/log served by the kubelet) and kubectl
    # (kubernetes-client 36 returns str(bytes) unless _preload_content=False: a client quirk, real clusters too)
    resp = core.read_namespaced_pod_log("envpod", ns, container="main", _preload_content=False)
    assert resp.data.decode() == expected
    assert cluster.kubectl("logs", "-n", ns, "envpod", "-c", "greeter").stdout == f"greeter in {ns}/envpod: hi\n"


def test_missing_secret_keeps_pod_pending(core, ns):
    core.create_namespaced_pod(ns, {"metadata": {"name": "nosecret"}, "spec": {"containers": [
        {"name": "main", "image": DEBIAN_IMAGE, "command": ["true"],
         "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}]}})

    def waiting_reason():
        st = core.read_namespaced_pod("nosecret", ns).status
        cs = st.container_statuses or []
        reason = st.phase == "Pending" and cs and cs[0].state.waiting and cs[0].state.waiting.reason
        return reason if reason == "CreateContainerConfigError" else None  # ContainerCreating comes first

    assert wait_for(waiting_reason, 30, what="CreateContainerConfigError") == "CreateContainerConfigError"


def test_kubectl_get_jobs(cluster, batch, ns):
    batch.create_namespaced_job(ns, job_manifest("listed", ["true"]))
    out = cluster.kubectl("get", "jobs", "-n", ns).stdout
    assert "listed" in out.split()
    version = cluster.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.34' in version


def test_spare_user_tokens_and_rbac(cluster, ns):
    user_core = client.CoreV1Api(cluster.api_client("user-1"))
    with pytest.raises(ApiException) as err:
        user_core.list_namespaced_pod(ns)
    assert err.value.status == 403
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(ns, {"metadata": {"name": "pods"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(ns, {"metadata": {"name": "pods"},
                                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                         "name": "pods"},
                                             "subjects": [{"kind": "User", "name": "user-1",
                                                           "apiGroup": "rbac.authorization.k8s.io"}]})
    cluster.wait_until_allowed("user-1", "list", "pods", ns)
    assert user_core.list_namespaced_pod(ns).items == []
