import pytest

from workqueue_provider.amqp.queues import QueueSpec, _parse_amqp_value, validate_queue_name
from workqueue_provider.exceptions import ConfigurationError


def test_quorum_by_default_with_arguments():
    spec = QueueSpec("jobs", dead_letter_exchange="", dead_letter_routing_key="jobs.dead", delivery_limit=3,
                     message_ttl_ms=1000, max_length=10)
    assert spec.arguments() == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "jobs.dead",
        "x-delivery-limit": 3, "x-message-ttl": 1000, "x-max-length": 10, "x-overflow": "reject-publish",
    }


@pytest.mark.parametrize(
    ("kwargs", "broker", "limit"),
    [
        pytest.param({}, (3, 10, 8), None, id="3.x-no-limit-omitted"),
        pytest.param({}, (4, 0, 5), -1, id="4.x-unlimited-explicitly"),
        pytest.param({}, (), None, id="unknown-version-omitted"),
        pytest.param({"delivery_limit": 5, "dead_letter_exchange": ""}, (4, 0, 5), 5, id="4.x-asked-limit"),
        pytest.param({"queue_type": "classic"}, (4, 0, 5), None, id="4.x-classic-has-none"),
        pytest.param({"extra_arguments": {"x-delivery-limit": -1}}, (4, 1), -1, id="4.x-asked-unlimited"),
    ],
)
def test_rabbitmq_4_gets_the_delivery_limit_asked_for(kwargs, broker, limit):
    assert QueueSpec("q", **kwargs).arguments(broker).get("x-delivery-limit") == limit


@pytest.mark.parametrize("kwargs", [{"max_length": 5}, {"extra_arguments": {"x-max-length": 5}},
                                    {"extra_arguments": {"x-max-length-bytes": 5000}}])
def test_a_length_limit_refuses_new_items_instead_of_dropping_old_ones(kwargs):
    assert QueueSpec("q", **kwargs).arguments()["x-overflow"] == "reject-publish"


def test_no_overflow_argument_without_a_length_limit():
    assert "x-overflow" not in QueueSpec("q").arguments((4, 0))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"name": ""}, "queue name is empty", id="empty-name"),
        pytest.param({"name": "   "}, "queue name is empty", id="blank-name"),
        pytest.param({"name": "q" * 256}, "at most 255", id="long-name"),
        pytest.param({"name": "é" * 128}, "at most 255", id="long-name-in-bytes"),
        pytest.param({"name": "amq.jobs"}, "reserves", id="reserved-prefix"),
        pytest.param({"name": "q", "queue_type": "stream"}, "Unknown queue type 'stream'", id="unknown-type"),
        pytest.param({"name": "q", "delivery_limit": 0}, "positive integer", id="zero-limit"),
        pytest.param({"name": "q", "max_length": -1}, "positive integer", id="negative-length"),
        pytest.param({"name": "q", "message_ttl_ms": "10"}, "positive integer", id="ttl-string"),
        pytest.param({"name": "q", "queue_type": "classic", "delivery_limit": 3}, "needs a quorum queue", id="limit-classic"),
        pytest.param({"name": "q", "delivery_limit": 3}, "would drop items without a trace", id="limit-without-dlx"),
        pytest.param({"name": "q", "message_ttl_ms": 1000}, "would drop items without a trace", id="ttl-without-dlx"),
        pytest.param({"name": "q", "extra_arguments": {"x-message-ttl": 9}}, "would drop items", id="ttl-argument"),
        pytest.param({"name": "q", "max_length": 5, "extra_arguments": {"x-overflow": "drop-head"}},
                     "drops the oldest items silently", id="drop-head"),
    ],
)
def test_bad_queue_specs(kwargs, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        QueueSpec(**kwargs)


def test_a_255_byte_name_is_fine():
    assert validate_queue_name("q" * 255) == "q" * 255


@pytest.mark.parametrize(
    ("text", "value"),
    [("none", None), ("'quorum'", "quorum"), ("the value '60000' of type 'signedint'", 60000),
     ("the value 'dlx' of type 'longstr'", "dlx")],
)
def test_rabbitmq_argument_values_are_read(text, value):
    assert _parse_amqp_value(text) == value
