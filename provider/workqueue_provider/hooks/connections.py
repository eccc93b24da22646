"""Why an Airflow connection can't be found, said clearly.

Airflow answers both "no such connection" and "``AIRFLOW_CONN_<ID>`` is set but malformed" with
``AirflowNotFoundException: The conn_id `x` isn't defined`` (the parse error is only logged at
debug level). :func:`connection_error` tells the two apart and names the fix; the message never
carries the URI's password.
"""

from __future__ import annotations

import json
import os
import re

from workqueue_provider.exceptions import ConfigurationError

_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")


def env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def malformed_error(conn_id: str, *, kind: str, example: str) -> ConfigurationError | None:
    """The error for an ``AIRFLOW_CONN_<ID>`` that is set but can't be parsed, else None. (The cncf
    Kubernetes hook falls back to the default kubeconfig instead of failing: check before using it.)"""
    name = env_var(conn_id)
    value = os.environ.get(name)
    problem = _parse_problem(value) if value is not None else None
    if not problem:
        return None
    return ConfigurationError(
        f"The {kind} connection {conn_id!r} is malformed: {name} can't be parsed ({problem}). "
        f"Expected a URI such as {example!r} or a JSON object."
    )


def connection_error(conn_id: str, *, kind: str, example: str) -> ConfigurationError:
    """The error for a connection Airflow says isn't defined (raise it ``from`` Airflow's)."""
    malformed = malformed_error(conn_id, kind=kind, example=example)
    if malformed is not None:
        return malformed
    name = env_var(conn_id)
    return ConfigurationError(
        f"The {kind} connection {conn_id!r} isn't defined: create it (Admin > Connections, or "
        f"`airflow connections add {conn_id}`), set {name} (e.g. {example!r}), or pass another conn id."
    )


def _parse_problem(value: str) -> str | None:
    """What is wrong with a connection's URI/JSON, password removed; None if Airflow can read it."""
    from airflow.sdk.definitions.connection import Connection

    try:
        if value.lstrip().startswith("{"):
            Connection(conn_id="probe", **json.loads(value))
        else:
            Connection.from_uri(value, conn_id="probe")
    except Exception as e:  # ValueError (port, IPv6), JSONDecodeError, TypeError (unknown JSON keys)
        return _PASSWORD.sub(r"\1***@", f"{type(e).__name__}: {e}")[:200]
    return None
