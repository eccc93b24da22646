"""The item account's cost in the worker: ``workqueue-consume --drain`` with and without the ledger.

    python bench/receipts.py            # 3,000 items each way, 2 alternated rounds
    python bench/receipts.py --quick    # 300 items, 1 round (a smoke run)

With the ledger (``Q.receipts``, as FillQueueOperator leaves it) every item costs one more confirmed
publish (its receipt) before its ack. Without it (a queue filled by other tools) the consumer acks
straight away. Same broker, same queue type (quorum), same worker command (``sh -c "cat >/dev/null"``,
a process per item as in production), measured side by side in alternated rounds: the figure is the
cost per item (a confirmed persistent publish, so a disk sync on the broker), which for real items
(seconds) is noise. Then the verification side: reading a ledger of 100,000 receipts (time, peak RSS).
No speed target of its own: what must hold is that the other benchmarks (drain mode, scale) still meet
theirs with receipts on. Exits non-zero if an account doesn't add up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "provider"))

import pika  # noqa: E402

from workqueue_provider.amqp import receipts  # noqa: E402
from workqueue_provider.amqp.connection import BrokerSettings, open_connection  # noqa: E402
from workqueue_provider.amqp.queues import QueueSpec, declare, delete, fill_key  # noqa: E402

BROKER_URL = os.environ.get("WORKQUEUE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
CONSUME = [sys.executable, "-m", "workqueue_provider.worker.cli"]
LEDGER_RECEIPTS = 100_000


def fill(queue: str, items: int, ledger: bool) -> None:
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    declare(connection, QueueSpec(queue))
    if ledger:
        receipts.declare_receipts(connection, queue)
    channel = connection.channel()
    channel.confirm_delivery()
    for index in range(items):
        channel.basic_publish("", queue, f"item-{index}".encode(), pika.BasicProperties(
            delivery_mode=2, message_id=receipts.message_id_for(index), headers={receipts.FILL_HEADER: fill_key("bench")}))
    if ledger:
        receipts.record_fill(connection, queue, "bench", items)
    connection.close()


def consume_seconds(items: int, ledger: bool) -> float:
    queue = f"bench-receipts-{uuid.uuid4().hex[:8]}"
    fill(queue, items, ledger)
    env = {**os.environ, "PYTHONPATH": str(REPO / "provider")}
    started = time.monotonic()
    subprocess.run([*CONSUME, "--url", BROKER_URL, "-q", queue, "--drain", "sh", "-c", "cat >/dev/null"],
                   env=env, check=True, capture_output=True)
    seconds = time.monotonic() - started
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    if ledger:
        account = receipts.read_account(connection, queue)
        assert account is not None and (account.processed, account.left, account.lost) == (items, 0, 0), account
    for name in (queue, receipts.receipts_queue(queue)):
        delete(connection, name)
    connection.close()
    return seconds


def ledger_read(count: int) -> dict[str, float]:
    """Seconds and peak-RSS growth (MB) of reading a ledger of ``count`` receipts."""
    import resource

    queue = f"bench-ledger-{uuid.uuid4().hex[:8]}"
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    declare(connection, QueueSpec(queue))
    receipts.declare_receipts(connection, queue)
    receipts.record_fill(connection, queue, "bench", count)
    channel = connection.channel()
    for index in range(count):
        channel.basic_publish("", receipts.receipts_queue(queue), b"", pika.BasicProperties(
            delivery_mode=2, message_id=str(index),
            headers={receipts.RECORD_HEADER: receipts.PROCESSED_RECORD, receipts.FILL_HEADER: fill_key("bench")}))
    while receipts.read_account(connection, queue) is None:
        time.sleep(0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    account = receipts.read_account(connection, queue)
    seconds = time.monotonic() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert account is not None and account.processed == count, account
    for name in (queue, receipts.receipts_queue(queue)):
        delete(connection, name)
    connection.close()
    return {"receipts": count, "seconds": round(seconds, 2), "peak_rss_growth_mb": round(grown, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    items, rounds = (300, 1) if args.quick else (3000, 2)
    times: dict[str, list[float]] = {"with receipts": [], "without": []}
    for _ in range(rounds):
        times["with receipts"].append(consume_seconds(items, ledger=True))
        times["without"].append(consume_seconds(items, ledger=False))
    per_item = {mode: statistics.median(values) / items * 1000 for mode, values in times.items()}
    overhead = per_item["with receipts"] / per_item["without"] - 1
    print(f"workqueue-consume --drain, {items} items, `sh -c 'cat >/dev/null'` per item: "
          f"{per_item['with receipts']:.2f} ms/item with receipts, {per_item['without']:.2f} without: "
          f"{per_item['with receipts'] - per_item['without']:+.2f} ms/item ({overhead:+.0%} on the shortest item)")
    ledger = ledger_read(LEDGER_RECEIPTS // (10 if args.quick else 1))
    print(f"reading a ledger of {ledger['receipts']:,} receipts: {ledger['seconds']} s, "
          f"peak RSS +{ledger['peak_rss_growth_mb']} MB")
    result = {"items": items, "rounds": rounds, "ms_per_item": per_item, "overhead": overhead, "ledger_read": ledger}
    if not args.quick:
        (REPO / "bench/results/receipts.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
