"""Names that moved between the Airflow 3 releases this provider supports (3.1 to 3.x)."""

from __future__ import annotations

try:  # Airflow >= 3.2: the Task SDK owns these exceptions
    from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException, TaskDeferred
except ImportError:  # Airflow 3.1
    from airflow.exceptions import (  # type: ignore[no-redef,attr-defined]
        AirflowNotFoundException,
        AirflowSkipException,
        TaskDeferred,
    )

try:  # Airflow >= 3.2
    from airflow.sdk.log import mask_secret
except ImportError:  # Airflow 3.1
    from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]



def airflow_3_3_plus() -> bool:
    """Airflow 3.3 calls a trigger's ``on_kill`` when the deferred task is killed; earlier releases only
    ``cleanup`` (which also runs on a triggerer restart)."""
    from airflow import __version__
    from packaging.version import Version

    return Version(__version__) >= Version("3.3.0")


__all__ = ["AirflowNotFoundException", "AirflowSkipException", "TaskDeferred", "airflow_3_3_plus", "mask_secret"]
