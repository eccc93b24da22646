"""The real node (``LocalCluster``): the kubelet, containerd, runc and CNI bridge
networking run pods from a Debian image built here, and behave as on any cluster: real exit codes, a
memory limit that OOM-kills, SIGTERM then SIGKILL after the grace period, OnFailure restarts with
back-off, activeDeadlineSeconds, a Secret in env, a missing image failing as a pull does, Services through
kube-proxy and names through CoreDNS, a NodePort from the host, and nothing left once it stops."""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from localkube import MARK_ID, LocalCluster, marked_pids
from localkube.image_build import PYTHON_IMAGE, ensure_python_image
from localkube.kubelet_node import cgroup_hierarchies
from localkube.node_images import DEBIAN_IMAGE
from localkube.node_network import OWNERS, NodeNetwork, remove_stale_networks

# the first start builds the images (debootstrap)
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600), pytest.mark.localkube_only]


@pytest.fixture(scope="module")
def node_cluster(local_cluster):
    """The session's real node."""
    print(f"\nreal node Ready {local_cluster.startup_seconds:.1f} s after the start")
    return local_cluster


@pytest.fixture(scope="module")
def core(node_cluster) -> client.CoreV1Api:
    return client.CoreV1Api(node_cluster.api_client())


@pytest.fixture
def namespace(core):
    name = f"rn-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def pod(name: str, script: str, *, restart: str = "Never", image: str = DEBIAN_IMAGE, pull: str = "IfNotPresent",
        grace: int | None = None, **container) -> dict:
    spec: dict = {"restartPolicy": restart, "containers": [
        {"name": "main", "image": image, "imagePullPolicy": pull, "command": ["bash", "-c", script], **container}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def wait_for(read, done, timeout: float = 90, what: str = "the pod"):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout} s"
        time.sleep(0.3)


def container_state(core, namespace: str, name: str):
    statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
    return statuses[0] if statuses else None


def test_a_pod_runs_in_a_container_of_the_debian_image_on_the_pod_network(node_cluster, core, namespace):
    script = 'echo "$(hostname) $(hostname -I)"; . /etc/os-release; echo "$PRETTY_NAME"; exit 3'
    core.create_namespaced_pod(namespace, pod("exit-three", script))
    status = wait_for(lambda: container_state(core, namespace, "exit-three"),
                      lambda s: s is not None and s.state.terminated is not None)
    assert (status.state.terminated.exit_code, status.state.terminated.reason) == (3, "Error")
    found = wait_for(lambda: core.read_namespaced_pod("exit-three", namespace), lambda p: p.status.phase == "Failed")
    assert found.spec.node_name == node_cluster.node_name  # placed by kube-scheduler
    node = node_cluster.kubelet_node
    assert ipaddress.ip_address(found.status.pod_ip) in ipaddress.ip_network(node.subnet)
    assert found.status.host_ip == node.node_ip
    assert node_cluster.read_pod_log(namespace, "exit-three").splitlines() == [
        f"exit-three {found.status.pod_ip} ", "Debian GNU/Linux 12 (bookworm)"]


def test_a_memory_limit_ends_in_oomkilled(core, namespace):
    hog = pod("hog", "head -c 300m /dev/zero | tail > /dev/null",
              resources={"limits": {"memory": "32Mi"}, "requests": {"memory": "32Mi"}})
    core.create_namespaced_pod(namespace, hog)
    status = wait_for(lambda: container_state(core, namespace, "hog"),
                      lambda s: s is not None and s.state.terminated is not None)
    assert status.state.terminated.reason == "OOMKilled", status.state.terminated


def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_period(node_cluster, core, namespace):
    script = "trap 'echo got SIGTERM, carrying on' TERM; echo started; while true; do sleep 0.1; done"
    core.create_namespaced_pod(namespace, pod("stubborn", script, grace=3))
    wait_for(lambda: container_state(core, namespace, "stubborn"), lambda s: s is not None and s.state.running)
    follow = subprocess.Popen([node_cluster.kubectl_path, "--kubeconfig", node_cluster.kubeconfig, "-n", namespace,
                               "logs", "-f", "stubborn"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: node_cluster.read_pod_log(namespace, "stubborn"), lambda text: "started" in text)
    deleted = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: [p.metadata.name for p in core.list_namespaced_pod(namespace).items], lambda names: not names,
             timeout=60, what="the deleted pod")
    gone = time.monotonic() - deleted
    output, _ = follow.communicate(timeout=30)
    assert "got SIGTERM, carrying on" in output  # SIGTERM first ...
    assert gone >= 3, f"the pod was gone {gone:.1f} s after the delete, before its 3 s grace period"  # ... SIGKILL after
    print(f"\ndeleted pod ignoring SIGTERM gone after {gone:.1f} s (grace 3 s)")


def test_on_failure_restarts_in_place_with_back_off(core, namespace):
    core.create_namespaced_pod(namespace, pod("crash", "echo attempt; exit 1", restart="OnFailure"))
    status = wait_for(lambda: container_state(core, namespace, "crash"),
                      lambda s: s is not None and s.restart_count >= 2, timeout=120)
    assert status.last_state.terminated.exit_code == 1
    waiting = wait_for(lambda: container_state(core, namespace, "crash"),
                       lambda s: s.state.waiting is not None, timeout=60)
    assert waiting.state.waiting.reason == "CrashLoopBackOff"


def test_a_secret_reaches_env_through_secret_key_ref(node_cluster, core, namespace):
    core.create_namespaced_secret(namespace, {"metadata": {"name": "broker"}, "stringData": {"password": "s3cr3t-value"}})
    env = [{"name": "BROKER_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "password"}}}]
    core.create_namespaced_pod(namespace, pod("reader", 'echo "password has ${#BROKER_PASSWORD} chars"', env=env))
    wait_for(lambda: container_state(core, namespace, "reader"), lambda s: s is not None and s.state.terminated)
    assert node_cluster.read_pod_log(namespace, "reader").strip() == "password has 12 chars"


@pytest.mark.parametrize(("image", "pull", "reasons"), [
    pytest.param("127.0.0.1:9/missing:1.0", "IfNotPresent", {"ErrImagePull", "ImagePullBackOff"}, id="no-registry"),
    pytest.param("localkube.local/missing:1.0", "Never", {"ErrImageNeverPull"}, id="pull-never"),
])
def test_a_missing_image_fails_as_on_any_cluster(core, namespace, image, pull, reasons):
    core.create_namespaced_pod(namespace, pod("missing", "true", image=image, pull=pull))
    status = wait_for(lambda: container_state(core, namespace, "missing"),
                      lambda s: s is not None and s.state.waiting and s.state.waiting.reason in reasons, timeout=60)
    assert image.split("/")[-1] in (status.state.waiting.message or "") or pull == "Never"


def test_active_deadline_seconds_ends_a_running_pod(core, namespace):
    sleeper = pod("overdue", "sleep 600")
    sleeper["spec"]["activeDeadlineSeconds"] = 3
    core.create_namespaced_pod(namespace, sleeper)
    found = wait_for(lambda: core.read_namespaced_pod("overdue", namespace), lambda p: p.status.phase == "Failed")
    assert found.status.reason == "DeadlineExceeded", found.status


def test_a_service_is_reached_by_name_from_a_pod_and_by_node_port_from_the_host(node_cluster, core, namespace):
    node_cluster.load_image(ensure_python_image())
    serve = "mkdir -p /srv && echo hello-from-web > /srv/index.html && cd /srv && exec python3 -m http.server 8000"
    web = pod("web", serve, image=PYTHON_IMAGE, readinessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1})
    web["metadata"]["labels"] = {"app": "web"}
    core.create_namespaced_pod(namespace, web)
    service = core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {
        "type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]}})
    wait_for(lambda: container_state(core, namespace, "web"), lambda s: s is not None and s.ready, what="the web pod")

    fqdn = f"web.{namespace}.svc.cluster.local"
    script = (f'getent hosts web | cut -d" " -f1; getent hosts {fqdn} | cut -d" " -f1; '
              'exec 3<>/dev/tcp/web/80; printf "GET / HTTP/1.0\r\n\r\n" >&3; tail -n 1 <&3')
    core.create_namespaced_pod(namespace, pod("caller", script))
    status = wait_for(lambda: container_state(core, namespace, "caller"),
                      lambda s: s is not None and s.state.terminated is not None)
    log = node_cluster.read_pod_log(namespace, "caller").split()
    assert status.state.terminated.exit_code == 0, log
    assert log == [service.spec.cluster_ip, service.spec.cluster_ip, "hello-from-web"]

    node_port = service.spec.ports[0].node_port
    with urllib.request.urlopen(f"http://{node_cluster.kubelet_node.node_ip}:{node_port}/", timeout=10) as answer:
        assert answer.read().decode().strip() == "hello-from-web"


def test_a_pod_reaches_the_host_at_the_host_address(node_cluster, core, namespace):
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the host")

        def log_message(self, *args):
            pass
    server = HTTPServer((node_cluster.kubelet_node.host_ip, 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    script = f'exec 3<>/dev/tcp/{host}/{port}; printf "GET / HTTP/1.0\\r\\n\\r\\n" >&3; tail -n 1 <&3'
    try:
        core.create_namespaced_pod(namespace, pod("caller", script))
        status = wait_for(lambda: container_state(core, namespace, "caller"),
                          lambda s: s is not None and s.state.terminated is not None)
    finally:
        server.shutdown()
    assert status.state.terminated.exit_code == 0
    assert node_cluster.read_pod_log(namespace, "caller").strip() == "hello from the host"


def test_stopping_leaves_no_container_mount_namespace_link_cgroup_or_process():
    cluster = LocalCluster().start()
    node = cluster.kubelet_node
    assert node is not None
    workdir = cluster.workdir_path
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod("default", pod("sleeper", "sleep 600"))
    wait_for(lambda: container_state(core, "default", "sleeper"), lambda s: s is not None and s.state.running)
    assert node.cgroup_pids(), "the running container is not in the node's cgroups"
    netns = node._sandbox_netns()
    assert netns and all(Path(path).exists() for path in netns)
    assert node.network.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    started = time.monotonic()
    cluster.stop()
    print(f"\nreal node stopped in {time.monotonic() - started:.1f} s")

    assert not marked_pids(MARK_ID, cluster.cluster_id), "processes of the cluster are still running"
    assert not [path for path in netns if Path(path).exists()], "pod network namespaces are left"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(workdir) not in mounts, "mounts are left under the cluster's work dir"
    network = node.network
    assert network.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert subprocess.run(["ip", "link", "show", network.host_veth], capture_output=True).returncode != 0, "the link is left"
    assert network.subnet not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert not [h for h in cgroup_hierarchies() if (h / node.cgroup_root).exists()], "the cgroup root is left"
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert node.bridge not in rules and node.subnet not in rules
    assert not workdir.exists()


def test_a_network_left_by_a_killed_launcher_is_removed_by_the_next_start():
    network = NodeNetwork(uuid.uuid4().hex[:10])
    network.create()
    try:
        assert network.netns not in remove_stale_networks()  # its launcher (this process) runs
        assert network.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        dead = subprocess.Popen(["true"])
        dead.wait()
        (OWNERS / network.netns).write_text(str(dead.pid))  # as if the launcher had been killed
        assert network.netns in remove_stale_networks()
        assert network.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert subprocess.run(["ip", "link", "show", network.host_veth], capture_output=True).returncode != 0
        assert network.subnet not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    finally:
        network.remove()
