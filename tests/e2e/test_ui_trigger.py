"""The path users take: the Airflow UI in a real browser triggers the example DAG with changed Params.

Airflow's api-server (UI), scheduler, dag-processor and triggerer run as subprocesses
(tests/e2e/airflow_services.py); headless Chromium (Debian's, driven by Playwright) signs in,
unpauses the DAG, fills the trigger form with new items and parallelism, and submits it. The run
goes through the real broker and the local control plane; the test then reads the task logs and
the extra link through the REST API, and the workers' output through the API (pods/log).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from urllib.parse import quote

import psutil
import pytest
from kubernetes import client

from localkube.node_images import with_command
from tests.conftest import WORKER_IMAGE, worker_image
from tests.e2e.airflow_services import REPO, AirflowServices
from workqueue_provider.amqp.connection import BrokerSettings

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(1500)]

DAG_ID = "work_queue_example"
ITEMS = ["kiwi", "mango", "papaya"]  # not the DAG's defaults
PARALLELISM = 3
SCREENSHOT = REPO / "artifacts" / "ui-run-succeeded.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 180_000  # per browser action: a hang guard on 2 shared cores, not a speed check
RUN_TIMEOUT = 900
SLEEPER = "localkube.local/sleeper:1.0"  # a worker image that never finishes its item


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get if missing. Fails, never skips."""
    result = subprocess.run([str(REPO / "scripts/ensure-chromium.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"Chromium could not be installed for the browser test:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def airflow(pod_broker_url, real_cluster, tmp_path_factory):
    """Airflow's services for this module's tests; on exit, checks that every process stopped on SIGTERM
    (stop() SIGKILLs the rest, so checking for survivors afterwards alone would always pass) and none is left."""
    started = time.monotonic()
    services = AirflowServices(tmp_path_factory.mktemp("airflow"), kubeconfig=str(real_cluster.kubeconfig),
                               amqp_url=pod_broker_url)
    services.env["WORKQUEUE_WORKER_IMAGE"] = WORKER_IMAGE
    with services:
        print(f"airflow ready after {time.monotonic() - started:.0f} s at {services.url}")
        services.wait_until(f"DAG {DAG_ID} to be parsed", lambda: services.api("GET", f"/dags/{DAG_ID}").json(), 300)
        yield services
        pids = services.pids()
    assert services.killed == [], f"Airflow processes that ignored SIGTERM and had to be SIGKILLed: {services.killed}"
    leftovers = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, f"Airflow processes left running: {leftovers}"


def test_the_ui_trigger_form_runs_the_example_dag_with_changed_params(chromium, airflow, pod_broker_url, cluster):
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            sign_in(page, airflow)
            run_id = trigger_through_the_form(page, airflow)
            print(f"triggered {run_id} after {time.monotonic() - started:.0f} s")
            run = airflow.wait_until(f"run {run_id} to finish", lambda: finished(airflow, run_id), RUN_TIMEOUT, 3)
            assert run["state"] == "success", f"run {run_id} ended {run['state']}:\n{task_logs(airflow, run_id)}"
            assert run["conf"]["items"] == ITEMS and run["conf"]["parallelism"] == PARALLELISM
            show_the_succeeded_run(page, airflow, run_id)
            link = extra_link_in_the_ui(page, airflow, run_id)
        finally:
            browser.close()

    logs = task_logs(airflow, run_id)
    job = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/run_job/xcomEntries/"
                             "return_value").json()["value"]
    run_path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    links = airflow.api("GET", f"{run_path}/taskInstances/run_job/links").json()["extra_links"]
    print(f"test done after {time.monotonic() - started:.0f} s")

    # Progress from the sensor/trigger and the Job summary, as the task log shows them.
    name = job["job_name"] if isinstance(job, dict) else job
    progress = re.findall(rf"Job default/{name}: succeeded (\d+)/{len(ITEMS)}, active \d+, failed \d+", logs["wait_for_job"])
    print(f"progress lines: succeeded {progress}")
    assert progress, logs["wait_for_job"][-3000:]
    assert f"Job default/{name} is Complete: succeeded {len(ITEMS)}/{len(ITEMS)}" in logs["wait_for_job"], \
        logs["wait_for_job"][-3000:]

    # Every changed item processed exactly once, by pods of this run's Job.
    core = client.CoreV1Api(cluster.api_client())
    pods = core.list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={name}").items
    printed = sorted(line for pod in pods for line in cluster.read_pod_log("default", pod.metadata.name).splitlines()
                     if line.startswith("Processing "))
    assert printed == sorted(f"Processing {item}" for item in ITEMS)
    job_spec = client.BatchV1Api(cluster.api_client()).read_namespaced_job(name, "default").spec
    assert job_spec.parallelism == PARALLELISM and job_spec.completions == len(ITEMS)

    # The extra link: registered by the provider, persisted by the task, shown by the UI; no credentials.
    queue = f"job1-{run_id}"
    broker = BrokerSettings.from_url(pod_broker_url)
    assert links["RabbitMQ queue"] == f"http://{broker.host}:15672/#/queues/%2F/{quote(queue, safe='')}" == link
    assert broker.login not in link and broker.password not in link
    assert SCREENSHOT.stat().st_size > 10_000


def test_marking_the_deferred_wait_failed_deletes_the_job_and_its_pods(airflow, cluster, tmp_path):
    """What a user does to stop a run from the UI (its "Mark as failed" calls this same REST endpoint):
    the triggerer cancels the deferred sensor's trigger, whose on_kill deletes the Job."""
    load_variant(cluster, tmp_path, SLEEPER, ["sh", "-c", "sleep 600"])  # holds its item until killed
    airflow.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    run_id = f"kill-{uuid.uuid4().hex[:8]}"
    airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", json={
        "dag_run_id": run_id, "logical_date": None, "conf": {"items": ["x", "y"], "image": SLEEPER}})
    run_path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    waiting = f"{run_path}/taskInstances/wait_for_job"
    airflow.wait_until("wait_for_job to defer", lambda: airflow.api("GET", waiting).json()["state"] == "deferred",
                       RUN_TIMEOUT, 2)
    # Only a trigger a triggerer has taken can run on_kill: a task marked failed in the second or two before
    # that leaves the Job running (Airflow drops a trigger nobody took; the README's failure table says so)
    airflow.wait_until("a triggerer to take the wait's trigger",
                       lambda: (airflow.api("GET", waiting).json().get("trigger") or {}).get("triggerer_id"), 120, 1)
    name = airflow.api("GET", f"{run_path}/taskInstances/run_job/xcomEntries/return_value").json()["value"]["job_name"]
    batch, core = client.BatchV1Api(cluster.api_client()), client.CoreV1Api(cluster.api_client())
    pods = f"batch.kubernetes.io/job-name={name}"
    airflow.wait_until("the Job's pods to run", lambda: [p for p in core.list_namespaced_pod("default", label_selector=pods).items
                                                        if p.status.phase == "Running"], 120, 1)

    airflow.api("PATCH", waiting, json={"new_state": "failed"})
    killed = time.monotonic()
    airflow.wait_until(f"Job {name} to be deleted", lambda: not batch.list_namespaced_job(
        "default", field_selector=f"metadata.name={name}").items, 120, 1)
    print(f"Job deleted {time.monotonic() - killed:.1f} s after the task was marked failed")
    airflow.wait_until("its pods to be gone", lambda: not core.list_namespaced_pod("default", label_selector=pods).items,
                       120, 1)
    run = airflow.wait_until(f"run {run_id} to finish", lambda: finished(airflow, run_id), RUN_TIMEOUT, 3)
    assert run["state"] == "failed"
    assert airflow.api("GET", f"{run_path}/taskInstances/delete_queue").json()["state"] == "success", "teardown ran"


def load_variant(cluster, folder, ref: str, command: list[str]) -> None:
    """Load into the node the worker image with another command, tagged ``ref`` (a test's own worker)."""
    cluster.load_image(with_command(worker_image()[1], folder / f"{uuid.uuid4().hex[:8]}.tar", ref, command))


def sign_in(page, airflow: AirflowServices) -> None:
    """The Simple auth manager's login form, as a user fills it."""
    page.goto(f"{airflow.url}/")
    page.wait_for_url("**/auth/login**")
    page.fill("input[name=username]", airflow.user)
    page.fill("input[name=password]", airflow.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/auth/login" not in url)


def trigger_through_the_form(page, airflow: AirflowServices) -> str:
    """Unpause the DAG with its toggle, then trigger it through the Params form; returns the run id."""
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    if airflow.api("GET", f"/dags/{DAG_ID}").json()["is_paused"]:
        page.get_by_test_id("toggle-pause").click()
        airflow.wait_until("the DAG to be unpaused", lambda: not airflow.api("GET", f"/dags/{DAG_ID}").json()["is_paused"], 60, 1)
    before = {run["dag_run_id"] for run in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns").json()["dag_runs"]}

    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.locator("[role=dialog][data-state=open]")
    dialog.locator("textarea[name=element_items]").fill("\n".join(ITEMS))
    dialog.locator("input[name=element_parallelism]").fill(str(PARALLELISM))
    dialog.get_by_test_id("trigger-dag-submit").click()

    def new_run() -> str | None:
        runs = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
        return next((run["dag_run_id"] for run in runs if run["dag_run_id"] not in before), None)

    return airflow.wait_until("the triggered run to appear", new_run, 120, 1)


def finished(airflow: AirflowServices, run_id: str) -> dict | None:
    run = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}").json()
    return run if run["state"] in ("success", "failed") else None


def show_the_succeeded_run(page, airflow: AirflowServices, run_id: str) -> None:
    """The run's page, after the UI shows it succeeded: saved to artifacts/ui-run-succeeded.png."""
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}")
    page.get_by_text("success", exact=False).first.wait_for()
    page.wait_for_load_state("networkidle")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def extra_link_in_the_ui(page, airflow: AirflowServices, run_id: str) -> str:
    """The "RabbitMQ queue" button on the run_job task instance's Details tab; returns where it points."""
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/run_job/details")
    button = page.get_by_role("link", name="RabbitMQ queue")
    button.wait_for()
    return button.get_attribute("href") or ""


def task_logs(airflow: AirflowServices, run_id: str) -> dict[str, str]:
    """Each task's log (its latest try) as text, through the REST API."""
    logs = {}
    for ti in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances").json()["task_instances"]:
        tries = max(ti["try_number"], 1)
        content = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{ti['task_id']}"
                                     f"/logs/{tries}", params={"full_content": "true"},
                              headers={"Accept": "application/json"}).json()["content"]
        logs[ti["task_id"]] = "\n".join(entry.get("event", str(entry)) if isinstance(entry, dict) else str(entry)
                                        for entry in content)
    return logs


def test_clearing_a_failed_run_finishes_only_the_items_left(airflow, cluster, tmp_path):
    """A worker fails on one item, so the Job hits its backoff limit and the run fails; the teardown keeps
    the queue. The user fixes the worker (pushes the fixed image under the same tag: the node has it, so
    IfNotPresent runs it) and clears the run (the UI's Clear calls this REST endpoint): the fill publishes
    nothing again, a new Job takes only the items left, and each item is processed once."""
    image = f"localkube.local/gated-{uuid.uuid4().hex[:6]}:1.0"
    load_variant(cluster, tmp_path, image, ["workqueue-consume", "sh", "-c", 'item=$(cat)\n'
                 'if [ "$item" = fig ]; then echo "cannot do $item"; exit 3; fi\necho "Processing $item"\n'])
    items = ["apple", "banana", "cherry", "date", "fig", "grape"]
    airflow.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    run_id = f"clear-{uuid.uuid4().hex[:8]}"
    airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", json={
        "dag_run_id": run_id, "logical_date": None, "conf": {"items": items, "image": image, "parallelism": 2}})
    run = airflow.wait_until(f"run {run_id} to finish", lambda: finished(airflow, run_id), RUN_TIMEOUT, 3)
    logs = task_logs(airflow, run_id)
    assert run["state"] == "failed", logs
    assert "failed 1" in logs["wait_for_job"] and "Kept queue" in logs["delete_queue"], logs

    load_variant(cluster, tmp_path, image, ["workqueue-consume", "sh", "-c", 'echo "Processing $(cat)"'])  # the fix
    airflow.api("POST", f"/dags/{DAG_ID}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": run_id, "only_failed": False, "reset_dag_runs": True})
    airflow.wait_until(f"run {run_id} to start again", lambda: finished(airflow, run_id) is None, 120, 1)
    run = airflow.wait_until(f"run {run_id} to finish again", lambda: finished(airflow, run_id), RUN_TIMEOUT, 3)
    logs = task_logs(airflow, run_id)
    assert run["state"] == "success", logs
    assert "not publishing them again" in logs["fill_queue"], logs["fill_queue"]
    assert "6 filled = 6 processed + 0 dead-lettered + 0 left + 0 lost; 0 processed more than once" in logs["wait_for_job"]
    name = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/run_job/xcomEntries/"
                              "return_value").json()["value"]["job_name"]
    assert name.endswith("-g2")
    summary = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/wait_for_job/"
                                 "xcomEntries/return_value").json()["value"]
    assert {k: summary["account"][k] for k in ("filled", "processed", "dead_lettered", "left", "lost", "duplicated")} \
        == {"filled": 6, "processed": 6, "dead_lettered": 0, "left": 0, "lost": 0, "duplicated": 0}, "the account in XCom"
    core = client.CoreV1Api(cluster.api_client())
    printed = sorted(line for job in (name.removesuffix("-g2"), name)
                     for pod in core.list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={job}").items
                     for line in cluster.read_pod_log("default", pod.metadata.name).splitlines()
                     if line.startswith("Processing "))
    assert printed == sorted(f"Processing {item}" for item in items), "every item processed exactly once in all"
