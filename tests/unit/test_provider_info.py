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
