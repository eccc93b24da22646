"""The broker's Secret, Service and StatefulSet manifests (pure functions)."""

import base64
import copy

import pytest
from kubernetes import client

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.kube.broker_manifests import (
    DEFAULT_IMAGE,
    DEFAULT_RESOURCES,
    SEED_POD_LABELS,
    BrokerManifestSpec,
    credentials_secret,
    differences,
    generate_password,
    rabbitmq_service,
    rabbitmq_statefulset,
)

SPEC = BrokerManifestSpec(namespace="team-a")


def round_trip(manifest, model):
    """The manifest through the client's model and back: any field the API doesn't know is lost."""
    api = client.ApiClient()
    return api.sanitize_for_serialization(api._ApiClient__deserialize(copy.deepcopy(manifest), model))


@pytest.mark.parametrize(
    ("build", "model"),
    [
        pytest.param(lambda: credentials_secret(SPEC, "workqueue", "s3cret"), "V1Secret", id="secret"),
        pytest.param(lambda: rabbitmq_service(SPEC), "V1Service", id="service"),
        pytest.param(lambda: rabbitmq_statefulset(SPEC), "V1StatefulSet", id="statefulset"),
    ],
)
def test_every_field_is_a_known_api_field(build, model):
    manifest = build()
    assert round_trip(manifest, model) == manifest


def test_service_is_the_seeds_rabbitmq_service():
    service = rabbitmq_service(SPEC)
    assert service["metadata"]["name"] == "rabbitmq-service"
    assert service["metadata"]["namespace"] == "team-a"
    assert service["metadata"]["labels"]["component"] == "rabbitmq"
    assert [p["port"] for p in service["spec"]["ports"]] == [5672]
    assert service["spec"]["selector"] == SEED_POD_LABELS


def test_statefulset_is_the_seeds_with_credentials_from_the_secret():
    sts = rabbitmq_statefulset(SPEC)
    spec = sts["spec"]
    assert sts["metadata"]["name"] == "rabbitmq"
    assert (spec["replicas"], spec["serviceName"]) == (1, "rabbitmq-service")
    assert spec["selector"]["matchLabels"] == SEED_POD_LABELS == {
        k: v for k, v in spec["template"]["metadata"]["labels"].items() if k in SEED_POD_LABELS}
    [container] = spec["template"]["spec"]["containers"]
    assert container["image"] == DEFAULT_IMAGE
    assert [p["containerPort"] for p in container["ports"]] == [5672]
    assert container["resources"] == DEFAULT_RESOURCES
    assert container["env"] == [
        {"name": "RABBITMQ_DEFAULT_USER", "valueFrom": {"secretKeyRef": {"name": "rabbitmq-credentials", "key": "username"}}},
        {"name": "RABBITMQ_DEFAULT_PASS", "valueFrom": {"secretKeyRef": {"name": "rabbitmq-credentials", "key": "password"}}},
    ]
    assert not [e for e in container["env"] if "value" in e], "no credential is a plain env value"
    assert container["readinessProbe"]["exec"]["command"][0] == "rabbitmq-diagnostics"


def test_options_reach_the_manifests():
    spec = BrokerManifestSpec(namespace="ns", image="registry.local/rabbitmq:3.13", secret_name="creds",
                              service_name="mq", statefulset_name="broker", resources={"limits": {"cpu": "1"}},
                              labels={"team": "a"})
    sts = rabbitmq_statefulset(spec)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert (sts["spec"]["serviceName"], container["image"], container["resources"]) == (
        "mq", "registry.local/rabbitmq:3.13", {"limits": {"cpu": "1"}})
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]} == {"creds"}
    assert rabbitmq_service(spec)["metadata"]["labels"]["team"] == "a"
    assert (spec.pod_name, spec.host()) == ("broker-0", "mq.ns.svc")


def test_secret_holds_base64_credentials():
    secret = credentials_secret(SPEC, "workqueue", "pä$$word")
    assert secret["type"] == "Opaque"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "username": "workqueue", "password": "pä$$word"}
    with pytest.raises(ConfigurationError, match="non-empty username and password"):
        credentials_secret(SPEC, "workqueue", "")


def test_generated_passwords_are_long_random_and_never_guest():
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) >= 32 and p != "guest" for p in passwords)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"namespace": "Team_A"}, "Namespace name 'Team_A'", id="namespace-case"),
        pytest.param({"namespace": "a" * 64}, "at most 63", id="namespace-too-long"),
        pytest.param({"service_name": "-mq"}, "Service name '-mq'", id="service-leading-dash"),
        pytest.param({"statefulset_name": "r" * 53}, "StatefulSet name", id="statefulset-too-long"),
        pytest.param({"secret_name": "creds/x"}, "Secret name", id="secret-slash"),
        pytest.param({"image": " "}, "image", id="empty-image"),
        pytest.param({"resources": {"limit": {"cpu": "1"}}}, "requests", id="resources-typo"),
    ],
)
def test_invalid_input_is_refused(kwargs, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        BrokerManifestSpec(**kwargs)


def test_differences_name_what_an_existing_object_changes():
    api = client.ApiClient()
    as_read = lambda manifest, model: api.sanitize_for_serialization(  # noqa: E731
        api._ApiClient__deserialize(copy.deepcopy(manifest), model))
    sts, service = rabbitmq_statefulset(SPEC), rabbitmq_service(SPEC)
    assert differences(as_read(sts, "V1StatefulSet"), sts) == []
    assert differences(as_read(service, "V1Service"), service) == []
    other = copy.deepcopy(sts)
    other["spec"]["template"]["spec"]["containers"][0]["image"] = "rabbitmq:3.8"
    other["spec"]["replicas"] = 3
    assert differences(other, sts) == ["replicas 3 (wanted 1)", "image 'rabbitmq:3.8' (wanted 'rabbitmq:3.13-management')"]
    moved = copy.deepcopy(service)
    moved["spec"]["ports"] = [{"port": 5671, "targetPort": 5671}]
    assert differences(moved, service) == ["ports [(5671, 5671)] (wanted [(5672, 5672)])"]
    assert differences({"data": {"username": "dQ=="}}, credentials_secret(SPEC, "u", "p")) == ["no key(s) password"]
