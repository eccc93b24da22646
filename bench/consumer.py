"""Per-item cost of the worker side, side by side in one run, on the same queue type (quorum).

    python bench/consumer.py [--rounds N]  # 3,000 items per process-per-item run (as issue 15), 20,000 in process; 5 rounds
    python bench/consumer.py --quick    # 300 / 5,000 items, 1 round (a smoke run)

1. ``workqueue-consume --drain`` and ``workqueue-consume -c N`` vs ``amqp-consume -c N`` (Debian
   amqp-tools, installed with apt-get when missing), the worker ``sh -c "cat >/dev/null"`` per item.
   Every queue is filled the same way and has a ledger (``Q.receipts``): ours writes a confirmed
   receipt per item before its ack, amqp-consume writes none. Target: >= 1.0x amqp-consume's items/s,
   with the process's start and end included (a Python process and its checks: ~0.2 s, against C's
   ~10 ms), and with them left out (the time beyond a 1-item run's: the cost per item). The CPU per
   item of each consumer (with its commands) and of the broker is printed beside.
2. The in-process API (``work_items()``, a no-op body, receipts on) vs process-per-item
   (``workqueue-consume --drain``). Target: >= 20x.
3. The in-process API vs PerfTest's consumer (``-x 0 -y 1 -q <prefetch>``, autoack off, one ack per
   message, no receipts) on the same queue type and prefetch. Target: within 2x (ratio >= 0.5).
Ratios are medians of each round's paired ratios (runs alternate order). Exits non-zero if a target
is missed or an account does not add up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BROKER_URL, REPO, verify_depth  # noqa: E402
from perftest import perftest  # noqa: E402

sys.path.insert(0, str(REPO / "provider"))
import pika  # noqa: E402

from workqueue_provider.amqp import receipts  # noqa: E402
from workqueue_provider.amqp.connection import BrokerSettings, open_connection  # noqa: E402
from workqueue_provider.amqp.queues import QueueSpec, declare, delete, fill_key  # noqa: E402

CONSUME = [sys.executable, "-m", "workqueue_provider.worker.cli"]
WORKER = ["sh", "-c", "cat >/dev/null"]
PREFETCH = 200  # the in-process API's default prefetch; PerfTest's consumer gets the same
TARGETS = {"drain_vs_amqp_consume": 1.0, "c_n_vs_amqp_consume": 1.0,
           "drain_vs_amqp_consume_start_left_out": 1.0, "c_n_vs_amqp_consume_start_left_out": 1.0,
           "in_process_vs_per_item": 20.0, "in_process_vs_perftest": 0.5}
IN_PROCESS = """
import sys, time
sys.path.insert(0, {provider!r})
from workqueue_provider.worker.items import work_items
items = work_items({queue!r}, url={url!r}, prefetch={prefetch})
started = time.perf_counter()
for item in items:
    pass
print(time.perf_counter() - started, items.result.processed, items.exit_code)
"""


def ensure_amqp_tools() -> None:
    if shutil.which("amqp-consume") is None:
        print("consumer: installing amqp-tools (apt-get)", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "amqp-tools"], check=True, capture_output=True)


def filled(n: int) -> str:
    """A fresh quorum queue with ``n`` items and a ledger, as FillQueueOperator leaves them."""
    queue = f"bench-consumer-{uuid.uuid4().hex[:8]}"
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    declare(connection, QueueSpec(queue))
    receipts.declare_receipts(connection, queue)
    channel = connection.channel()
    key = fill_key("bench")
    for index in range(n):
        channel.basic_publish("", queue, f"item-{index:07d}".encode(), pika.BasicProperties(
            delivery_mode=2, message_id=receipts.message_id_for(index), headers={receipts.FILL_HEADER: key}))
    verify_depth(queue, n)
    receipts.record_fill(connection, queue, "bench", n)
    connection.close()
    return queue


def settle(queue: str, n: int, ledger: bool) -> None:
    """Check the run took every item (and, with receipts, the account adds up), then delete the queues."""
    connection = open_connection(BrokerSettings.from_url(BROKER_URL))
    try:
        if ledger:
            account = receipts.read_account(connection, queue)
            assert account is not None and (account.processed, account.left, account.lost) == (n, 0, 0), account
        else:
            left = connection.channel().queue_declare(queue, passive=True).method.message_count
            assert left == 0, f"{left} items left in {queue}"
    finally:
        for name in (queue, receipts.receipts_queue(queue)):
            delete(connection, name)
        connection.close()


def _cpu_seconds() -> tuple[float, float]:
    """CPU used so far by this bench's finished children (a consumer and its commands), and by the
    brokers on this machine (every beam.smp: run the bench with one broker busy)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    brokers = 0.0
    for pid in subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        brokers += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return children.ru_utime + children.ru_stime, brokers


CPU: dict[str, dict[str, list[float]]] = {}  # kind -> {"consumer": [...], "broker": [...]} ms of CPU per item


def per_item(kind: str, n: int) -> tuple[float, float]:
    """Items/s of one process-per-item consumer over ``n`` items (process start included, as in a pod),
    and its per-item rate with the start left out: ``(n - 1)`` over the time beyond a 1-item run's
    (the best of 3). Notes the CPU per item of the consumer with its commands, and of the broker, in ``CPU``."""
    one = min(_run(kind, 1) for _ in range(3))
    cpu_before = _cpu_seconds()
    seconds = _run(kind, n)
    cpu = CPU.setdefault(kind, {"consumer": [], "broker": []})
    for name, before, after in zip(("consumer", "broker"), cpu_before, _cpu_seconds(), strict=True):
        cpu[name].append((after - before) / n * 1000)
    STARTS.setdefault(kind, []).append(one * 1000)
    return n / seconds, (n - 1) / (seconds - one)


STARTS: dict[str, list[float]] = {}  # kind -> ms a 1-item run takes (the process's start and end)
MARGINAL: dict[str, list[float]] = {}  # kind -> items/s with that left out


def _run(kind: str, n: int) -> float:
    """Seconds one consumer process takes over a fresh queue of ``n`` items (every item checked)."""
    queue = filled(n)
    env = {**os.environ, "PYTHONPATH": str(REPO / "provider")}
    amqp_url = BROKER_URL[:-1] if urlsplit(BROKER_URL).path == "/" else BROKER_URL
    command = {"drain": [*CONSUME, "--url", BROKER_URL, "-q", queue, "--drain", *WORKER],
               "c_n": [*CONSUME, "--url", BROKER_URL, "-q", queue, "-c", str(n), *WORKER],
               "amqp_consume": ["amqp-consume", f"--url={amqp_url}", "-q", queue, "-c", str(n), "--", *WORKER]}[kind]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    seconds = time.perf_counter() - started
    settle(queue, n, ledger=kind != "amqp_consume")
    return seconds


def in_process(n: int) -> float:
    queue = filled(n)
    code = IN_PROCESS.format(provider=str(REPO / "provider"), queue=queue, url=BROKER_URL, prefetch=PREFETCH)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600)
    seconds, processed, exit_code = done.stdout.split()
    assert int(processed) == n and int(exit_code) == 0, done.stdout + done.stderr
    settle(queue, n, ledger=True)
    return n / float(seconds)


def perftest_consumer(n: int) -> float:
    queue = filled(n)
    rates = perftest("-x", "0", "-y", "1", "-q", str(PREFETCH), "-u", queue, "-p", "-ad", "false", "-D", str(n))
    settle(queue, n, ledger=False)
    return rates["receive"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (the ratios are their medians)")
    args = parser.parse_args()
    n, n_fast, rounds = (300, 5_000, 1) if args.quick else (3_000, 20_000, args.rounds)
    ensure_amqp_tools()
    rates: dict[str, list[float]] = {k: [] for k in ("drain", "c_n", "amqp_consume", "in_process", "perftest")}
    ratios: dict[str, list[float]] = {k: [] for k in TARGETS}
    for round_ in range(rounds):
        kinds = ["amqp_consume", "drain", "c_n"] if round_ % 2 == 0 else ["c_n", "drain", "amqp_consume"]
        both = {kind: per_item(kind, n) for kind in kinds}
        measured = {kind: rate for kind, (rate, _marginal) in both.items()}
        marginal = {kind: rate for kind, (_rate, rate) in both.items()}
        fast = ["in_process", "perftest"] if round_ % 2 == 0 else ["perftest", "in_process"]
        measured.update({kind: in_process(n_fast) if kind == "in_process" else perftest_consumer(n_fast)
                         for kind in fast})
        for kind, rate in measured.items():
            rates[kind].append(rate)
        ratios["drain_vs_amqp_consume"].append(measured["drain"] / measured["amqp_consume"])
        ratios["c_n_vs_amqp_consume"].append(measured["c_n"] / measured["amqp_consume"])
        ratios["drain_vs_amqp_consume_start_left_out"].append(marginal["drain"] / marginal["amqp_consume"])
        ratios["c_n_vs_amqp_consume_start_left_out"].append(marginal["c_n"] / marginal["amqp_consume"])
        for kind, rate in marginal.items():
            MARGINAL.setdefault(kind, []).append(rate)
        ratios["in_process_vs_per_item"].append(measured["in_process"] / measured["drain"])
        ratios["in_process_vs_perftest"].append(measured["in_process"] / measured["perftest"])
        print("consumer: round", round_ + 1, ", ".join(f"{k} {v:,.0f}/s" for k, v in measured.items()), flush=True)
    ok = True
    summary: dict[str, Any] = {}
    for name, target in TARGETS.items():
        ratio = statistics.median(ratios[name])
        met = ratio >= target
        ok &= met
        summary[name] = {"ratio": round(ratio, 2), "ratios": [round(r, 2) for r in ratios[name]], "target": target,
                         "target_met": met}
        print(f"  {name.replace('_', ' ')}: {ratio:.2f}x; target >= {target:g}x: {'MET' if met else 'MISSED'}")
    print("  items/s (medians): " + ", ".join(f"{k} {statistics.median(v):,.0f}" for k, v in rates.items()))
    print("  items/s with the start left out (medians): " + ", ".join(
        f"{k} {statistics.median(v):,.0f}" for k, v in MARGINAL.items()))
    print("  a 1-item run, ms (medians): " + ", ".join(f"{k} {statistics.median(v):,.0f}" for k, v in STARTS.items()))
    cpu = {kind: {name: round(statistics.median(v), 3) for name, v in parts.items()} for kind, parts in CPU.items()}
    print("  CPU ms per item (medians; consumer = it and its commands): " + ", ".join(
        f"{kind} consumer {parts['consumer']:.2f} broker {parts['broker']:.2f}" for kind, parts in cpu.items()))
    if not args.quick:
        (REPO / "bench" / "results" / "consumer.json").write_text(json.dumps({
            "command": "python bench/consumer.py", "items_per_item_runs": n, "items_in_process": n_fast,
            "rounds": rounds, "worker": WORKER, "prefetch_in_process": PREFETCH,
            "rates": {k: [round(r) for r in v] for k, v in rates.items()},
            "rates_start_left_out": {k: [round(r) for r in v] for k, v in MARGINAL.items()},
            "one_item_run_ms": {k: [round(r) for r in v] for k, v in STARTS.items()},
            "cpu_ms_per_item": cpu, "targets": summary}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
