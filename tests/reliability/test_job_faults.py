"""Faults on the Job side, on the real broker and the local control plane: a worker SIGKILLed while it
holds an item, the triggerer restarted mid-wait, the API server restarted mid-wait (and a 410 Gone),
and a poison item that ends in the dead-letter queue."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog.testing
from kubernetes_asyncio.client.exceptions import ApiException

from tests.conftest import WORKER_IMAGE, task_context
from workqueue_provider.compat import TaskDeferred
from workqueue_provider.exceptions import JobError
from workqueue_provider.hooks import kubernetes_async
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.kube import job_wait
from workqueue_provider.operators.job import QueueJobOperator
from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator
from workqueue_provider.triggers.job import JobCompleteTrigger

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.localkube_only]


def filled(queue, items, **declare):
    DeclareQueueOperator(task_id="declare", queue_name=queue, **declare).execute(task_context())
    FillQueueOperator(task_id="fill", queue_name=queue, items=items).execute(task_context())


def worker_script(tmp_path: Path, body: str, **pod_spec) -> dict:
    """A Job's worker: the worker image's workqueue-consume running ``sh <script>`` per item (the item on
    stdin, in ``$item``). The script is written to ``tmp_path``, which the pods mount (hostPath) at the same
    path, writable by their non-root user: the test and the workers share files there (markers, gates).
    What the script echoes also goes to ``printed.<pod name>`` there (read by printed()): once a pod has ended,
    the kubelet keeps the log of its container's last run only. ``pod_spec``: more pod spec fields."""
    shared_folder(tmp_path)
    script = tmp_path / "worker.sh"
    copy_echo = f'echo() {{ command echo "$@"; command echo "$@" >> "{tmp_path}/printed.$HOSTNAME"; }}\n'
    script.write_text("item=$(cat)\n" + copy_echo + body)
    volume = {"name": "shared", "hostPath": {"path": str(tmp_path), "type": "Directory"}}
    mount = {"name": "shared", "mountPath": str(tmp_path)}
    return {"command": ["workqueue-consume", "sh", str(script)],
            "pod_template": {"spec": {"volumes": [volume], "containers": [{"name": "worker", "volumeMounts": [mount]}],
                                      **pod_spec}}}


def shared_folder(path: Path) -> Path:
    """``path`` (made if missing) writable by the pods' non-root user."""
    path.mkdir(exist_ok=True)
    path.chmod(0o777)
    return path


def job_op(queue, namespace, worker: dict | list[str], **kwargs):
    """QueueJobOperator on the worker image with ``worker`` (a worker_script(), or a command)."""
    kwargs = {**(worker if isinstance(worker, dict) else {"command": worker}), **kwargs}
    kwargs.setdefault("deferrable", False)
    kwargs.setdefault("poll_interval", 0.5)
    kwargs.setdefault("timeout", 300)
    return QueueJobOperator(task_id="run_job", queue_name=queue, namespace=namespace, image=WORKER_IMAGE, **kwargs)


def printed(folder: Path, job_name: str) -> list[str]:
    """Every line the pods of Job ``job_name`` echoed from a worker_script() in ``folder``, in all their runs."""
    own = re.compile(rf"printed\.{re.escape(job_name)}-[a-z0-9]{{5}}")  # a Job's pods: <job name>-<5 characters>
    return [line for path in sorted(folder.iterdir()) if own.fullmatch(path.name) for line in path.read_text().splitlines()]


def processed(folder: Path, job_name: str) -> list[str]:
    return sorted(line for line in printed(folder, job_name) if line.startswith("Processing "))


def wait_for_running_pod(core, namespace, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.status.phase == "Running" for p in core.list_namespaced_pod(namespace).items):
            return
        time.sleep(0.2)
    raise AssertionError(f"no pod of namespace {namespace} started within {timeout} s")


def logged(caplog, captured) -> list[str]:
    """What the trigger logged, through the stdlib or structlog (Airflow's task/trigger logger); structlog's
    events are formatted with their positional arguments (then followed by the raw event)."""
    lines = [r.getMessage() for r in caplog.records]
    for event in list(captured):
        text = str(event.get("event"))
        if event.get("positional_args"):
            try:
                text %= tuple(event["positional_args"])
            except (TypeError, ValueError):
                pass
        lines.append(f"{text} {event!r}")
    return lines


def namespaced_job_watches(cluster) -> float:
    """Long-running WATCH requests on jobs in a namespace (the trigger's watches one Job by name: scope
    "resource") the API server holds, from its own metrics; the controllers' watches are cluster-wide."""
    api = cluster.api_client()
    response = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False,
                            _return_http_data_only=True)
    total = 0.0
    for line in response.data.decode().splitlines():
        if line.startswith("apiserver_longrunning_requests{") and 'resource="jobs"' in line \
                and 'scope="cluster"' not in line and 'verb="WATCH"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_a_worker_killed_with_sigkill_gets_its_item_redelivered(amqp_conn, kube_conn, cluster, core, namespace,
                                                               queue_name, tmp_path):
    items = ["apple", "victim", "cherry", "date"]
    filled(queue_name, items)
    marker = tmp_path / "killed"
    command = worker_script(tmp_path, f"""
if [ "$item" = victim ] && mkdir {marker} 2>/dev/null; then
  echo "SIGKILL to the consumer $PPID holding $item" >&2
  kill -9 $PPID
  exit 1
fi
echo "Processing $item"
""", shareProcessNamespace=True)  # the consumer is not the pid namespace's init then, which SIGKILL can't end
    summary = job_op(queue_name, namespace, command).execute(task_context())
    assert summary["succeeded"] == 4 and summary["items_left"] == 0
    account = {k: summary["account"][k] for k in ("filled", "processed", "dead_lettered", "left", "lost", "duplicated")}
    assert account == {"filled": 4, "processed": 4, "dead_lettered": 0, "left": 0, "lost": 0, "duplicated": 0}
    assert processed(tmp_path, summary["job_name"]) == sorted(f"Processing {i}" for i in items)
    lines = printed(tmp_path, summary["job_name"])
    assert sum("SIGKILL to the consumer" in line for line in lines) == 1
    pods = core.list_namespaced_pod(namespace).items
    restarts = sum(s.restart_count for p in pods for s in p.status.container_statuses or [])
    print(f"\nSIGKILL: 1 kill, {restarts} container restart(s), victim processed once, {summary['succeeded']}/4 succeeded")
    assert restarts == 1


SLOW_ITEM = 'sleep 1.5\necho "Processing $item"\n'


def before_airflow_3_3(monkeypatch, trigger: JobCompleteTrigger, task_state: str) -> None:
    """Run ``cleanup()``'s pre-3.3 path for real: the version check says < 3.3, the trigger has its task
    instance, and the task's state (read from the API server before 3.3) is ``task_state``."""
    monkeypatch.setattr("workqueue_provider.compat.airflow_3_3_plus", lambda: False)
    trigger.task_instance = SimpleNamespace(dag_id="dag", task_id="run_job", run_id="manual__1", map_index=-1)

    async def state(self):
        return task_state
    monkeypatch.setattr(JobCompleteTrigger, "_task_state", state)


def test_a_restarted_triggerer_reattaches_to_the_same_job(amqp_conn, kube_conn, cluster, core, batch, namespace,
                                                         queue_name, tmp_path, monkeypatch):
    items = ["a", "b", "c", "d"]
    filled(queue_name, items)
    command = worker_script(tmp_path, SLOW_ITEM)
    with pytest.raises(TaskDeferred) as deferred:
        job_op(queue_name, namespace, command, deferrable=True, parallelism=1).execute(task_context(try_number=1))
    first = deferred.value.trigger
    wait_for_running_pod(core, namespace)
    before_airflow_3_3(monkeypatch, first, "deferred")  # a triggerer restart: the task is still deferred

    async def interrupted():  # the triggerer dies while the trigger waits
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first_event(first), timeout=1.5)
        await first.cleanup()
    asyncio.run(interrupted())
    assert len(batch.list_namespaced_job(namespace).items) == 1, "cleanup on a triggerer restart keeps the Job"

    # the task is run again (retry, same run): it re-attaches and defers on the same Job
    operator = job_op(queue_name, namespace, command, deferrable=True, parallelism=1)
    with pytest.raises(TaskDeferred) as again:
        operator.execute(task_context(try_number=2))
    path, kwargs = again.value.trigger.serialize()
    assert kwargs["job_name"] == first.job_name
    # a new triggerer builds the trigger from its serialized form
    event = asyncio.run(asyncio.wait_for(first_event(JobCompleteTrigger(**kwargs)), timeout=120))
    assert event["status"] == "succeeded"
    summary = operator.execute_complete(task_context(try_number=2), event)
    assert summary["succeeded"] == 4 and summary["items_left"] == 0
    assert [j.metadata.name for j in batch.list_namespaced_job(namespace).items] == [first.job_name], "no second Job"
    assert processed(tmp_path, first.job_name) == sorted(f"Processing {i}" for i in items)


def test_before_airflow_3_3_a_killed_deferred_task_deletes_its_job_in_cleanup(amqp_conn, kube_conn, cluster, batch,
                                                                              core, namespace, queue_name, tmp_path,
                                                                              monkeypatch):
    filled(queue_name, ["a", "b"])
    with pytest.raises(TaskDeferred) as deferred:
        job_op(queue_name, namespace, worker_script(tmp_path, SLOW_ITEM), deferrable=True,
               parallelism=1).execute(task_context())
    trigger = deferred.value.trigger
    wait_for_running_pod(core, namespace)
    before_airflow_3_3(monkeypatch, trigger, "failed")  # "Mark as failed" in the UI, before 3.3

    async def killed():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first_event(trigger), timeout=1.5)
        await trigger.cleanup()
    asyncio.run(killed())
    assert batch.list_namespaced_job(namespace).items == [], "cleanup after a kill deletes the Job"


def test_the_watch_survives_an_api_server_restart(amqp_conn, kube_conn, cluster, core, namespace, queue_name,
                                                 tmp_path, caplog, monkeypatch):
    items = ["a", "b", "c", "d"]
    filled(queue_name, items)
    command = worker_script(tmp_path, SLOW_ITEM)
    launched = job_op(queue_name, namespace, command, wait_for_completion=False, parallelism=1).execute(task_context())
    wait_for_running_pod(core, namespace)
    caplog.set_level(logging.INFO)

    progress: list[str] = []  # the trigger's progress, as it logs it (each assessment of the Job it saw)
    real_assess = job_wait.assess

    def recording_assess(job):
        verdict = real_assess(job)
        progress.append(verdict.progress())
        return verdict

    monkeypatch.setattr(job_wait, "assess", recording_assess)

    async def wait_through_restart(captured):
        trigger = JobCompleteTrigger(kubernetes_conn_id=kube_conn, deadline=time.time() + 180, **launched)
        waiting = asyncio.create_task(first_event(trigger))
        # restart only once the watch is open: the trigger has its first progress (the Job listed and assessed)
        # and the API server holds a watch on that Job (the controllers' watches on jobs are cluster-wide)
        deadline = time.monotonic() + 60
        watches = 0.0
        while not (progress and (watches := await asyncio.to_thread(namespaced_job_watches, cluster)) >= 1):
            assert not waiting.done(), f"the trigger ended before its watch was seen open (progress {progress}, " \
                                       f"namespaced job watches {watches})"
            assert time.monotonic() < deadline, f"the trigger's watch did not open (progress: {progress})"
            await asyncio.sleep(0.1)
        away = await asyncio.to_thread(cluster.restart_apiserver)
        return away, await asyncio.wait_for(waiting, timeout=150)

    with structlog.testing.capture_logs() as captured:
        away, event = asyncio.run(wait_through_restart(captured))
    assert event["status"] == "succeeded" and event["job"]["status"]["succeeded"] == 4, event
    reconnects = [m for m in logged(caplog, captured) if "reconnecting" in m or "410" in m]
    print(f"\nkube-apiserver away {away:.1f} s; the trigger logged: {reconnects}")
    assert reconnects, "the watch noticed the restart"
    operator = job_op(queue_name, namespace, command, parallelism=1)
    summary = operator.execute_complete(task_context(), event)
    assert summary["items_left"] == 0
    assert processed(tmp_path, launched["job_name"]) == sorted(f"Processing {i}" for i in items)


def test_waiting_in_the_worker_rides_out_an_api_server_restart(amqp_conn, kube_conn, cluster, core, namespace,
                                                               queue_name, tmp_path, caplog):
    import threading

    items = ["a", "b", "c", "d", "e", "f"]
    filled(queue_name, items)
    command = worker_script(tmp_path, 'sleep 3\necho "Processing $item"\n')  # >= 18 s of work: outlasts the restart
    operator = job_op(queue_name, namespace, command, parallelism=1, poll_interval=0.5)
    away: list[float] = []
    errors: list[BaseException] = []

    def restart_once_running():
        try:
            wait_for_running_pod(core, namespace)
            away.append(cluster.restart_apiserver(down_seconds=5))
        except BaseException as e:
            errors.append(e)

    restarter = threading.Thread(target=restart_once_running)
    caplog.set_level(logging.WARNING, logger="workqueue_provider.hooks.kubernetes")
    restarter.start()
    try:
        summary = operator.execute(task_context())  # deferrable=False: polls get_job through the outage
    finally:
        restarter.join()
    assert not errors, errors
    retries = [r.getMessage() for r in caplog.records if "reading again" in r.getMessage()]
    print(f"\nkube-apiserver away {away[0]:.1f} s; {len(retries)} reads retried, first: {retries[:1]}")
    assert retries, "the poll met the outage"
    # the Job controller may start one pod too many around a restart (it then finds the queue empty and
    # exits 0): the guarantee is the item account, every item processed, none lost, duplicates counted
    assert summary["succeeded"] >= 6 and summary["items_left"] == 0
    account = summary["account"]
    assert (account["filled"], account["processed"], account["left"], account["lost"]) == (6, 6, 0, 0)
    lines = processed(tmp_path, summary["job_name"])
    assert sorted(set(lines)) == sorted(f"Processing {i}" for i in items)
    assert len(lines) == 6 + account["duplicated"], "every extra run of an item is in the account"


def test_a_410_gone_makes_the_watch_list_again(amqp_conn, kube_conn, cluster, namespace, queue_name, tmp_path,
                                              monkeypatch, caplog):
    filled(queue_name, ["a", "b"])
    launched = job_op(queue_name, namespace, worker_script(tmp_path, SLOW_ITEM), wait_for_completion=False,
                      parallelism=1).execute(task_context())
    real_watch = kubernetes_async.async_watch.Watch
    gone = {"raised": 0}

    class ExpiringOnce(real_watch):
        def stream(self, func, *args, **kwargs):
            if not gone["raised"]:
                gone["raised"] += 1
                raise ApiException(status=410, reason="Gone: too old resource version")
            return super().stream(func, *args, **kwargs)

    monkeypatch.setattr(kubernetes_async.async_watch, "Watch", ExpiringOnce)
    caplog.set_level(logging.INFO)
    with structlog.testing.capture_logs() as captured:
        event = asyncio.run(asyncio.wait_for(first_event(JobCompleteTrigger(kubernetes_conn_id=kube_conn, **launched)),
                                             120))
    assert event["status"] == "succeeded" and gone["raised"] == 1
    assert any("410 Gone" in m and "listing it again" in m for m in logged(caplog, captured))


def test_a_poison_item_ends_in_the_dead_letter_queue_and_is_reported(amqp_conn, kube_conn, cluster, core, namespace,
                                                                    queue_name, tmp_path):
    dead = f"{queue_name}.dead"
    limit = 2
    items = ["apple", "poison", "cherry", "date"]
    filled(queue_name, items, delivery_limit=limit, dead_letter_queue=dead)
    attempts = tmp_path / "attempts"
    command = worker_script(tmp_path, f"""
echo "$item" >> {attempts}
if [ "$item" = poison ]; then echo "cannot process $item" >&2; exit 3; fi
echo "Processing $item"
""")
    operator = job_op(queue_name, namespace, command, dead_letter_queue=dead, backoff_limit=10)
    with pytest.raises(JobError) as raised:
        operator.execute(task_context())
    message = str(raised.value)
    assert "1 item(s) of Job" in message and f"dead-lettered into queue {dead!r}" in message, message
    tries = attempts.read_text().splitlines()
    print(f"\npoison: {tries.count('poison')} deliveries with delivery_limit={limit}; message: {message}")
    assert tries.count("poison") == limit + 1 and all(tries.count(i) == 1 for i in items if i != "poison")

    # reporting instead of failing: the summary says how many and where (re-attaches to the same Job)
    summary = job_op(queue_name, namespace, command, dead_letter_queue=dead, backoff_limit=10,
                     fail_on_dead_letters=False).execute(task_context(try_number=2))
    assert summary["items_left"] == 0 and summary["dead_lettered"] == 1 and summary["dead_letter_queue"] == dead
    account = {k: summary["account"][k] for k in ("filled", "processed", "dead_lettered", "left", "lost", "duplicated")}
    assert account == {"filled": 4, "processed": 3, "dead_lettered": 1, "left": 0, "lost": 0, "duplicated": 0}
    assert summary["succeeded"] == 4
    assert processed(tmp_path, summary["job_name"]) == sorted(f"Processing {i}" for i in items
                                                                              if i != "poison")
    assert AmqpHook().queue_depth(queue_name).messages == 0 and AmqpHook().queue_depth(dead).messages == 1
