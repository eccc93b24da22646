import pika
import pytest

from workqueue_provider.amqp.connection import BrokerSettings, translate_connect_error
from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("amqp://user:pass@host:5672/vh", dict(host="host", port=5672, login="user", vhost="vh", tls=False),
                     id="amqp"),
        pytest.param("amqps://user:pass@host/vh", dict(host="host", effective_port=5671, tls=True), id="amqps-default-port"),
        pytest.param("amqp://u:p@host/", dict(vhost="/", effective_port=5672), id="empty-vhost-is-slash"),
        pytest.param("amqp://u:p@host/%2F", dict(vhost="/"), id="encoded-slash-vhost"),
        pytest.param("amqp://u:p%40ss@host/", dict(password="p@ss"), id="encoded-password"),
        pytest.param("amqp://host", dict(login="guest", password="guest"), id="guest-by-default"),
        pytest.param("amqp://u:p@h/?heartbeat=30&connection_attempts=5&blocked_connection_timeout=12.5",
                     dict(heartbeat=30, connection_attempts=5, blocked_connection_timeout=12.5), id="query-options"),
        pytest.param("amqps://u:p@h/?ca_certs=/ca.pem&verify=false&server_hostname=rabbit",
                     dict(ca_file="/ca.pem", verify=False, server_hostname="rabbit"), id="tls-options"),
    ],
)
def test_url_forms_are_read(url, expected):
    settings = BrokerSettings.from_url(url)
    for attribute, value in expected.items():
        assert getattr(settings, attribute) == value, attribute


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        pytest.param("http://host/", "Malformed broker URL", id="wrong-scheme"),
        pytest.param("amqp://", "Malformed broker URL", id="no-host"),
        pytest.param("amqp://host:99999/", "Malformed broker URL", id="port-out-of-range"),
        pytest.param("amqp://host:abc/", "Malformed broker URL", id="port-not-a-number"),
        pytest.param("amqp://h/?heartbeat=soon", "heartbeat='soon' is not a number", id="bad-number"),
        pytest.param("amqp://h/?bogus=1", "Unknown broker option 'bogus'", id="unknown-option"),
        pytest.param("amqp://h/?connection_attempts=0", "must be positive", id="zero-attempts"),
    ],
)
def test_malformed_urls_are_refused_clearly(url, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        BrokerSettings.from_url(url)


def test_defaults_bound_every_wait():
    params = BrokerSettings(host="h").pika_parameters()
    assert params.blocked_connection_timeout and params.socket_timeout and params.stack_timeout
    assert params.heartbeat == 60
    assert params.connection_attempts >= 1


def test_password_never_in_repr_or_description():
    settings = BrokerSettings.from_url("amqp://user:s3cr3t-pw@host/vh")
    assert "s3cr3t-pw" not in repr(settings)
    assert "s3cr3t-pw" not in settings.describe()
    assert "s3cr3t-pw" in settings.url(), "url() is the one place that carries it (for a Secret)"


def test_url_can_point_pods_elsewhere():
    settings = BrokerSettings.from_url("amqp://u:p@localhost:5672/vh")
    assert settings.url(host="rabbitmq-service", port=5672) == "amqp://u:p@rabbitmq-service:5672/vh"
    assert settings.address_for(host="rabbitmq-service", port=5672) == "rabbitmq-service:5672"  # what the log says
    assert BrokerSettings.from_url("amqp://u:p@10.0.0.9:30672/").address_for(host="rabbitmq-service") == \
        "rabbitmq-service:30672"
    assert BrokerSettings.from_url(settings.url()) == settings


def test_tls_parameters_use_the_ca(tmp_path):
    with pytest.raises(ConfigurationError, match="TLS files"):
        BrokerSettings.from_url("amqps://u:p@h/?ca_certs=/does/not/exist.pem").pika_parameters()
    params = BrokerSettings.from_url("amqps://u:p@h/?verify=false").pika_parameters()
    assert params.ssl_options is not None and params.port == 5671


@pytest.mark.parametrize(
    ("error", "kind", "fragment"),
    [
        pytest.param(pika.exceptions.ProbableAuthenticationError("403"), BrokerAuthError, "refused the credentials", id="auth"),
        pytest.param(pika.exceptions.ProbableAccessDeniedError("530"), BrokerAuthError, "refused vhost", id="vhost"),
        pytest.param(pika.exceptions.AMQPConnectionError("refused"), BrokerUnreachableError, "did not answer", id="unreachable"),
        pytest.param(OSError("boom"), BrokerUnreachableError, "did not answer", id="socket"),
    ],
)
def test_pika_errors_are_translated(error, kind, fragment):
    translated = translate_connect_error(BrokerSettings(host="h", port=1234, password="pw-xyz"), error)
    assert isinstance(translated, kind) and isinstance(translated, BrokerError)
    assert not isinstance(translated, pika.exceptions.AMQPError)
    assert fragment in str(translated) and "h:1234" in str(translated)
    assert "pw-xyz" not in str(translated)


def test_the_outage_window_is_read_from_extras_and_urls():
    assert BrokerSettings(host="h").outage_window == 300
    assert BrokerSettings.from_url("amqp://h/?outage_window=4.5").outage_window == 4.5
    assert BrokerSettings(host="h").with_options({"outage_window": "0"}).outage_window == 0
    with pytest.raises(ConfigurationError, match="outage_window=-1.0 must not be negative"):
        BrokerSettings.from_url("amqp://h/?outage_window=-1")


def test_only_outages_are_transient():
    import socket
    import ssl

    from workqueue_provider.amqp.connection import is_transient

    settings = BrokerSettings(host="h")
    refused = pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(translate_connect_error(settings, refused))
    assert is_transient(pika.exceptions.StreamLostError("lost"))
    assert is_transient(pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown"))
    assert not is_transient(translate_connect_error(settings, pika.exceptions.ProbableAuthenticationError("403")))
    assert not is_transient(translate_connect_error(settings, socket.gaierror(-2, "Name or service not known")))
    assert not is_transient(translate_connect_error(settings, ssl.SSLError("CERTIFICATE_VERIFY_FAILED")))
    assert not is_transient(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue"))
    home_down = pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - home node 'rabbit@b' of durable queue 'q' in "
                                                           "vhost '/' is down or inaccessible")
    assert is_transient(home_down), "a classic queue's node down: back with its node, worth waiting out"
    try:
        raise BrokerError("depth failed") from home_down
    except BrokerError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(ConfigurationError("bad input"))


def test_the_pods_url_keeps_the_tls_options_and_brackets_an_ipv6_host():
    settings = BrokerSettings(host="fd00::10", password="p@ss", tls=True, ca_file="/etc/ca.pem", verify=False,
                              server_hostname="rabbit.internal")
    url = settings.url()
    assert url.startswith("amqps://guest:p%40ss@[fd00::10]:5671/%2F?")
    back = BrokerSettings.from_url(url)
    assert (back.host, back.ca_file, back.verify, back.server_hostname, back.tls, back.password) == \
        ("fd00::10", "/etc/ca.pem", False, "rabbit.internal", True, "p@ss")
    assert BrokerSettings(host="rabbitmq-service").url(port=5672) == "amqp://guest:guest@rabbitmq-service:5672/%2F"


def test_an_amqps_connection_uses_tls_even_with_use_tls_unticked(monkeypatch):
    import json

    from workqueue_provider.hooks.amqp import AmqpHook

    monkeypatch.setenv("AIRFLOW_CONN_AMQP_FORM", json.dumps(
        {"conn_type": "amqps", "host": "rabbit", "login": "u", "password": "p", "extra": {"ssl": False}}))
    settings = AmqpHook(amqp_conn_id="amqp_form").settings
    assert settings.tls and settings.effective_port == 5671


# -- several nodes (a RabbitMQ cluster) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        pytest.param("h1,h2:5673,h3", None, "h1:5672,h2:5673,h3:5672", id="default-port-for-bare-hosts"),
        pytest.param(" h1 , h2 ", 5680, "h1:5680,h2:5680", id="connection-port-and-spaces"),
        pytest.param("[fd00::1]:5672,fd00::2", None, "[fd00::1]:5672,[fd00::2]:5672", id="ipv6"),
        pytest.param("only", None, "only:5672", id="one-host"),
    ],
)
def test_a_host_list_names_every_node_in_order(host, port, expected):
    settings = BrokerSettings(host=host, port=port)
    assert settings.address == expected
    assert [f"{p.host}:{p.port}" for p in settings.connection_parameters()] == \
        [f"{a.host}:{a.port}" for a in settings.addresses]


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        pytest.param("h1,,h2", "empty entry", id="doubled-comma"),
        pytest.param("h1,", "empty entry", id="trailing-comma"),
        pytest.param("h1,h2:abc", "port that is not a number", id="bad-port"),
        pytest.param("h1,h2:70000", "out of range", id="port-out-of-range"),
        pytest.param("h1,h1:5672", "names an address twice", id="duplicate"),
        pytest.param(":5672", "has no host", id="no-host"),
        pytest.param("[fd00::1", "IPv6", id="unclosed-bracket"),
        pytest.param("", "has no host", id="empty"),
    ],
)
def test_a_malformed_host_list_is_refused_before_anything_connects(host, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        BrokerSettings(host=host)


def test_the_pods_url_carries_every_node_and_reads_back():
    settings = BrokerSettings(host="h1,h2:5673,h3", login="u", password="p@ss", vhost="/")
    url = settings.url()
    assert url == "amqp://u:p%40ss@h1:5672,h2:5673,h3:5672/%2F"
    again = BrokerSettings.from_url(url)
    assert again.addresses == settings.addresses and again.password == "p@ss" and again.vhost == "/"
    assert again.url() == url


def test_a_host_override_replaces_the_list_and_a_port_override_applies_to_bare_hosts():
    settings = BrokerSettings(host="h1,h2:5673", login="u", password="p")
    assert settings.url(host="rabbitmq-service") == "amqp://u:p@rabbitmq-service:5672/%2F"
    assert settings.url(host="rabbitmq-service", port=30672) == "amqp://u:p@rabbitmq-service:30672/%2F"
    assert settings.url(port=30672) == "amqp://u:p@h1:30672,h2:5673/%2F"
    assert settings.url(host="a,b") == "amqp://u:p@a:5672,b:5672/%2F"


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        pytest.param("amqp://u:p@h1:5672,h2:5672,h3:5672/%2F", ["h1:5672", "h2:5672", "h3:5672"], id="each-port"),
        pytest.param("amqp://u:p@h1,h2,h3:5673/", ["h1:5672", "h2:5672", "h3:5673"], id="airflow-uri-form"),
        pytest.param("amqps://u:p@h1,h2/?verify=false", ["h1:5671", "h2:5671"], id="tls-default-port"),
        pytest.param("amqp://u:p@[::1]:5672,[::2]:5673/", ["[::1]:5672", "[::2]:5673"], id="ipv6"),
    ],
)
def test_the_url_form_with_several_nodes_is_read(url, addresses):
    assert [str(a) for a in BrokerSettings.from_url(url).addresses] == addresses


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        pytest.param("amqp://u:p@h1,,h2/", "empty entry", id="doubled-comma"),
        pytest.param("amqp://u:p@h1:x,h2/", "not a number", id="bad-port"),
    ],
)
def test_a_malformed_url_with_several_nodes_is_refused_clearly(url, fragment):
    with pytest.raises(ConfigurationError, match=f"Malformed broker URL.*{fragment}"):
        BrokerSettings.from_url(url)


def test_several_nodes_never_show_the_password():
    settings = BrokerSettings.from_url("amqp://user:s3cr3t-pw@h1:5672,h2:5672/vh")
    assert settings.describe() == "amqp://user@h1:5672,h2:5672/vh"
    for text in (repr(settings), settings.describe(), settings.address,
                 str(translate_connect_error(settings, ConnectionRefusedError("refused")))):
        assert "s3cr3t-pw" not in text


def test_no_node_answering_names_every_node():
    settings = BrokerSettings(host="h1,h2,h3")
    error = translate_connect_error(settings, pika.exceptions.AMQPConnectionError("refused"))
    assert isinstance(error, BrokerUnreachableError)
    assert "None of the broker nodes h1:5672,h2:5672,h3:5672 answered" in str(error)


def test_tls_checks_each_nodes_own_name():
    settings = BrokerSettings(host="rabbit-0,rabbit-1", tls=True, verify=False)
    assert [p.ssl_options.server_hostname for p in settings.connection_parameters()] == ["rabbit-0", "rabbit-1"]


def test_an_error_without_a_message_never_shows_empty_parentheses():
    import pika.exceptions

    from workqueue_provider.amqp.errors import short

    assert short(pika.exceptions.AMQPConnectionError()) == "AMQPConnectionError: no answer"
    wrapped = pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "Connection refused"))
    assert short(wrapped).startswith("AMQPConnectionError: ") and "Connection refused" in short(wrapped)
