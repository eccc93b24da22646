#!/usr/bin/env python3
"""The seed's job-wq-1 worker: reads one work item on stdin and prints "Processing <item>"."""

import sys

item = sys.stdin.read().strip()
print("Processing " + item, flush=True)
