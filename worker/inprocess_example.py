#!/usr/bin/env python3
"""The seed's worker in process: one Python process takes items until the queue is empty, with
workqueue-consume's guarantees (ack after the item is handled, receipts, SIGTERM) and no process
per item. BROKER_URL and QUEUE come from the environment (QueueJobOperator sets them)."""

import logging
import sys

from workqueue_provider.worker.items import work_items

logging.basicConfig(level=logging.INFO, format="worker: %(message)s", stream=sys.stderr)
logging.getLogger("pika").setLevel(logging.CRITICAL)

# [START inprocess_worker]
items = work_items()
for item in items:
    print("Processing " + item.text.strip(), flush=True)
sys.exit(items.exit_code)
# [END inprocess_worker]
