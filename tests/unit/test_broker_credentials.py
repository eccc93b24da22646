"""Broker credentials from a Kubernetes Secret: connection extras, AmqpHook.settings, error translation."""

import base64
import json
from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException

from workqueue_provider.exceptions import (
    ConfigurationError,
    KubernetesAuthError,
    KubernetesError,
    KubernetesNotFoundError,
    KubernetesUnreachableError,
    WorkQueueError,
)
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.hooks.broker_credentials import (
    CredentialsSecretNotFoundError,
    SecretRef,
    pop_secret_ref,
    read_credentials,
)
from workqueue_provider.hooks.kube_errors import api_error as translate_api_error
from workqueue_provider.hooks.kubernetes import KubernetesApi

PASSWORD = "Zx9-generated-secret-password_42"


def b64(text):
    return base64.b64encode(text.encode()).decode()


def api_error(status, message, kind=None, name=None):
    error = ApiException(status=status, reason={403: "Forbidden", 404: "Not Found", 500: "Internal"}.get(status, ""))
    error.body = json.dumps({"kind": "Status", "message": message, "details": {"kind": kind, "name": name}})
    return error


class FakeCoreV1:
    """read_namespaced_secret from a dict, or raising a given error; records the calls."""

    def __init__(self, secrets=None, error=None):
        self.secrets = secrets or {}
        self.error = error
        self.calls = []

    def read_namespaced_secret(self, name, namespace, **_request_options):
        self.calls.append((name, namespace))
        if self.error is not None:
            raise self.error
        if (namespace, name) not in self.secrets:
            raise api_error(404, f'secrets "{name}" not found', "secrets", name)
        return SimpleNamespace(data=self.secrets[(namespace, name)])


class FakeApiClient:
    @staticmethod
    def sanitize_for_serialization(secret):
        return {"data": secret.data}


def fake_api(core, conn_id="kubernetes_default"):
    """A KubernetesApi whose CoreV1Api is ``core`` (the access layer's own error translation stays real)."""
    api = KubernetesApi(conn_id)
    api.__dict__.update(core=core, api_client=FakeApiClient())
    return api


@pytest.fixture
def fake_kube(monkeypatch):
    """The Kubernetes connection the hook reads the Secret through, faked; records which conn id was used."""
    core = FakeCoreV1({("brokers", "rabbitmq-credentials"): {"username": b64("workqueue"), "password": b64(PASSWORD)}})
    used = []
    real_init = KubernetesApi.__init__

    def init(self, conn_id="kubernetes_default"):
        used.append(conn_id)
        real_init(self, conn_id)
        self.__dict__.update(core=core, api_client=FakeApiClient())

    monkeypatch.setattr(KubernetesApi, "__init__", init)
    return SimpleNamespace(core=core, used=used)


def set_amqp_conn(monkeypatch, **extra):
    monkeypatch.setenv("AIRFLOW_CONN_AMQP_DEFAULT", json.dumps(
        {"conn_type": "amqp", "host": "rabbitmq-service.brokers.svc", "port": 5672, "login": "conn-user",
         "password": "conn-password", "extra": extra}))


@pytest.mark.parametrize(
    ("extras", "expected"),
    [
        pytest.param({}, None, id="no-secret"),
        pytest.param({"credentials_namespace": "x"}, None, id="namespace-alone-is-ignored"),
        pytest.param({"credentials_secret": "creds"}, SecretRef("creds", "default", "kubernetes_default"), id="defaults"),
        pytest.param({"credentials_secret": "creds", "credentials_namespace": "ns", "kubernetes_conn_id": "k8s"},
                     SecretRef("creds", "ns", "k8s"), id="all"),
    ],
)
def test_secret_extras_are_read_and_removed(extras, expected):
    remaining = {**extras, "heartbeat": "30"}
    assert pop_secret_ref(remaining) == expected
    assert remaining == {"heartbeat": "30"}


def test_hook_logs_in_with_the_secrets_credentials(monkeypatch, fake_kube):
    set_amqp_conn(monkeypatch, credentials_secret="rabbitmq-credentials", credentials_namespace="brokers",
                  kubernetes_conn_id="k8s_prod", heartbeat="30")
    settings = AmqpHook().settings
    assert (settings.login, settings.password, settings.heartbeat) == ("workqueue", PASSWORD, 30)
    assert settings.address == "rabbitmq-service.brokers.svc:5672"
    assert fake_kube.core.calls == [("rabbitmq-credentials", "brokers")]
    assert fake_kube.used == ["k8s_prod"]
    assert PASSWORD not in settings.describe() + repr(settings)


def test_prefixed_extras_from_the_classic_form_work_too(monkeypatch, fake_kube):
    set_amqp_conn(monkeypatch, extra__amqp__credentials_secret="rabbitmq-credentials",
                  extra__amqp__credentials_namespace="brokers")
    assert AmqpHook().settings.login == "workqueue"
    assert fake_kube.used == ["kubernetes_default"]


def test_without_a_secret_the_connection_credentials_are_used(monkeypatch, fake_kube):
    set_amqp_conn(monkeypatch, heartbeat="30")
    settings = AmqpHook().settings
    assert (settings.login, settings.password) == ("conn-user", "conn-password")
    assert fake_kube.used == []


def test_a_missing_secret_says_the_broker_was_not_started(monkeypatch, fake_kube):
    set_amqp_conn(monkeypatch, credentials_secret="rabbitmq-credentials", credentials_namespace="elsewhere")
    with pytest.raises(CredentialsSecretNotFoundError) as raised:
        _ = AmqpHook().settings
    message = str(raised.value)
    assert "Secret 'rabbitmq-credentials' in namespace 'elsewhere'" in message
    assert "EnsureBrokerOperator" in message
    assert isinstance(raised.value, ConfigurationError)


def test_test_connection_reports_a_missing_secret_instead_of_raising(monkeypatch, fake_kube):
    set_amqp_conn(monkeypatch, credentials_secret="rabbitmq-credentials", credentials_namespace="elsewhere")
    ok, message = AmqpHook().test_connection()
    assert not ok and "doesn't exist" in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param({"username": b64("u")}, "has no 'password' key", id="no-password"),
        pytest.param({}, "has no 'username' or 'password' key", id="empty"),
        pytest.param({"username": "not base64!", "password": b64("p")}, "base64", id="not-base64"),
    ],
)
def test_an_unusable_secret_is_named(data, fragment):
    core = FakeCoreV1({("ns", "creds"): data})
    with pytest.raises(ConfigurationError, match=fragment):
        read_credentials(SecretRef("creds", "ns"), fake_api(core))


@pytest.mark.parametrize(
    ("error", "expected_type", "fragments"),
    [
        pytest.param(api_error(403, 'secrets "creds" is forbidden: User "user-1" cannot get resource "secrets" '
                                    'in API group "" in the namespace "ns"'),
                     KubernetesAuthError, ["connection 'k8s' lacks RBAC rights", "403 Forbidden",
                                          'User "user-1" cannot get resource "secrets"', "Role"], id="rbac"),
        pytest.param(api_error(500, "etcdserver: request timed out"), KubernetesError, ["500", "etcdserver"], id="server"),
        pytest.param(ConnectionRefusedError(111, "Connection refused"), KubernetesUnreachableError,
                     ["can't be reached", "'k8s'"], id="api-down"),
    ],
)
def test_kubernetes_errors_are_translated_and_never_leak(error, expected_type, fragments):
    with pytest.raises(WorkQueueError) as raised:
        read_credentials(SecretRef("creds", "ns", "k8s"), fake_api(FakeCoreV1(error=error), "k8s"))
    assert type(raised.value) is expected_type
    assert raised.value.__cause__ is error
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_missing_namespace_is_named():
    error = translate_api_error(api_error(404, 'namespaces "team-x" not found', "namespaces", "team-x"),
                                "create Secret 'rabbitmq-credentials'", kubernetes_conn_id="k8s", namespace="team-x")
    assert isinstance(error, KubernetesNotFoundError)
    assert "namespace 'team-x' does not exist" in str(error) and "kubectl create namespace team-x" in str(error)


def test_an_unknown_kubernetes_connection_is_a_configuration_error(monkeypatch):
    set_amqp_conn(monkeypatch, credentials_secret="creds", kubernetes_conn_id="no_such_kubernetes_conn")
    with pytest.raises(ConfigurationError, match="Kubernetes connection 'no_such_kubernetes_conn' isn't defined"):
        _ = AmqpHook().settings


def test_a_password_read_from_a_secret_is_masked_in_airflows_logs(monkeypatch, fake_kube):
    """Airflow masks connection passwords itself, not one read from a Kubernetes Secret: it is registered."""

    masked: list[object] = []
    monkeypatch.setattr("workqueue_provider.compat.mask_secret", masked.append)
    set_amqp_conn(monkeypatch, credentials_secret="rabbitmq-credentials", credentials_namespace="brokers")
    assert AmqpHook().settings.password == PASSWORD
    assert masked == [PASSWORD]
