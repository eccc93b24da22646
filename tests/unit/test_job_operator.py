"""QueueJobOperator's checks that need no services: bad waiting knobs are refused before anything is created."""

from __future__ import annotations

import pytest

from tests.conftest import task_context
from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.operators.job import QueueJobOperator


@pytest.mark.parametrize(("knob", "value"), [
    pytest.param("poll_interval", 0, id="poll-interval-zero"),
    pytest.param("timeout", -5, id="negative-timeout"),
    pytest.param("image_pull_grace_seconds", "soon", id="grace-not-a-number"),
    pytest.param("poll_interval", True, id="poll-interval-bool"),
])
def test_waiting_knobs_are_checked_before_anything_is_created(knob, value):
    operator = QueueJobOperator(task_id="run_job", image="img:1", queue_name="q", **{knob: value})
    operator.__dict__["jobs"] = operator.__dict__["amqp"] = None  # any call to Kubernetes or the broker fails
    with pytest.raises(ConfigurationError, match=f"{knob}=.* must be a positive number of seconds"):
        operator.execute(task_context())


def test_the_dead_letter_queue_is_templated_like_the_sensors():
    assert "dead_letter_queue" in QueueJobOperator.template_fields


def test_the_sensors_grace_period_is_checked_before_any_call():
    from workqueue_provider.sensors.job import JobCompleteSensor

    sensor = JobCompleteSensor(task_id="wait", job_name="j", image_pull_grace_seconds=0)
    sensor.__dict__["jobs"] = None  # any call to Kubernetes fails
    with pytest.raises(ConfigurationError, match="image_pull_grace_seconds=0 must be a positive number of seconds"):
        sensor.execute(task_context())
