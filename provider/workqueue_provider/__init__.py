"""Airflow provider for Kubernetes work-queue batch Jobs fed by RabbitMQ."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """What Airflow's providers manager reads through the ``apache_airflow_provider`` entry point."""
    from workqueue_provider import connection_form

    return {
        "package-name": "airflow-provider-workqueue",
        "name": "Work queue (RabbitMQ + Kubernetes Jobs)",
        "description": "Fill a RabbitMQ work queue and run a Kubernetes Job that drains it, "
        "following Kubernetes' coarse-parallel work-queue pattern.",
        "versions": [__version__],
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
        "hook-class-names": ["workqueue_provider.hooks.amqp.AmqpHook"],
        "operators": [
            {
                "integration-name": "Work queue",
                "python-modules": ["workqueue_provider.operators.queue", "workqueue_provider.operators.broker",
                                   "workqueue_provider.operators.job"],
            }
        ],
        "sensors": [{"integration-name": "Work queue", "python-modules": ["workqueue_provider.sensors.job"]}],
        "triggers": [{"integration-name": "Work queue", "python-modules": ["workqueue_provider.triggers.job"]}],
        "extra-links": ["workqueue_provider.links.RabbitMQQueueLink"],
    }
