import pytest

from workqueue_provider.kube.job_status import JobPhase, assess


def job(*conditions, succeeded=0, failed=0, active=0, completions=8):
    return {
        "spec": {"completions": completions},
        "status": {"succeeded": succeeded, "failed": failed, "active": active,
                   "conditions": [{"type": t, "status": s, "reason": f"{t}Reason", "message": f"{t} message"}
                                  for t, s in conditions]},
    }


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        pytest.param([], JobPhase.RUNNING, id="no-conditions"),
        pytest.param([("Complete", "True")], JobPhase.SUCCEEDED, id="complete"),
        pytest.param([("Complete", "False")], JobPhase.RUNNING, id="complete-false-is-not-success"),
        pytest.param([("SuccessCriteriaMet", "True")], JobPhase.RUNNING, id="success-coming"),
        pytest.param([("SuccessCriteriaMet", "True"), ("Complete", "True")], JobPhase.SUCCEEDED, id="success-then-complete"),
        pytest.param([("FailureTarget", "True")], JobPhase.FAILED, id="failure-target"),
        pytest.param([("FailureTarget", "True"), ("Failed", "True")], JobPhase.FAILED, id="failed"),
        pytest.param([("Failed", "False")], JobPhase.RUNNING, id="failed-false"),
        pytest.param([("Suspended", "True")], JobPhase.RUNNING, id="suspended"),
    ],
)
def test_conditions_are_looked_up_by_type_and_true_status(conditions, phase):
    assert assess(job(*conditions)).phase is phase


def test_failure_carries_reason_and_message():
    verdict = assess(job(("FailureTarget", "True"), ("Failed", "True")))
    assert verdict.reason == "FailedReason" and verdict.message == "Failed message"


def test_progress_line():
    assert assess(job(succeeded=40, active=10, failed=1, completions=100)).progress() == "succeeded 40/100, active 10, failed 1"
    assert assess(job(completions=None)).progress() == "succeeded 0/?, active 0, failed 0"
    assert assess({"metadata": {}}).progress() == "succeeded 0/?, active 0, failed 0"


def test_success_coming_is_flagged():
    assert assess(job(("SuccessCriteriaMet", "True"))).finishing


def waiting_pod(name, *, created, restarts=0, ran_before=False, reason="ErrImagePull"):
    container = {"name": "worker", "image": "img:1", "restartCount": restarts,
                 "state": {"waiting": {"reason": reason, "message": "pull failed"}}}
    if ran_before:
        container["lastState"] = {"terminated": {"exitCode": 1}}
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "status": {"containerStatuses": [container]}}


def test_a_container_that_never_ran_counts_its_wait_from_the_pods_creation():
    from workqueue_provider.kube.job_status import stuck_containers

    pod = waiting_pod("p", created="2026-01-01T00:00:00Z")
    start = 1767225600.0  # 2026-01-01T00:00:00Z
    assert stuck_containers([pod], now=start + 299, grace_seconds=300, first_seen={}) == []
    assert len(stuck_containers([pod], now=start + 301, grace_seconds=300, first_seen={})) == 1


def test_an_old_pod_that_ran_and_hits_one_transient_pull_error_is_not_stuck():
    """An OnFailure pod hours old whose restart meets one ErrImagePull: its wait counts from when it was
    first seen waiting, across observations, not from the pod's age."""
    from workqueue_provider.kube.job_status import stuck_containers

    start = 1767225600.0
    pod = waiting_pod("p", created="2026-01-01T00:00:00Z", restarts=1, ran_before=True)
    seen: dict[str, float] = {}
    later = start + 5 * 3600
    assert stuck_containers([pod], now=later, grace_seconds=300, first_seen=seen) == []
    assert stuck_containers([pod], now=later + 200, grace_seconds=300, first_seen=seen) == []
    running = {**pod, "status": {"containerStatuses": [{"name": "worker", "restartCount": 1, "state": {"running": {}}}]}}
    assert stuck_containers([running], now=later + 250, grace_seconds=300, first_seen=seen) == []
    assert seen == {}  # it recovered: a later wait counts afresh
    assert stuck_containers([pod], now=later + 400, grace_seconds=300, first_seen=seen) == []
    assert len(stuck_containers([pod], now=later + 701, grace_seconds=300, first_seen=seen)) == 1
