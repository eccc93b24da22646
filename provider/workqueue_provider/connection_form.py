"""The AMQP connection form, declared once: provider info (Airflow >= 3.2 declarative forms) and the
hook's classic ``get_connection_form_widgets`` / ``get_ui_field_behaviour`` both read it."""

from __future__ import annotations

from typing import Any

# extra name -> (label, JSON type, default)
EXTRA_FIELDS: dict[str, tuple[str, str, Any]] = {
    "ssl": ("Use TLS (amqps)", "boolean", False),
    "ca_certs": ("TLS CA certificate file", "string", None),
    "certfile": ("TLS client certificate file", "string", None),
    "keyfile": ("TLS client key file", "string", None),
    "verify": ("Verify the server certificate", "boolean", True),
    "server_hostname": ("TLS server name (SNI and hostname check)", "string", None),
    "heartbeat": ("Heartbeat (s)", "integer", 60),
    "blocked_connection_timeout": ("Blocked connection timeout (s)", "number", 60),
    "connection_attempts": ("Connection attempts", "integer", 3),
    "retry_delay": ("Retry delay (s)", "number", 1),
    "socket_timeout": ("Socket timeout (s)", "number", 10),
    "credentials_secret": ("Credentials from Kubernetes Secret (keys username, password)", "string", None),
    "credentials_namespace": ("Namespace of that Secret (default: default)", "string", None),
    "kubernetes_conn_id": ("Kubernetes connection to read it (default: kubernetes_default)", "string", None),
    "management_url": ("RabbitMQ management UI URL, for the UI's queue link (default: http://<host>:15672)",
                       "string", None),
}

UI_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["extra"],
    "relabeling": {"schema": "Virtual host", "login": "Username"},
    "placeholders": {
        "host": "rabbitmq-service.default.svc or localhost; a cluster: rabbit-0,rabbit-1,rabbit-2",
        "port": "5672 (amqp) or 5671 (amqps)",
        "schema": "/",
        "login": "guest",
        "ca_certs": "/etc/ssl/rabbitmq/ca.pem",
    },
}


def conn_fields() -> dict[str, Any]:
    """``conn-fields`` for get_provider_info()."""
    fields = {}
    for name, (label, kind, default) in EXTRA_FIELDS.items():
        schema: dict[str, Any] = {"type": [kind, "null"]}
        if default is not None:
            schema["default"] = default
        fields[name] = {"label": label, "schema": schema}
    return fields


def ui_field_behaviour() -> dict[str, Any]:
    """``ui-field-behaviour`` for get_provider_info() (dash-separated keys)."""
    return {key.replace("_", "-"): value for key, value in UI_BEHAVIOUR.items()}
