"""Airflow provider for Kubernetes work-queue batch Jobs fed by RabbitMQ."""

from __future__ import annotations

__version__ = "0.1.0"
#: the same words as pyproject.toml's description (a unit test holds them equal)
DESCRIPTION = "Airflow operators for Kubernetes work-queue batch Jobs fed by RabbitMQ"


def get_provider_info() -> dict:
    """What Airflow's providers manager reads through the ``apache_airflow_provider`` entry point."""
    from workqueue_provider import connection_form

    integration = "Work queue"
    return {
        "package-name": "airflow-provider-workqueue",
        "name": "Work queue (RabbitMQ + Kubernetes Jobs)",
        "description": DESCRIPTION,
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": integration,
                "external-doc-url": "https://kubernetes.io/docs/tasks/job/coarse-parallel-processing-work-queue/",
                "tags": ["software", "protocol"],
            }
        ],
        "hooks": [{"integration-name": integration, "python-modules": ["workqueue_provider.hooks.amqp"]}],
        "connection-types": [
            {
                "connection-type": conn_type,
                "hook-class-name": f"workqueue_provider.hooks.amqp.{hook}",
                "hook-name": name,
                "conn-fields": connection_form.conn_fields(),
                "ui-field-behaviour": connection_form.ui_field_behaviour(),
            }
            for conn_type, hook, name in (
                ("amqp", "AmqpHook", "AMQP (RabbitMQ)"),
                ("amqps", "AmqpsHook", "AMQP over TLS (RabbitMQ)"),
            )
        ],
        "operators": [
            {
                "integration-name": integration,
                "python-modules": ["workqueue_provider.operators.queue", "workqueue_provider.operators.broker",
                                   "workqueue_provider.operators.job"],
            }
        ],
        "sensors": [{"integration-name": integration, "python-modules": ["workqueue_provider.sensors.job"]}],
        "triggers": [{"integration-name": integration, "python-modules": ["workqueue_provider.triggers.job",
                                                                       "workqueue_provider.triggers.amqp_message"]}],
        "extra-links": ["workqueue_provider.links.RabbitMQQueueLink"],
        # MessageQueueTrigger(scheme="amqp", ...) for AssetWatcher; needs apache-airflow-providers-common-messaging.
        "queues": ["workqueue_provider.messaging.AmqpMessageQueueProvider"],
        "asset-uris": [
            {
                "schemes": ["amqp", "amqps"],
                "handler": "workqueue_provider.assets.sanitize_uri",
                "factory": "workqueue_provider.assets.create_asset",
                "to_openlineage_converter": "workqueue_provider.assets.convert_asset_to_openlineage",
            }
        ],
    }
