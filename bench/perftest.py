"""The fill against RabbitMQ's own load generator, PerfTest, at the same confirm window, side by side.

    python bench/perftest.py            # 100,000 persistent 12-byte messages, 3 alternated rounds per queue type
    python bench/perftest.py --quick    # 20,000 messages, 1 round (a smoke run)

PerfTest 2.22.1 (``com.rabbitmq:perf-test`` from Maven Central) is installed into
``$WORKQUEUE_CACHE/perftest/2.22.1`` with Maven when missing (:func:`perftest_classpath`; Java and Maven
are on these machines). Its producer: one connection, ``-x 1 -y 0 -C N -c 10000 -f persistent -s 12``
(10,000 unconfirmed in flight, the fill's default window) into a fresh, pre-declared durable queue.
The fill: ``FillQueueOperator.execute()`` (bench/fill_throughput.py's measurement A, run in a fresh
process: validation, spooling, the queue check, the ledger records, pipelined confirms). Both queues
are checked to hold exactly N messages. Target: the fill at least 1.0x PerfTest's rate on classic and
quorum queues (medians of the rounds' paired ratios). The receipts' cost is stated: the fill writes
three ledger records (a reset, "filling", "fill"), each a confirmed publish, timed here on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BROKER_URL, REPO, fresh_queue, verify_depth  # noqa: E402

PERFTEST_VERSION = "2.22.1"
CACHE = Path(os.environ.get("WORKQUEUE_CACHE", Path.home() / ".cache" / "workqueue"))
RESULTS = REPO / "bench" / "results"
TARGET = 1.0
WINDOW = 10_000
POM = """<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>perftest-install</artifactId><version>1</version><packaging>pom</packaging>
<dependencies><dependency><groupId>com.rabbitmq</groupId><artifactId>perf-test</artifactId>
<version>{version}</version></dependency></dependencies></project>
"""


def perftest_classpath() -> str:
    """PerfTest's classpath; installs it from Maven Central (``mvn dependency:copy-dependencies``) if missing."""
    home = CACHE / "perftest" / PERFTEST_VERSION
    lib = home / "lib"
    if not (lib / f"perf-test-{PERFTEST_VERSION}.jar").exists():
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(POM.format(version=PERFTEST_VERSION))
        print(f"perftest: installing PerfTest {PERFTEST_VERSION} into {home} (Maven Central)", flush=True)
        done = subprocess.run(["mvn", "-q", "-B", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
                               f"-DoutputDirectory={lib}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"perftest: installing PerfTest failed (is Maven on PATH?):\n{done.stdout}{done.stderr}")
    return f"{lib}/*"


def perftest(*args: str) -> dict[str, float]:
    """Run PerfTest; returns its summary rates (msg/s) and the wall time."""
    url = BROKER_URL + "%2F" if urlsplit(BROKER_URL).path == "/" else BROKER_URL  # the default vhost, spelled out
    started = time.perf_counter()
    done = subprocess.run(["java", "-cp", perftest_classpath(), "com.rabbitmq.perf.PerfTest", "-h", url, *args],
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"perftest: PerfTest failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    rates = {kind: float(value) for kind, value in re.findall(r"(sending|receiving) rate avg: (\d+) msg/s", done.stdout)}
    return {"send": rates.get("sending", 0.0), "receive": rates.get("receiving", 0.0), "seconds": seconds}


def perftest_producer(queue_type: str, n: int) -> float:
    with fresh_queue("perftest", queue_type) as queue:
        rates = perftest("-x", "1", "-y", "0", "-u", queue, "-p", "-ad", "false", "-C", str(n), "-c", str(WINDOW),
                         "-f", "persistent", "-s", "12")
        verify_depth(queue, n)
    return rates["send"]


def fill_rate(queue_type: str, n: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "fill_throughput.py"), "A", queue_type, str(n)],
                          capture_output=True, text=True, cwd=REPO / "bench")
    if done.returncode != 0:
        raise SystemExit(f"perftest: the fill failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ledger_cost(queue_type: str, rounds: int = 20) -> float:
    """Milliseconds the fill's three ledger records (reset, filling, fill) cost, measured on their own."""
    sys.path.insert(0, str(REPO / "provider"))
    from workqueue_provider.amqp import receipts
    from workqueue_provider.amqp.connection import BrokerSettings, open_connection

    with fresh_queue("ledger", queue_type) as queue:
        connection = open_connection(BrokerSettings.from_url(BROKER_URL))
        receipts.declare_receipts(connection, queue)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            receipts.reset(connection, queue)
            receipts.record_fill_started(connection, queue, "bench", 100_000)
            receipts.record_fill(connection, queue, "bench", 100_000)
            times.append(time.perf_counter() - started)
        channel = connection.channel()
        channel.queue_delete(receipts.receipts_queue(queue))
        connection.close()
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, rounds = (20_000, 1) if args.quick else (100_000, 3)
    perftest_classpath()
    results: dict[str, Any] = {}
    ok = True
    for queue_type in ("classic", "quorum"):
        ratios, fills, perfs = [], [], []
        for round_ in range(rounds):
            order = ("fill", "perftest") if round_ % 2 == 0 else ("perftest", "fill")
            measured = {}
            for what in order:
                measured[what] = fill_rate(queue_type, n)["rate"] if what == "fill" else perftest_producer(queue_type, n)
            fills.append(measured["fill"])
            perfs.append(measured["perftest"])
            ratios.append(measured["fill"] / measured["perftest"])
            print(f"perftest: {queue_type} round {round_ + 1}: fill {measured['fill']:,.0f} msg/s, PerfTest "
                  f"{measured['perftest']:,.0f} msg/s: {ratios[-1]:.2f}x", flush=True)
        ratio = statistics.median(ratios)
        ledger_ms = ledger_cost(queue_type)
        fill_ms = n / statistics.median(fills) * 1000
        met = ratio >= TARGET
        ok &= met
        print(f"Fill vs PerfTest's producer ({queue_type}, {n:,} persistent 12-byte messages, window {WINDOW:,}): "
              f"{ratio:.2f}x; target >= {TARGET:g}x: {'MET' if met else 'MISSED'}. The ledger's three records cost "
              f"{ledger_ms:.1f} ms per fill ({ledger_ms / fill_ms:.1%} of this fill), included in the fill's rate.")
        results[queue_type] = {"fill_rates": fills, "perftest_rates": perfs, "ratios": ratios, "ratio": ratio,
                               "target": TARGET, "target_met": met, "ledger_ms_per_fill": round(ledger_ms, 2)}
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "perftest.json").write_text(json.dumps({
            "command": "python bench/perftest.py", "messages": n, "rounds": rounds, "window": WINDOW,
            "perftest": PERFTEST_VERSION, "results": results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
