import pytest

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.worker.cli import main, parse_options

ENV = {"BROKER_URL": "amqp://u:p@rabbit:5672/", "QUEUE": "job1"}


def test_environment_gives_url_and_queue_like_amqp_consume():
    settings, options = parse_options(["/usr/bin/worker.py"], ENV)
    assert settings.host == "rabbit" and options.queue == "job1"
    assert options.command == ["/usr/bin/worker.py"] and options.max_items == 1


def test_flags_override_the_environment_and_command_flags_pass_through():
    settings, options = parse_options(["--url", "amqp://x/", "-q", "other", "-c", "5", "--", "worker", "-c", "9"], ENV)
    assert settings.host == "x" and options.queue == "other" and options.max_items == 5
    assert options.command == ["worker", "-c", "9"]


@pytest.mark.parametrize(
    ("argv", "env", "max_items"),
    [
        (["--drain", "w"], ENV, None),
        (["w"], {**ENV, "WORKQUEUE_MAX_ITEMS": "0"}, None),
        (["w"], {**ENV, "WORKQUEUE_MAX_ITEMS": "7"}, 7),
    ],
)
def test_drain_and_batch_modes(argv, env, max_items):
    assert parse_options(argv, env)[1].max_items == max_items


def test_dead_letter_and_ca_file():
    settings, options = parse_options(["--dead-letter", "--ca-file", "/ca.pem", "w"],
                                      {**ENV, "BROKER_URL": "amqps://u:p@rabbit/"})
    assert options.dead_letter and settings.ca_file == "/ca.pem" and settings.tls


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["w"], {"QUEUE": "q"}, "No broker URL"),
        (["w"], {"BROKER_URL": "amqp://h/"}, "No queue"),
        ([], ENV, "No command"),
        (["-c", "0", "w"], ENV, "must be positive"),
        (["w"], {**ENV, "WORKQUEUE_MAX_ITEMS": "many"}, "not a number"),
        (["w"], {**ENV, "BROKER_URL": "http://h/"}, "Malformed broker URL"),
    ],
)
def test_bad_options_are_refused(argv, env, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        parse_options(argv, env)


def test_usage_errors_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("BROKER_URL", raising=False)
    assert main(["worker"]) == 2
    assert "No broker URL" in capsys.readouterr().err
