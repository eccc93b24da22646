"""``workqueue-consume``: the worker-side command line. Options also come from the environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.worker.consume import DEFAULT_OUTAGE_WINDOW, EXIT_BROKER, ConsumeOptions, consume

EXIT_USAGE = 2


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workqueue-consume",
        description="Run COMMAND once per queue item with the item on stdin; ack only on exit 0; "
        "exit 0 at once when the queue is empty.",
    )
    parser.add_argument("--url", default=env.get("BROKER_URL"),
                        help="amqp:// or amqps:// URL (env BROKER_URL)")
    parser.add_argument("-q", "--queue", default=env.get("QUEUE"), help="queue to consume (env QUEUE)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("-c", "--max-items", type=int, default=None,
                       help="take up to N items, one at a time (env WORKQUEUE_MAX_ITEMS; default 1)")
    count.add_argument("--drain", action="store_true", default=None,
                       help="take items until the queue is empty (env WORKQUEUE_MAX_ITEMS=0)")
    parser.add_argument("--dead-letter", action="store_true",
                        default=env.get("WORKQUEUE_DEAD_LETTER", "").lower() in ("1", "true", "yes"),
                        help="reject failed items without requeue, so the queue dead-letters them "
                        "(env WORKQUEUE_DEAD_LETTER)")
    parser.add_argument("--outage-window", type=float,
                        default=_float_env(env, "WORKQUEUE_OUTAGE_WINDOW", DEFAULT_OUTAGE_WINDOW),
                        help="seconds to keep reconnecting while the broker is unreachable before exiting "
                        f"{EXIT_BROKER} (env WORKQUEUE_OUTAGE_WINDOW; default {DEFAULT_OUTAGE_WINDOW:g})")
    parser.add_argument("--ca-file", default=env.get("BROKER_CA_FILE"),
                        help="CA bundle for amqps:// (env BROKER_CA_FILE)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="worker command and its arguments")
    return parser


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds.") from None


def parse_options(argv: Sequence[str], env: Mapping[str, str]) -> tuple[BrokerSettings, ConsumeOptions]:
    """Turn the command line and environment into settings; raises ConfigurationError on bad input."""
    args = build_parser(env).parse_args(argv)
    if not args.url:
        raise ConfigurationError("No broker URL: set BROKER_URL or pass --url amqp://user:pass@host:5672/vhost.")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.drain:
        max_items: int | None = None
    elif args.max_items is not None:
        max_items = args.max_items
    else:
        raw = env.get("WORKQUEUE_MAX_ITEMS", "1")
        try:
            max_items = int(raw) or None
        except ValueError:
            raise ConfigurationError(f"WORKQUEUE_MAX_ITEMS={raw!r} is not a number (0 drains the queue).") from None
    overrides = {"ca_file": args.ca_file} if args.ca_file else {}
    settings = BrokerSettings.from_url(args.url, **overrides)
    return settings, ConsumeOptions(queue=args.queue or "", command=command, max_items=max_items,
                                    dead_letter=args.dead_letter, outage_window=args.outage_window)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="workqueue-consume: %(message)s", stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # our own lines say what happened, once, without pika's dumps
    try:
        settings, options = parse_options(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigurationError as e:
        print(f"workqueue-consume: {e}", file=sys.stderr)
        return EXIT_USAGE
    return consume(settings, options).exit_code


if __name__ == "__main__":
    sys.exit(main())
