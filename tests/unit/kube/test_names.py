"""Names and label values the provider gives Kubernetes objects."""

from __future__ import annotations

import re

import pytest

from workqueue_provider.kube.names import airflow_labels, label_value

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize(("text", "expected"), [
    ("work_queue_example", "work_queue_example"),
    ("manual__2026-12-01T03:04:05.123456+00:00", "manual__2026-12-01T03-04-05.123456-00-00"),
    ("scheduled__2026-01-01T00:00:00+00:00", "scheduled__2026-01-01T00-00-00-00-00"),
])
def test_run_ids_become_valid_label_values(text, expected):
    assert label_value(text) == expected and LABEL_VALUE.match(expected)


def test_long_values_stay_distinct_and_valid():
    a, b = label_value("x" * 70 + "a"), label_value("x" * 70 + "b")
    assert a != b and len(a) <= 63 and LABEL_VALUE.match(a) and LABEL_VALUE.match(b)


def test_airflow_labels_name_the_dag_task_and_run():
    assert airflow_labels("d", "t", "r") == {"airflow.apache.org/dag-id": "d", "airflow.apache.org/task-id": "t",
                                             "airflow.apache.org/run-id": "r"}
