"""The item account's cost in the worker: ``workqueue-consume --drain`` with and without the ledger.

    python bench/receipts.py            # 3,000 items each way, 2 alternated rounds
    python bench/receipts.py --quick    # 300 items, 1 round (a smoke run)

With the ledger (``Q.receipts``, as FillQueueOperator leaves it) every item costs one more confirmed
publish (its receipt) before its ack. Without it (a queue filled by other tools) the consumer acks
straight away. Same broker, same queue type (quorum), same worker command (``sh -c "cat >/dev/null"``,
a process per item as in production), measured side by side in alternated rounds. The target: the
receipts cost at most 25% of the per-item time of the shortest possible item, so for real items
(seconds) they are noise. Exits non-zero when the target is missed.
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
from workqueue_provider.amqp.queues import QueueSpec, declare, delete  # noqa: E402

BROKER_URL = os.environ.get("WORKQUEUE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
CONSUME = [sys.executable, "-m", "workqueue_provider.worker.cli"]
TARGET_OVERHEAD = 0.25


def fill(queue: str, items: int, ledger: bool) -> None:
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    declare(connection, QueueSpec(queue))
    if ledger:
        receipts.declare_receipts(connection, queue)
    channel = connection.channel()
    channel.confirm_delivery()
    for index in range(items):
        channel.basic_publish("", queue, f"item-{index}".encode(), pika.BasicProperties(
            delivery_mode=2, message_id=receipts.message_id_for(index), headers={receipts.FILL_HEADER: "bench"}))
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
    met = overhead <= TARGET_OVERHEAD
    result = {"items": items, "rounds": rounds, "ms_per_item": per_item, "overhead": overhead,
              "target": TARGET_OVERHEAD, "met": met}
    print(f"workqueue-consume --drain, {items} items, `sh -c 'cat >/dev/null'` per item: "
          f"{per_item['with receipts']:.2f} ms/item with receipts, {per_item['without']:.2f} without: "
          f"+{per_item['with receipts'] - per_item['without']:.2f} ms/item ({overhead:+.0%}; target <= "
          f"{TARGET_OVERHEAD:+.0%}): {'MET' if met else 'MISSED'}")
    if not args.quick:
        (REPO / "bench/results/receipts.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
