"""The part of an Airflow task context the provider's operators read, for calling ``execute()``
directly (tests and benchmarks)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def task_context(dag_id: str = "dag", task_id: str = "task", run_id: str = "manual__1", try_number: int = 1) -> Any:
    """``{"ti", "run_id", "task_instance"}`` for one try of one task (typed ``Any``: it stands in for
    Airflow's ``Context``). Benchmarks pass the ids of a real scheduled run, since the fill's id travels
    in every message and a toy id would flatter the figures."""
    ti = SimpleNamespace(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=-1, try_number=try_number)
    return {"ti": ti, "run_id": run_id, "task_instance": ti}
