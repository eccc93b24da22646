"""Asset events that carry the item account: what the task that saw the Job complete tells the DAGs
scheduled on its outlets.

For each :class:`~airflow.sdk.Asset` in the task's ``outlets``, the event's ``extra`` is::

    {"job_name": ..., "namespace": ..., "queue_name": ...,
     "account": {"filled": 8, "processed": 8, "dead_lettered": 0, "left": 0, "duplicated": 0, "lost": 0}}

``account`` is None when the workers keep no receipts (plain ``amqp-consume``, or verification off).
A downstream DAG reads it from ``triggering_asset_events``. Asset aliases get no event from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Asset

ACCOUNT_KEYS = ("filled", "processed", "dead_lettered", "left", "duplicated", "lost")


def account_extra(summary: Mapping[str, Any], queue_name: str | None) -> dict[str, Any]:
    """The event's extra for a run's summary (see ``completion.conclude``)."""
    account = summary.get("account")
    return {
        "job_name": summary["job_name"],
        "namespace": summary["namespace"],
        "queue_name": queue_name,
        "account": {key: account.get(key) for key in ACCOUNT_KEYS} if account else None,
    }


def emit_account_events(context: Mapping[str, Any], outlets: Iterable[Any], summary: Mapping[str, Any],
                        queue_name: str | None) -> None:
    """Put the account on the event of every Asset in ``outlets`` (Airflow emits the events when the task succeeds)."""
    assets = [outlet for outlet in outlets or () if isinstance(outlet, Asset)]
    if not assets:
        return
    extra = account_extra(summary, queue_name)
    for asset in assets:
        context["outlet_events"][asset].extra.update(extra)
