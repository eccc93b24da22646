"""KubernetesApi's own decisions, on a fake client: 404/409 handling, error translation, outage retries."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes.client import ApiException

from workqueue_provider.exceptions import (
    KubernetesAuthError,
    KubernetesError,
    KubernetesNotFoundError,
    KubernetesUnreachableError,
)
from workqueue_provider.hooks import kubernetes as kubernetes_module
from workqueue_provider.hooks.kubernetes import KubernetesApi


class Client:
    @staticmethod
    def sanitize_for_serialization(obj):
        return obj


def api() -> KubernetesApi:
    k = KubernetesApi("k8s")
    k.__dict__["api_client"] = Client()
    return k


def failing(*errors, result=None):
    """A client call that raises ``errors`` in turn, then returns ``result``; records its calls."""
    calls = []

    def call(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    call.calls = calls
    return call


def test_missing_ok_and_exists_ok_turn_404_and_409_into_none():
    assert api().call("read", failing(ApiException(status=404)), missing_ok=True) is None
    assert api().call("create", failing(ApiException(status=409)), exists_ok=True) is None
    with pytest.raises(KubernetesNotFoundError):
        api().call("read Job 'j'", failing(ApiException(status=404)))


@pytest.mark.parametrize(("status", "error"), [(401, KubernetesAuthError), (403, KubernetesAuthError),
                                               (500, KubernetesError), (422, KubernetesError)])
def test_api_errors_become_kubernetes_errors_naming_the_action(status, error):
    with pytest.raises(error, match="create Job 'j'") as raised:
        api().call("create Job 'j'", failing(ApiException(status=status, reason="x")), namespace="ns")
    assert isinstance(raised.value.__cause__, ApiException)


def test_a_refused_connection_is_unreachable_naming_the_connection():
    with pytest.raises(KubernetesUnreachableError, match="connection 'k8s' can't be reached"):
        api().call("read Job 'j'", failing(urllib3.exceptions.MaxRetryError(None, "/", ConnectionRefusedError())))


def test_waiting_reads_ride_out_a_restarting_api_server(monkeypatch):
    monkeypatch.setattr(kubernetes_module, "OUTAGE_SECONDS", 5)
    call = failing(ApiException(status=503), ConnectionResetError(), result={"kind": "Job"})
    assert api().call("read Job 'j'", call, ride_out_outages=True) == {"kind": "Job"}
    assert len(call.calls) == 3 and all(c["_request_timeout"] == kubernetes_module.READ_TIMEOUT for c in call.calls)


def test_other_calls_fail_at_the_first_outage():
    call = failing(ApiException(status=503), result={})
    with pytest.raises(KubernetesError, match="503"):
        api().call("create Job 'j'", call)
    assert len(call.calls) == 1


def test_an_unknown_connection_names_both_fixes(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CLUSTER", raising=False)
    with pytest.raises(Exception, match="The Kubernetes connection 'no_such_cluster' isn't defined"):
        _ = KubernetesApi("no_such_cluster").api_client


def test_no_connection_and_no_kubeconfig_names_both_fixes(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(Exception) as raised:
        _ = KubernetesApi().api_client
    message = str(raised.value)
    assert "No Kubernetes connection 'kubernetes_default' is defined" in message, message
    assert "set KUBECONFIG" in message and "AIRFLOW_CONN_KUBERNETES_DEFAULT='kubernetes://?kube_config_path=" in message
