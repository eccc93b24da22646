"""The broker's Secret, Service and StatefulSet manifests (pure functions)."""

import base64
import copy

import pytest
from kubernetes import client

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.kube.broker_manifests import (
    DEFAULT_IMAGE,
    DEFAULT_RESOURCES,
    TUTORIAL_POD_LABELS,
    BrokerManifestSpec,
    cluster_config_map,
    cookie_secret,
    credentials_secret,
    differences,
    generate_cookie,
    generate_password,
    nodes_service,
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
    assert service["spec"]["selector"] == TUTORIAL_POD_LABELS


def test_a_node_port_exposes_the_service_on_every_node_and_a_changed_one_is_named():
    assert "type" not in rabbitmq_service(SPEC)["spec"]  # the tutorial's ClusterIP Service by default
    spec = BrokerManifestSpec(namespace="team-a", node_port=30672)
    service = rabbitmq_service(spec)
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [{"name": "amqp", "port": 5672, "targetPort": 5672, "protocol": "TCP",
                                         "nodePort": 30672}]
    assert round_trip(service, "V1Service") == service
    existing = copy.deepcopy(service)
    existing["spec"]["ports"][0]["nodePort"] = 31000
    assert differences(existing, service) == ["nodePort [31000] (wanted [30672])"]


@pytest.mark.parametrize("port", [5672, 29999, 32768, True, "30672"])
def test_a_node_port_outside_the_range_is_refused(port):
    with pytest.raises(ConfigurationError, match="NodePort range 30000-32767"):
        BrokerManifestSpec(node_port=port)


def test_statefulset_is_the_seeds_with_credentials_from_the_secret():
    sts = rabbitmq_statefulset(SPEC)
    spec = sts["spec"]
    assert sts["metadata"]["name"] == "rabbitmq"
    assert (spec["replicas"], spec["serviceName"]) == (1, "rabbitmq-service")
    assert spec["selector"]["matchLabels"] == TUTORIAL_POD_LABELS == {
        k: v for k, v in spec["template"]["metadata"]["labels"].items() if k in TUTORIAL_POD_LABELS}
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


# -- replicas > 1: a RabbitMQ cluster ----------------------------------------------------------------
CLUSTER = BrokerManifestSpec(namespace="team-a", replicas=3)


@pytest.mark.parametrize(
    ("build", "model"),
    [
        pytest.param(lambda: rabbitmq_statefulset(CLUSTER), "V1StatefulSet", id="statefulset"),
        pytest.param(lambda: nodes_service(CLUSTER), "V1Service", id="headless-service"),
        pytest.param(lambda: cluster_config_map(CLUSTER), "V1ConfigMap", id="config-map"),
        pytest.param(lambda: cookie_secret(CLUSTER, "c00kie"), "V1Secret", id="cookie-secret"),
    ],
)
def test_every_cluster_field_is_a_known_api_field(build, model):
    manifest = build()
    assert round_trip(manifest, model) == manifest


def test_each_node_has_a_stable_name_through_the_headless_service():
    sts, headless = rabbitmq_statefulset(CLUSTER), nodes_service(CLUSTER)
    assert (sts["spec"]["replicas"], sts["spec"]["serviceName"]) == (3, "rabbitmq-nodes")
    assert headless["metadata"]["name"] == "rabbitmq-nodes"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in headless["spec"]["ports"]} == {5672, 4369, 25672}
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["RABBITMQ_NODENAME"]["value"] == "rabbit@$(MY_POD_NAME).rabbitmq-nodes.team-a.svc.cluster.local"
    assert CLUSTER.node_hosts() == [f"rabbitmq-{i}.rabbitmq-nodes.team-a.svc.cluster.local" for i in range(3)]


def test_peers_are_discovered_from_the_config_map_naming_every_node():
    conf = cluster_config_map(CLUSTER)["data"]["cluster.conf"].splitlines()
    assert "cluster_formation.peer_discovery_backend = classic_config" in conf
    assert [line.split(" = ")[1] for line in conf if ".classic_config.nodes." in line] == [
        f"rabbit@rabbitmq-{i}.rabbitmq-nodes.team-a.svc.cluster.local" for i in range(3)]
    sts = rabbitmq_statefulset(CLUSTER)
    [mount] = [m for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "cluster-config"]
    assert mount["mountPath"].startswith("/etc/rabbitmq/conf.d/")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cluster-config"]["configMap"]["name"] == cluster_config_map(CLUSTER)["metadata"]["name"]


def test_every_node_reads_the_same_erlang_cookie_from_a_secret():
    secret = cookie_secret(CLUSTER, "c00kie")
    assert base64.b64decode(secret["data"][".erlang.cookie"]).decode() == "c00kie"
    pod = rabbitmq_statefulset(CLUSTER)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["erlang-cookie"]["secret"]["secretName"] == secret["metadata"]["name"]
    [init] = pod["initContainers"]
    assert "/var/lib/rabbitmq/.erlang.cookie" in init["command"][-1] and "chmod 600" in init["command"][-1]
    assert "c00kie" not in repr(rabbitmq_statefulset(CLUSTER)), "the cookie is never in the StatefulSet"
    assert len(generate_cookie()) >= 32 and generate_cookie() != generate_cookie()


def test_a_cluster_boots_in_parallel_on_persistent_volumes():
    spec = rabbitmq_statefulset(BrokerManifestSpec(replicas=3, data_size="5Gi", storage_class="fast"))["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "rabbitmq-data"
    assert (claim["spec"]["resources"]["requests"]["storage"], claim["spec"]["storageClassName"]) == ("5Gi", "fast")
    assert "rabbitmq-data" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}


def test_one_replica_stays_the_seeds_single_node():
    sts = rabbitmq_statefulset(SPEC)["spec"]
    assert "volumeClaimTemplates" not in sts and "initContainers" not in sts["template"]["spec"]
    assert SPEC.node_hosts() == ["rabbitmq-service.team-a.svc"]


@pytest.mark.parametrize("replicas", [0, 2, 4, -1, True, "3"])
def test_a_cluster_size_without_a_majority_to_spare_is_refused(replicas):
    with pytest.raises(ConfigurationError, match="odd cluster size"):
        BrokerManifestSpec(replicas=replicas)


def test_a_cluster_statefulset_differs_from_a_single_node_one():
    assert differences(rabbitmq_statefulset(SPEC), rabbitmq_statefulset(CLUSTER)) == [
        "replicas 1 (wanted 3)", "serviceName 'rabbitmq-service' (wanted 'rabbitmq-nodes')"]


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_broker_meets_the_restricted_pod_security_standard(replicas):
    from workqueue_provider.kube.broker_manifests import BrokerManifestSpec, rabbitmq_statefulset

    pod = rabbitmq_statefulset(BrokerManifestSpec(replicas=replicas))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999, "fsGroup": 999,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    for container in pod["containers"] + pod.get("initContainers", []):
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
