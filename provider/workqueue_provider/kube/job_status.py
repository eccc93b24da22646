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
from datetime import datetime
from typing import Any


class JobPhase(enum.StrEnum):
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


def parse_time(value: Any) -> datetime:
    """A Kubernetes timestamp (``2026-12-01T03:04:05Z``, or a datetime the sync client already parsed)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The Job condition of this type if its status is "True", else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def assess(job: dict[str, Any]) -> JobAssessment:
    """Done, failed or running, with counts, from a Job dict as the API returns it."""
    status = job.get("status") or {}
    failed = condition(job, "Failed") or condition(job, "FailureTarget")  # FailureTarget: no way back
    complete = condition(job, "Complete")
    finishing = condition(job, "SuccessCriteriaMet")
    phase, decisive = (
        (JobPhase.FAILED, failed) if failed
        else (JobPhase.SUCCEEDED, complete) if complete
        else (JobPhase.RUNNING, finishing)
    )
    return JobAssessment(
        phase,
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        active=int(status.get("active") or 0),
        completions=(job.get("spec") or {}).get("completions"),
        reason=decisive.get("reason") if decisive else None,
        message=decisive.get("message") if decisive else None,
        finishing=phase is JobPhase.RUNNING and finishing is not None,
    )


JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on every pod it creates


def pods_of(job_name: str) -> str:
    """Label selector for the pods of Job ``job_name``."""
    return f"{JOB_NAME_LABEL}={job_name}"


# Waiting reasons a pod doesn't leave on its own: the Job would wait forever (no pod fails, none runs).
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError")


def stuck_containers(pods: list[dict[str, Any]], *, now: float, grace_seconds: float,
                     first_seen: dict[str, float] | None = None) -> list[str]:
    """One line per container that has waited longer than ``grace_seconds`` for a reason in
    :data:`STUCK_REASONS`, naming the pod, the image and the kubelet's message.

    How long it has waited: since the pod was created if the container never ran (restartCount 0, no
    earlier termination); otherwise since it was first seen waiting, in ``first_seen`` (state the caller
    keeps across observations, keyed by pod and container), so a pod that ran for hours and hits one
    transient ErrImagePull on a restart is not taken for stuck. Without ``first_seen`` such a container
    counts from now.
    """
    lines = []
    waiting_now = set()
    for pod in pods:
        metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
        created = metadata.get("creationTimestamp")
        if not created:
            continue
        created_at = parse_time(created)
        for container in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in STUCK_REASONS:
                continue
            key = f"{metadata.get('uid') or metadata.get('name')}/{container.get('name')}"
            waiting_now.add(key)
            ran_before = int(container.get("restartCount") or 0) > 0 or bool((container.get("lastState") or {}).get("terminated"))
            since = (first_seen.setdefault(key, now) if first_seen is not None else now) if ran_before \
                else created_at.timestamp()
            if now - since < grace_seconds:
                continue
            message = (waiting.get("message") or "").strip()
            lines.append(f"pod {metadata.get('name')} container {container.get('name')!r} image "
                         f"{container.get('image')!r}: {waiting['reason']}" + (f" ({message[:300]})" if message else ""))
    if first_seen is not None:
        for key in set(first_seen) - waiting_now:  # waiting ended: a later wait counts afresh
            del first_seen[key]
    return lines


def waiting_pods(pods: list[dict[str, Any]], *, limit: int = 3) -> list[str]:
    """One line per pod that isn't running yet or keeps restarting, saying why: an unschedulable pod
    (the scheduler's message), a container waiting (ErrImagePull, CrashLoopBackOff, ...: the kubelet's
    reason). For the progress line, long before any grace period ends."""
    lines = []
    for pod in pods:
        metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
        if metadata.get("deletionTimestamp"):
            continue
        unscheduled = next((c for c in status.get("conditions") or []
                            if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
        if unscheduled:
            lines.append(f"pod {metadata.get('name')} {unscheduled.get('reason') or 'Pending'}"
                         f" ({(unscheduled.get('message') or '').strip()[:200]})")
            continue
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
                lines.append(f"pod {metadata.get('name')} {waiting['reason']} (image {container.get('image')!r})")
                break
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])


#: Event reasons with which the Job controller says it could not create a pod
REFUSED_CREATE_REASON = "FailedCreate"


def failed_create_selector(job_name: str, uid: str | None = None) -> str:
    """Field selector for a Job's FailedCreate events (by uid too when known: a Job of the same name
    deleted earlier has its own)."""
    selector = f"involvedObject.kind=Job,involvedObject.name={job_name},reason={REFUSED_CREATE_REASON}"
    return f"{selector},involvedObject.uid={uid}" if uid else selector


def refused_creations(events: list[dict[str, Any]]) -> list[str]:
    """The distinct messages of a Job's ``FailedCreate`` events, newest first: the API server's own
    words (a PodSecurity violation, an exceeded quota, a missing ServiceAccount, a webhook's denial)."""
    newest = sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""), reverse=True)
    messages: list[str] = []
    for event in newest:
        message = (event.get("message") or "").strip()
        if event.get("reason") == REFUSED_CREATE_REASON and message and message not in messages:
            messages.append(message[:500])
    return messages
