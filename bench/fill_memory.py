"""Fill memory: one FillQueueOperator.execute() in this (fresh) process; prints peak RSS as JSON.

    python bench/fill_memory.py {file|generator} N [QUEUE_TYPE] [ITEMS_FILE]

``file`` reads ITEMS_FILE (one item per line, written by the caller so writing it costs this process
nothing); ``generator`` passes a callable returning a generator of N items. Peak RSS is the process's
``ru_maxrss`` after the fill; ``rss_before_mb`` is the resident size after imports, before the fill.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time

import psutil
from common import fresh_queue, item, setup_airflow_env, task_context, verify_depth

setup_airflow_env()


def main() -> None:
    source, n = sys.argv[1], int(sys.argv[2])
    queue_type = sys.argv[3] if len(sys.argv) > 3 else "classic"
    items_file = sys.argv[4] if len(sys.argv) > 4 else None
    from workqueue_provider.operators.queue import FillQueueOperator

    logging.disable(logging.WARNING)
    with fresh_queue("mem", queue_type) as queue:
        if source == "file":
            assert items_file, "the file source needs ITEMS_FILE"
            op = FillQueueOperator(task_id="bench_fill", queue_name=queue, items_file=items_file, progress_every=3600.0)
        elif source == "generator":
            op = FillQueueOperator(task_id="bench_fill", queue_name=queue, progress_every=3600.0,
                                   items=lambda: (item(i) for i in range(n)))
        else:
            raise SystemExit(f"unknown source {source!r}: use file or generator")
        op.hook.settings  # noqa: B018 - read the connection before measuring the starting size
        before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        published = op.execute(task_context())
        seconds = time.perf_counter() - started
        assert published == n, f"execute returned {published}, expected {n}"
        verify_depth(queue, n)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    print(json.dumps({"source": source, "items": n, "queue_type": queue_type, "seconds": seconds,
                      "rss_before_mb": before / 2**20, "peak_rss_mb": peak_kb / 1024}))


if __name__ == "__main__":
    main()
