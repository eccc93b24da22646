"""The one function that decides whether a Job is done, failed, or still running.

The sensor's ``poke`` and the trigger's watch loop both call :func:`assess`, so they can't drift.
It reads the Job as the API serves it (a camelCase dict): conditions are looked up by type and
count only with ``status == "True"``. Since Kubernetes 1.31 a Job first gets ``SuccessCriteriaMet``
/ ``FailureTarget`` and only gets ``Complete`` / ``Failed`` once all its pods have terminated.
``FailureTarget`` already decides failure; success waits for ``Complete``, because the queue is
only checked once no pod can still take an item.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class JobPhase(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobAssessment:
    phase: JobPhase
    succeeded: int
    failed: int
    active: int
    completions: int | None
    reason: str | None = None
    message: str | None = None
    finishing: bool = False  # SuccessCriteriaMet seen: Complete follows once every pod has terminated

    @property
    def done(self) -> bool:
        return self.phase is not JobPhase.RUNNING

    def progress(self) -> str:
        """``succeeded 40/100, active 10, failed 1`` (``40/?`` without completions)."""
        target = "?" if self.completions is None else str(self.completions)
        return f"succeeded {self.succeeded}/{target}, active {self.active}, failed {self.failed}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        return data


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The Job condition of this type if its status is "True", else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def assess(job: dict[str, Any]) -> JobAssessment:
    """Done, failed or running, with counts, from a Job dict as the API returns it."""
    status = job.get("status") or {}
    counts = dict(
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        active=int(status.get("active") or 0),
        completions=(job.get("spec") or {}).get("completions"),
    )
    failed = condition(job, "Failed") or condition(job, "FailureTarget")  # FailureTarget: no way back
    if failed:
        return JobAssessment(JobPhase.FAILED, **counts, reason=failed.get("reason"), message=failed.get("message"))
    complete = condition(job, "Complete")
    if complete:
        return JobAssessment(JobPhase.SUCCEEDED, **counts, reason=complete.get("reason"), message=complete.get("message"))
    finishing = condition(job, "SuccessCriteriaMet")
    return JobAssessment(
        JobPhase.RUNNING, **counts, finishing=finishing is not None,
        reason=finishing.get("reason") if finishing else None,
        message=finishing.get("message") if finishing else None,
    )
