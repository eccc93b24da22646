"""Scale target: 100,000 items through the example DAG in drain mode, parallelism 10, on the local cluster's real node.

    PYTHONPATH=. python bench/scale.py                 # 100,000 items (and the 8-item reference run)
    PYTHONPATH=. python bench/scale.py --items 5000    # a smaller run (a smoke test)

Runs ``airflow dags test work_queue_example`` (isolated AIRFLOW_HOME, connections to the local
cluster and the local RabbitMQ: scripts/demo.py's airflow_env) with conf
``{"items_file": ..., "parallelism": 10, "items_per_pod": null, "image": IMAGE}``:
the items go through a file (one per line), as large runs should; 100,000 items in the run's conf
(~1 MB) would be held by Airflow itself in every task (+130 MB measured). The CLI is started as
``python -c`` that reads the conf from a file into ``sys.argv`` and calls
``airflow.__main__.main()``: the same command, in-process.

Checks:
- the DAG run succeeds (its sensor verifies the Job Complete and the queue empty);
- every item processed exactly once: IMAGE is the worker image built from worker/Dockerfile with the
  command ``workqueue-consume awk 1`` (each item printed as one line); the pods' logs must hold each
  item exactly once;
- peak RSS of the ``airflow dags test`` process tree (psutil, sampled every 0.2 s; tasks and
  triggers run inside that process under ``dags test``) within 100 MB of the same DAG with 8 items;
- the log shows progress throughout: progress lines of fill (``Published``) and of the wait (Job
  progress / queue depth), and the longest silence between log lines while the Job runs.
"""

from __future__ import annotations

import argparse
import calendar
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster_common import REPO, check_lines, job_output, real_node_cluster, verdict, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from demo import airflow, airflow_env, dag_run_succeeded  # noqa: E402

IMAGE = "localkube.local/bench-scale-worker:1"
COMMAND = ["workqueue-consume", "awk", "1"]
MEMORY_BUDGET_MB = 100
LAUNCH = ("import json, sys; from airflow.__main__ import main; "
          "sys.argv = ['airflow', 'dags', 'test', 'work_queue_example', '--conf', open(sys.argv[1]).read()]; main()")
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def item(i: int) -> str:
    return f"i{i:06d}"


class TreeSampler(threading.Thread):
    """Peak RSS of a process and its descendants (sum), and of the process alone, every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.peak_tree = 0
        self.peak_root = 0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (unix time, tree RSS)
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    if p.pid == self.root.pid:
                        self.peak_root = max(self.peak_root, rss)
                self.peak_tree = max(self.peak_tree, total)
                self.timeline.append((time.time(), total))
                self.samples += 1
            except psutil.Error:
                break
            self.stop.wait(0.2)


def run_dag(cluster: Any, amqp_url: str, home: str, conf: dict[str, Any], log_path: Path) -> dict[str, Any]:
    env = airflow_env(str(cluster.kubeconfig), home, amqp_url)
    migrated = airflow(["db", "migrate"], env, echo=False)
    if migrated.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{migrated.stdout[-3000:]}")
    conf_file = Path(home) / "conf.json"
    conf_file.write_text(json.dumps(conf))
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, str(conf_file)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
        sampler = TreeSampler(process.pid)
        sampler.start()
        try:
            process.wait()
        finally:
            if process.poll() is None:  # interrupted: don't leave the DAG run behind
                process.kill()
                process.wait()
        sampler.stop.set()
        sampler.join()
    seconds = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    result = subprocess.CompletedProcess(process.args, process.returncode, text, "")
    return {"seconds": round(seconds, 1), "returncode": process.returncode, "succeeded": dag_run_succeeded(result),
            "peak_rss_tree_mb": round(sampler.peak_tree / 2**20, 1), "peak_rss_main_mb": round(sampler.peak_root / 2**20, 1),
            "rss_samples": sampler.samples, "rss_by_task": rss_by_task(text, sampler.timeline), **progress(text)}


TASKS = ["start_broker", "declare_queue", "fill_queue", "run_job", "wait_for_job (until deferred)",
         "wait_for_job (deferred, then resumed)", "delete_queue"]


def _stamp(line: str) -> float | None:
    m = TIMESTAMP.match(line)
    if not m:
        return None
    return calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + m.group(1)[20:])


def rss_by_task(text: str, timeline: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """RSS of the process tree at the start of each window and its peak in it, to see where memory grows.
    Windows: each task's run (from its "Task instance state updated" to running, to the one with its
    new state; in the DAG's task order) and the scheduling gaps between tasks."""
    marks = []  # (time, label of the window that ends here)
    task = 0
    for ln in text.splitlines():
        if "Task instance state updated" not in ln or (stamp := _stamp(ln)) is None:
            continue
        name = TASKS[task] if task < len(TASKS) else f"task #{task}"
        if "new_state=" in ln:
            marks.append((stamp, f"{name}: running"))
            task += 1
        else:
            marks.append((stamp, f"before {name}"))
    marks.append((float("inf"), "after the last task"))
    windows, start = [], timeline[0][0] if timeline else 0.0
    for end, label in marks:
        inside = [rss for t, rss in timeline if start <= t < end]
        before = [rss for t, rss in timeline if t < start]
        if inside:
            windows.append({"window": label, "seconds": round(min(end, timeline[-1][0]) - start, 1),
                            "rss_at_start_mb": round((before[-1] if before else inside[0]) / 2**20, 1),
                            "peak_mb": round(max(inside) / 2**20, 1)})
        start = end
    return windows


def progress(text: str) -> dict[str, Any]:
    """Progress lines, and the longest silence in the log between the Job's creation and the end of the wait."""
    lines = text.splitlines()
    fill = [ln for ln in lines if "Published" in ln or "Encoded" in ln]
    wait = [ln for ln in lines if re.search(r"Job \S+: succeeded|still running after|items left|queue depth", ln)]
    deferred = [ln for ln in lines if "defer" in ln.lower()]
    stamps = []
    in_job = False
    for ln in lines:
        if "Created Job" in ln:
            in_job = True
        stamp = _stamp(ln)
        if in_job and stamp is not None:
            stamps.append(stamp)
        if "is Complete" in ln:
            in_job = False
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"fill_progress_lines": len(fill), "wait_progress_lines": len(wait), "deferred_lines": len(deferred),
            "longest_silence_during_job_s": round(max(gaps), 1) if gaps else None,
            "wait_progress_sample": [ln[:160] for ln in wait[:3] + wait[-3:]]}


def progress_met(run: dict[str, Any]) -> bool:
    """At least 3 wait progress lines, and no silence over 120 s while the Job ran. A log in which no
    timestamped line was parsed (silence None) fails: the silence was not measured, so it is not met."""
    silence = run["longest_silence_during_job_s"]
    return run["wait_progress_lines"] >= 3 and silence is not None and silence <= 120


def check_output(cluster: Any, items: int) -> dict[str, Any]:
    """Every item exactly once in the logs of the newest Job's pods (the DAG run's)."""
    from kubernetes import client

    jobs = client.BatchV1Api(cluster.api_client()).list_namespaced_job("default").items
    newest = max(jobs, key=lambda job: job.metadata.creation_timestamp)
    with tempfile.NamedTemporaryFile("w", suffix=".out") as out:
        out.write("".join(f"{line}\n" for line in job_output(cluster, newest.metadata.name)))
        out.flush()
        check = check_lines(Path(out.name), [item(i) for i in range(items)])
    return {"processed_records": check["lines"], **{k: v for k, v in check.items() if k != "lines"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--parallelism", type=int, default=10)
    parser.add_argument("--reference-items", type=int, default=8)
    a = parser.parse_args()

    from localkube.node_images import with_command
    from scripts.real_node_images import worker_image

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        with real_node_cluster() as (cluster, amqp_url):
            print(f"scale: the cluster and its real node up in {cluster.startup_seconds:.1f} s", flush=True)
            cluster.load_image(with_command(worker_image()[1], Path(tmp) / "bench-scale-worker.tar", IMAGE, COMMAND))
            for label, count in (("reference", a.reference_items), ("scale", a.items)):
                home = tempfile.mkdtemp(prefix=f"airflow-{label}-", dir=tmp)
                items_file = Path(home) / f"items-{label}.txt"  # the run's conf stays small
                items_file.write_text("".join(f"{item(i)}\n" for i in range(count)))
                conf = {"items_file": str(items_file), "parallelism": a.parallelism,
                        "items_per_pod": None, "image": IMAGE}
                log_path = Path(tempfile.gettempdir()) / f"workqueue-bench-scale-{label}.log"  # kept after the run
                print(f"scale: {label}: {count} items through the example DAG (drain mode, parallelism "
                      f"{a.parallelism}); log {log_path}", flush=True)
                run = run_dag(cluster, amqp_url, home, conf, log_path)
                run.update(items=count, **check_output(cluster, count))
                run["seconds_per_1000_items"] = round(run["seconds"] * 1000 / count, 2)
                runs[label] = run
                for w in run["rss_by_task"]:
                    print(f"scale: {label}:   {w['window']:<40} {w['seconds']:>7} s  RSS {w['rss_at_start_mb']:>6} -> "
                          f"peak {w['peak_mb']:>6} MB", flush=True)
                print(f"scale: {label}: {'succeeded' if run['succeeded'] else 'FAILED'} in {run['seconds']} s; "
                      f"processed {run['processed_records']} (exactly once: {run['exactly_once']}); peak RSS tree "
                      f"{run['peak_rss_tree_mb']} MB (main {run['peak_rss_main_mb']} MB); progress lines fill "
                      f"{run['fill_progress_lines']}, wait {run['wait_progress_lines']}; longest silence during the Job "
                      f"{run['longest_silence_during_job_s']} s", flush=True)

    ref, big = runs["reference"], runs["scale"]
    growth = big["peak_rss_tree_mb"] - ref["peak_rss_tree_mb"]
    marginal = (big["seconds"] - ref["seconds"]) * 1000 / max(big["items"] - ref["items"], 1)
    completed = big["succeeded"] and big["exactly_once"]
    memory_ok = growth <= MEMORY_BUDGET_MB
    silence = big["longest_silence_during_job_s"]
    progress_ok = progress_met(big)
    print()
    print(f"Target 5, scale ({a.items} items, drain mode, parallelism {a.parallelism}):")
    print(f"  completed, every item exactly once: {verdict(completed)} ({big['processed_records']} records, "
          f"{big['missing']} missing, {big['duplicated']} duplicated)")
    print(f"  wall time {big['seconds']} s = {big['seconds_per_1000_items']} s per 1,000 items "
          f"(8-item run: {ref['seconds']} s; beyond it: {marginal:.1f} s per 1,000 items)")
    print(f"  peak RSS of the dags-test process tree {big['peak_rss_tree_mb']} MB vs {ref['peak_rss_tree_mb']} MB with "
          f"{a.reference_items} items: +{growth:.1f} MB; target <= +{MEMORY_BUDGET_MB} MB: {verdict(memory_ok)}")
    print(f"  progress in the log: fill {big['fill_progress_lines']} lines, wait {big['wait_progress_lines']} lines, "
          f"longest silence while the Job ran "
          f"{'unknown (no timestamped log line parsed)' if silence is None else f'{silence} s'}: {verdict(progress_ok)}")
    write_result("scale", {
        "command": f"PYTHONPATH=. python bench/scale.py --items {a.items}", "worker": "workqueue-consume dd oflag=append",
        "runs": runs, "memory_growth_mb": round(growth, 1), "memory_target_met": memory_ok, "completed": completed,
        "progress_target_met": progress_ok, "seconds_per_1000_items": big["seconds_per_1000_items"],
        "marginal_seconds_per_1000_items": round(marginal, 2),
    })
    return 0 if completed and memory_ok and progress_ok else 1


if __name__ == "__main__":
    sys.exit(main())
