"""How a wait for a Job ends for the task: one place that turns a :class:`WaitEvent` into the run's
summary or an error.

Used by QueueJobOperator and JobCompleteSensor, whether they waited in the triggerer or in the
worker. A Complete Job is then checked against its queue (:mod:`workqueue_provider.verification`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from workqueue_provider.exceptions import ConfigurationError, JobError, WorkQueueError
from workqueue_provider.hooks.kubernetes import KubernetesApi
from workqueue_provider.kube.job_status import JobAssessment, JobPhase, assess, condition, parse_time
from workqueue_provider.kube.job_wait import WaitEvent, WaitStatus
from workqueue_provider.verification import Log, Verification, verify_items


def check_seconds(value: Any, name: str) -> None:
    """Waiting knobs: a positive number of seconds (``poll_interval=0`` would poll in a tight loop)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name}={value!r} must be a positive number of seconds.")


#: waits that end with the Job still there and never finishing by itself
NEVER_ENDING = frozenset({WaitStatus.STUCK, WaitStatus.REFUSED, WaitStatus.TIMEOUT})


def finish(event: WaitEvent, api: KubernetesApi, verification: Verification, log: Log, *,
           delete_when: frozenset[WaitStatus] = frozenset()) -> dict[str, Any]:
    """The summary of a Job that completed and whose items check out, else the error saying why not.
    ``delete_when``: the endings after which the Job is deleted (with its pods and broker Secret), e.g.
    a Job whose pods can't start, which left alone would never end."""
    deleted = event.status in delete_when and _delete(api, event.job_name, event.namespace, log)
    if event.status in (WaitStatus.TIMEOUT, WaitStatus.ERROR):
        message = event.message or f"Waiting for Job {event.namespace}/{event.job_name} failed."
        raise JobError(message + (" The Job was deleted." if deleted else ""))
    if event.status in (WaitStatus.STUCK, WaitStatus.REFUSED):
        raise unstartable_job_error(event, deleted=deleted)
    job = event.job or api.get_job(event.job_name, event.namespace)
    if job is None:
        raise JobError(f"Job {event.namespace}/{event.job_name} vanished before its result could be read.")
    return conclude(job, api, verification, log)


def conclude(job: dict[str, Any], api: KubernetesApi, verification: Verification, log: Log) -> dict[str, Any]:
    """Return the run's summary for a Complete Job, or raise :class:`JobError` saying why it failed."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    verdict = assess(job)
    if verdict.phase is JobPhase.RUNNING:
        raise JobError(f"Job {namespace}/{name} has not finished ({verdict.progress()}).")
    if verdict.phase is JobPhase.FAILED:
        details = failed_pod_details(api, name, namespace)
        raise JobError(
            f"Job {namespace}/{name} failed: {verdict.reason}: {verdict.message} ({verdict.progress()})."
            + ("".join(f"\n  - {line}" for line in details) if details else "")
        )
    summary = _summary(job, verdict)
    log.info("Job %s/%s is Complete: %s, in %s s (noticed %s s after the Complete condition).", namespace, name,
             verdict.progress(), summary["duration_seconds"], summary["noticed_after_seconds"])
    summary.update(verify_items(name, verification, log))
    return summary


def unstartable_job_error(event: WaitEvent, *, deleted: bool = False) -> JobError:
    """The error for a Job whose pods can't start (``stuck``) or can't even be created (``refused``),
    quoting Kubernetes and naming the fix. ``deleted``: the Job was deleted (the message says so)."""
    name, namespace, grace = event.job_name, event.namespace, event.grace_seconds or 0
    if event.status is WaitStatus.REFUSED:
        head = f"Job {namespace}/{name} can't create its pods (refused for more than {grace:g} s):"
        fix = refusal_fix(" ".join(event.reasons))
    else:
        head = f"Job {namespace}/{name} can't start its pods (waiting more than {grace:g} s):"
        fix = ("Check the image name and tag, that the registry is reachable, image_pull_secrets, and the "
               "Secrets/ConfigMaps the pod uses.")
    return JobError(
        head + "".join(f"\n  - {line}" for line in event.reasons[:3]) + f"\n{fix} "
        + ("The Job was deleted." if deleted else f"Delete the Job (kubectl -n {namespace} delete job {name}).")
    )


def refusal_fix(reasons: str) -> str:
    """What to do about refused pod creations, from the API server's words."""
    if "PodSecurity" in reasons:
        return ("The namespace enforces a Pod Security Standard the pods don't meet: keep the provider's default "
                "(restricted) security context, or make the one in pod_template meet the standard.")
    if "exceeded quota" in reasons:
        return ("The namespace's ResourceQuota has no room for the pods: lower container_resources or parallelism, "
                "or raise the quota.")
    if "serviceaccount" in reasons.lower() and "not found" in reasons:
        return "The pods' ServiceAccount doesn't exist: create it, or set service_account_name to one that does."
    if "admission webhook" in reasons:
        return "An admission webhook denied the pods: its message above says why."
    if "LimitRange" in reasons or "per Container" in reasons:
        return "A LimitRange refuses the pods' requests or limits: adjust container_resources."
    return "Fix what the API server says above."


def failed_pod_details(api: KubernetesApi, name: str, namespace: str, *, limit: int = 3) -> list[str]:
    """One line per failed pod: exit code, restarts, and the tail of its log."""
    details = []
    for pod in api.job_pods(name, namespace):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or \
                (status.get("lastState") or {}).get("terminated")
            if not terminated or terminated.get("exitCode") == 0:
                continue
            pod_name = pod["metadata"]["name"]
            tail = api.pod_log_tail(pod_name, namespace)
            details.append(
                f"pod {pod_name} exited {terminated.get('exitCode')} ({terminated.get('reason', 'Error')}, "
                f"{status.get('restartCount', 0)} restarts)" + (f"; last output: {tail[-500:]!r}" if tail else "")
            )
            break
        if len(details) >= limit:
            break
    return details


def _delete(api: KubernetesApi, name: str, namespace: str, log: Log) -> bool:
    """Delete the Job; a failure is logged (the error then tells the user to delete it)."""
    try:
        api.delete_job(name, namespace)  # False: already gone, which is as good
        return True
    except WorkQueueError as e:
        log.warning("Could not delete Job %s/%s: %s", namespace, name, e)
        return False


def _summary(job: dict[str, Any], verdict: JobAssessment) -> dict[str, Any]:
    status = job.get("status") or {}
    started, finished = status.get("startTime"), status.get("completionTime")
    duration = None
    if started and finished:
        duration = (parse_time(finished) - parse_time(started)).total_seconds()
    complete = condition(job, "Complete")
    noticed_after = None
    if complete and complete.get("lastTransitionTime"):  # seconds resolution, as the API keeps it
        noticed_after = round((datetime.now(UTC) - parse_time(complete["lastTransitionTime"])).total_seconds(), 1)
    return {
        "job_name": job["metadata"]["name"],
        "namespace": job["metadata"]["namespace"],
        "succeeded": verdict.succeeded,
        "failed": verdict.failed,
        "completions": verdict.completions,
        "duration_seconds": duration,
        "noticed_after_seconds": noticed_after,
    }
