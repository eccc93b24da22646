import json
from importlib.metadata import entry_points
from pathlib import Path

import jsonschema

import workqueue_provider


def test_entry_point_points_at_get_provider_info():
    found = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("workqueue_provider")]
    assert [ep.value for ep in found] == ["workqueue_provider:get_provider_info"]
    assert found[0].load()() == workqueue_provider.get_provider_info()


def test_provider_info_matches_airflow_schema():
    import airflow

    schema_path = Path(airflow.__file__).parent / "provider_info.schema.json"
    info = workqueue_provider.get_provider_info()
    jsonschema.validate(info, json.loads(schema_path.read_text()))
    assert info["package-name"] == "airflow-provider-workqueue"
    assert info["versions"] == [workqueue_provider.__version__]


def test_every_declared_class_imports():
    from importlib import import_module

    def import_string(path):
        module, _, name = path.rpartition(".")
        return getattr(import_module(module), name)

    info = workqueue_provider.get_provider_info()
    for connection in info["connection-types"]:
        hook = import_string(connection["hook-class-name"])
        assert hook.conn_type == connection["connection-type"]
        form = hook.get_ui_field_behaviour()
        assert form["relabeling"]["schema"] == "Virtual host"
    for operators in info["operators"]:
        for module in operators["python-modules"]:
            __import__(module)


def test_provider_info_has_airflow_3_metadata_and_no_deprecated_keys():
    info = workqueue_provider.get_provider_info()
    assert "hook-class-names" not in info
    [integration] = info["integrations"]
    assert integration["integration-name"] == "Work queue" and integration["external-doc-url"].startswith("https://")
    assert integration["tags"]
    names = {integration["integration-name"]}
    for key in ("hooks", "operators", "sensors", "triggers"):
        assert {entry["integration-name"] for entry in info[key]} <= names, key
    assert info["hooks"][0]["python-modules"] == ["workqueue_provider.hooks.amqp"]
    assert "workqueue_provider.triggers.amqp_message" in info["triggers"][0]["python-modules"]
    assert info["queues"] == ["workqueue_provider.messaging.AmqpMessageQueueProvider"]
    [uris] = info["asset-uris"]
    assert uris["schemes"] == ["amqp", "amqps"]


def test_every_declared_queue_provider_trigger_and_asset_function_imports():
    from airflow.providers.common.messaging.providers.base_provider import BaseMessageQueueProvider
    from airflow.triggers.base import BaseEventTrigger

    def import_string(path):
        module, _, name = path.rpartition(".")
        return getattr(__import__(module, fromlist=[name]), name)

    info = workqueue_provider.get_provider_info()
    for path in info["queues"]:
        provider = import_string(path)()
        assert isinstance(provider, BaseMessageQueueProvider)
        assert issubclass(provider.trigger_class(), BaseEventTrigger)
    for uris in info["asset-uris"]:
        for key in ("handler", "factory", "to_openlineage_converter"):
            assert callable(import_string(uris[key]))
    for triggers in info["triggers"]:
        for module in triggers["python-modules"]:
            __import__(module)
    for hooks in info["hooks"]:
        for module in hooks["python-modules"]:
            __import__(module)


def test_airflow_discovers_the_amqp_queue_provider_and_asset_scheme():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    manager.initialize_providers_queues()
    assert "workqueue_provider.messaging.AmqpMessageQueueProvider" in manager.queue_class_names
    manager.initialize_providers_asset_uri_resources()
    assert {"amqp", "amqps"} <= set(manager.asset_uri_handlers)


def test_the_provider_describes_itself_as_the_package_does():
    import tomllib
    from pathlib import Path

    from workqueue_provider import DESCRIPTION, get_provider_info

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert get_provider_info()["description"] == DESCRIPTION == pyproject["project"]["description"]
