"""Items are data (issue 10 section 5): through a real DAG run (``airflow dags test``, with
``render_template_as_native_obj=True`` like the example DAG), a literal list and a callable arrive in
the queue byte for byte; only a string template is rendered."""

from __future__ import annotations

import json
import textwrap
import uuid

import pika
import pytest

from scripts.demo import airflow
from workqueue_provider.amqp import receipts
from workqueue_provider.hooks.amqp import AmqpHook

pytestmark = [pytest.mark.integration]
TRICKY = ["{{ x }}", "a {% b", "1e3", "0x10", "'q'", "{{ params.secret }}", "[1, 2]", "None"]

DAG_FILE = '''
from datetime import datetime

from airflow.sdk import DAG

from workqueue_provider.operators.queue import DeclareQueueOperator, FillQueueOperator

TRICKY = {tricky!r}


def generate():
    return iter(TRICKY)


with DAG(dag_id="templated_items", schedule=None, start_date=datetime(2026, 1, 1),
         render_template_as_native_obj=True, params={{"items": ["p1", "{{{{ p2 }}}}"], "secret": "rendered!"}}):
    for suffix, items in (("literal", TRICKY), ("callable", generate), ("lambda", lambda: (i for i in TRICKY)),
                          ("template", "{{{{ params['items'] }}}}")):
        queue = "{prefix}-" + suffix
        DeclareQueueOperator(task_id="declare_" + suffix, queue_name=queue, queue_type="classic") >> \\
            FillQueueOperator(task_id="fill_" + suffix, queue_name=queue, items=items)
'''


def bodies(url: str, queue: str) -> list[str]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    taken = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        taken.append(body.decode())
    connection.close()
    return taken


def test_literal_and_callable_items_arrive_byte_for_byte_only_templates_are_rendered(broker_url, tmp_path,
                                                                                       monkeypatch):
    prefix = f"tmpl-{uuid.uuid4().hex[:8]}"
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "templated_items.py").write_text(textwrap.dedent(DAG_FILE.format(tricky=TRICKY, prefix=prefix)))
    env = {"AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_CONN_AMQP_DEFAULT": broker_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import os
    migrated = airflow(["db", "migrate"], dict(os.environ), echo=False)
    assert migrated.returncode == 0, migrated.stdout[-3000:]
    result = airflow(["dags", "test", "templated_items", "--conf", json.dumps({})], dict(os.environ), echo=False)
    try:
        assert result.returncode == 0 and "state=success" in result.stdout.replace("DagRunState.SUCCESS", "state=success"), \
            result.stdout[-5000:]
        for suffix in ("literal", "callable", "lambda"):
            assert bodies(broker_url, f"{prefix}-{suffix}") == TRICKY, f"{suffix} items were rewritten"
        assert bodies(broker_url, f"{prefix}-template") == ["p1", "{{ p2 }}"], "a template renders once, to the list"
    finally:
        hook = AmqpHook()
        for suffix in ("literal", "callable", "lambda", "template"):
            hook.delete_queue(f"{prefix}-{suffix}")
            hook.delete_queue(receipts.receipts_queue(f"{prefix}-{suffix}"))
