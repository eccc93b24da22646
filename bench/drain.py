"""Drain mode target: short items, drain mode vs one item per pod, same parallelism, on the local cluster's real node.

    PYTHONPATH=. python bench/drain.py            # 200 items each way (the target), then 1,000 drained for the record
    PYTHONPATH=. python bench/drain.py --full     # both ways on all 1,000 items (about 5x longer)
    PYTHONPATH=. python bench/drain.py --quick    # 50 items each way, 200 drained (a smoke run)

Each item is about 10 ms of work: the worker command is ``sh -c 'awk 1; sleep 0.01'`` (prints the
item it reads on stdin as one line), run per item by ``workqueue-consume`` as the Job's container
command, in containers of the worker image built from worker/Dockerfile; the pods' logs are the output.

Both modes run through QueueJobOperator.execute() with parallelism 10 (``items_per_pod=None``:
drain, completions unset, WORKQUEUE_MAX_ITEMS=0; ``items_per_pod=1``: completions = items, one
pod per item), waiting in the worker (``deferrable=False``, ``poll_interval=0.5``) so the time is
Job creation -> Complete -> queue verified empty. Verified completion is checked again here:
queue empty, the pods' logs hold every item exactly once.

One item per pod costs a pod start per item (a sandbox, a container, the kubelet noticing its exit,
and the Job controller creating pods in waves of ``parallelism``), so it is slow: the target's ratio compares
both modes on the same (smaller) item count, like for like. Scaling the one-per-pod time up to more
items would multiply its fixed costs too and overstate the ratio; the larger drain is only reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster_common import (  # noqa: E402
    bench_queue,
    check_lines,
    delete_job,
    job_output,
    queue_depth,
    real_node_cluster,
    set_kube_conn,
    setup_airflow_env,
    task_context,
    verdict,
    write_result,
)

setup_airflow_env()

WORKER = ["workqueue-consume", "sh", "-c", "awk 1; sleep 0.01"]
TARGET = 5.0


def run_mode(cluster: Any, out_dir: Path, items: int, items_per_pod: int | None, parallelism: int) -> dict[str, Any]:
    from scripts.real_node_images import WORKER_IMAGE
    from workqueue_provider.operators.job import QueueJobOperator
    from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator

    mode = "drain" if items_per_pod is None else f"{items_per_pod}-per-pod"
    expected = [f"item-{i:06d}" for i in range(items)]
    out = out_dir / f"{mode}-{items}.out"
    with bench_queue("drain") as queue:
        ctx = task_context(task_id=f"drain-{mode}")
        DeclareQueueOperator(task_id="declare", queue_name=queue).execute(ctx)
        FillQueueOperator(task_id="fill", queue_name=queue, items=expected).execute(ctx)
        operator = QueueJobOperator(task_id=f"job-{mode}", image=WORKER_IMAGE, command=WORKER, queue_name=queue,
                                    parallelism=parallelism, items_per_pod=items_per_pod,
                                    deferrable=False, poll_interval=0.5)
        started = time.monotonic()
        summary = operator.execute(ctx)
        assert summary is not None, "the queue was empty: the Job was skipped"
        seconds = time.monotonic() - started
        left = queue_depth(queue)
        out.write_text("".join(f"{line}\n" for line in job_output(cluster, summary["job_name"])))
        delete_job(cluster, summary["job_name"])
    check = check_lines(out, expected)
    result = {"mode": mode, "items": items, "parallelism": parallelism, "seconds": round(seconds, 2),
              "items_per_second": round(items / seconds, 1), "pods_succeeded": summary["succeeded"],
              "queue_left": left, "verified": summary.get("items_left") == 0 and left == 0 and check["exactly_once"],
              **{f"output_{k}": v for k, v in check.items()}}
    print(f"drain: {mode:>10}: {items} items in {seconds:.1f} s ({result['items_per_second']:.0f} items/s), "
          f"{summary['succeeded']} pods; queue left {left}; output lines {check['lines']}, exactly once: "
          f"{check['exactly_once']}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--per-pod-items", type=int, default=200, help="items for the compared runs (both modes)")
    parser.add_argument("--full", action="store_true", help="compare both modes on --items")
    parser.add_argument("--quick", action="store_true", help="50 items each way, 200 drained for the record")
    parser.add_argument("--parallelism", type=int, default=10)
    a = parser.parse_args()
    items = 200 if a.quick else a.items
    per_pod_items = items if a.full else (50 if a.quick else min(a.per_pod_items, items))

    with real_node_cluster() as (cluster, _), tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        print(f"drain: the cluster and its real node up in {cluster.startup_seconds:.1f} s", flush=True)
        set_kube_conn("kubernetes_default", cluster.kubeconfig)
        out_dir = Path(tmp)
        per_pod = run_mode(cluster, out_dir, per_pod_items, 1, a.parallelism)
        drain = run_mode(cluster, out_dir, per_pod_items, None, a.parallelism)  # the same items: like for like
        runs = [per_pod, drain]
        if per_pod_items != items:
            runs.append(run_mode(cluster, out_dir, items, None, a.parallelism))  # the larger drain, for the record

    # The target compares equal item counts: both runs include the same fixed costs (Job creation, first
    # pod start, the final verification), so scaling one of them would inflate the ratio.
    ratio = per_pod["seconds"] / drain["seconds"]
    verified = all(r["verified"] for r in runs)
    ok = ratio >= TARGET and verified
    big = runs[2] if len(runs) > 2 else None
    print()
    print(f"Target 4, drain mode ({per_pod_items} items of ~10 ms each way, parallelism {a.parallelism}"
          f"{', QUICK' if a.quick else ''}):")
    print(f"  drain {drain['seconds']:.1f} s vs one item per pod {per_pod['seconds']:.1f} s on the same {per_pod_items} "
          f"items: {ratio:.1f}x faster; target >= {TARGET:g}x: {verdict(ratio >= TARGET)}")
    if big:
        print(f"  (for the record: drain on {big['items']} items took {big['seconds']:.1f} s, "
              f"{big['items_per_second']:.0f} items/s; not part of the target)")
    print(f"  verified completion (queue empty, every item exactly once) in every run: {verdict(verified)}")
    write_result("drain" + ("_quick" if a.quick else ""), {
        "command": "PYTHONPATH=. python bench/drain.py" + (" --quick" if a.quick else "") + (" --full" if a.full else ""),
        "worker": WORKER, "runs": runs, "items_compared": per_pod_items, "drain_seconds": drain["seconds"],
        "per_pod_seconds": per_pod["seconds"], "ratio": round(ratio, 1), "ratio_basis": "equal item counts",
        "target": TARGET, "target_met": ok, "verified": verified,
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
