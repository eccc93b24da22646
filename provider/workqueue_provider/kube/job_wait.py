"""What one wait for a Job knows, and how it ends: shared by the trigger, the sensor and the in-worker wait.

:class:`JobProgress` follows the Job across observations (its verdict, the progress line, since when
some active pods aren't ready, since when it has no pod at all) and holds the rules for when the
Job's pods or events are worth an API request: a healthy Job costs none. From what those requests
return it writes a notice for the task log at once (pods waiting on an image, unschedulable, in a
crash loop; pod creations refused) and ends the wait once that has lasted past its grace period.
:class:`WaitEvent` is how every wait ends: the trigger sends it as the TriggerEvent's payload, the
in-worker wait returns it, and ``completion.finish`` turns it into the task's result or error.
Pure: nothing here talks to a cluster.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from workqueue_provider.kube.job_status import (
    JobAssessment,
    JobPhase,
    assess,
    refused_creations,
    stuck_containers,
    waiting_pods,
)

NOTICE_SECONDS = 5.0  # a Job with pods not ready (or with no pod) this long gets its pods (or events) read
CHECK_EVERY_SECONDS = 10.0  # and read again at most this often
REFUSED_GRACE_SECONDS = 20.0  # refused pod creations for this long end the wait (quota or webhook hiccups pass)


class WaitStatus(enum.StrEnum):
    """How a wait ended. ``succeeded``/``failed`` carry the Job as seen when it finished."""

    SUCCEEDED = JobPhase.SUCCEEDED.value
    FAILED = JobPhase.FAILED.value
    STUCK = "stuck"  # pods wait on an image that can't be pulled (or a config that can't be created)
    REFUSED = "refused"  # the API server refuses the Job controller's pod creations
    TIMEOUT = "timeout"
    ERROR = "error"  # the Job vanished, or the API refused the watch


@dataclass(frozen=True)
class WaitEvent:
    """The end of a wait, as a JSON-safe dict in a TriggerEvent (:meth:`as_dict`/:meth:`from_dict`)."""

    status: WaitStatus
    job_name: str
    namespace: str
    message: str | None = None
    job: dict[str, Any] | None = None  # succeeded/failed: the Job as seen (a short TTL may delete it before a re-read)
    reasons: list[str] = field(default_factory=list)  # stuck/refused: one line per pod or refusal, in Kubernetes' words
    grace_seconds: float | None = None  # stuck/refused: how long it was given

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WaitEvent:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        reasons = data.get("reasons") or data.get("stuck") or []  # "stuck": events of a trigger before 0.2
        return cls(**{**known, "status": WaitStatus(data["status"]), "reasons": list(reasons)})

    @classmethod
    def finished(cls, job: dict[str, Any], verdict: JobAssessment) -> WaitEvent:
        metadata = job["metadata"]
        return cls(WaitStatus(verdict.phase.value), metadata["name"], metadata["namespace"], job=job)


class JobProgress:
    """One wait's view of a Job across observations.

    :param grace_seconds: how long a pod may wait on an image before the wait ends as ``stuck``
        (None: pods are never read).
    :param list_pods_early: read pods as soon as some active pods aren't ready (the sensor, whose
        state may not survive between pokes), rather than once that has lasted :data:`NOTICE_SECONDS`.
    """

    def __init__(self, name: str, namespace: str, *, grace_seconds: float | None, list_pods_early: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.namespace = name, namespace
        self.grace_seconds = grace_seconds
        self.list_pods_early = list_pods_early
        self.clock = clock
        self.verdict: JobAssessment | None = None
        self.last_line: str | None = None
        self.uid: str | None = None
        self._unready_since: float | None = None  # some active pods not ready
        self._idle_since: float | None = None  # running, and no pod at all
        self._last_read = {"pods": float("-inf"), "events": float("-inf")}
        self._waiting_since: dict[str, float] = {}  # container -> first seen waiting (see stuck_containers)
        self._refused_since: float | None = None
        self._notice: str | None = None

    def observe(self, job: dict[str, Any]) -> bool:
        """Take in the Job as just read or watched; True when the progress line changed (log it)."""
        status = job.get("status") or {}
        self.uid = (job.get("metadata") or {}).get("uid") or self.uid
        self.verdict = assess(job)
        now = self.clock()
        unready = int(status.get("active") or 0) > int(status.get("ready") or 0)
        idle = not self.verdict.done and not self.verdict.active and not job.get("spec", {}).get("suspend")
        self._unready_since = (self._unready_since if self._unready_since is not None else now) if unready else None
        self._idle_since = (self._idle_since if self._idle_since is not None else now) if idle else None
        if not idle:
            self._refused_since = None
        line = self.verdict.progress()
        changed, self.last_line = line != self.last_line, line
        return changed

    def ending(self, job: dict[str, Any]) -> WaitEvent | None:
        """The wait's end if the Job just observed has finished, else None."""
        return WaitEvent.finished(job, self.verdict) if self.verdict is not None and self.verdict.done else None

    def pods_worth_listing(self) -> bool:
        """Some active pods have not been ready for :data:`NOTICE_SECONDS` (at once with
        ``list_pods_early``), and pods weren't read in the last :data:`CHECK_EVERY_SECONDS`."""
        if self.grace_seconds is None:
            return False
        return self._due("pods", self._unready_since, 0.0 if self.list_pods_early else NOTICE_SECONDS)

    def events_worth_listing(self) -> bool:
        """The running Job has had no pod for :data:`NOTICE_SECONDS`: are its pod creations refused?"""
        return self._due("events", self._idle_since, NOTICE_SECONDS)

    def _due(self, what: str, since: float | None, after: float) -> bool:
        now = self.clock()
        if since is None or now - since < after or now - self._last_read[what] < CHECK_EVERY_SECONDS:
            return False
        self._last_read[what] = now
        return True

    def look_at_pods(self, pods: list[dict[str, Any]], *, now: float | None = None) -> tuple[str | None, WaitEvent | None]:
        """A notice for the log (None: nothing new) and the ``stuck`` end once a container has waited on
        its image past the grace period."""
        assert self.grace_seconds is not None
        notice = self._new_notice("pods waiting: " + "; ".join(waiting) if (waiting := waiting_pods(pods)) else None)
        stuck = stuck_containers(pods, now=time.time() if now is None else now, grace_seconds=self.grace_seconds,
                                 first_seen=self._waiting_since)
        if not stuck:
            return notice, None
        return notice, WaitEvent(WaitStatus.STUCK, self.name, self.namespace, reasons=stuck,
                                 message=f"Job {self.namespace}/{self.name} can't start its pods.",
                                 grace_seconds=self.grace_seconds)

    def look_at_events(self, events: list[dict[str, Any]]) -> tuple[str | None, WaitEvent | None]:
        """A notice for the log and, once refusals have lasted :data:`REFUSED_GRACE_SECONDS`, the
        ``refused`` end. ``events``: the Job's events (only its FailedCreate ones count)."""
        refused = refused_creations(events)
        if not refused:
            self._refused_since = None
            return None, None
        now = self.clock()
        self._refused_since = self._refused_since if self._refused_since is not None else now
        notice = self._new_notice("pod creation refused: " + refused[0])
        if now - self._refused_since < REFUSED_GRACE_SECONDS:
            return notice, None
        return notice, WaitEvent(WaitStatus.REFUSED, self.name, self.namespace, reasons=refused,
                                 message=f"Job {self.namespace}/{self.name} can't create its pods.",
                                 grace_seconds=REFUSED_GRACE_SECONDS)

    def _new_notice(self, notice: str | None) -> str | None:
        """``notice`` if it differs from the last one given (so the log says each thing once)."""
        if notice is None or notice == self._notice:
            return None
        self._notice = notice
        return notice
