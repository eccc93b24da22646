"""work_items() refuses bad input before touching the broker."""

import pytest

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.worker.items import work_items


@pytest.mark.parametrize(("kwargs", "env", "message"), [
    pytest.param({}, {"QUEUE": "q"}, "No broker URL", id="no-url"),
    pytest.param({}, {"BROKER_URL": "amqp://h/"}, "No queue", id="no-queue"),
    pytest.param({"prefetch": 0}, {"BROKER_URL": "amqp://h/", "QUEUE": "q"}, "prefetch=0", id="prefetch"),
    pytest.param({"max_items": 0}, {"BROKER_URL": "amqp://h/", "QUEUE": "q"}, "max_items=0", id="max-items"),
])
def test_bad_options_are_refused_before_connecting(kwargs, env, message):
    with pytest.raises(ConfigurationError, match=message):
        work_items(env=env, **kwargs)


def test_options_come_from_the_environment():
    items = work_items(env={"BROKER_URL": "amqp://u:secret@broker:5672/", "QUEUE": "jobs"})
    assert items.queue == "jobs" and items.settings.host == "broker" and items.prefetch == 200
    assert "secret" not in repr(items.settings)
