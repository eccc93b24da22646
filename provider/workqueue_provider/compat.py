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

__all__ = ["AirflowNotFoundException", "AirflowSkipException", "TaskDeferred", "mask_secret"]
