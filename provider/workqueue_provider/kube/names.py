"""Kubernetes object names and the labels every object the provider creates carries."""

from __future__ import annotations

import hashlib
import re

from workqueue_provider.exceptions import ConfigurationError

#: ``app.kubernetes.io/managed-by`` on every Job, Secret, Service and StatefulSet the provider creates
MANAGED_BY_VALUE = "airflow-provider-workqueue"
MANAGED_BY = {"app.kubernetes.io/managed-by": MANAGED_BY_VALUE}
MAX_NAME = 63
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NOT_IN_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")
#: labels on every Job (and its pods) saying which Airflow task of which run created it: select on them
#: with ``kubectl get jobs -l airflow.apache.org/dag-id=my_dag``
DAG_ID_LABEL, TASK_ID_LABEL, RUN_ID_LABEL = (f"airflow.apache.org/{key}" for key in ("dag-id", "task-id", "run-id"))


def label_value(text: str) -> str:
    """``text`` as a valid label value: characters a label can't hold become '-', and a value over 63
    characters keeps its first 52 and a digest of the whole (so distinct values stay distinct)."""
    value = _NOT_IN_LABEL_VALUE.sub("-", text).strip("-_.")
    if len(value) > MAX_NAME:
        value = f"{value[:52].rstrip('-_.')}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return value


def airflow_labels(dag_id: str, task_id: str, run_id: str) -> dict[str, str]:
    """The DAG, task and run a Job belongs to, as labels users can select on."""
    return {DAG_ID_LABEL: label_value(dag_id), TASK_ID_LABEL: label_value(task_id), RUN_ID_LABEL: label_value(run_id)}


def validate_name(name: object, what: str, *, max_length: int = MAX_NAME) -> str:
    """An RFC 1123 label (Jobs, namespaces, Services, StatefulSets) of at most ``max_length`` characters."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"The {what} is empty: give a lowercase RFC 1123 name such as 'job-wq-1'.")
    if len(name) > max_length:
        raise ConfigurationError(
            f"The {what} {name[:20]!r}... is {len(name)} characters; Kubernetes allows at most {max_length} "
            "(it is used in labels and pod names): shorten it."
        )
    if not _RFC1123_LABEL.match(name):
        raise ConfigurationError(
            f"The {what} {name!r} is not a valid RFC 1123 name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit."
        )
    return name


def validate_subdomain(name: object, what: str) -> str:
    """An RFC 1123 subdomain (dot-separated labels, at most 253 characters), as Secret and service account names are."""
    if not isinstance(name, str) or not name or len(name) > 253 or \
            not all(_RFC1123_LABEL.match(label) for label in name.split(".")):
        raise ConfigurationError(
            f"The {what} {name!r} is not a valid RFC 1123 subdomain: use lowercase letters, digits, '-' and '.', "
            "each dot-separated part starting and ending with a letter or digit, at most 253 characters."
        )
    return name
